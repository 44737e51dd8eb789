"""Routing statistics in one schema for every combiner (design §3; methods-routing §0.5).

Keys: `route/<slot>/<stat>` and `route/<slot>/<stat>/e<i>`; affinity tables as
`route/<slot>/affinity/<label>/e<i>` (mean gate weight of expert i on examples of that class, task or modality).
All statistics are unweighted and computed without gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moecli.rules import entropy


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation with population moments (methods-classic §5): Var(x) / mean(x)²."""
    mean = x.mean()
    return x.var(unbiased=False) / (mean * mean).clamp_min(1e-12)


class RoutingAccumulator:
    """Collects the effective gate weights `[B, E]` of one slot over batches and summarises them.

    weights: effective per-example expert weights, rows sum to 1 for gates that promise it (0 = not used).
    labels: class / task / modality index per example `[B]` for the affinity table (optional).
    stats: extra per-batch statistics from the combiner's output (scalars or `[E]` vectors), averaged over
    batches weighted by batch size.
    """

    def __init__(self, slot: str, num_experts: int, label_names: Sequence[str] = (), dead_fraction: float = 0.1):
        self.slot, self.num_experts, self.label_names = slot, num_experts, tuple(label_names)
        self.dead_fraction = dead_fraction
        self.count = 0
        self.importance = torch.zeros(num_experts, dtype=torch.float64)
        self.load = torch.zeros(num_experts, dtype=torch.float64)
        self.entropy_sum = 0.0
        self.affinity = torch.zeros(max(len(self.label_names), 1), num_experts, dtype=torch.float64)
        self.label_count = torch.zeros(max(len(self.label_names), 1), dtype=torch.float64)
        self.extra: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def add(self, weights: torch.Tensor, labels: torch.Tensor | None = None,
            stats: dict[str, torch.Tensor] | None = None) -> None:
        w = weights.detach().reshape(-1, self.num_experts).to("cpu", torch.float64)
        n = w.shape[0]
        self.count += n
        self.importance += w.sum(0)
        # Rows with no expert (tokens dropped by capacity) count for no expert, not for expert 0 (spec §2.8.3).
        routed = w.abs().sum(-1) > 0
        self.load += torch.bincount(w.argmax(-1)[routed], minlength=self.num_experts).double()
        total = w.sum(-1, keepdim=True).clamp_min(1e-30)
        self.entropy_sum += float(entropy(w / total).sum())
        if labels is not None and self.label_names:
            lab = labels.detach().reshape(-1).to("cpu").long()
            self.affinity.index_add_(0, lab, w)
            self.label_count += torch.bincount(lab, minlength=len(self.label_names)).double()
        for key, value in (stats or {}).items():
            value = value.detach().to("cpu", torch.float64).reshape(-1) * n
            self.extra[key] = self.extra[key] + value if key in self.extra else value

    def metrics(self) -> dict[str, float]:
        """Summary over everything added so far; empty when nothing was added."""
        if self.count == 0:
            return {}
        return routing_metrics(self.slot, self.importance / self.count, self.load / self.count,
                               self.entropy_sum / self.count, self._affinity(), self.dead_fraction,
                               {k: v / self.count for k, v in self.extra.items()})

    def _affinity(self) -> dict[str, torch.Tensor]:
        return {name: self.affinity[i] / self.label_count[i]
                for i, name in enumerate(self.label_names) if self.label_count[i] > 0}


def routing_metrics(slot: str, importance: torch.Tensor, load: torch.Tensor, mean_entropy: float,
                    affinity: dict[str, torch.Tensor] | None = None, dead_fraction: float = 0.1,
                    extra: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Turn per-expert importance `[E]` (mean weight) and load `[E]` (top-1 fraction) into metric keys.

    dead: experts whose importance share is below `dead_fraction / E` (a tenth of a fair share by default).
    balance: Switch form E · Σ_e f_e P_e with f = load and P = importance share (1.0 when balanced).
    """
    p = f"route/{slot}"
    num_experts = importance.numel()
    share = importance / importance.sum().clamp_min(1e-30)
    out: dict[str, float] = {
        f"{p}/cv2_importance": float(cv_squared(importance)),
        f"{p}/cv2_load": float(cv_squared(load)),
        f"{p}/entropy": float(mean_entropy),
        f"{p}/marginal_entropy": float(entropy(share)),
        f"{p}/dead": float((share < dead_fraction / num_experts).sum()),
        f"{p}/balance": float(num_experts * (load * share).sum()),
    }
    for i in range(num_experts):
        out[f"{p}/load/e{i}"] = float(load[i])
        out[f"{p}/importance/e{i}"] = float(importance[i])
    for name, row in (affinity or {}).items():
        for i in range(num_experts):
            out[f"{p}/affinity/{name}/e{i}"] = float(row[i])
    for key, value in (extra or {}).items():
        if value.numel() == 1:
            out[f"{p}/{key}"] = float(value)
        else:
            for i, v in enumerate(value.tolist()):
                out[f"{p}/{key}/e{i}"] = float(v)
    return out
