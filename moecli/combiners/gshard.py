"""`gshard`: GShard top-2 gating (Lepikhin et al. 2020, Algorithm 1; methods-routing §1).

Gate: g = softmax(W_g x); the top-2 pair normalised before capacity (not redone after); capacity per group
C = ceil(CF·2·S/E) (per-token convention; CF 1.0 = the paper's 2S/E); all first choices are served before any
second choice; the second expert is dispatched with probability min(1, g2n/second_threshold) (0.5 = the
paper's 2·g2n). Loss: balance_coef × E·Σ f m (code scale, f = pre-capacity top-1 fraction; aux_loss_scale
paper = the paper's 1/E² form). In evaluation the second expert follows `eval_second_policy` (all:
deterministic). On a distribution slot the prediction is softmax(g1n·logits_e1 + g2n·logits_e2).
"""

from __future__ import annotations

import torch

from moecli.errors import check_choice
from moecli.routing.gating import Routing, gshard_top2_gating
from moecli.routing.layer import RoutedCombiner, resolve_eval_capacity, shared_options

POLICIES = ["random", "threshold", "all", "none"]


class Gshard(RoutedCombiner):
    def __init__(
        self,
        slot,
        num_experts: int | None = 8,
        expert_hidden: int = 0,
        activation: str = "relu",
        capacity_factor: float | None = 1.0,
        eval_capacity_factor: float | None | str = "same",
        capacity_convention: str = "per_token",
        capacity_rounding: str | None = None,
        min_capacity: int = 1,
        second_policy: str = "random",
        eval_second_policy: str = "all",
        second_threshold: float = 0.5,
        queue: str = "paper",
        renormalize_after_drop: bool = False,
        balance_coef: float = 0.01,
        z_coef: float = 0.0,
        aux_loss_scale: str = "code",
        router_init_scale: float | None = None,
        router_bias: bool = False,
        expert_dropout: float = 0.0,
        num_shared_experts: int = 0,
        bias_balancing: bool = False,
        bias_update_rate: float = 0.001,
        group_size: int | None = None,
        local_entropy_coef: float = 0.0,
        global_entropy_coef: float = 0.0,
        min_experts: float | None = 4.0,
    ):
        super().__init__(slot, **shared_options(locals()))
        check_choice("combiner.eval_second_policy", eval_second_policy, POLICIES)
        check_choice("combiner.aux_loss_scale", aux_loss_scale, ["code", "paper"])
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = resolve_eval_capacity(capacity_factor, eval_capacity_factor)
        self.options = {
            "convention": capacity_convention,
            "rounding": capacity_rounding,
            "min_capacity": min_capacity,
            "second_threshold": second_threshold,
            "queue": queue,
            "renormalize_after_drop": renormalize_after_drop,
            "balance_form": aux_loss_scale,
        }
        self.second_policy, self.eval_second_policy = second_policy, eval_second_policy
        gshard_top2_gating(
            torch.zeros(1, self.num_experts), capacity_factor, None, second_policy, **self.options
        )

    def route(self, logits: torch.Tensor, x: torch.Tensor, group_size: int | None) -> Routing:
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        policy = self.second_policy if self.training else self.eval_second_policy
        return gshard_top2_gating(logits, cf, group_size, policy, selection_bias=self.bias, **self.options)
