"""Routing: router modules, pure gate functions, losses and statistics (design §3).

Gate functions take logits and return frozen records; nothing here keeps state between calls.
"""

from moecli.routing.router import Router
from moecli.routing.stats import RoutingAccumulator, routing_metrics

__all__ = ["Router", "RoutingAccumulator", "routing_metrics"]
