"""Conformance tests of the pure routing functions and losses (methods-routing §0–6 checks; classic §3.9)."""

from __future__ import annotations

import math

import pytest
import torch

from moecli.errors import ConfigError
from moecli.routing import (
    balance_loss,
    entropy_global_loss,
    entropy_local_loss,
    expert_capacity,
    expert_choice_gating,
    gshard_top2_gating,
    noisy_top_k_gating,
    prob_in_top_k,
    router_z_loss,
    switch_gating,
    top_k_gating,
    update_selection_bias,
)
from moecli.routing.gating import apply_capacity, queue_positions
from moecli.routing.soft import soft_moe_weights

# ----------------------------------------------------------------------------------------- balance and z loss


@pytest.mark.parametrize("e", [2, 8, 32])
def test_balance_loss_uniform_is_exactly_one(e):
    t = 16 * e
    probs = torch.full((t, e), 1.0 / e, dtype=torch.float64)
    assert balance_loss(probs, torch.arange(t) % e).item() == 1.0
    assert balance_loss(probs, torch.arange(t) % e, scale="paper").item() == pytest.approx(
        1 / e**2, abs=1e-15
    )


def test_balance_loss_collapse_scales_and_gradient():
    t, e = 64, 8
    logits = torch.zeros(t, e)
    logits[:, 0] = 40.0  # p ≈ one-hot on expert 0
    probs = torch.softmax(logits, -1).requires_grad_()
    idx = torch.zeros(t, dtype=torch.long)
    assert balance_loss(probs, idx).item() == pytest.approx(8.0, rel=1e-6)
    assert balance_loss(probs, idx, scale="paper").item() == pytest.approx(0.125, rel=1e-6)
    # ∂(α·L_B)/∂P = α·E·f = (0.08, 0, …) with P the mean probability (spec §2.9).
    p_mean = probs.mean(0)
    p_mean.retain_grad()
    loss = 0.01 * e * (torch.bincount(idx, minlength=e).float() / t * p_mean).sum()
    loss.backward()
    assert torch.allclose(p_mean.grad, torch.tensor([0.08] + [0.0] * 7))
    # The library form gives the same gradient on the probabilities.
    probs2 = probs.detach().clone().requires_grad_()
    (0.01 * balance_loss(probs2, idx)).backward()
    assert torch.allclose(probs2.grad.sum(0), torch.tensor([0.08] + [0.0] * 7), atol=1e-7)


def test_balance_loss_top_k_forms():
    t, e, k = 64, 8, 2
    probs = torch.full((t, e), 1.0 / e)
    idx = torch.stack([torch.arange(t) % e, (torch.arange(t) + 1) % e], 1)
    assert balance_loss(probs, idx).item() == pytest.approx(1.0)
    assert balance_loss(probs, idx, scale="hf_mixtral").item() == pytest.approx(float(k))


def test_balance_loss_averages_over_groups():
    e = 4
    probs = torch.softmax(torch.randn(32, e), -1)
    idx = torch.randint(0, e, (32,))
    per_group = [balance_loss(probs[i : i + 8], idx[i : i + 8]) for i in range(0, 32, 8)]
    assert balance_loss(probs, idx, group_size=8).item() == pytest.approx(float(sum(per_group) / 4), rel=1e-6)


@pytest.mark.parametrize("e", [2, 8, 64])
def test_z_loss_at_zero_logits_and_gradient(e):
    b = 10
    logits = torch.zeros(b, e, dtype=torch.float64, requires_grad=True)
    z = router_z_loss(logits)
    assert z.item() == pytest.approx(math.log(e) ** 2, rel=1e-6)
    z.backward()
    assert torch.allclose(
        logits.grad, torch.full((b, e), 2 * math.log(e) / (e * b), dtype=torch.float64), rtol=1e-5
    )
    assert router_z_loss(torch.zeros(b, 8)).item() == pytest.approx(4.3241, abs=1e-4)


def test_z_loss_grows_quadratically():
    x = torch.randn(100, 8)
    assert router_z_loss(10 * x) > 20 * router_z_loss(x)


# --------------------------------------------------------------------------------------------------- capacity


def test_capacity_worked_values():
    assert expert_capacity(1024, 128, 1, 1.25, "per_choice") == 10
    assert expert_capacity(1024, 128, 1, 1.25, "per_token") == 10
    assert expert_capacity(100, 8, 1, 1.25, "per_choice") == 15
    assert expert_capacity(100, 8, 1, 1.25, "per_token") == 16
    assert expert_capacity(100, 8, 2, 1.25, "per_choice") == 15
    assert expert_capacity(100, 8, 2, 1.25, "per_token") == 32
    assert expert_capacity(100, 8, 2, None) is None
    assert expert_capacity(10, 2, 2, 100.0) == 10  # capped at S
    assert expert_capacity(100, 8, 1, 0.01, "per_choice", min_capacity=4) == 4
    assert expert_capacity(100, 8, 1, 64, "absolute") == 64
    with pytest.raises(ConfigError, match="choose one of"):
        expert_capacity(100, 8, 1, 1.0, "sideways")


def test_queue_positions_are_exclusive_counts():
    expert = torch.tensor([0, 1, 0, 0, 1, 2])
    assert queue_positions(expert, 3).tolist() == [0, 0, 1, 2, 1, 0]
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    assert queue_positions(expert, 3, group).tolist() == [0, 0, 1, 0, 0, 0]


def test_switch_ten_tokens_capacity_four_keeps_first_four():
    logits = torch.zeros(10, 4)
    logits[:, 0] = 5.0
    r = switch_gating(logits, capacity_factor=4, convention="absolute")
    assert r.kept[:, 0].tolist() == [True] * 4 + [False] * 6
    assert r.stats["dropped_fraction"].item() == pytest.approx(0.6)
    assert r.stats["capacity"].item() == pytest.approx(4 / 16)


def test_switch_gate_value_is_raw_probability_and_balance_pre_capacity():
    torch.manual_seed(0)
    logits = torch.randn(64, 4)
    r = switch_gating(logits, capacity_factor=None)
    p = torch.softmax(logits, -1)
    assert torch.equal(r.experts[:, 0], p.argmax(-1))
    assert torch.allclose(r.gates[:, 0], p.max(-1).values)
    assert r.kept.all() and r.stats["dropped_fraction"].item() == 0.0
    # f counts pre-capacity choices: a tight capacity does not change the loss.
    tight = switch_gating(logits, capacity_factor=1, convention="absolute")
    assert tight.losses["balance"].item() == pytest.approx(r.losses["balance"].item())


def test_switch_router_runs_in_float32_under_bfloat16():
    logits = torch.randn(32, 8).bfloat16()
    r = switch_gating(logits, 1.25)
    assert r.probs.dtype == torch.float32 and r.gates.dtype == torch.float32


def test_rank_one_choices_fill_capacity_before_rank_two():
    experts = torch.tensor([[0, 1], [0, 1], [1, 0], [1, 0]])
    kept = apply_capacity(experts, 2, 2)
    assert kept[:, 0].all() and not kept[:, 1].any()


# ------------------------------------------------------------------------------------------------------ top-k


def test_top_k_renormalize_equals_softmax_over_kept_logits():
    torch.manual_seed(1)
    logits = torch.randn(50, 8)
    r = top_k_gating(logits, 3)
    kept_logits = logits.gather(1, r.experts)
    assert torch.allclose(r.gates, torch.softmax(kept_logits, -1), atol=1e-6)
    raw = top_k_gating(logits, 3, renormalize=False)
    assert torch.allclose(raw.gates, torch.softmax(logits, -1).gather(1, raw.experts))


def test_top_k_with_k_equal_e_is_dense_softmax():
    logits = torch.randn(20, 6)
    r = top_k_gating(logits, 6)
    assert torch.allclose(r.weights(), torch.softmax(logits, -1), atol=1e-6)


def test_unbounded_capacity_drops_nothing():
    logits = torch.randn(200, 8)
    logits[:, 0] += 10  # everybody wants expert 0
    for r in (
        top_k_gating(logits, 2),
        switch_gating(logits, None),
        gshard_top2_gating(logits, None, second_policy="all"),
    ):
        assert r.kept.all()
        assert r.stats["dropped_fraction"].item() == 0.0


# ----------------------------------------------------------------------------------------------------- GShard


def test_gshard_second_dispatch_rate_at_uniform_probabilities():
    # Spec §1.9: S = 1024, E = 16, C = 2S/E = 128, logits N(0, 0.1²): about 92 % of tokens get two experts
    # (pre-capacity rate E[min(1, 2·g2n)] ≈ 0.976, the rest lost to capacity). The per-seed spread is about
    # ±0.02, so the check averages over seeds; the lingvo queue keeps more second choices than the paper
    # queue.
    s, e = 1024, 16
    rates = {"paper": [], "lingvo": []}
    for seed in range(6):
        logits = 0.1 * torch.randn(s, e, generator=torch.Generator().manual_seed(seed))
        for queue in rates:
            r = gshard_top2_gating(logits, 1.0, queue=queue, generator=torch.Generator().manual_seed(seed))
            assert r.capacity == 128
            assert torch.bincount(r.experts[r.kept], minlength=e).max() <= 128
            assert r.kept[:, 0].all()
            assert 0.95 <= r.stats["second_accept_rate"].item() <= 0.995
            assert r.losses["balance"].item() == pytest.approx(1.0, abs=0.1)
            rates[queue].append(r.stats["second_dispatch_rate"].item())
    paper, lingvo = (sum(v) / len(v) for v in rates.values())
    assert 0.895 <= paper <= 0.935
    assert paper < lingvo <= 0.95


def test_gshard_policy_all_with_large_capacity():
    logits = torch.randn(64, 8, dtype=torch.float64)
    r = gshard_top2_gating(logits, capacity_factor=100.0, second_policy="all")
    assert r.kept.all()
    assert torch.allclose(r.gates.sum(-1).double(), torch.ones(64, dtype=torch.float64), atol=1e-6)


def test_gshard_ordering_second_choices_queue_behind_first_choices():
    # 10 tokens prefer expert 0 (second: 1); C = 4: exactly the first 4 keep expert 0.
    logits = torch.full((10, 4), -5.0)
    logits[:, 0], logits[:, 1] = 3.0, 2.0
    r = gshard_top2_gating(logits, capacity_factor=4, convention="absolute", second_policy="all")
    assert r.kept[:, 0].tolist() == [True] * 4 + [False] * 6
    # Expert 1 has no first choices, so its 4 slots go to the first 4 second choices.
    assert r.kept[:, 1].tolist() == [True] * 4 + [False] * 6
    # A token whose first choice is expert 1 is served before any second choice to expert 1.
    logits2 = logits.clone()
    logits2[9, 1] = 4.0
    r2 = gshard_top2_gating(logits2, capacity_factor=4, convention="absolute", second_policy="all")
    assert r2.experts[9, 0].item() == 1 and r2.kept[9, 0]
    assert r2.kept[:, 1].sum().item() == 3  # one slot of expert 1 taken by token 9's first choice


def test_gshard_gates_not_renormalised_after_drop():
    logits = torch.full((10, 4), -5.0)
    logits[:, 0], logits[:, 1] = 3.0, 2.0
    r = gshard_top2_gating(logits, capacity_factor=4, convention="absolute", second_policy="none")
    g1n = 1 / (1 + math.exp(-1.0))
    assert r.gates[0, 0].item() == pytest.approx(g1n, rel=1e-5)
    assert r.gates[0, 1].item() == 0.0
    renorm = gshard_top2_gating(
        logits, capacity_factor=4, convention="absolute", second_policy="none", renormalize_after_drop=True
    )
    assert renorm.gates[0, 0].item() == pytest.approx(1.0)


def test_gshard_paper_scale_loss():
    probs_logits = torch.zeros(64, 8)
    r = gshard_top2_gating(probs_logits, None, balance_form="paper", second_policy="none")
    assert r.losses["balance"].item() == pytest.approx(1 / 64, rel=1e-5)


# ------------------------------------------------------------------------------------------------ noisy top-k


def test_noisy_top_k_load_estimator_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    e, k = 8, 2
    clean = torch.randn(1, e, generator=g, dtype=torch.float64)
    sd = torch.nn.functional.softplus(torch.randn(1, e, generator=g, dtype=torch.float64))
    noisy = clean + torch.randn(1, e, generator=g, dtype=torch.float64) * sd
    analytic = prob_in_top_k(clean, noisy, sd, k)[0]
    n = 200_000
    for i in range(e):
        draws = noisy.repeat(n, 1)
        draws[:, i] = clean[0, i] + torch.randn(n, generator=g, dtype=torch.float64) * sd[0, i]
        in_top = (torch.topk(draws, k, -1).indices == i).any(-1).double().mean()
        assert abs(in_top.item() - analytic[i].item()) < 0.003


def test_kth_excluding_identity():
    torch.manual_seed(3)
    e, k = 6, 2
    noisy = torch.randn(5, e, dtype=torch.float64)
    clean, sd = torch.randn(5, e, dtype=torch.float64), torch.rand(5, e, dtype=torch.float64) + 0.5
    p = prob_in_top_k(clean, noisy, sd, k)
    normal = torch.distributions.Normal(0.0, 1.0)
    for t in range(5):
        for i in range(e):
            others = torch.cat([noisy[t, :i], noisy[t, i + 1 :]])
            kth = torch.topk(others, k).values[-1]
            assert p[t, i].item() == pytest.approx(
                normal.cdf((clean[t, i] - kth) / sd[t, i]).item(), rel=1e-9
            )


def test_noisy_top_k_gate_shape_and_eval():
    torch.manual_seed(0)
    logits, noise = torch.randn(30, 8), torch.randn(30, 8)
    r = noisy_top_k_gating(logits, noise, 3, training=True)
    w = r.weights()
    assert ((w > 0).sum(-1) == 3).all()
    assert torch.allclose(w.sum(-1), torch.ones(30))
    assert set(r.losses) == {"importance", "load"}
    ev = noisy_top_k_gating(logits, noise, 3, training=False)
    assert "load" not in ev.losses  # hard counts only in eval (classic §3.8 pitfall 3)
    assert torch.allclose(ev.weights(), top_k_gating(logits, 3).weights(), atol=1e-6)
    dense = noisy_top_k_gating(logits, noise, 8, training=False)
    assert torch.allclose(dense.weights(), torch.softmax(logits, -1), atol=1e-6)


def test_noisy_top_k_balanced_at_initialisation():
    # W_g = W_noise = 0: E[CV²(counts)] = (E − K)/(B·K) = 0.00293 at B = 1024, E = 16, K = 4.
    torch.manual_seed(0)
    b, e, k = 1024, 16, 4
    values = []
    for _ in range(100):
        r = noisy_top_k_gating(torch.zeros(b, e), torch.zeros(b, e), k, training=True)
        counts = torch.bincount(r.experts.reshape(-1), minlength=e).double()
        values.append(counts.var(unbiased=False) / counts.mean() ** 2)
    assert float(sum(values) / len(values)) == pytest.approx((e - k) / (b * k), rel=0.25)


def test_noisy_load_loss_reaches_both_weight_matrices():
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    wg = torch.nn.Parameter(0.1 * torch.randn(5, 8))
    wn = torch.nn.Parameter(0.1 * torch.randn(5, 8))
    r = noisy_top_k_gating(x @ wg, x @ wn, 2, training=True)
    r.losses["load"].backward()
    assert wg.grad.abs().sum() > 0 and wn.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- expert choice


def test_expert_choice_counts_and_dense_limit():
    torch.manual_seed(0)
    logits = torch.randn(512, 8)
    r = expert_choice_gating(logits, 2.0)
    assert r.capacity == 128
    assert (r.kept.sum(0) == 128).all()
    assert r.kept.float().sum(-1).mean().item() == pytest.approx(2.0)
    assert r.losses.get("balance") is None
    full = expert_choice_gating(logits, 8.0)
    assert torch.allclose(full.weights(), torch.softmax(logits, -1))
    with pytest.raises(ConfigError):
        expert_choice_gating(torch.randn(4, 8), 1.0)


def test_expert_choice_permutation_equivariant():
    torch.manual_seed(0)
    logits = torch.randn(64, 4)
    perm = torch.randperm(64)
    a, b = expert_choice_gating(logits, 1.0), expert_choice_gating(logits[perm], 1.0)
    assert torch.equal(a.weights()[perm], b.weights())


# ------------------------------------------------------------------------------------------------------ LIMoE


def test_limoe_entropy_values():
    e = 8
    uniform = torch.full((96, e), 1.0 / e)
    one_hot = torch.eye(e).repeat(12, 1)
    assert entropy_local_loss(uniform).item() == pytest.approx(math.log(e), rel=1e-6)
    assert entropy_local_loss(one_hot).item() == pytest.approx(0.0, abs=1e-6)
    assert entropy_global_loss(one_hot, min_experts=None).item() == pytest.approx(-math.log(8), rel=1e-6)
    four = torch.eye(e)[torch.arange(96) % 4]
    two = torch.eye(e)[torch.arange(96) % 2]
    assert entropy_global_loss(four).item() == pytest.approx(0.0, abs=1e-6)
    assert entropy_global_loss(two).item() == pytest.approx(math.log(2), rel=1e-6)


def test_limoe_per_modality_masking():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(40, 8), -1)
    mod = (torch.arange(40) >= 30).long()
    base = entropy_global_loss(probs, mod, 2), entropy_local_loss(probs, mod, 2)
    more = torch.cat([probs, torch.softmax(torch.randn(10, 8), -1)])
    mod2 = torch.cat([mod, torch.zeros(10, dtype=torch.long)])
    after = entropy_global_loss(more, mod2, 2), entropy_local_loss(more, mod2, 2)
    assert after[0][1].item() == pytest.approx(base[0][1].item()) and after[1][1] == pytest.approx(base[1][1])


def test_limoe_global_gradient():
    p = torch.full((8,), 0.1 / 7)
    p[0] = 0.9
    logits = torch.log(p).repeat(32, 1).requires_grad_()
    entropy_global_loss(torch.softmax(logits, -1), min_experts=4).sum().backward()
    g = logits.grad.sum(0)
    assert g[0].item() == pytest.approx(0.373, abs=1e-3)
    assert torch.allclose(g[1:], torch.full((7,), -0.0533), atol=1e-3)


# --------------------------------------------------------------------------------------------- bias balancing


def test_bias_balancing_reduces_max_violation():
    g = torch.Generator().manual_seed(0)
    t, e, k = 4096, 16, 2
    logits = torch.randn(t, e, generator=g)
    logits[:, :4] += 1.0
    bias = torch.zeros(e)

    def maxvio():
        r = top_k_gating(logits, k, score_fn="sigmoid", selection_bias=bias)
        load = torch.bincount(r.experts.reshape(-1), minlength=e).float()
        return r, load, (load.max() / load.mean() - 1).item()

    _, _, start = maxvio()
    assert start > 1.0
    scores = torch.sigmoid(logits)
    for _ in range(2000):  # the selection rule of top_k_gating, inlined to keep the loop fast
        chosen = torch.topk(scores + bias, k, -1).indices
        update_selection_bias(bias, torch.bincount(chosen.reshape(-1), minlength=e), 1e-3)
    r, _, end = maxvio()
    assert end < 0.05
    # Gates come from the unbiased scores, normalised over the kept experts.
    s = torch.sigmoid(logits).gather(1, r.experts)
    assert torch.allclose(r.gates, s / s.sum(-1, keepdim=True))
    shifted = top_k_gating(logits, k, score_fn="sigmoid", selection_bias=bias + 3.0)
    assert torch.equal(shifted.experts, r.experts)


# --------------------------------------------------------------------------------------------------- Soft MoE


def test_soft_moe_weights_axes_and_zero_scale():
    x = torch.randn(2, 10, 6)
    phi = torch.randn(6, 4)
    d, c = soft_moe_weights(x, phi, 1.0)
    assert torch.allclose(d.sum(1), torch.ones(2, 4)) and torch.allclose(c.sum(2), torch.ones(2, 10))
    d0, c0 = soft_moe_weights(x, phi, 0.0)
    assert torch.allclose(d0, torch.full_like(d0, 0.1)) and torch.allclose(c0, torch.full_like(c0, 0.25))
