"""`switch`: Switch Transformer top-1 routing with capacity, balance loss and router z-loss (Fedus et al.
2021; Zoph et al. 2022; methods-routing §2).

Gate: p = softmax(W_r x) in float32, i* = argmax p, gate p_{i*} (not renormalised); capacity C = floor(CF·S/E)
per group by default, CF 1.25 in training and 2.0 in evaluation; dropped tokens output 0 (the residual carries
them). Loss: balance_coef · E·Σ f_i P_i + z_coef · mean(logsumexp²). Jitter multiplies the router's copy of
the input by U(1 − ε, 1 + ε) in training. On a distribution slot (e.g. task=vowel) the gate picks one expert
per example and the prediction is softmax(p_{i*} · logits_{i*}).
"""

from __future__ import annotations

import torch

from moecli.routing.gating import Routing, switch_gating
from moecli.routing.layer import RoutedCombiner, resolve_eval_capacity, router_jitter, shared_options


class Switch(RoutedCombiner):
    def __init__(
        self,
        slot,
        num_experts: int | None = 8,
        expert_hidden: int = 0,
        activation: str = "relu",
        capacity_factor: float | None = 1.25,
        eval_capacity_factor: float | None | str = 2.0,
        capacity_convention: str = "per_choice",
        capacity_rounding: str | None = None,
        min_capacity: int = 1,
        balance_coef: float = 0.01,
        z_coef: float = 0.001,
        jitter_eps: float = 0.01,
        router_init_scale: float | None = 0.1,
        router_bias: bool = False,
        expert_dropout: float = 0.0,
        num_shared_experts: int = 0,
        f_after_capacity: bool = False,
        balance_form: str = "code",
        bias_balancing: bool = False,
        bias_update_rate: float = 0.001,
        group_size: int | None = None,
        local_entropy_coef: float = 0.0,
        global_entropy_coef: float = 0.0,
        min_experts: float | None = 4.0,
    ):
        super().__init__(slot, **shared_options(locals()))
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = resolve_eval_capacity(capacity_factor, eval_capacity_factor)
        self.capacity = {
            "convention": capacity_convention,
            "rounding": capacity_rounding,
            "min_capacity": min_capacity,
        }
        self.jitter_eps, self.f_after_capacity, self.balance_form = jitter_eps, f_after_capacity, balance_form
        # Validate the capacity keys once at build time (a bad value fails before training starts).
        switch_gating(torch.zeros(1, self.num_experts), capacity_factor, None, **self.capacity)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        return super().router_logits(router_jitter(x, self.jitter_eps, self.training))

    def route(self, logits: torch.Tensor, x: torch.Tensor, group_size: int | None) -> Routing:
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        return switch_gating(
            logits,
            cf,
            group_size,
            selection_bias=self.bias,
            f_after_capacity=self.f_after_capacity,
            balance_form=self.balance_form,
            **self.capacity,
        )
