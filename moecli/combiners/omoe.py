"""`omoe`: one-gate mixture of experts as a shared bottom (Ma et al. 2018's OMoE; methods-classic §4.2).

    f(x) = Σ_{i=1..E} g(x)_i f_i(x),    g(x) = softmax(W_g x)      (one gate for all H tasks)

Representation slots only. Returns `output` `[B, U]` and `weights` `[B, E]` whatever `slot.num_tasks` is: the
one mixture is broadcast by the task to every tower (it is MMoE with all task gates tied, §4.9). Experts as in
`mmoe`: one layer `act(W_i x + b_i)` when the task asks for it (`slot.extra["expert_layers"] == 1`), else the
slot's FFN. `top_k` keeps the k largest gate scores through the routing core's `top_k_gating` (null = dense
softmax, the paper's OMoE); `balance_coef` weights its balance loss, as in `mmoe`.
"""

from __future__ import annotations

import torch

from moecli.combiners.base import Combiner
from moecli.combiners.mmoe import TaskGates, bottom_experts, check_top_k, gate_output, task_gates
from moecli.routing.router import Router
from moecli.rules import weighted_sum
from moecli.slots import CombinerOutput, Slot


class OMoE(Combiner):
    slot_kinds = frozenset({"representation"})

    def __init__(self, slot: Slot, num_experts: int | None = 8, activation: str = "relu",
                 gate_bias: bool = False, top_k: int | None = None, balance_coef: float = 0.0):
        super().__init__(slot, num_experts)
        check_top_k(top_k, self.num_experts)
        self.top_k, self.balance_coef = top_k, balance_coef
        self.experts = bottom_experts(slot, self.num_experts, activation)
        self.router = Router(slot.in_dim, self.num_experts, num_tasks=1, bias=gate_bias)

    def forward(self, x: torch.Tensor, experts=None, mask=None) -> CombinerOutput:
        gates = task_gates(self.router(x).unsqueeze(1), self.top_k)  # one gate: [B, 1, E]
        weights = gates.weights.squeeze(1)
        out = weighted_sum(weights, self.experts(x))
        return gate_output(out, TaskGates(weights, gates.losses, gates.stats), self.balance_coef)
