"""`poe`: product of experts, no gate (Hinton 1999/2002; methods-classic §2.3–2.4).

Categorical slots: normalised product of the experts' class distributions, `log_softmax(Σ_m α_m log q_m)`.
Gaussian slots: precision-weighted product of diagonal Gaussians; with `prior: true` the prior expert N(0, I)
enters exactly once (MVAE); a presence mask leaves missing experts out. `prior: null` lets the slot decide
(`slot.extra["prior_expert"]`, false when absent): the multimodal VAE's posterior slot asks for it (MVAE).
`weighting: none` is the plain product (α = 1, the default); `weighting: gate` learns α = E · softmax(s(x)), so a
uniform gate is the plain product (generalised PoE of Cao & Fleet 2014 with gate-given weights).
Owned Gaussian experts emit a mean and a log-variance per output.
"""

from __future__ import annotations

import torch

from moecli.combiners.base import Combiner, zero_loss
from moecli.errors import check_choice
from moecli.routing.router import Router
from moecli.rules import Categorical, Gaussian, as_log_probs, categorical_product, gaussian_product
from moecli.slots import CombinerOutput, Slot


class Poe(Combiner):
    posterior_ok = True  # MVAE: the product of the modality posteriors (methods-multimodal §1.2)

    def __init__(self, slot: Slot, num_experts: int | None = 4, expert_hidden: int = 0,
                 activation: str = "relu", weighting: str = "none", prior: bool | None = False):
        super().__init__(slot, num_experts)
        check_choice("combiner.weighting", weighting, ["none", "gate"])
        self.prior = bool(slot.extra.get("prior_expert", False)) if prior is None else prior
        self.experts = self.make_experts(expert_hidden, activation, 2 if slot.family == "gaussian" else 1)
        self.router = Router(slot.in_dim, self.num_experts) if weighting == "gate" else None

    def forward(self, x: torch.Tensor, experts=None, mask=None) -> CombinerOutput:
        weights = torch.softmax(self.router(x), -1) if self.router is not None else None
        alpha = weights * self.num_experts if weights is not None else None
        if self.slot.family == "categorical":
            logits = experts if experts is not None else self.experts(x)
            out = Categorical(categorical_product(as_log_probs(logits), alpha))
        else:
            if experts is not None:
                mean, logvar = experts
            else:
                mean, logvar = self.experts(x).chunk(2, dim=-1)
            out = Gaussian(*gaussian_product(mean, logvar, mask, alpha, prior=self.prior))
        return CombinerOutput(out, zero_loss(out.point()), weights)
