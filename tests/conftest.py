"""Shared fixtures: compose configs through Hydra's compose API and train in-process (fast, no subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Tests use tiny models: one intra-op thread is faster for them and immune to OpenMP spin-waiting when the
# machine is busy (subprocesses inherit the setting).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def compose(overrides: list[str] | None = None):
    """The composed config (with choices) for `overrides`, exactly as `moecli train` would build it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from moecli.registry import conf_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides or []), return_hydra_config=True)
    GlobalHydra.instance().clear()
    choices = {k: v for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra") and v is not None}
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


def train_inprocess(overrides: list[str], run_dir: Path) -> dict:
    """Train one run in `run_dir` without a subprocess; returns its summary."""
    from moecli.run import train

    cfg, choices = compose(["logger=quiet", *overrides])
    return train(cfg, Path(run_dir), choices, list(overrides))


def moecli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess (as a user would) and capture its output."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "moecli.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
