"""`topk`: top-k token choice, dropless by default (HF Mixtral; DeepSeekMoE; methods-routing §0, §6–8).

Gate: scores = softmax(W_r x) (or sigmoid, DeepSeek-V3), the k best experts per token; renormalize: true gives
weights = softmax over the kept logits (Mixtral = Shazeer's softmax-after-KeepTopK, without noise); false
keeps the raw probabilities (DeepSeekMoE / V2). capacity_factor null = dropless; a number turns on per-token
capacity ceil(CF·K·S/E), filled by all first choices before second choices. Loss: balance_coef × the
normalised top-k balance loss (1.0 balanced; balance_form hf_mixtral gives Mixtral's K-scaled value) + z_coef
× z-loss. bias_balancing: true selects with score + b and updates b by ±bias_update_rate per step (loss-free
balancing). num_shared_experts adds ungated experts (DeepSeekMoE). On a distribution slot the prediction is
the softmax of the gate-weighted sum of the k chosen experts' logits.
"""

from __future__ import annotations

import torch

from moecli.combiners.base import require
from moecli.routing.gating import Routing, top_k_gating
from moecli.routing.layer import RoutedCombiner, resolve_eval_capacity, shared_options


class Topk(RoutedCombiner):
    def __init__(
        self,
        slot,
        num_experts: int | None = 8,
        top_k: int = 2,
        expert_hidden: int = 0,
        activation: str = "relu",
        renormalize: bool = True,
        score_fn: str = "softmax",
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None | str = "same",
        capacity_convention: str = "per_token",
        capacity_rounding: str | None = None,
        min_capacity: int = 1,
        balance_coef: float = 0.01,
        z_coef: float = 0.001,
        balance_form: str = "code",
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
        require(
            1 <= top_k <= self.num_experts,
            f"combiner.top_k={top_k} must be between 1 and combiner.num_experts={self.num_experts}",
        )
        require(
            not (top_k == 1 and renormalize),
            "combiner.top_k=1 with combiner.renormalize=true makes the gate constant (no router gradient); "
            "set renormalize=false or use combiner=switch",
        )
        self.top_k, self.renormalize, self.score_fn, self.balance_form = (
            top_k,
            renormalize,
            score_fn,
            balance_form,
        )
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = resolve_eval_capacity(capacity_factor, eval_capacity_factor)
        self.capacity = {
            "convention": capacity_convention,
            "rounding": capacity_rounding,
            "min_capacity": min_capacity,
        }
        top_k_gating(
            torch.zeros(1, self.num_experts),
            top_k,
            renormalize,
            capacity_factor,
            None,
            score_fn=score_fn,
            balance_form=balance_form,
            **self.capacity,
        )

    def route(self, logits: torch.Tensor, x: torch.Tensor, group_size: int | None) -> Routing:
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        return top_k_gating(
            logits,
            self.top_k,
            self.renormalize,
            cf,
            group_size,
            score_fn=self.score_fn,
            selection_bias=self.bias,
            balance_form=self.balance_form,
            **self.capacity,
        )
