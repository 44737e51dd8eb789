"""`dense`: one network and no gate, the backpropagation baseline (Jacobs et al. 1991, methods-classic §1.5).

Distribution slots: an MLP from the slot input to the outputs (`hidden` units; 0 = linear).
Representation slots: the plain feed-forward layer `[T, D] -> [T, D]` of width `hidden`, or the task's d_ff when
`hidden` is null.
When the task asks for one-layer experts (`slot.extra["expert_layers"] == 1`, the shared bottom of Ma et al.
2018, methods-classic §4.5) it is one layer `act(W x + b)` `[B, D] -> [B, hidden]` whose units feed the task
towers; `hidden` null = `slot.extra["dense_hidden"]`, the task's parameter-matched width.
"""

from __future__ import annotations

import torch

from moecli.combiners.base import Combiner, zero_loss
from moecli.errors import check_positive
from moecli.experts import MLP
from moecli.experts import activation as activation_fn
from moecli.rules import Categorical, Gaussian, as_log_probs
from moecli.slots import CombinerOutput, Slot


class Dense(Combiner):
    slot_kinds = frozenset({"distribution", "representation"})
    external_ok = False

    def __init__(self, slot: Slot, hidden: int | None = None, activation: str = "relu"):
        super().__init__(slot, num_experts=1)
        self.out_act = None
        if slot.kind == "representation" and slot.extra.get("expert_layers") == 1:
            hidden = slot.extra.get("dense_hidden", slot.out_dim) if hidden is None else hidden
            check_positive("combiner.hidden", hidden)
            self.net, self.out_act = MLP(slot.in_dim, hidden, 0), activation_fn(activation)
            return
        if hidden is None:
            hidden = slot.expert_hidden if slot.kind == "representation" else 12
        check_positive("combiner.hidden", hidden, minimum=0 if slot.kind == "distribution" else 1)
        self.net = MLP(slot.in_dim, slot.out_dim, hidden, activation)

    def forward(self, x: torch.Tensor, experts=None, mask=None) -> CombinerOutput:
        y = self.net(x)
        if self.out_act is not None:
            y = self.out_act(y)
        if self.slot.kind == "representation":
            out = y
        elif self.slot.family == "categorical":
            out = Categorical(as_log_probs(y))
        else:
            out = Gaussian(y, torch.zeros_like(y))
        return CombinerOutput(out, zero_loss(y))
