"""`mmoe`: multi-gate mixture of experts, one softmax gate per task over the raw input (Ma et al. 2018;
methods-classic §4.2).

    f^k(x) = Σ_{i=1..E} g^k(x)_i f_i(x),    g^k(x) = softmax(W_{gk} x)          (k = 1..H tasks)

Representation slots only (the shared bottom of a multi-task network). What it returns:

* `slot.num_tasks = H > 1`: `output` `[B, H, U]`, one mixture per task (task k's tower reads `output[:, k]`),
  and `weights` `[B, H, E]`, task k's gate row `weights[:, k]` (each row sums to 1; zeros outside the kept set
  with `top_k`).
* `slot.num_tasks = 1`: `output` `[B, U]` and `weights` `[B, E]`, like every single-gate combiner (it is then
  the one-gate OMoE).

Single-gate combiners on the same slot (`dense` = shared bottom, `omoe`, `cooperative`) return `[B, U]`, which
the task broadcasts to every tower.

Experts: with `slot.extra["expert_layers"] == 1` (Ma et al.: one ReLU layer of U units each) an expert is
`act(W_i x + b_i)` with U = `slot.out_dim` units; otherwise it is the slot's FFN `in -> expert_hidden -> out`.
`top_k`: each task's gate keeps its k largest softmax scores and renormalises them (the routing core's
`top_k_gating`, Shazeer et al. 2017 without noise; methods-routing §0, §6); null = dense softmax, the paper's
MMoE. With top_k = 1 the kept gate is constantly 1 and the gates get no task gradient (methods-routing §2.8).
`balance_coef` weights the routing core's balance loss (mean over tasks) in `aux_loss`; unweighted balance and
z losses are in `losses` and the gating statistics (averaged over tasks) in `stats`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moecli.combiners.base import Combiner, require, zero_loss
from moecli.experts import StackedExperts, activation
from moecli.routing.gating import top_k_gating
from moecli.routing.router import Router
from moecli.slots import CombinerOutput, Slot


class OneLayerExperts(nn.Module):
    """E single-layer experts `act(W_i x + b_i)`: x `[B, D]` -> `[B, E, U]` (Ma et al. 2018's experts)."""

    def __init__(self, num_experts: int, in_dim: int, units: int, act: str = "relu"):
        super().__init__()
        self.linear = StackedExperts(num_experts, in_dim, units, hidden=0)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(x))


def bottom_experts(slot: Slot, num_experts: int, act: str) -> nn.Module:
    """The expert stack of a representation slot: one-layer experts when the task asks for them
    (`slot.extra["expert_layers"] == 1`), else the slot's FFN `in -> expert_hidden -> out`."""
    if slot.extra.get("expert_layers") == 1:
        return OneLayerExperts(num_experts, slot.in_dim, slot.out_dim, act)
    require(bool(slot.expert_hidden), f"slot '{slot.name}' has no expert_hidden (d_ff) for its FFN experts")
    return StackedExperts(num_experts, slot.in_dim, slot.out_dim, slot.expert_hidden, act)


@dataclass(frozen=True)
class TaskGates:
    """Gate weights `[B, H, E]` (rows sum to 1); unweighted losses and statistics averaged over tasks."""

    weights: torch.Tensor
    losses: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor]


def task_gates(logits: torch.Tensor, top_k: int | None) -> TaskGates:
    """Per-task gates from logits `[B, H, E]`: dense softmax (top_k None), else the routing core's top-k gate
    applied to each task's logits `[B, E]` on its own (dropless: every example keeps its k experts)."""
    if top_k is None:
        return TaskGates(torch.softmax(logits, dim=-1), {}, {})
    records = [top_k_gating(logits[:, k], top_k) for k in range(logits.shape[1])]
    # Dense [B, E] weights built from `gates` so the task loss reaches the gate (Routing.weights() is detached).
    weights = torch.stack([torch.zeros_like(r.probs).scatter(1, r.experts, r.gates) for r in records], dim=1)
    losses = {n: torch.stack([r.losses[n] for r in records]).mean() for n in records[0].losses}
    stats = {n: torch.stack([r.stats[n].float() for r in records]).mean(0) for n in records[0].stats}
    return TaskGates(weights, losses, stats)


def gate_output(out: torch.Tensor, gates: TaskGates, balance_coef: float) -> CombinerOutput:
    """The CombinerOutput of a gated bottom: aux_loss = balance_coef · balance (0 without top-k)."""
    aux = zero_loss(out)
    if balance_coef and "balance" in gates.losses:
        aux = balance_coef * gates.losses["balance"]
    return CombinerOutput(out, aux, gates.weights, dict(gates.losses), dict(gates.stats))


def check_top_k(top_k: int | None, num_experts: int) -> None:
    require(top_k is None or 1 <= top_k <= num_experts,
            f"combiner.top_k={top_k} is not valid; choose 1..{num_experts} or null (dense softmax)")


def mix(weights: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """Per-task mixtures `f^k = Σ_i g^k_i f_i`: weights `[B, H, E]`, experts `[B, E, U]` -> `[B, H, U]`."""
    return torch.einsum("bhe,beu->bhu", weights, outputs)


class MMoE(Combiner):
    slot_kinds = frozenset({"representation"})

    def __init__(self, slot: Slot, num_experts: int | None = 8, activation: str = "relu",
                 gate_bias: bool = False, top_k: int | None = None, balance_coef: float = 0.0):
        super().__init__(slot, num_experts)
        check_top_k(top_k, self.num_experts)
        self.top_k, self.balance_coef = top_k, balance_coef
        self.experts = bottom_experts(slot, self.num_experts, activation)
        # One linear gate per task on the raw input, no hidden layer (§4.2; §4.8 pitfall 3).
        self.router = Router(slot.in_dim, self.num_experts, num_tasks=slot.num_tasks, bias=gate_bias)

    def forward(self, x: torch.Tensor, experts=None, mask=None) -> CombinerOutput:
        logits = self.router(x)
        if self.slot.num_tasks == 1:
            logits = logits.unsqueeze(1)  # [B, 1, E]
        gates = task_gates(logits, self.top_k)
        out = mix(gates.weights, self.experts(x))
        if self.slot.num_tasks == 1:
            out, gates = out.squeeze(1), TaskGates(gates.weights.squeeze(1), gates.losses, gates.stats)
        return gate_output(out, gates, self.balance_coef)
