"""`gpoe`: generalised product of experts with learned per-modality, per-dimension credibility
(Cao & Fleet 2014; ICMI 2022 gPoE; methods-multimodal §1.5, methods-classic §2.4).

Gate: one credibility network per modality, a_m = g_m(x_m) ∈ R^Z (an MLP `D_m → hidden → hidden → Z` on that
modality's observed input, last layer zero-initialised so α starts uniform). Normalised across the PRESENT
modalities per example and dimension: `norm: softmax` α = softmax_m(a_m), or `norm: sum` α = softplus(a)/Σ.
Rule: the weighted product T = Σ_m α_m T_m (+ 1 for the prior expert), μ = T⁻¹ Σ_m α_m T_m μ_m
(`moecli.rules.gaussian_product(weights=α)`). With equal weights 1/|S| and no prior it is the plain product's
mean with |S| times its variance (a tempered PoE, every expert raised to the power 1/|S|).

The gate input `x` is the task's concatenated observed modality features `[B, Σ D_m]`, split by
`slot.extra["modality_dims"]`. Output: a `GaussianPosterior`; weights `[B, M]` = α averaged over Z;
stats: `alpha_entropy` (entropy of α over modalities, mean over examples and dimensions) and `alpha_onehot`
(fraction of dimensions where one α > 0.99, the saturation warning of §6 item 7d).
"""

from __future__ import annotations

import torch
from torch import nn

from moecli.combiners.base import Combiner, zero_loss
from moecli.errors import check_choice, check_positive
from moecli.experts import activation as activation_fn
from moecli.posteriors import GaussianPosterior
from moecli.rules import entropy, gaussian_product
from moecli.slots import CombinerOutput, Slot


class CredibilityNet(nn.Module):
    """g_m: `[B, D_m] -> [B, Z]`, two hidden layers; last layer zero-initialised (uniform α at the start)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, act: str):
        super().__init__()
        self.act = activation_fn(act)
        self.hidden = nn.ModuleList([nn.Linear(in_dim, hidden), nn.Linear(hidden, hidden)])
        self.out = nn.Linear(hidden, out_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = self.act(layer(x))
        return self.out(x)


def normalise_credibility(logits: torch.Tensor, mask: torch.Tensor | None, norm: str) -> torch.Tensor:
    """α `[B, M, Z]` summing to 1 over present modalities (axis 1); absent modalities get exactly 0."""
    present = None if mask is None else mask.bool().unsqueeze(-1)
    if norm == "softmax":
        if present is not None:
            logits = logits.masked_fill(~present, float("-inf"))
        return torch.softmax(logits, dim=1)
    positive = nn.functional.softplus(logits)
    if present is not None:
        positive = torch.where(present, positive, torch.zeros_like(positive))
    return positive / positive.sum(1, keepdim=True).clamp_min(1e-6)  # floor against underflow (§6 item 7f)


class Gpoe(Combiner):
    families = frozenset({"gaussian"})
    owned_ok = False
    posterior_ok = True

    @classmethod
    def incompatibility(cls, slot: Slot) -> str | None:
        reason = super().incompatibility(slot)
        if reason is None and not slot.extra.get("modality_dims"):
            return "it needs the per-modality inputs of a multimodal VAE posterior slot; this slot has none"
        return reason

    def __init__(self, slot: Slot, num_experts: int | None = None, hidden: int = 128,
                 activation: str = "relu", norm: str = "softmax", prior_expert: bool = True):
        super().__init__(slot, num_experts)
        check_choice("combiner.norm", norm, ["softmax", "sum"])
        check_positive("combiner.hidden", hidden)
        self.dims = [int(d) for d in slot.extra["modality_dims"]]
        self.norm, self.prior_expert = norm, prior_expert
        self.nets = nn.ModuleList([CredibilityNet(d, hidden, slot.out_dim, activation) for d in self.dims])

    def forward(self, x: torch.Tensor, experts=None, mask=None) -> CombinerOutput:
        mean, logvar = experts  # [B, M, Z]
        parts = x.split(self.dims, dim=-1)
        logits = torch.stack([net(part) for net, part in zip(self.nets, parts)], dim=1)  # [B, M, Z]
        alpha = normalise_credibility(logits, mask, self.norm)
        fused = GaussianPosterior(*gaussian_product(mean, logvar, mask, weights=alpha,
                                                    prior=self.prior_expert))
        stats = {"alpha_entropy": entropy(alpha, dim=1).mean().detach(),
                 "alpha_onehot": (alpha > 0.99).any(1).float().mean().detach()}
        return CombinerOutput(fused, zero_loss(mean), alpha.mean(-1), stats=stats)
