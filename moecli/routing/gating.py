"""Pure token-routing gates (design §3; methods-routing §0–2, §4, §6; methods-classic §3).

Every gate takes router logits `[T, E]` (plus its options) and returns a frozen `Routing` record; nothing here
keeps state. Routing runs in float32 whatever the autocast (Switch §2.3 "selective precision").

Conventions (methods-routing §0.2–0.3): tokens are routed in groups of `group_size` contiguous rows (None =
one group); inside a group the queue order is the row order, choices of rank 1 before choices of rank 2
(GShard); a choice is kept iff its exclusive position in its expert is `< C`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from moecli.errors import ConfigError, check_choice
from moecli.routing.losses import balance_loss, importance_loss, load_loss, router_z_loss, smooth_load

CONVENTIONS = ("per_token", "per_choice", "absolute")


# ---------------------------------------------------------------------------------------------------- record


@dataclass(frozen=True)
class Routing:
    """One routing decision for T tokens (design §3: routing is returned data).

    experts `[T, K]` chosen expert ids (long); gates `[T, K]` the weight each choice gets in the output (0
    where the choice was dropped; differentiable); kept `[T, K]` bool; probs `[T, E]` the router's full
    distribution (before top-k and capacity, for losses and statistics); losses: unweighted auxiliary losses
    (scalars); stats: unweighted statistics (scalars or `[E]`); capacity: C per expert per group (None =
    unbounded).
    """

    experts: torch.Tensor
    gates: torch.Tensor
    kept: torch.Tensor
    probs: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    capacity: int | None = None

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    @torch.no_grad()
    def weights(self) -> torch.Tensor:
        """Dense effective weights `[T, E]` (0 where an expert did not process the token), detached: they are
        for statistics; gradients flow through `gates`. A token's experts are distinct, so scatter suffices."""
        w = torch.zeros_like(self.probs, dtype=self.gates.dtype)
        return w.scatter_(1, self.experts, self.gates * self.kept)

    def assignments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Kept (token, expert, gate) triples, each `[N]`, for the sparse dispatch."""
        token = torch.arange(self.experts.shape[0], device=self.experts.device).unsqueeze(1)
        token = token.expand_as(self.experts)
        mask = self.kept
        return token[mask], self.experts[mask], self.gates[mask]


# -------------------------------------------------------------------------------------------------- capacity


def expert_capacity(
    tokens_per_group: int,
    num_experts: int,
    k: int,
    capacity_factor: float | None,
    convention: str = "per_token",
    rounding: str | None = None,
    min_capacity: int = 1,
) -> int | None:
    """Capacity C per expert per group (methods-routing §0.3), or None when unbounded (dropless).

    per_token: `ceil(CF·K·S/E)` (default; CF 1 = exactly the balanced demand for any K);
    per_choice: `floor(CF·S/E)` (Switch eq. 3, Mesh-TF); absolute: `C = CF` (HF Switch's fixed capacity).
    `rounding` overrides the convention's rounding ("ceil" or "floor"); the result is at least `min_capacity`
    and at most S.
    """
    if capacity_factor is None:
        return None
    check_choice("combiner.capacity_convention", convention, CONVENTIONS)
    if convention == "absolute":
        return max(int(capacity_factor), 0)
    raw = capacity_factor * tokens_per_group / num_experts * (k if convention == "per_token" else 1)
    rounding = rounding or ("ceil" if convention == "per_token" else "floor")
    check_choice("combiner.capacity_rounding", rounding, ["ceil", "floor"])
    # Round away float noise first (1.25·1024/128 must give 10, not 9.999…).
    raw = round(raw, 9)
    cap = math.ceil(raw) if rounding == "ceil" else math.floor(raw)
    return int(min(max(cap, min_capacity), tokens_per_group))


def num_groups(num_tokens: int, group_size: int | None) -> int:
    """Number of routing groups; a partial last group is an error (methods-routing §0.2)."""
    if group_size is None:
        return 1
    if group_size < 1 or num_tokens % group_size:
        raise ConfigError(f"combiner.group_size={group_size} must divide the {num_tokens} routed tokens")
    return num_tokens // group_size


def queue_positions(
    expert: torch.Tensor,
    num_experts: int,
    group: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exclusive position of each entry in its (group, expert) queue, entries given in priority order.

    expert, group `[N]` long; offset `[G, E]` (or `[E]`) slots already taken before these entries. Sort-based:
    no `[N, E]` one-hot and no cumsum over experts. Returns `[N]` long.
    """
    key = expert if group is None else group * num_experts + expert
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=int(key.max()) + 1 if key.numel() else 1)
    starts = torch.cumsum(counts, 0) - counts
    sorted_key = key[order]
    pos = torch.empty_like(key)
    pos[order] = torch.arange(key.numel(), device=key.device) - starts[sorted_key]
    if offset is not None:
        pos = pos + offset.reshape(-1)[key]
    return pos


def _groups_of(num_tokens: int, group_size: int | None, device) -> torch.Tensor | None:
    if group_size is None:
        return None
    return torch.arange(num_tokens, device=device) // group_size


def apply_capacity(
    experts: torch.Tensor,
    capacity: int | None,
    num_experts: int,
    group_size: int | None = None,
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """Kept mask `[T, K]`: choices fill each expert's C slots per group, all rank-1 choices first, then rank
    2…

    `active` `[T, K]` marks choices that take part (others are never kept and take no slot).
    """
    t, k = experts.shape
    kept = torch.ones_like(experts, dtype=torch.bool) if active is None else active.clone()
    if capacity is None:
        return kept
    num_groups(t, group_size)
    flat_expert = experts.t().reshape(-1)  # rank-major: every first choice precedes every second choice
    group = _groups_of(t, group_size, experts.device)
    flat_group = None if group is None else group.repeat(k)
    flat_active = kept.t().reshape(-1)
    # Inactive choices queue in a sentinel expert E so that they take no slot.
    flat_expert = torch.where(flat_active, flat_expert, torch.full_like(flat_expert, num_experts))
    pos = queue_positions(flat_expert, num_experts + 1, flat_group)
    return (flat_active & (pos < capacity)).reshape(k, t).t()


# ------------------------------------------------------------------------------------------------ statistics


@torch.no_grad()
def routing_stats(
    experts: torch.Tensor,
    kept: torch.Tensor,
    probs: torch.Tensor,
    logits: torch.Tensor,
    capacity: int | None,
    num_groups_: int = 1,
    demand: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-batch statistics of methods-routing §0.5, unweighted. Loads are fractions of the T tokens.

    dispatch `[E]` post-capacity load; demand `[E]` pre-capacity load; dropped_fraction: dropped choices over
    demanded choices; unrouted_fraction: tokens with no expert; capacity: used fraction of the E·C·G slots;
    max_violation: max/mean − 1 of the post-capacity load (MaxVio); experts_per_token; max_abs_logit;
    router_prob `[E]` mean router probability.
    """
    t, e = probs.shape
    if demand is None:
        demand = torch.ones_like(kept)
    demanded = torch.bincount(experts[demand.bool()], minlength=e).float()
    dispatched = torch.bincount(experts[kept], minlength=e).float()
    n_demand = demanded.sum().clamp_min(1.0)
    stats = {
        "dispatch": dispatched / t,
        "demand": demanded / t,
        "router_prob": probs.float().mean(0),
        "dropped_fraction": 1.0 - dispatched.sum() / n_demand,
        "unrouted_fraction": (~kept.any(-1)).float().mean(),
        "experts_per_token": kept.float().sum(-1).mean(),
        "max_violation": dispatched.max() / dispatched.mean().clamp_min(1e-12) - 1.0,
        "max_abs_logit": logits.detach().abs().max().float(),
    }
    if capacity is not None:
        stats["capacity"] = dispatched.sum() / max(capacity * e * num_groups_, 1)
    return stats


def _float_logits(logits: torch.Tensor) -> torch.Tensor:
    return logits.float()


def _select_top_k(scores: torch.Tensor, k: int, selection_bias: torch.Tensor | None) -> torch.Tensor:
    """Indices `[T, K]` of the k largest `scores + bias` (the bias only selects; DeepSeek-V3, spec §6)."""
    if not 1 <= k <= scores.shape[-1]:
        raise ConfigError(f"combiner.top_k={k} must be between 1 and num_experts={scores.shape[-1]}")
    biased = scores if selection_bias is None else scores + selection_bias.to(scores.dtype)
    return torch.topk(biased, k, dim=-1, sorted=True).indices


# ----------------------------------------------------------------------------------------------------- gates


def top_k_gating(
    logits: torch.Tensor,
    k: int,
    renormalize: bool = True,
    capacity_factor: float | None = None,
    group_size: int | None = None,
    convention: str = "per_token",
    rounding: str | None = None,
    min_capacity: int = 1,
    score_fn: str = "softmax",
    selection_bias: torch.Tensor | None = None,
    balance_form: str = "code",
) -> Routing:
    """Top-k token choice (Mixtral; DeepSeekMoE / V3; methods-routing §0, §6, §7).

    logits `[T, E]`. scores = softmax(logits) (or sigmoid, DeepSeek-V3); experts = top-k of scores (+ the
    selection bias, if any). renormalize=True: gates = kept scores / their sum, which for softmax scores is
    "softmax, top-k, renormalise" (HF Mixtral) = "top-k, then softmax over the kept logits" (Shazeer 2017);
    renormalize=False keeps the raw scores (DeepSeekMoE/V2). With K = 1 and renormalize the gate is
    constantly 1 and the router gets no task gradient (spec §2.8 pitfall 1). Capacity (None = dropless) is
    filled rank-major. Losses: balance over all K choices (top-k normalised form, 1 when balanced; see
    `balance_loss` for the scalings) and z.
    """
    check_choice("combiner.score_fn", score_fn, ["softmax", "sigmoid"])
    logits = _float_logits(logits)
    t, e = logits.shape
    probs = torch.softmax(logits, -1) if score_fn == "softmax" else torch.sigmoid(logits)
    experts = _select_top_k(probs, k, selection_bias)
    gates = probs.gather(1, experts)
    if renormalize:
        gates = gates / gates.sum(-1, keepdim=True).clamp_min(1e-20)
    groups = num_groups(t, group_size)
    cap = expert_capacity(t // groups, e, k, capacity_factor, convention, rounding, min_capacity)
    kept = apply_capacity(experts, cap, e, group_size)
    norm_probs = probs if score_fn == "softmax" else probs / probs.sum(-1, keepdim=True)
    losses = {
        "balance": balance_loss(norm_probs, experts, scale=balance_form, group_size=group_size),
        "z": router_z_loss(logits),
    }
    stats = routing_stats(experts, kept, probs, logits, cap, groups)
    return Routing(experts, gates * kept, kept, probs, losses, _with_losses(stats, losses), cap)


def switch_gating(
    logits: torch.Tensor,
    capacity_factor: float | None = 1.25,
    group_size: int | None = None,
    convention: str = "per_choice",
    rounding: str | None = None,
    min_capacity: int = 1,
    selection_bias: torch.Tensor | None = None,
    f_after_capacity: bool = False,
    balance_form: str = "code",
) -> Routing:
    """Switch top-1 routing (Fedus et al. 2021; methods-routing §2.2).

    p = softmax(logits) in float32; i* = argmax p; gate = p_{i*} (not renormalised); C = floor(CF·S/E) per
    group by default (per-choice, the same as per-token for K = 1 up to rounding); a token is kept iff its
    exclusive position in i*'s queue is < C; a dropped token's gate is 0 (residual only).
    Losses: Switch balance `E·Σ f_i P_i` with f the pre-capacity top-1 fraction (1.0 balanced, E collapsed;
    `f_after_capacity` counts only kept tokens), z-loss. Jitter acts on the router input, so it lives in the
    combiner.
    """
    logits = _float_logits(logits)
    t, e = logits.shape
    probs = torch.softmax(logits, -1)
    experts = _select_top_k(probs, 1, selection_bias)
    gates = probs.gather(1, experts)
    groups = num_groups(t, group_size)
    cap = expert_capacity(t // groups, e, 1, capacity_factor, convention, rounding, min_capacity)
    kept = apply_capacity(experts, cap, e, group_size)
    f_index = experts if not f_after_capacity else torch.where(kept, experts, torch.full_like(experts, -1))
    losses = {
        "balance": balance_loss(probs, f_index, scale=balance_form, group_size=group_size),
        "z": router_z_loss(logits),
    }
    stats = routing_stats(experts, kept, probs, logits, cap, groups)
    return Routing(experts, gates * kept, kept, probs, losses, _with_losses(stats, losses), cap)


def gshard_top2_gating(
    logits: torch.Tensor,
    capacity_factor: float | None = 1.0,
    group_size: int | None = None,
    second_policy: str = "random",
    second_threshold: float = 0.5,
    queue: str = "paper",
    convention: str = "per_token",
    rounding: str | None = None,
    min_capacity: int = 1,
    renormalize_after_drop: bool = False,
    selection_bias: torch.Tensor | None = None,
    balance_form: str = "code",
    generator: torch.Generator | None = None,
) -> Routing:
    """GShard top-2 gating (Lepikhin et al. 2020, Algorithm 1; methods-routing §1.2–1.3).

    g = softmax(logits) `[T, E]`; (e1, g1), (e2, g2) the two largest; the pair is normalised before capacity,
    g1n = g1/(g1+g2), g2n = g2/(g1+g2), and not renormalised after (option `renormalize_after_drop`, fairseq).
    Pass 1: first choices fill C slots in row order per group; the top-1 demand c[e] counts overflow too.
    Pass 2: a second choice is dispatched iff the policy accepts it (random: U(0,1) < g2n/threshold, i.e.
    P = min(1, 2·g2n) at 0.5; threshold: g2n > threshold; all; none) and its position is < C, where
    queue="paper" places it after all first-choice demand and counts every second choice, accepted or not,
    and queue="lingvo" places it after the kept first choices and counts only accepted ones.
    Capacity default: per-token CF 1.0, i.e. 2S/E. Loss: code-scaled `E·Σ_e f_e m_e` (f = pre-capacity top-1).
    """
    check_choice("combiner.second_policy", second_policy, ["random", "threshold", "all", "none"])
    check_choice("combiner.queue", queue, ["paper", "lingvo"])
    logits = _float_logits(logits)
    t, e = logits.shape
    if e < 2:
        raise ConfigError("combiner.num_experts=1 is not valid for gshard; it must be >= 2")
    probs = torch.softmax(logits, -1)
    experts = _select_top_k(probs, 2, selection_bias)
    top = probs.gather(1, experts)
    pair = top / top.sum(-1, keepdim=True)
    g2n = pair[:, 1].detach()
    if second_policy == "random":
        r = torch.rand(t, device=logits.device, generator=generator)
        accept = r < g2n / second_threshold
    elif second_policy == "threshold":
        accept = g2n > second_threshold
    else:
        accept = torch.full_like(g2n, second_policy == "all", dtype=torch.bool)
    groups = num_groups(t, group_size)
    cap = expert_capacity(t // groups, e, 2, capacity_factor, convention, rounding, min_capacity)
    kept = _gshard_keep(experts, accept, cap, e, group_size, queue)
    gates = pair * kept
    if renormalize_after_drop:
        gates = gates / gates.sum(-1, keepdim=True).clamp_min(1e-20)
    losses = {
        "balance": balance_loss(probs, experts[:, 0], scale=balance_form, group_size=group_size),
        "z": router_z_loss(logits),
    }
    demand = torch.stack([torch.ones_like(accept), accept], 1)
    stats = routing_stats(experts, kept, probs, logits, cap, groups, demand)
    stats["second_dispatch_rate"] = kept[:, 1].float().mean()
    stats["second_accept_rate"] = accept.float().mean()
    return Routing(experts, gates, kept, probs, losses, _with_losses(stats, losses), cap)


def _gshard_keep(
    experts: torch.Tensor,
    accept: torch.Tensor,
    cap: int | None,
    num_experts: int,
    group_size: int | None,
    queue: str,
) -> torch.Tensor:
    """Kept mask `[T, 2]` for the two-pass GShard assignment (see `gshard_top2_gating`)."""
    t = experts.shape[0]
    if cap is None:
        return torch.stack([torch.ones_like(accept), accept], 1)
    group = _groups_of(t, group_size, experts.device)
    g = 1 if group is None else t // group_size
    gid = torch.zeros(t, dtype=torch.long, device=experts.device) if group is None else group
    pos1 = queue_positions(experts[:, 0], num_experts, gid)
    keep1 = pos1 < cap
    first = experts[:, 0] if queue == "paper" else experts[:, 0][keep1]
    first_gid = gid if queue == "paper" else gid[keep1]
    offset = torch.bincount(first_gid * num_experts + first, minlength=g * num_experts).view(g, num_experts)
    if queue == "paper":  # every second choice counts, accepted or not
        pos2 = queue_positions(experts[:, 1], num_experts, gid, offset)
        keep2 = accept & (pos2 < cap)
    else:  # rejected second choices take no slot
        sentinel = torch.where(accept, experts[:, 1], torch.full_like(experts[:, 1], num_experts))
        off = torch.cat([offset, offset.new_zeros(g, 1)], 1)
        pos2 = queue_positions(sentinel, num_experts + 1, gid, off)
        keep2 = accept & (pos2 < cap)
    return torch.stack([keep1, keep2], 1)


def noisy_top_k_gating(
    logits: torch.Tensor,
    noise_logits: torch.Tensor | None,
    k: int,
    training: bool,
    noise_floor: float = 1e-6,
    eval_noise: bool = False,
    selection_bias: torch.Tensor | None = None,
    cv_unbiased: bool = False,
    capacity_factor: float | None = None,
    group_size: int | None = None,
    convention: str = "per_token",
    rounding: str | None = None,
    min_capacity: int = 1,
) -> Routing:
    """Noisy top-k gating (Shazeer et al. 2017; methods-classic §3.2).

    logits = clean `x W_g` `[T, E]`; noise_logits = `x W_noise` `[T, E]` (None = no noise);
    sd = softplus(noise
    logits) clamped at `noise_floor`; H = clean + ε·sd (training, or eval with `eval_noise`); G =
    softmax(KeepTopK(H, k)). Losses: importance = CV²(Σ_x G(x)); load = CV²(Σ_x Φ((clean −
    kth_excluding(H))/sd))
    when noise is on (in eval the load loss is skipped: hard counts are logged instead, spec §3.8 pitfall 3).
    `probs` in the record are softmax(H) (the dense gate G_σ when k = E).
    """
    logits = _float_logits(logits)
    t, e = logits.shape
    noisy_on = noise_logits is not None and (training or eval_noise)
    if noisy_on:
        sd = torch.nn.functional.softplus(noise_logits.float()).clamp_min(noise_floor)
        noisy = logits + torch.randn_like(logits) * sd
    else:
        noisy = logits
    experts = _select_top_k(noisy, k, selection_bias)
    gates = torch.softmax(noisy.gather(1, experts), -1)
    groups = num_groups(t, group_size)
    cap = expert_capacity(t // groups, e, k, capacity_factor, convention, rounding, min_capacity)
    kept = apply_capacity(experts, cap, e, group_size)
    gates = gates * kept
    dense_gates = torch.zeros_like(logits).scatter(1, experts, gates)
    losses = {"importance": importance_loss(dense_gates, unbiased=cv_unbiased)}
    if noisy_on and k < e:
        losses["load"] = load_loss(smooth_load(logits, noisy, sd, k), unbiased=cv_unbiased)
    probs = torch.softmax(noisy, -1)
    stats = routing_stats(experts, kept, probs, logits, cap, groups)
    return Routing(experts, gates, kept, probs, losses, _with_losses(stats, losses), cap)


def expert_choice_gating(
    logits: torch.Tensor, capacity_factor: float = 2.0, group_size: int | None = None
) -> Routing:
    """Expert Choice routing (Zhou et al. 2022; methods-routing §4.2).

    S = softmax(logits) over experts `[T, E]`; per group of n tokens each expert takes its k = round(n·c/E)
    highest-affinity tokens (stable sort: ties go to the earlier row); gate = S[token, expert], not
    renormalised. The record has K = E columns (`experts[t] = 0..E-1`, kept = chosen). No auxiliary loss.
    """
    logits = _float_logits(logits)
    t, e = logits.shape
    groups = num_groups(t, group_size)
    n = t // groups
    k = round(n * capacity_factor / e)
    if not 1 <= k <= n:
        raise ConfigError(
            f"combiner.capacity_factor={capacity_factor} gives k={k} tokens per expert for groups "
            f"of {n} tokens and {e} experts; it must be between 1 and {n}"
        )
    probs = torch.softmax(logits, -1)
    per_group = probs.detach().view(groups, n, e).transpose(1, 2)  # [G, E, n]
    top = torch.sort(per_group, dim=-1, descending=True, stable=True).indices[..., :k]
    chosen = torch.zeros(groups, e, n, dtype=torch.bool, device=logits.device)
    chosen.scatter_(2, top, True)
    kept = chosen.transpose(1, 2).reshape(t, e)
    experts = torch.arange(e, device=logits.device).expand(t, e)
    losses = {"z": router_z_loss(logits)}
    stats = routing_stats(experts, kept, probs, logits, k, groups)
    stats.pop("dropped_fraction")  # no token-choice demand exists
    return Routing(experts, probs * kept, kept, probs, losses, _with_losses(stats, losses), k)


# --------------------------------------------------------------------------------------- bias balancing (§6)


@torch.no_grad()
def update_selection_bias(
    bias: torch.Tensor, load: torch.Tensor, rate: float, recentre: bool = True
) -> torch.Tensor:
    """Loss-free balancing step (Wang et al. 2024; DeepSeek-V3; methods-routing §6.2), in place.

    b_i ← b_i + γ·sign(mean_j load_j − load_i); re-centred to zero mean (selection is invariant to a shared
    shift; keeps b bounded, pytorch/torchtitan#1506). bias, load `[E]`.
    """
    bias += rate * torch.sign(load.float().mean() - load.float()).to(bias.dtype)
    if recentre:
        bias -= bias.mean()
    return bias


def _with_losses(stats: dict[str, torch.Tensor], losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the unweighted loss values to the statistics as `<name>_loss` (detached)."""
    out = dict(stats)
    for name, value in losses.items():
        out[f"{name}_loss"] = value.detach()
    return out
