"""`mopoe`: mixture of products of experts (Sutter, Daunhawer & Vogt 2021; methods-multimodal §1.4, §2.4).

Gate: uniform over the non-empty subsets of the present modalities. Rule: for every subset s the product
q̃_s = PoE({q(z|x_m) : m ∈ s}) (§1.2), then the mixture (1/|valid subsets|) Σ_s q̃_s. The output is a
`GaussianPosteriorMixture` over the U = 2^M − 1 subsets with `kl="components"`, so the task's objective uses
the mean subset KL (the Jensen bound of §2.4). Singletons only would be the MMVAE mixture; the full set only
PoE.

`prior_expert`: "full_subset" (default, the reference code): N(0, I) enters the product of the subset holding
every present modality only; "all": every subset's product; "none": no product.
Posterior slots only (the task supplies one Gaussian expert per modality).
"""

from __future__ import annotations

import torch

from moecli.combiners.base import Combiner, zero_loss
from moecli.errors import check_choice
from moecli.posteriors import GaussianPosteriorMixture, nonempty_subsets
from moecli.rules import gaussian_product
from moecli.slots import CombinerOutput, Slot


class Mopoe(Combiner):
    families = frozenset({"gaussian"})
    owned_ok = False
    posterior_ok = True

    @classmethod
    def incompatibility(cls, slot: Slot) -> str | None:
        reason = super().incompatibility(slot)
        if reason is None and not slot.extra.get("posterior"):
            return "it fuses the posterior experts of a multimodal VAE, and this slot is not one"
        return reason

    def __init__(self, slot: Slot, num_experts: int | None = None, prior_expert: str = "full_subset"):
        super().__init__(slot, num_experts)
        check_choice("combiner.prior_expert", prior_expert, ["full_subset", "all", "none"])
        self.prior_expert = prior_expert
        self.register_buffer("subsets", nonempty_subsets(self.num_experts), persistent=False)  # [U, M]

    def forward(self, x: torch.Tensor, experts=None, mask=None) -> CombinerOutput:
        mean, logvar = experts  # [B, M, Z]
        batch, num_mod, latent = mean.shape
        present = torch.ones(batch, num_mod, dtype=torch.bool, device=mean.device) if mask is None \
            else mask.bool()
        subsets = self.subsets.unsqueeze(0)  # [1, U, M]
        valid = ~(subsets & ~present.unsqueeze(1)).any(-1)  # [B, U]: subset within the present modalities
        fused_mean, fused_logvar = self._subset_products(mean, logvar, subsets, present)
        zero = torch.zeros((), dtype=mean.dtype, device=mean.device)
        # Invalid subsets may fuse absent (placeholder) experts: keep them finite, their weight is zero.
        fused_mean = torch.where(valid.unsqueeze(-1), fused_mean, zero)
        fused_logvar = torch.where(valid.unsqueeze(-1), fused_logvar, zero)
        log_weights = torch.where(valid, zero, torch.tensor(float("-inf"), device=mean.device))
        log_weights = log_weights - torch.log(valid.sum(-1, keepdim=True).to(mean.dtype))
        out = GaussianPosteriorMixture(log_weights, fused_mean, fused_logvar, kl="components")
        # Effective weight of modality m: Σ_s π_s [m ∈ s] / |s| (each subset's weight shared by its members).
        share = subsets.to(mean.dtype) / subsets.sum(-1, keepdim=True).to(mean.dtype)  # [1, U, M]
        weights = (out.weights.unsqueeze(-1) * share).sum(1)
        return CombinerOutput(out, zero_loss(mean), weights)

    def _subset_products(self, mean, logvar, subsets, present):
        """PoE of every subset: `[B, M, Z]` -> `[B, U, Z]`, with the prior expert as `prior_expert` says."""
        batch, num_mod, latent = mean.shape
        num_sub = subsets.shape[1]
        if self.prior_expert == "all":
            prior = torch.ones(batch, num_sub, dtype=torch.bool, device=mean.device)
        elif self.prior_expert == "full_subset":
            prior = (subsets == present.unsqueeze(1)).all(-1)  # the subset of every present modality
        else:
            prior = torch.zeros(batch, num_sub, dtype=torch.bool, device=mean.device)
        # The prior is one more expert N(0, I), present only where `prior` holds: added once per product.
        zeros = mean.new_zeros(batch, 1, latent)
        ext_mean = torch.cat([zeros, mean], 1).unsqueeze(1).expand(batch, num_sub, num_mod + 1, latent)
        ext_logvar = torch.cat([zeros, logvar], 1).unsqueeze(1).expand(batch, num_sub, num_mod + 1, latent)
        ext_mask = torch.cat([prior.unsqueeze(-1), subsets.expand(batch, -1, -1)], -1)
        fm, fl = gaussian_product(ext_mean.reshape(batch * num_sub, num_mod + 1, latent),
                                  ext_logvar.reshape(batch * num_sub, num_mod + 1, latent),
                                  ext_mask.reshape(batch * num_sub, num_mod + 1))
        return fm.view(batch, num_sub, latent), fl.view(batch, num_sub, latent)
