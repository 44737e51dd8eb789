"""Hydra's application: compose `conf/` (installed as `moecli.conf`) and train one job."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from moecli.errors import ConfigError
from moecli.registry import conf_dir

EXIT = {"code": 0}


def job(cfg: DictConfig) -> None:
    """One Hydra job: train in the job's output folder. User errors print one line and fail the job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from moecli.run import train

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra") and v is not None}
    try:
        summary = train(cfg, Path(hc.runtime.output_dir), choices, list(hc.overrides.task),
                        sweep_dir=hc.sweep.dir if multirun else None)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        EXIT["code"] = 2
        return
    if summary["status"] != "completed":
        EXIT["code"] = 1


def run_hydra(argv: list[str]) -> int:
    """Run Hydra's main with `argv` as its command line; return the exit code of the worst job."""
    app = hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(job)
    sys.argv = ["moecli train", *argv]
    EXIT["code"] = 0
    app()
    return EXIT["code"]
