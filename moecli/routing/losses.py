"""Auxiliary routing losses, all unweighted (methods-routing §0.4, §2.2, §3.2; methods-classic §3.2).

The combiner multiplies them by their coefficients; here every function returns the plain value so that it
can be logged and compared across routers (balance losses are 1.0 at perfect balance in the default scale).
"""

from __future__ import annotations

import math

import torch

from moecli.errors import check_choice

BALANCE_SCALES = ("code", "paper", "hf_mixtral")


def _cv_squared(x: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Var(x)/mean(x)² over the entries of x (population variance by default; methods-classic §5)."""
    mean = x.mean()
    return x.var(unbiased=unbiased) / (mean * mean).clamp_min(1e-12)


def balance_loss(
    router_probs: torch.Tensor, expert_index: torch.Tensor, scale: str = "code", group_size: int | None = None
) -> torch.Tensor:
    """Switch / GShard balance loss over groups (methods-routing §0.4), averaged over groups.

    router_probs `[T, E]` (full distribution, differentiable); expert_index `[T]` or `[T, K]` chosen experts
    (entries < 0 are ignored, e.g. dropped tokens when f is counted after capacity).
    scale="code": `E/(K·S) · Σ_e count_e · P_e` — Switch `E·Σ f P` for K = 1, GShard code scale, DeepSeek's
    normalised top-k form; 1.0 when uniform and balanced, E (K = 1) when collapsed.
    scale="paper": GShard paper `(1/E) Σ f m` = code / E² (1/E² balanced). scale="hf_mixtral": HF Mixtral
    `E·Σ_{k,e} f[k,e] P_e` = K · code (K balanced).
    """
    check_choice("combiner.balance_form", scale, BALANCE_SCALES)
    t, e = router_probs.shape
    idx = expert_index.reshape(t, -1)
    k = idx.shape[1]
    g = 1 if group_size is None else t // group_size
    s = t // g
    valid = idx >= 0
    group = (torch.arange(t, device=idx.device) // s).unsqueeze(1).expand_as(idx)
    counts = torch.bincount((group * e + idx.clamp_min(0))[valid], minlength=g * e).view(g, e)
    f = counts.to(router_probs.dtype) / (k * s)  # [G, E], no gradient
    p = router_probs.reshape(g, s, e).mean(1)  # [G, E]
    code = (e * (f * p).sum(-1)).mean()
    if scale == "paper":
        return code / (e * e)
    if scale == "hf_mixtral":
        return code * k
    return code


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss `(1/T) Σ_t (logsumexp_j x_tj)²` on raw logits `[T, E]` (eq. 5); (ln E)² at 0."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def importance_loss(gates: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Shazeer 2017: CV²(Importance), Importance = Σ_x G(x) over the batch; gates `[T, E]`."""
    return _cv_squared(gates.sum(0), unbiased)


def load_loss(load: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Shazeer 2017: CV²(Load) of the smooth load vector `[E]` from `smooth_load`."""
    return _cv_squared(load, unbiased)


def prob_in_top_k(clean: torch.Tensor, noisy: torch.Tensor, sd: torch.Tensor, k: int) -> torch.Tensor:
    """P(x, i) = Φ((clean_i − kth_excluding(H(x), k, i)) / sd_i), `[T, E]` (methods-classic §3.2).

    kth_excluding is the (k+1)-th largest noisy logit when i is currently in the top k, else the k-th largest
    (tensor2tensor's `_prob_in_top_k` identity). Needs k < E.
    """
    top = torch.topk(noisy, k + 1, dim=-1).values
    kth, kth_plus = top[:, k - 1 : k], top[:, k : k + 1]
    in_top = noisy >= kth  # ties at the threshold count as in (measure zero)
    threshold = torch.where(in_top, kth_plus, kth)
    normal = torch.distributions.Normal(
        torch.zeros((), dtype=clean.dtype, device=clean.device),
        torch.ones((), dtype=clean.dtype, device=clean.device),
    )
    return normal.cdf((clean - threshold) / sd)


def smooth_load(clean: torch.Tensor, noisy: torch.Tensor, sd: torch.Tensor, k: int) -> torch.Tensor:
    """Load(X)_i = Σ_x P(x, i), `[E]`: the differentiable load estimate of Shazeer 2017."""
    return prob_in_top_k(clean, noisy, sd, k).sum(0)


def _per_modality_mean(
    values: torch.Tensor, modality: torch.Tensor | None, num_modalities: int, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of `values [T, ...]` per modality -> ([M, ...], present `[M]` bool)."""
    t = values.shape[0]
    mod = torch.zeros(t, dtype=torch.long, device=values.device) if modality is None else modality.long()
    weight = torch.ones(t, dtype=values.dtype, device=values.device)
    if valid is not None:
        weight = weight * valid.to(values.dtype)
    count = torch.zeros(num_modalities, dtype=values.dtype, device=values.device).index_add(0, mod, weight)
    flat = values.reshape(t, -1) * weight.unsqueeze(1)
    total = torch.zeros(num_modalities, flat.shape[1], dtype=values.dtype, device=values.device)
    total = total.index_add(0, mod, flat)
    mean = total / count.clamp_min(1.0).unsqueeze(1)
    return mean.reshape((num_modalities,) + values.shape[1:]), count > 0


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)


def entropy_local_loss(
    probs: torch.Tensor,
    modality: torch.Tensor | None = None,
    num_modalities: int = 1,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """LIMoE local loss per modality, `[M]`: mean per-token routing entropy (methods-routing §3.2).

    probs `[T, E]` full softmax; modality `[T]` ids in 0..M-1 (None = one group); valid `[T]` padding mask.
    Uniform routing gives ln E; one-hot gives 0. Absent modalities give 0.
    """
    mean, present = _per_modality_mean(_entropy(probs).unsqueeze(1), modality, num_modalities, valid)
    return mean.squeeze(1) * present


def entropy_global_loss(
    probs: torch.Tensor,
    modality: torch.Tensor | None = None,
    num_modalities: int = 1,
    min_experts: float | None = 4.0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """LIMoE global loss per modality, `[M]`: max(0, τ − H(p̄_m)), τ = ln(min_experts) (methods-routing §3.2).

    min_experts None gives the unthresholded −H(p̄_m). Absent modalities give 0.
    """
    mean, present = _per_modality_mean(probs, modality, num_modalities, valid)
    neg_h = -_entropy(mean)
    loss = neg_h if min_experts is None else torch.relu(math.log(min_experts) + neg_h)
    return loss * present
