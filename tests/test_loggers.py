"""wandb is a view of the same metrics: offline without a key, and never able to stop a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import train_inprocess


def test_wandb_offline_logs_config_metrics_and_routing(tmp_path):
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", HOME=str(tmp_path))  # no key, no ~/.netrc
    cmd = [sys.executable, "-m", "moecli.cli", "train", "logger=wandb", "logger.console=false",
           "trainer.max_epochs=20", f"hydra.run.dir={run_dir}"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    logs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1
    data = logs[0].read_bytes()
    for key in (b"route/out/load/e0", b"train/acc", b"competitive", b"test/acc"):
        assert key in data


def test_a_failing_wandb_warns_and_the_run_goes_on(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")

    def broken(*args, **kwargs):
        raise RuntimeError("no route to wandb")

    monkeypatch.setattr(wandb, "init", broken)
    with pytest.warns(UserWarning, match="wandb disabled: no route to wandb"):
        summary = train_inprocess(["logger=wandb", "logger.console=false", "trainer.max_epochs=10"], tmp_path)
    assert summary["status"] == "completed"
