"""Routing: router modules, pure gate functions, losses and statistics (design §3).

Gate functions take logits and return frozen records; nothing here keeps state between calls.
"""

from moecli.routing.dispatch import routed_experts
from moecli.routing.gating import (
    Routing,
    expert_capacity,
    expert_choice_gating,
    gshard_top2_gating,
    noisy_top_k_gating,
    switch_gating,
    top_k_gating,
    update_selection_bias,
)
from moecli.routing.losses import (
    balance_loss,
    entropy_global_loss,
    entropy_local_loss,
    importance_loss,
    load_loss,
    prob_in_top_k,
    router_z_loss,
    smooth_load,
)
from moecli.routing.router import Router
from moecli.routing.soft import soft_moe_weights
from moecli.routing.stats import RoutingAccumulator, routing_metrics

__all__ = ["Router", "RoutingAccumulator", "routing_metrics",
           "Routing", "expert_capacity", "expert_choice_gating", "gshard_top2_gating", "noisy_top_k_gating",
           "switch_gating", "top_k_gating", "update_selection_bias", "balance_loss", "entropy_global_loss",
           "entropy_local_loss", "importance_loss", "load_loss", "prob_in_top_k", "router_z_loss", "smooth_load",
           "routed_experts", "soft_moe_weights"]
