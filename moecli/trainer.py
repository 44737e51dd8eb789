"""The one training loop (design §6.6): optimiser, schedule, clipping, evaluation cadence, stopping criterion,
checkpoint/resume and a NaN/Inf guard. It reads top to bottom; a new procedure is a new trainer, not a flag.

Cadences are in optimiser steps. A checkpoint holds the model, optimiser, scheduler, the global and data RNG
states, the position in the epoch and the trainer's own bookkeeping, so a killed run resumed from it ends with
exactly the metrics of an uninterrupted run on CPU.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from moecli.errors import ConfigError, check_choice, check_positive
from moecli.record import RunRecord
from moecli.routing.alarms import CollapseMonitor
from moecli.task import Task, move


class RunFailed(RuntimeError):
    """The run cannot go on; it stops with status "failed", the message, and its last good checkpoint."""


class NonFiniteLoss(RunFailed):
    """A loss term became NaN or Inf."""


@dataclass
class StopRule:
    """Stop (or just record) when `metric` reaches `threshold` ("max": ≥, "min": ≤). Epochs-to-criterion."""

    metric: str | None = None
    mode: str = "max"
    threshold: float = 0.0
    stop: bool = True

    def reached(self, metrics: dict[str, float]) -> bool:
        if self.metric is None or self.metric not in metrics:
            return False
        value = metrics[self.metric]
        return value >= self.threshold if self.mode == "max" else value <= self.threshold


@dataclass
class TrainState:
    """Bookkeeping that a checkpoint must carry besides the modules."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    epoch_generator_state: torch.Tensor | None = None
    best: dict[str, float] = field(default_factory=dict)
    criterion_step: int | None = None
    criterion_epoch: float | None = None
    elapsed: float = 0.0
    last_eval: dict[str, float] = field(default_factory=dict)


def build_optimizer(params, name: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """Optimiser from its YAML name: sgd, adam or adamw."""
    check_choice("trainer.optimizer.name", name, ["sgd", "adam", "adamw"])
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)


def lr_lambda(name: str, warmup_steps: int, total_steps: int):
    """Multiplier of the base learning rate: linear warm-up, then constant, cosine or linear decay to 0."""
    check_choice("trainer.scheduler.name", name, ["constant", "cosine", "linear"])

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress)) if name == "cosine" else 1.0 - progress

    return factor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    check_choice("trainer.device", name, ["auto", "cpu", "cuda"])
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is available; choose one of: auto, cpu")
    return torch.device(name)


class Trainer:
    """Plain loop: `fit(task, model, record, reporter, seed) -> summary dict`."""

    def __init__(self, max_epochs: int | None = 100, max_steps: int | None = None, eval_every: int = 10,
                 log_every: int = 10, checkpoint_every: int = 0, grad_clip: float | None = None,
                 optimizer: dict | None = None, scheduler: dict | None = None, stop: dict | None = None,
                 resume: bool = False, device: str = "auto", collapse: dict | None = None):
        if max_epochs is None and max_steps is None:
            raise ConfigError("trainer.max_epochs and trainer.max_steps are both null; set at least one")
        for key, value in [("trainer.eval_every", eval_every), ("trainer.log_every", log_every)]:
            check_positive(key, value)
        check_positive("trainer.checkpoint_every", checkpoint_every, minimum=0)
        self.max_epochs, self.max_steps = max_epochs, max_steps
        self.eval_every, self.log_every, self.checkpoint_every = eval_every, log_every, checkpoint_every
        self.grad_clip, self.resume, self.device_name = grad_clip, resume, device
        self.optimizer_cfg = dict(optimizer or {"name": "adam", "lr": 1e-3})
        self.scheduler_cfg = dict(scheduler or {"name": "constant"})
        self.stop_rule = StopRule(**(stop or {}))
        check_choice("trainer.stop.mode", self.stop_rule.mode, ["max", "min"])
        self.collapse = CollapseMonitor(**(collapse or {}))

    # ----------------------------------------------------------------------------------------------- helpers
    def _total_steps(self, steps_per_epoch: int | None) -> int:
        candidates = [s for s in [self.max_steps] if s is not None]
        if self.max_epochs is not None and steps_per_epoch:
            candidates.append(self.max_epochs * steps_per_epoch)
        return min(candidates) if candidates else 0

    def _evaluate(self, task: Task, model: nn.Module, splits) -> dict[str, float]:
        model.eval()
        metrics: dict[str, float] = {}
        # Evaluation must not move the training RNG streams, or a resumed run would diverge.
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for split in splits:
                metrics.update(task.evaluate(model, split))
        model.train()
        return metrics

    def _checkpoint(self, record: RunRecord, model, opt, sched, gen, state: TrainState) -> None:
        record.save_checkpoint({
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "torch_rng": torch.get_rng_state(), "data_rng": gen.get_state(),
            "python_rng": _python_rng(), "numpy_rng": _numpy_rng(),
            "state": {k: v for k, v in vars(state).items()},
        })

    def _restore(self, ckpt: dict[str, Any], model, opt, sched, gen) -> TrainState:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["torch_rng"])
        gen.set_state(ckpt["data_rng"])
        _set_python_rng(ckpt["python_rng"])
        _set_numpy_rng(ckpt["numpy_rng"])
        return TrainState(**ckpt["state"])

    # ---------------------------------------------------------------------------------------------- the loop
    def fit(self, task: Task, model: nn.Module, record: RunRecord, reporter, seed: int) -> dict[str, Any]:
        device = resolve_device(self.device_name)
        model.to(device)
        task.to(device)
        opt = build_optimizer(model.parameters(), **self.optimizer_cfg)
        steps_per_epoch = getattr(task, "steps_per_epoch", None)
        total = self._total_steps(steps_per_epoch)
        sched_cfg = dict(self.scheduler_cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(sched_cfg.pop("name"), sched_cfg.pop("warmup_steps", 0), total or 1))
        gen = torch.Generator().manual_seed(seed)
        state = TrainState()
        if self.resume and (ckpt := record.load_checkpoint()) is not None:
            state = self._restore(ckpt, model, opt, sched, gen)
            record.truncate_metrics(state.step)
        status, message = "completed", None
        start = time.perf_counter() - state.elapsed
        reporter.start(total, state.step)
        busy, items = 0.0, 0  # throughput counts optimiser steps only, not evaluation or checkpoints
        try:
            done = False
            while not done and (self.max_epochs is None or state.epoch < self.max_epochs):
                if state.batch_in_epoch == 0:
                    state.epoch_generator_state = gen.get_state()
                else:  # resumed inside an epoch: replay the epoch's order and skip what was done
                    gen.set_state(state.epoch_generator_state)
                for i, batch in enumerate(task.train_batches(state.epoch, gen)):
                    if i < state.batch_in_epoch:
                        continue
                    started = time.perf_counter()
                    out, loss = self._optimise(task, model, move(batch, device), opt, sched, state.step + 1)
                    busy += time.perf_counter() - started
                    state.step, state.batch_in_epoch = state.step + 1, i + 1
                    items += out.num_items
                    reporter.step(state.step, float(loss.detach()))
                    if state.step % self.log_every == 0:
                        train = {f"train/loss/{k}": float(v.detach()) for k, v in out.losses.items()}
                        train.update({"train/loss": float(loss.detach()), "train/lr": sched.get_last_lr()[0],
                                      f"train/{task.items_name}_per_s": items / max(busy, 1e-9),
                                      "train/epoch": state.epoch + (i + 1) / max(steps_per_epoch or (i + 1), 1),
                                      **out.metrics})
                        busy, items = 0.0, 0
                        reporter.log(state.step, train)
                    if state.step % self.eval_every == 0:
                        done = self._after_eval(task, model, reporter, state, steps_per_epoch)
                    if self.checkpoint_every and state.step % self.checkpoint_every == 0:
                        state.elapsed = time.perf_counter() - start
                        self._checkpoint(record, model, opt, sched, gen, state)
                    if done or (self.max_steps is not None and state.step >= self.max_steps):
                        done = True
                        break
                if not done:
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        except RunFailed as err:
            status, message = "failed", str(err)
        except KeyboardInterrupt:
            status, message = "interrupted", f"interrupted at step {state.step}"
            state.elapsed = time.perf_counter() - start
            self._checkpoint(record, model, opt, sched, gen, state)
        final: dict[str, float] = {}
        if status == "completed":
            final = self._evaluate(task, model, tuple(task.eval_splits()) + ("test",))
            reporter.evaluation(state.step, final)
            final.update(task.finish(model, record.dir))
            if state.criterion_step is not None:
                final["train/steps_to_criterion"] = float(state.criterion_step)
                if state.criterion_epoch is not None:
                    final["train/epochs_to_criterion"] = float(state.criterion_epoch)
            state.elapsed = time.perf_counter() - start
            if self.checkpoint_every:
                self._checkpoint(record, model, opt, sched, gen, state)
            reporter.log(state.step, {f"final/{k}": v for k, v in final.items()})
        return {
            "status": status, "message": message, "seed": seed,
            "wall_time_s": time.perf_counter() - start, "steps": state.step, "epochs": state.epoch,
            "final": final, "best": state.best,
            "criterion": {"metric": self.stop_rule.metric, "threshold": self.stop_rule.threshold,
                          "step": state.criterion_step, "epoch": state.criterion_epoch},
        }

    def _optimise(self, task: Task, model: nn.Module, batch, opt, sched, step: int):
        """One optimiser step on one batch; returns the task's StepOutput and the summed loss."""
        out = task.training_step(model, batch)
        loss = self._checked_sum(out.losses, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
        opt.step()
        sched.step()
        return out, loss

    def _checked_sum(self, losses: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        for name, value in losses.items():
            if not torch.isfinite(value).all():
                raise NonFiniteLoss(f"loss term '{name}' is {float(value.detach())} at step {step}")
        return sum(losses.values())

    def _after_eval(self, task: Task, model, reporter, state: TrainState, steps_per_epoch) -> bool:
        """Evaluate, update best values and the criterion; return True when the run should stop."""
        metrics = self._evaluate(task, model, task.eval_splits())
        state.last_eval = metrics
        key, mode = task.monitor
        if key in metrics:
            better = max if mode == "max" else min
            state.best[key] = better(state.best.get(key, metrics[key]), metrics[key])
        reporter.evaluation(state.step, metrics)
        reporter.log(state.step, metrics)
        if state.criterion_step is None and self.stop_rule.reached(metrics):
            state.criterion_step = state.step
            state.criterion_epoch = state.step / steps_per_epoch if steps_per_epoch else None
            reporter.log(state.step, {"train/steps_to_criterion": state.step})
            return self.stop_rule.stop
        warnings = self.collapse.check(metrics)
        for warning in warnings:
            reporter.warn(f"routing collapse at step {state.step}: {warning}")
        if warnings and self.collapse.abort:
            raise RunFailed(f"routing collapsed at step {state.step} (trainer.collapse.abort=true): {warnings[0]}")
        return False


def _python_rng() -> dict[str, Any]:
    # random.getstate() holds ints; store them as a tensor so the checkpoint stays weights_only-loadable.
    version, internal, gauss = random.getstate()
    return {"state": torch.tensor([version, *internal], dtype=torch.int64),
            "gauss": float("nan") if gauss is None else float(gauss)}


def _set_python_rng(state: dict[str, Any]) -> None:
    values = state["state"].tolist()
    gauss = None if math.isnan(state["gauss"]) else state["gauss"]
    random.setstate((values[0], tuple(values[1:]), gauss))


def _numpy_rng() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached": float(cached)}


def _set_numpy_rng(state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["pos"], state["has_gauss"], state["cached"]))
