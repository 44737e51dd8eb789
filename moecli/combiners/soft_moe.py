"""`soft_moe`: Soft MoE (Puigcerver et al. 2023, ICLR 2024; methods-routing §5).

Each of E experts owns p slots; a slot's input is a softmax-over-tokens average of the group's tokens, each
expert processes its p slots (one batched matmul over the stacked experts), and each token's output is a
softmax-over-slots average of the slot outputs. Logits use l2-normalised tokens and slot parameters times a
learned scale (init 1). No token is dropped; no auxiliary loss. Representation slots only: on a distribution
slot the slots would average different examples' inputs into one prediction. Not causal: in a causal slot
(slot.extra["causal"]) the group is one position across sequences (forward(x, num_sequences=N)).
weights `[T, E]` = each token's combine weight summed over an expert's slots (rows sum to 1).
"""

from __future__ import annotations

import torch
from torch import nn

from moecli.combiners.base import Combiner, require
from moecli.errors import check_positive
from moecli.experts import StackedExperts
from moecli.routing.layer import RoutedCombiner
from moecli.routing.soft import soft_moe_weights
from moecli.slots import CombinerOutput, Slot


class SoftMoe(Combiner):
    slot_kinds = frozenset({"representation"})
    mixes_tokens = True

    def __init__(
        self,
        slot: Slot,
        num_experts: int | None = 8,
        slots_per_expert: int = 1,
        activation: str = "relu",
        normalize: bool = True,
        group_size: int | None = None,
        allow_future_leak: bool = False,
    ):
        super().__init__(slot, num_experts)
        check_positive("combiner.slots_per_expert", slots_per_expert)
        check_positive("slot.expert_hidden", slot.expert_hidden)
        if group_size is not None:
            check_positive("combiner.group_size", group_size)
        self.slots_per_expert, self.normalize, self.group_size = slots_per_expert, normalize, group_size
        self.causal = bool(slot.extra.get("causal", False)) and not allow_future_leak
        self.experts = StackedExperts(
            self.num_experts, slot.in_dim, slot.out_dim, slot.expert_hidden, activation
        )
        num_slots = self.num_experts * slots_per_expert
        self.phi = nn.Parameter(torch.randn(slot.in_dim, num_slots) / slot.in_dim**0.5)
        self.scale = nn.Parameter(torch.ones(()))

    _group_size = RoutedCombiner._group_size

    def forward(
        self, x: torch.Tensor, experts=None, mask=None, num_sequences: int | None = None, modality=None
    ) -> CombinerOutput:
        """x `[T, D]` (or `[..., D]`) -> output of the same shape; groups of contiguous rows."""
        lead, d = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, d)
        t = x2.shape[0]
        size = self._group_size(t, num_sequences) or t
        require(t % size == 0, f"combiner.group_size={size} must divide the {t} tokens")
        xg = x2.view(t // size, size, d)  # [G, m, D]
        dispatch, combine = soft_moe_weights(xg, self.phi, self.scale, self.normalize)
        slot_in = torch.einsum("gms,gmd->gsd", dispatch.to(x.dtype), xg)  # [G, n·p, D]
        y_slots = self._experts(slot_in)  # [G, n·p, O]
        y = torch.einsum("gms,gso->gmo", combine.to(y_slots.dtype), y_slots).reshape(*lead, -1)
        e, p = self.num_experts, self.slots_per_expert
        weights = combine.reshape(t, e, p).sum(-1)
        stats = {
            "dispatch": weights.detach().mean(0),
            "slots": torch.tensor(float(e * p)),
            "combine_max": combine.detach().max(-1).values.mean(),
            "dispatch_max": dispatch.detach().max(1).values.mean(),
        }
        return CombinerOutput(y, y.new_zeros(()), weights, {}, stats)

    def _experts(self, slot_in: torch.Tensor) -> torch.Tensor:
        """Expert j on slots j·p … j·p+p−1 of every group: one bmm per layer over the stacked weights."""
        g, s, d = slot_in.shape
        e, p, ex = self.num_experts, self.slots_per_expert, self.experts
        z = slot_in.view(g, e, p, d).transpose(0, 1).reshape(e, g * p, d)  # [E, G·p, D]
        h = torch.baddbmm(ex.b1.unsqueeze(1), z, ex.w1)
        if ex.hidden > 0:
            h = torch.baddbmm(ex.b2.unsqueeze(1), ex.act(h), ex.w2)
        return h.view(e, g, p, -1).transpose(0, 1).reshape(g, s, -1)
