"""The single build site (design §4): instantiate task, combiner and trainer from the composed config, train,
and write the run record. Nothing else reads the global config.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from moecli.errors import ConfigError


def combiner_factory(cfg: DictConfig, combiner_name: str, task_name: str):
    """Return `make_combiner(slot)`: checks compatibility, then builds the combiner with the slot's sizes."""
    from hydra.utils import get_class

    from moecli import registry

    params = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "_target_"}
    cls = get_class(cfg._target_)

    def make(slot):
        reason = cls.incompatibility(slot)
        if reason is not None:
            ok = registry.compatible_combiners(slot)
            raise ConfigError(f"combiner={combiner_name} cannot serve task={task_name} slot '{slot.name}' "
                              f"({reason}); compatible combiners: {', '.join(ok) or 'none'}")
        try:
            return cls(slot=slot, **params)
        except TypeError as err:  # an unknown key in the combiner's YAML or overrides
            raise ConfigError(f"combiner={combiner_name}: {err}") from None

    return make


def build(cfg: DictConfig, choices: dict[str, str]):
    """Instantiate the task (set up with the seed), its model with combiners, and the trainer."""
    from hydra.utils import instantiate

    task_name, combiner_name = choices.get("task", "?"), choices.get("combiner", "?")
    try:
        task = instantiate(cfg.task)
        trainer = instantiate(cfg.trainer)
    except Exception as err:  # Hydra wraps constructor errors; surface ours
        cause = err.__cause__ or err.__context__ or err
        if isinstance(cause, ConfigError):
            raise cause from None
        raise
    task.setup(int(cfg.seed))
    model = task.build_model(combiner_factory(cfg.combiner, combiner_name, task_name))
    return task, model, trainer


def versions() -> dict[str, str]:
    import torch

    from moecli import __version__

    return {"moecli": __version__, "torch": torch.__version__, "python": platform.python_version()}


def train(cfg: DictConfig, run_dir: Path, choices: dict[str, str], overrides: list[str],
          sweep_dir: str | None = None) -> dict[str, Any]:
    """Train one run in `run_dir`; returns the summary that was written to summary.json."""
    from moecli.record import RunRecord
    from moecli.report.console import ConsoleView
    from moecli.report.reporter import Reporter
    from moecli.trainer import seed_everything

    record = RunRecord(run_dir)
    resume = bool(cfg.trainer.get("resume", False))
    previous = record.read_summary()
    if not resume and (previous is not None or record.checkpoint_path.exists()):
        raise ConfigError(f"hydra.run.dir={run_dir} already holds a run; pass trainer.resume=true to continue it "
                          "or choose another hydra.run.dir")
    seed_everything(int(cfg.seed))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    try:
        task, model, trainer = build(cfg, choices)
    except ConfigError as err:
        record.write_summary({"status": "failed", "message": str(err), "seed": int(cfg.seed), "wall_time_s": 0.0,
                              "final": {}, "best": {}, "overrides": overrides})
        raise
    wandb = None
    if cfg.logger.get("wandb", False):
        from moecli.report.wandb_logger import WandbView

        name = ",".join(o for o in overrides if not o.startswith("hydra")) or "default"
        wandb = WandbView(run_dir, resolved, project=cfg.logger.project, entity=cfg.logger.get("entity"),
                          group=Path(sweep_dir).name if sweep_dir else None, job_type=choices.get("combiner"),
                          name=name, mode=cfg.logger.get("mode"), tags=list(cfg.logger.get("tags") or []))
    reporter = Reporter(record, {k: resolved[k] for k in ("task", "combiner", "trainer") if k in resolved},
                        ConsoleView(enabled=bool(cfg.logger.get("console", True))), wandb)
    summary = trainer.fit(task, model, record, reporter, int(cfg.seed))
    summary.update({"overrides": overrides, "choices": choices, "versions": versions(),
                    "parameters": sum(p.numel() for p in model.parameters())})
    record.write_summary(summary)
    reporter.finish(summary)
    if summary["status"] == "failed":
        print(f"error: run failed: {summary['message']}", file=sys.stderr)
    return summary
