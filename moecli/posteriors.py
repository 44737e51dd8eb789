"""Gaussian posterior distributions for expert fusion in multimodal VAEs (methods-multimodal §1–2).

A Gaussian is `(μ, ℓ)` with ℓ = log σ² (log-variance; precision T = exp(−ℓ)); every conversion lives here.
`GaussianPosterior` is one diagonal Gaussian `[B, Z]` (a product of experts: PoE, gPoE). A
`GaussianPosteriorMixture` holds K diagonal components `[B, K, Z]` with log mixture weights `[B, K]`
(−inf = component absent): the MMVAE mixture (K = M modalities) or the MoPoE mixture of subset products
(K = U = 2^M − 1 subsets). Both expose `rsample`, `log_prob`, `point` and `nll` (= −log_prob), so the rest of
moecli can treat them like the other distribution objects of `moecli.rules`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

LOG_2PI = math.log(2.0 * math.pi)


def clamp_logvar(logvar: torch.Tensor, kind: str = "soft", bound: float = 6.0) -> torch.Tensor:
    """Bound log-variances (§6 item 3): soft `c·tanh(ℓ/c)` keeps a gradient at the bound; hard; none."""
    if kind == "soft":
        return bound * torch.tanh(logvar / bound)
    if kind == "hard":
        return logvar.clamp(-bound, bound)
    return logvar


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; μ, exp ℓ) summed over the last axis (Z): `[..., Z]` -> `[...]`."""
    return -0.5 * (((z - mean) ** 2) * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over Z, the prior p(z): `[..., Z]` -> `[...]`."""
    return -0.5 * (z * z + LOG_2PI).sum(-1)


def kl_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) = ½ Σ_Z (μ² + σ² − 1 − ℓ) (§2.1): `[..., Z]` -> `[...]`."""
    return 0.5 * (mean * mean + torch.exp(logvar) - 1.0 - logvar).sum(-1)


def log_mean_exp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """lme_k x_k = logsumexp_k x_k − log n along `dim` (§0.1)."""
    return torch.logsumexp(x, dim=dim) - math.log(x.shape[dim])


def nonempty_subsets(num_modalities: int) -> torch.Tensor:
    """All U = 2^M − 1 non-empty subsets as a bool table `[U, M]`, by size, then in index order.

    The last row is the full set; rows 0..M−1 are the singletons.
    """
    rows = [c for k in range(1, num_modalities + 1) for c in itertools.combinations(range(num_modalities), k)]
    table = torch.zeros(len(rows), num_modalities, dtype=torch.bool)
    for i, members in enumerate(rows):
        table[i, list(members)] = True
    return table


@dataclass(frozen=True)
class GaussianPosterior:
    """One diagonal Gaussian posterior q(z|X_S): mean, logvar `[B, Z]`."""

    mean: torch.Tensor
    logvar: torch.Tensor

    def rsample(self, num_samples: int = 1) -> torch.Tensor:
        """Reparameterised samples `[N, B, Z]`."""
        eps = torch.randn((num_samples,) + tuple(self.mean.shape), dtype=self.mean.dtype,
                          device=self.mean.device)
        return self.mean + torch.exp(0.5 * self.logvar) * eps

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z) for z `[..., B, Z]` -> `[..., B]`."""
        return gaussian_log_prob(z, self.mean, self.logvar)

    def kl_prior(self) -> torch.Tensor:
        """KL(q ‖ N(0, I)) `[B]`."""
        return kl_standard_normal(self.mean, self.logvar)

    def nll(self, target: torch.Tensor) -> torch.Tensor:
        return -self.log_prob(target)

    def point(self) -> torch.Tensor:
        return self.mean

    def as_mixture(self) -> GaussianPosteriorMixture:
        """The same distribution as a one-component mixture (one code path for objectives)."""
        return GaussianPosteriorMixture(self.mean.new_zeros(self.mean.shape[0], 1), self.mean.unsqueeze(1),
                                        self.logvar.unsqueeze(1), kl="components")


@dataclass(frozen=True)
class GaussianPosteriorMixture:
    """Mixture q(z|X) = Σ_k π_k N(z; μ_k, σ_k²) of diagonal Gaussians (§1.3 MMVAE, §1.4 MoPoE).

    log_weights `[B, K]` (log π; −inf marks an absent component), mean and logvar `[B, K, Z]` (finite even
    for absent components). `kl` names the regulariser the objective uses: "mixture" = Monte Carlo
    log p(z) − log q_mix(z) (MMVAE, §2.3), "components" = Σ_k π_k KL(q_k ‖ p) in closed form (MoPoE's
    Jensen bound, §2.4; exact for K = 1).
    """

    log_weights: torch.Tensor
    mean: torch.Tensor
    logvar: torch.Tensor
    kl: str = "mixture"

    @property
    def weights(self) -> torch.Tensor:
        """π `[B, K]`."""
        return torch.exp(self.log_weights)

    def rsample(self, num_samples: int = 1) -> torch.Tensor:
        """Stratified reparameterised samples: N from every component, `[K, N, B, Z]` (§1.3).

        Component k's samples depend on μ_k and σ_k only (∂z_k/∂μ_j = 0 for j ≠ k).
        """
        mean, std = self.mean.transpose(0, 1), torch.exp(0.5 * self.logvar).transpose(0, 1)  # [K, B, Z]
        eps = torch.randn((mean.shape[0], num_samples) + tuple(mean.shape[1:]), dtype=mean.dtype,
                          device=mean.device)
        return mean.unsqueeze(1) + std.unsqueeze(1) * eps

    def sample(self) -> torch.Tensor:
        """One ancestral sample per example `[B, Z]` (component drawn from π; for evaluation, no gradient)."""
        idx = torch.multinomial(self.weights, 1).squeeze(-1)
        rows = torch.arange(idx.shape[0], device=idx.device)
        mean, logvar = self.mean[rows, idx], self.logvar[rows, idx]
        return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)

    def component_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q_k(z) for z `[..., B, Z]` -> `[..., B, K]`."""
        return gaussian_log_prob(z.unsqueeze(-2), self.mean, self.logvar)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q_mix(z) = logsumexp_k(log π_k + log q_k(z)), z `[..., B, Z]` -> `[..., B]`."""
        return torch.logsumexp(self.log_weights + self.component_log_prob(z), dim=-1)

    def responsibilities(self, z: torch.Tensor) -> torch.Tensor:
        """r_k(z) = π_k q_k(z) / q_mix(z), `[..., B, K]`."""
        return torch.softmax(self.log_weights + self.component_log_prob(z), dim=-1)

    def kl_components(self) -> torch.Tensor:
        """KL(q_k ‖ N(0, I)) per component `[B, K]`."""
        return kl_standard_normal(self.mean, self.logvar)

    def nll(self, target: torch.Tensor) -> torch.Tensor:
        return -self.log_prob(target)

    def point(self) -> torch.Tensor:
        """Mixture mean Σ_k π_k μ_k `[B, Z]` (the representation probes read, §1.3)."""
        return (self.weights.unsqueeze(-1) * self.mean).sum(1)

    def as_mixture(self) -> GaussianPosteriorMixture:
        return self


def as_posterior(output) -> GaussianPosterior | GaussianPosteriorMixture:
    """A combiner's Gaussian output as a posterior object: mixtures pass through; anything with `mean` and
    `logvar` `[B, Z]` (e.g. `moecli.rules.Gaussian` from `poe`) becomes a `GaussianPosterior`."""
    if isinstance(output, (GaussianPosterior, GaussianPosteriorMixture)):
        return output
    return GaussianPosterior(output.mean, output.logvar)
