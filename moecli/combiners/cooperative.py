"""`cooperative`: softmax gate, loss on the blended output (methods-classic §1.2 eq. 1, E_coop).

Distribution slots: the blend `Σ_i p_i o_i` of the expert outputs (class logits for a categorical slot, then
softmax; means for a Gaussian slot, scored with unit variance so the loss is ½‖d − Σ p_i o_i‖²).
Representation slots: the dense softmax mixture of expert FFNs `y = Σ_e p_e FFN_e(x)` (every expert sees every
token; it is the k = E limit of the sparse layers).
"""

from __future__ import annotations

import torch

from moecli.combiners.base import Combiner, zero_loss
from moecli.experts import StackedExperts
from moecli.routing.router import Router
from moecli.rules import Categorical, Gaussian, as_log_probs, weighted_sum
from moecli.slots import CombinerOutput, Slot


class Cooperative(Combiner):
    slot_kinds = frozenset({"distribution", "representation"})

    def __init__(self, slot: Slot, num_experts: int | None = 4, expert_hidden: int = 0,
                 activation: str = "relu", gate: str = "learned", gate_hidden: int = 0):
        super().__init__(slot, num_experts)
        self.router = Router(slot.in_dim, self.num_experts, kind=gate, hidden=gate_hidden)
        if slot.kind == "representation":
            self.experts = StackedExperts(self.num_experts, slot.in_dim, slot.out_dim, slot.expert_hidden,
                                          activation)
        else:
            self.experts = self.make_experts(expert_hidden, activation)

    def forward(self, x: torch.Tensor, experts=None, mask=None) -> CombinerOutput:
        weights = torch.softmax(self.router(x), dim=-1)
        outputs = experts if experts is not None else self.experts(x)
        blend = weighted_sum(weights, outputs)
        if self.slot.kind == "representation":
            out = blend
        elif self.slot.family == "categorical":
            out = Categorical(as_log_probs(blend))
        else:
            out = Gaussian(blend, torch.zeros_like(blend))
        return CombinerOutput(out, zero_loss(blend), weights)
