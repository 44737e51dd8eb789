"""`expert_choice`: Expert Choice routing (Zhou et al. 2022; methods-routing §4).

S = softmax(W_g x) over experts; in each group of n tokens every expert takes its k = round(n·c/E)
highest-affinity tokens (c = capacity_factor, the mean number of experts per token); a token's output is
Σ_i S[t, i]·FFN_i(x_t) over the experts that chose it (0 if none did). No auxiliary loss (balance by
construction). Not causal: in a causal slot (slot.extra["causal"]) the combiner groups the tokens of one
position across sequences and needs forward(x, num_sequences=N); `allow_future_leak: true` disables that
(measurement only). On a distribution slot the group is the batch, so an example's prediction depends on the
batch.
"""

from __future__ import annotations

import torch

from moecli.combiners.base import require
from moecli.routing.gating import Routing, expert_choice_gating
from moecli.routing.layer import RoutedCombiner, shared_options


class ExpertChoice(RoutedCombiner):
    token_choice = False
    mixes_tokens = True

    def __init__(
        self,
        slot,
        num_experts: int | None = 8,
        expert_hidden: int = 0,
        activation: str = "relu",
        capacity_factor: float = 2.0,
        z_coef: float = 0.0,
        router_init_scale: float | None = None,
        router_bias: bool = False,
        expert_dropout: float = 0.0,
        num_shared_experts: int = 0,
        group_size: int | None = None,
        allow_future_leak: bool = False,
        local_entropy_coef: float = 0.0,
        global_entropy_coef: float = 0.0,
        min_experts: float | None = 4.0,
    ):
        super().__init__(slot, **shared_options(locals(), balance_coef=0.0, bias_balancing=False, bias_update_rate=0.0))
        require(
            capacity_factor is not None and capacity_factor > 0,
            f"combiner.capacity_factor={capacity_factor} must be a positive number (c, experts per token)",
        )
        self.capacity_factor = capacity_factor

    def route(self, logits: torch.Tensor, x: torch.Tensor, group_size: int | None) -> Routing:
        return expert_choice_gating(logits, self.capacity_factor, group_size)
