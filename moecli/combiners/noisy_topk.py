"""`noisy_topk`: sparsely-gated MoE with noisy top-k gating (Shazeer et al. 2017; methods-classic §3).

Gate: H = x W_g + ε·softplus(x W_noise) (noise in training only), G = softmax(KeepTopK(H, k)); W_g =
W_noise = 0 at init. Losses: importance_coef·CV²(Σ G) + load_coef·CV²(Σ Φ((clean − kth_excluding)/sd)) (the
load loss only when noise is on). `hierarchical: a` splits the E experts into a groups of E/a (appendix B): a
primary noisy top-k gate over groups and one secondary noisy top-k gate per group, weights G_primary·G_group
(k per level, so k² experts per token), with the paper's product form of importance and load. No capacity by
default. On a distribution slot the prediction is softmax(Σ_i G_i·logits_i).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moecli.combiners.base import require
from moecli.routing.gating import Routing, noisy_top_k_gating, routing_stats
from moecli.routing.layer import RoutedCombiner, resolve_eval_capacity, shared_options, zero_router
from moecli.routing.losses import importance_loss, load_loss, prob_in_top_k, router_z_loss
from moecli.routing.router import Router


class NoisyTopk(RoutedCombiner):
    def __init__(
        self,
        slot,
        num_experts: int | None = 8,
        top_k: int = 2,
        expert_hidden: int = 0,
        activation: str = "relu",
        importance_coef: float = 0.1,
        load_coef: float = 0.1,
        noise: bool = True,
        eval_noise: bool = False,
        noise_floor: float = 1e-6,
        cv_unbiased: bool = False,
        hierarchical: int | None = None,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None | str = "same",
        capacity_convention: str = "per_token",
        capacity_rounding: str | None = None,
        min_capacity: int = 1,
        z_coef: float = 0.0,
        expert_dropout: float = 0.0,
        num_shared_experts: int = 0,
        bias_balancing: bool = False,
        bias_update_rate: float = 0.001,
        group_size: int | None = None,
        local_entropy_coef: float = 0.0,
        global_entropy_coef: float = 0.0,
        min_experts: float | None = 4.0,
    ):
        super().__init__(slot, **shared_options(locals(), router_init_scale=None, router_bias=False, balance_coef=0.0))
        e = self.num_experts
        require(
            top_k >= 2 or hierarchical,
            f"combiner.top_k={top_k}: noisy top-k needs k >= 2 (with k = 1 the "
            "kept gate is always 1 and the router gets no gradient; methods-classic §3.8 pitfall 6)",
        )
        if hierarchical:
            require(
                e % hierarchical == 0 and hierarchical >= 2,
                f"combiner.hierarchical={hierarchical} must be >= 2 and divide num_experts={e}",
            )
            require(
                not bias_balancing and capacity_factor is None,
                "combiner.hierarchical supports neither bias_balancing nor capacity_factor; set them off",
            )
            require(
                top_k <= min(hierarchical, e // hierarchical),
                f"combiner.top_k={top_k} must not exceed the group count and the group size",
            )
        else:
            require(top_k <= e, f"combiner.top_k={top_k} must be between 2 and combiner.num_experts={e}")
        self.top_k, self.hierarchical, self.noise = top_k, hierarchical, noise
        self.eval_noise, self.noise_floor, self.cv_unbiased = eval_noise, noise_floor, cv_unbiased
        self.coefs.update({"importance": importance_coef, "load": load_coef})
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = resolve_eval_capacity(capacity_factor, eval_capacity_factor)
        self.capacity = {
            "convention": capacity_convention,
            "rounding": capacity_rounding,
            "min_capacity": min_capacity,
        }
        self.noise_router = Router(slot.in_dim, e, bias=False)
        zero_router(self.router)
        zero_router(self.noise_router)
        if hierarchical:  # primary gate over the a groups; self.router holds the a·b secondary logits
            self.primary = Router(slot.in_dim, hierarchical, bias=False)
            self.primary_noise = Router(slot.in_dim, hierarchical, bias=False)
            zero_router(self.primary)
            zero_router(self.primary_noise)

    def route(self, logits: torch.Tensor, x: torch.Tensor, group_size: int | None) -> Routing:
        noise_logits = self.noise_router(x.float()) if self.noise else None
        if self.hierarchical:
            return self._route_hierarchical(logits, noise_logits, x)
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        return noisy_top_k_gating(
            logits,
            noise_logits,
            self.top_k,
            self.training,
            self.noise_floor,
            self.eval_noise,
            self.bias,
            self.cv_unbiased,
            cf,
            group_size,
            **self.capacity,
        )

    def _noisy(self, clean: torch.Tensor, noise_logits: torch.Tensor | None):
        if noise_logits is None or not (self.training or self.eval_noise):
            return clean, None
        sd = F.softplus(noise_logits.float()).clamp_min(self.noise_floor)
        return clean + torch.randn_like(clean) * sd, sd

    def _route_hierarchical(self, logits, noise_logits, x) -> Routing:
        """Shazeer 2017 appendix B: weights G_p(x)_i · G_i(x)_j, importance and load in the product form."""
        t, a, k = logits.shape[0], self.hierarchical, self.top_k
        b = self.num_experts // a
        p_clean = self.primary(x.float())
        p_noisy, p_sd = self._noisy(p_clean, self.primary_noise(x.float()) if self.noise else None)
        s_clean = logits.view(t, a, b)
        s_noisy, s_sd = self._noisy(s_clean, None if noise_logits is None else noise_logits.view(t, a, b))
        groups = torch.topk(p_noisy, k, -1).indices  # [T, k]
        g_primary = torch.softmax(p_noisy.gather(1, groups), -1)
        inner = torch.topk(s_noisy, k, -1).indices  # [T, a, k]
        g_inner = torch.softmax(s_noisy.gather(2, inner), -1)
        chosen_inner = inner.gather(1, groups.unsqueeze(-1).expand(t, k, k))  # [T, k, k]
        gates = (g_primary.unsqueeze(-1) * g_inner.gather(1, groups.unsqueeze(-1).expand(t, k, k))).reshape(
            t, -1
        )
        experts = (groups.unsqueeze(-1) * b + chosen_inner).reshape(t, -1)
        dense = torch.zeros(t, self.num_experts, device=x.device).scatter(1, experts, gates)
        losses = {"importance": importance_loss(dense, self.cv_unbiased), "z": router_z_loss(logits)}
        if p_sd is not None:
            in_group = torch.zeros(t, a, dtype=torch.bool, device=x.device).scatter(1, groups, True)
            load_p = prob_in_top_k(p_clean, p_noisy, p_sd, k).sum(0)  # [a]
            p_inner = prob_in_top_k(
                s_clean.reshape(t * a, b), s_noisy.reshape(t * a, b), s_sd.reshape(t * a, b), k
            ).view(t, a, b)
            size = in_group.sum(0).clamp_min(1).unsqueeze(-1)  # |X^(i)|
            load_inner = (p_inner * in_group.unsqueeze(-1)).sum(0) / size  # [a, b]
            losses["load"] = load_loss((load_p.unsqueeze(-1) * load_inner).reshape(-1), self.cv_unbiased)
        kept = torch.ones_like(experts, dtype=torch.bool)
        stats = routing_stats(experts, kept, dense.detach(), logits, None)
        for name, value in losses.items():
            stats[f"{name}_loss"] = value.detach()
        return Routing(experts, gates, kept, dense.detach(), losses, stats, None)
