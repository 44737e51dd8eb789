"""Collapse alarms over the routing statistics logged at each evaluation (methods-routing §0.5, §2.8).

An alarm fires when, for a slot, the number of dead experts exceeds `max_dead`, the marginal gate entropy falls
below `min_marginal_entropy` (nats), or one expert's load share stays above `max_share` for `patience`
evaluations in a row. The trainer prints the warnings and, with `abort: true`, stops the run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_SLOT = re.compile(r"^route/(?P<slot>.+)/marginal_entropy$")


@dataclass
class CollapseMonitor:
    max_dead: float | None = None
    min_marginal_entropy: float | None = None
    max_share: float | None = None
    patience: int = 3
    abort: bool = False
    _streak: dict[str, int] = field(default_factory=dict)

    def check(self, metrics: dict[str, float]) -> list[str]:
        """Warnings for this evaluation (empty when routing looks healthy)."""
        warnings = []
        for key in metrics:
            m = _SLOT.match(key)
            if m:
                warnings += self._check_slot(m["slot"], metrics)
        return warnings

    def _check_slot(self, slot: str, metrics: dict[str, float]) -> list[str]:
        p, out = f"route/{slot}", []
        dead = metrics.get(f"{p}/dead", 0.0)
        if self.max_dead is not None and dead > self.max_dead:
            out.append(f"{slot}: {dead:.0f} dead experts (> {self.max_dead:g})")
        ent = metrics[f"{p}/marginal_entropy"]
        if self.min_marginal_entropy is not None and ent < self.min_marginal_entropy:
            out.append(f"{slot}: marginal gate entropy {ent:.3f} nats (< {self.min_marginal_entropy:g})")
        loads = [v for k, v in metrics.items() if k.startswith(f"{p}/load/e")]
        if self.max_share is not None and loads:
            self._streak[slot] = self._streak.get(slot, 0) + 1 if max(loads) > self.max_share else 0
            if self._streak[slot] >= self.patience:
                out.append(f"{slot}: one expert took {max(loads):.0%} of the load for {self._streak[slot]} "
                           f"evaluations (> {self.max_share:.0%})")
        return out
