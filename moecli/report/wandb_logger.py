"""Weights & Biases view: the same metrics dictionary, logged lazily; any wandb failure warns and is ignored.

One wandb run per job; `group` is the sweep folder's name, `job_type` the combiner, the name the job's
overrides. Without an API key (or with WANDB_MODE=offline) the run is logged offline inside the run folder.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any


class WandbView:
    def __init__(self, run_dir: Path, config: dict, project: str = "moecli", entity: str | None = None,
                 group: str | None = None, job_type: str | None = None, name: str | None = None,
                 mode: str | None = None, tags: list[str] | None = None):
        self.run = None
        try:
            import wandb  # lazy: importing wandb costs seconds

            if mode is None:
                has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").exists()
                mode = os.environ.get("WANDB_MODE") or ("online" if has_key else "offline")
            self.run = wandb.init(project=project, entity=entity, group=group, job_type=job_type, name=name,
                                  config=config, dir=str(run_dir), mode=mode, tags=tags, reinit="finish_previous")
        except Exception as err:  # noqa: BLE001 - wandb must never stop a run
            warnings.warn(f"wandb disabled: {err}", stacklevel=2)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            self.run.log(metrics, step=step)
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"wandb log failed, disabling: {err}", stacklevel=2)
            self.run = None

    def log_image(self, key: str, path: Path, step: int | None = None) -> None:
        if self.run is None:
            return
        try:
            import wandb

            self.run.log({key: wandb.Image(str(path))}, step=step)
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"wandb image failed: {err}", stacklevel=2)

    def finish(self, summary: dict) -> None:
        if self.run is None:
            return
        try:
            for key, value in summary.get("final", {}).items():
                self.run.summary[key] = value
            self.run.summary["status"] = summary["status"]
            self.run.finish(exit_code=0 if summary["status"] == "completed" else 1)
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"wandb finish failed: {err}", stacklevel=2)
        self.run = None
