"""The abstract task (design §2): data, a model with expert slots, a loss and metrics.

A task never reads the global config: its YAML keys arrive as constructor arguments, and the build site
(`moecli.run`) passes the combiner factory and the seed. The trainer only sees this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moecli.slots import CombinerOutput, Slot

CombinerFactory = Callable[[Slot], nn.Module]


@dataclass
class StepOutput:
    """One training step's result.

    losses: named loss terms, each a scalar that the trainer sums (the task term, e.g. "nll", and the
        combiners' already-weighted auxiliary losses, e.g. "aux/out"). Names appear in NaN/Inf messages and
        as `train/loss/<name>` metrics.
    metrics: extra scalars to log for this step (floats), e.g. `train/acc`.
    num_items: examples (or tokens) in the batch, for throughput.
    """

    losses: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)
    num_items: int = 0


class Task(ABC):
    """Base of every task. Subclasses are final; their YAML is `conf/task/<name>.yaml`.

    Life cycle (called by `moecli.run` and the trainer, in this order):
      setup(seed) -> build_model(make_combiner) -> [train_batches(epoch, generator) -> training_step(model, batch)
      ... evaluate(model, split) ...] -> finish(model, run_dir).
    """

    #: metric the trainer tracks as "best" unless the trainer config names another; (key, "max"|"min")
    monitor: tuple[str, str] = ("val/loss", "min")
    #: what `StepOutput.num_items` counts; the throughput metric is `train/<items_name>_per_s`
    items_name: str = "examples"
    #: optimiser steps in one epoch (None when an epoch is not a fixed number of steps)
    steps_per_epoch: int | None = None

    @abstractmethod
    def setup(self, seed: int) -> None:
        """Load or generate the data deterministically from `seed`."""

    @abstractmethod
    def slots(self) -> list[Slot]:
        """The expert slots of the model (available after setup)."""

    @abstractmethod
    def build_model(self, make_combiner: CombinerFactory) -> nn.Module:
        """Build the model; call `make_combiner(slot)` once per slot."""

    @abstractmethod
    def train_batches(self, epoch: int, generator: torch.Generator) -> Iterator[Any]:
        """The batches of one training epoch, in an order drawn from `generator` only (resumability)."""

    @abstractmethod
    def training_step(self, model: nn.Module, batch: Any) -> StepOutput:
        """Forward one batch and return its named loss terms."""

    @abstractmethod
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """Metrics on `split` ("train", "val" or "test"), keys `<split>/<name>`, routing under `route/...`."""

    def eval_splits(self) -> tuple[str, ...]:
        """Splits evaluated at each evaluation; the final evaluation adds "test"."""
        return ("val",)

    def finish(self, model: nn.Module, run_dir: Path) -> dict[str, float]:
        """After training: extra final metrics, plots and samples written into `run_dir`."""
        return {}

    def to(self, device: torch.device) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Move any tensors the task holds (datasets) to `device`."""


def move(batch: Any, device: torch.device) -> Any:
    """Move a batch (tensor, tuple, list or dict of tensors) to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: move(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move(v, device) for v in batch)
    return batch


__all__ = ["Task", "StepOutput", "CombinerFactory", "CombinerOutput", "Slot", "move"]
