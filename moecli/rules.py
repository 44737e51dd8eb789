"""Combination rules and the distributions they produce (design §1: a combiner is a gate plus a rule).

Rules: weighted sum of outputs, mixture of distributions, product of distributions. Each distribution object
exposes `nll(target) -> [B]` (the per-example training loss of that rule) and `point() -> [B, O]` (the
prediction used for accuracy). Equations are from `methods-classic.md` §1.2 and §2.3–2.4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------- rule functions


def weighted_sum(weights: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """Cooperative blend `Σ_i p_i o_i` (methods-classic §1.2 eq. 1). weights `[B, E]`, outputs `[B, E, ...]`."""
    w = weights.reshape(weights.shape + (1,) * (outputs.dim() - weights.dim()))
    return (w * outputs).sum(dim=1)


def categorical_product(log_probs: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised (generalised) product of categorical experts (methods-classic §2.3).

    log P(y|x) = Σ_m α_m log q_m(y|x) − logsumexp_y' Σ_m α_m log q_m(y'|x)
    log_probs `[B, E, O]` (or raw logits: per-expert constants cancel); weights α `[B, E]` or None (α = 1).
    Returns log-probabilities `[B, O]`.
    """
    if weights is not None:
        log_probs = log_probs * weights.unsqueeze(-1)
    return torch.log_softmax(log_probs.sum(dim=1), dim=-1)


def categorical_mixture(log_weights: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Mixture `log Σ_i p_i q_i(y|x)` (methods-classic §1.2 eq. 4). `[B, E]`, `[B, E, O]` -> `[B, O]`."""
    return torch.logsumexp(log_weights.unsqueeze(-1) + log_probs, dim=1)


def gaussian_product(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    prior: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Precision-weighted product of diagonal Gaussians (methods-classic §2.4; MVAE; gPoE of Cao & Fleet).

    T = Σ_m α_m T_m (+ 1 for the prior expert N(0, I), included once), μ = T⁻¹ Σ_m α_m T_m μ_m,
    computed in log space: ℓ = −logsumexp_m(log α_m − ℓ_m).
    mean, logvar `[B, E, Z]`; mask `[B, E]` (1 = expert present); weights α `[B, E]` or `[B, E, Z]`.
    Returns (mean `[B, Z]`, logvar `[B, Z]`).
    """
    log_prec = -logvar
    if weights is not None:
        w = weights if weights.dim() == mean.dim() else weights.unsqueeze(-1)
        log_prec = log_prec + torch.log(w.clamp_min(1e-30))
    if mask is not None:
        log_prec = log_prec.masked_fill(~mask.bool().unsqueeze(-1), float("-inf"))
        # Absent experts may hold NaN placeholders: fill, never multiply (NaN · 0 = NaN; multimodal §1.2).
        mean = mean.masked_fill(~mask.bool().unsqueeze(-1), 0.0)
    if prior:
        zeros = torch.zeros_like(mean[:, :1])
        mean = torch.cat([zeros, mean], dim=1)
        log_prec = torch.cat([zeros, log_prec], dim=1)
    fused_logvar = -torch.logsumexp(log_prec, dim=1)
    fused_mean = (mean * torch.exp(log_prec + fused_logvar.unsqueeze(1))).sum(dim=1)
    return fused_mean, fused_logvar


# ----------------------------------------------------------------------------------------------- distributions


@dataclass(frozen=True)
class Categorical:
    """Class distribution; log_probs `[B, O]` (normalised). nll = −log P(y)."""

    log_probs: torch.Tensor

    def nll(self, target: torch.Tensor) -> torch.Tensor:
        return -self.log_probs.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)

    def point(self) -> torch.Tensor:
        return self.log_probs.exp()


@dataclass(frozen=True)
class CategoricalMixture:
    """Mixture of expert class distributions (methods-classic §1.2 eq. 4).

    log_weights `[B, E]` (log p), expert_log_probs `[B, E, O]`; nll = −logsumexp_i(log p_i + log q_i(y)), whose
    gradient with respect to the gate logits is p − h.
    """

    log_weights: torch.Tensor
    expert_log_probs: torch.Tensor

    @property
    def log_probs(self) -> torch.Tensor:
        return categorical_mixture(self.log_weights, self.expert_log_probs)

    def nll(self, target: torch.Tensor) -> torch.Tensor:
        return -self.log_probs.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)

    def responsibilities(self, target: torch.Tensor) -> torch.Tensor:
        """Posterior h_i = p_i q_i(y) / Σ_j p_j q_j(y), `[B, E]`."""
        idx = target.long().view(-1, 1, 1).expand(-1, self.expert_log_probs.shape[1], 1)
        joint = self.log_weights + self.expert_log_probs.gather(-1, idx).squeeze(-1)
        return torch.softmax(joint, dim=-1)

    def point(self) -> torch.Tensor:
        return self.log_probs.exp()


@dataclass(frozen=True)
class Gaussian:
    """Diagonal Gaussian, mean and logvar `[B, O]`. nll drops the constant ½·O·log 2π.

    With logvar = 0 and the blended mean this is ½‖d − Σ p_i o_i‖², half the cooperative error E_coop.
    """

    mean: torch.Tensor
    logvar: torch.Tensor

    def nll(self, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * (((target - self.mean) ** 2) * torch.exp(-self.logvar) + self.logvar).sum(-1)

    def point(self) -> torch.Tensor:
        return self.mean


@dataclass(frozen=True)
class GaussianMixture:
    """Mixture of Gaussians centred on the expert outputs (methods-classic §1.2 eq. 3, Jacobs' E_nll).

    log_weights `[B, E]`, means `[B, E, O]`, shared fixed `sigma`.
    nll = −log Σ_i p_i exp(−‖d − o_i‖² / 2σ²) (normalising constant dropped: it has no parameter).
    point() is the blend Σ p_i o_i (the project's default test output).
    """

    log_weights: torch.Tensor
    means: torch.Tensor
    sigma: float = 1.0

    def _log_joint(self, target: torch.Tensor) -> torch.Tensor:
        sq = ((target.unsqueeze(1) - self.means) ** 2).sum(-1)
        return self.log_weights - sq / (2.0 * self.sigma**2)

    def nll(self, target: torch.Tensor) -> torch.Tensor:
        return -torch.logsumexp(self._log_joint(target), dim=-1)

    def responsibilities(self, target: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self._log_joint(target), dim=-1)

    def point(self) -> torch.Tensor:
        return weighted_sum(self.log_weights.exp(), self.means)


@dataclass(frozen=True)
class ExpectedSquaredError:
    """Jacobs' competitive error E_comp = Σ_i p_i ‖d − o_i‖² (methods-classic §1.2 eq. 2).

    Not a likelihood: `nll` returns the expected error so that the same training code applies.
    """

    weights: torch.Tensor
    means: torch.Tensor

    def nll(self, target: torch.Tensor) -> torch.Tensor:
        return (self.weights * ((target.unsqueeze(1) - self.means) ** 2).sum(-1)).sum(-1)

    def point(self) -> torch.Tensor:
        return weighted_sum(self.weights, self.means)


def entropy(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats along `dim`, with 0·log 0 = 0."""
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim)


LOG2 = math.log(2.0)


def as_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Expert logits `[..., O]` -> normalised log-probabilities."""
    return F.log_softmax(logits, dim=-1)
