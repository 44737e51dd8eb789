"""The contract between a task and a combiner.

A task declares expert *slots*; the build site turns each slot into a combiner. Two kinds:

* distribution slot: every expert predicts a distribution over the target (categorical logits `[B, E, O]` or a
  diagonal Gaussian `[B, E, Z]` pair); products, mixtures and weighted sums all apply.
* representation slot: an MoE layer `[T, D] -> [T, D]` (transformer FFN, shared bottom); weighted sums only.

Axis legend used across moecli: B examples, T tokens, E experts, K kept experts per token, C capacity,
D model/input dim, H hidden, O outputs/classes, Z latent dim, M modalities.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

SlotKind = Literal["distribution", "representation"]
Family = Literal["categorical", "gaussian"]


@dataclass(frozen=True)
class Slot:
    """What a task asks of a combiner, with the runtime sizes (never written in YAML).

    name: used in metric keys, `route/<name>/...`.
    kind: "distribution" or "representation".
    in_dim: width of the gate's input (distribution) or the model width D (representation).
    out_dim: classes O, target size, latent size Z, or D again for a representation slot.
    family: "categorical" or "gaussian" for distribution slots.
    num_experts: fixed by the task when its experts are external (one per modality, one per domain); None lets
        the combiner's `num_experts` decide.
    expert_hidden: FFN width for representation slots (d_ff).
    external_experts: the task evaluates the experts itself and passes their outputs to the combiner.
    num_tasks: number of task heads (multi-gate combiners build one gate per task).
    labels: names of the classes / tasks / modalities for affinity tables.
    """

    name: str
    kind: SlotKind
    in_dim: int
    out_dim: int
    family: Family | None = None
    num_experts: int | None = None
    expert_hidden: int | None = None
    external_experts: bool = False
    num_tasks: int = 1
    labels: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CombinerOutput:
    """What every combiner returns for one forward pass (design §3: routing is returned data).

    output: a distribution object from `moecli.rules` (distribution slots) or a tensor `[T, D]`.
    aux_loss: scalar, already multiplied by its coefficients; the trainer adds it to the task loss.
    weights: `[B, E]` effective per-example expert weights (0 where an expert was not used), or None for a
        combiner without a gate.
    losses: unweighted auxiliary losses for logging (e.g. "balance", "z").
    stats: extra per-batch statistics, scalars or `[E]` vectors (e.g. "dropped_fraction", "dispatch").
    Multi-gate combiners (`mmoe`) on a slot with num_tasks = H > 1 return one mixture per task: output
    `[B, H, D]` and weights `[B, H, E]`; single-gate combiners return `[B, D]`, given to every head.
    """

    output: Any
    aux_loss: torch.Tensor
    weights: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
