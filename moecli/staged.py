"""A staged procedure (design §6.6: a new procedure is a new trainer, not a flag): a sequence of plain
training loops, each on one module of the model, then one final evaluation of the whole model.

The task lists its stages with `stages(model) -> list[Stage]` (e.g. segmentation, methods-multimodal §8.2:
each expert on its domain, the baseline on the union, then the gate on frozen experts). Every stage runs
`moecli.trainer.Trainer` unchanged: `stage.task` is a plain `Task` and `stage.module` the module it trains, so
the optimiser only sees that module (frozen parameters have `requires_grad=False`; torch optimisers skip
parameters without a gradient).

Config: the trainer keys of `conf/trainer/default.yaml` are the common settings; `stages.<kind>` overrides
them per stage kind (dicts merge one level deep, e.g. `stages.gate.optimizer.lr`). Record: metrics are logged
as `stage/<name>/<key>` at a global step (stages follow each other); each stage has `stages/<name>/` in the
run folder (its checkpoints and `module.pt` once done); the final metrics come from the task's `evaluate` on
its eval splits and "test", plus `finish`. With `resume: true` a finished stage is loaded from its `module.pt`
and skipped, and an interrupted stage resumes from its checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from moecli.errors import ConfigError
from moecli.record import RunRecord
from moecli.task import Task
from moecli.trainer import Trainer, resolve_device, seed_everything


@dataclass
class Stage:
    """One stage: `name` (metric prefix and folder), `kind` (key into the trainer's `stages` config), the
    plain task that drives it, the module it trains, and `prepare`, called right before the stage (also when a
    resumed run skips it), e.g. to freeze the modules an earlier stage trained."""

    name: str
    kind: str
    task: Task
    module: nn.Module
    prepare: Callable[[], None] | None = None


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def merge(base: dict, override: dict) -> dict:
    """`base` updated by `override`; dict values merge one level deep."""
    out = dict(base)
    for key, value in (override or {}).items():
        value = _plain(value)
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


class StageReporter:
    """The run's reporter seen from inside one stage: prefixes metric keys, offsets steps, starts nothing."""

    def __init__(self, reporter, name: str, offset: int):
        self.reporter, self.name, self.offset = reporter, name, offset

    def start(self, total: int, step: int) -> None:
        pass

    def step(self, step: int, loss: float) -> None:
        self.reporter.step(self.offset + step, loss)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.reporter.log(self.offset + step, {f"stage/{self.name}/{k}": v for k, v in metrics.items()})

    def evaluation(self, step: int, metrics: dict[str, float]) -> None:
        self.reporter.evaluation(self.offset + step, {f"{self.name}:{k}": v for k, v in metrics.items()})

    def warn(self, message: str) -> None:
        self.reporter.warn(f"[{self.name}] {message}")


class StagedTrainer:
    """`fit(task, model, record, reporter, seed) -> summary` over `task.stages(model)`."""

    def __init__(self, stages: dict | None = None, **common):
        self.common = {k: _plain(v) for k, v in common.items()}
        self.stages_cfg = {k: _plain(v) or {} for k, v in (_plain(stages) or {}).items()}
        Trainer(**self.common)  # check the common keys now, so that a typo fails before any training
        for kind, cfg in self.stages_cfg.items():
            self._trainer(kind, cfg)

    def _trainer(self, kind: str, cfg: dict) -> Trainer:
        try:
            return Trainer(**merge(self.common, cfg))
        except TypeError as err:
            raise ConfigError(f"trainer.stages.{kind}: {err}") from None

    def fit(self, task: Task, model: nn.Module, record: RunRecord, reporter, seed: int) -> dict[str, Any]:
        if not hasattr(task, "stages"):
            raise ConfigError(f"the staged trainer needs a task with stages; {type(task).__name__} has none; "
                              "choose trainer=default")
        model.to(resolve_device(self.common.get("device", "auto")))
        stages = task.stages(model)
        kinds = {s.kind for s in stages}
        for kind in self.stages_cfg:
            if kind not in kinds | {"expert", "baseline", "gate", "moe"}:
                raise ConfigError(f"trainer.stages.{kind} names no stage kind; "
                                  f"choose one of: {', '.join(sorted(kinds))}")
        trainers = [self._trainer(s.kind, self.stages_cfg.get(s.kind, {})) for s in stages]
        totals = [t._total_steps(s.task.steps_per_epoch) for s, t in zip(stages, trainers)]
        start = time.perf_counter()
        reporter.start(sum(totals), 0)
        offset, results = 0, {}
        for i, (stage, trainer) in enumerate(zip(stages, trainers)):
            result = self._run_stage(i, stage, trainer, record, reporter, seed, offset)
            results[stage.name] = result
            offset += totals[i] or result["steps"]
            if result["status"] != "completed":
                message = f"stage {stage.name}: {result['message']}"
                return self._summary(results, result["status"], message, {}, seed, start)
        final = self._final(task, model, record, reporter, offset)
        return self._summary(results, "completed", None, final, seed, start)

    def _run_stage(self, i: int, stage: Stage, trainer: Trainer, record: RunRecord, reporter, seed: int,
                   offset: int) -> dict[str, Any]:
        if stage.prepare is not None:
            stage.prepare()
        stage_record = RunRecord(Path(record.dir) / "stages" / stage.name)
        done = stage_record.dir / "module.pt"
        if trainer.resume and done.exists():
            stage.module.load_state_dict(torch.load(done, map_location="cpu", weights_only=True))
            return stage_record.read_summary() or {"status": "completed", "steps": 0}
        seed_everything(seed + i)  # each stage starts from a known RNG state, so a resumed run matches
        view = StageReporter(reporter, stage.name, offset)
        result = trainer.fit(stage.task, stage.module, stage_record, view, seed + i)
        if result["status"] == "completed":
            stage_record.write_summary(result)
            torch.save(stage.module.state_dict(), done)
        stage_record.close()
        return result

    def _final(self, task: Task, model: nn.Module, record: RunRecord, reporter,
               step: int) -> dict[str, float]:
        model.eval()
        final: dict[str, float] = {}
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for split in tuple(task.eval_splits()) + ("test",):
                final.update(task.evaluate(model, split))
        reporter.evaluation(step, final)
        final.update(task.finish(model, Path(record.dir)))
        reporter.log(step, {f"final/{k}": v for k, v in final.items()})
        wandb = getattr(reporter, "wandb", None)
        if wandb is not None:  # pictures the task wrote go to wandb as images
            for path in sorted((Path(record.dir) / "pictures").glob("*.png")):
                wandb.log_image(f"pictures/{path.stem}", path, step=step)
        return final

    @staticmethod
    def _summary(results: dict, status: str, message: str | None, final: dict, seed: int,
                 start: float) -> dict[str, Any]:
        return {
            "status": status, "message": message, "seed": seed, "wall_time_s": time.perf_counter() - start,
            "steps": sum(r.get("steps", 0) for r in results.values()),
            "epochs": sum(r.get("epochs", 0) for r in results.values()), "final": final,
            "best": {f"{name}/{k}": v for name, r in results.items() for k, v in r.get("best", {}).items()},
            "criterion": {"metric": None, "threshold": None, "step": None, "epoch": None},
            "stages": {name: {k: r.get(k) for k in ("status", "steps", "epochs", "wall_time_s", "final")}
                       for name, r in results.items()},
        }
