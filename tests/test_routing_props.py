"""Hypothesis property tests over shapes, k, E and capacity for the routing gates and the sparse dispatch."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moecli.experts import StackedExperts
from moecli.routing import (
    expert_choice_gating,
    gshard_top2_gating,
    noisy_top_k_gating,
    routed_experts,
    switch_gating,
    top_k_gating,
)

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def routing_case(draw, min_e=1):
    e = draw(st.integers(min_e, 9))
    groups = draw(st.integers(1, 3))
    s = draw(st.integers(1, 24))
    k = draw(st.integers(1, e))
    cf = draw(st.one_of(st.none(), st.floats(0.1, 3.0)))
    convention = draw(st.sampled_from(["per_token", "per_choice"]))
    seed = draw(st.integers(0, 2**16))
    logits = torch.randn(groups * s, e, generator=torch.Generator().manual_seed(seed)) * draw(
        st.floats(0.0, 5.0)
    )
    return logits, e, groups, s, k, cf, convention


def check_capacity(r, e, groups, s):
    """Per group and expert, kept choices never exceed C; kept ⊆ chosen; gates 0 where dropped."""
    assert not r.gates[~r.kept].any()
    if r.capacity is None:
        return
    group = (torch.arange(groups * s) // s).unsqueeze(1).expand_as(r.experts)
    counts = torch.bincount((group * e + r.experts)[r.kept], minlength=groups * e)
    assert counts.max().item() <= r.capacity


@SETTINGS
@given(routing_case())
def test_top_k_capacity_never_exceeded(case):
    logits, e, groups, s, k, cf, convention = case
    r = top_k_gating(logits, k, capacity_factor=cf, group_size=s, convention=convention)
    check_capacity(r, e, groups, s)
    assert r.experts.shape == (groups * s, k)
    # Distinct experts per token, and rank 1 is the best score.
    assert (r.experts.sort(-1).values.diff(dim=-1) > 0).all() if k > 1 else True
    probs = torch.softmax(logits, -1)
    assert torch.equal(probs.gather(1, r.experts[:, :1]).squeeze(1), probs.max(-1).values)
    if cf is None:
        assert r.kept.all()
    # A choice of rank 2 is only kept when every rank-1 choice to the same expert in its group was kept.
    if k > 1 and r.capacity is not None:
        for g in range(groups):
            rows = slice(g * s, (g + 1) * s)
            for ex in range(e):
                firsts = r.experts[rows, 0] == ex
                seconds_kept = (r.experts[rows, 1] == ex) & r.kept[rows, 1]
                if seconds_kept.any():
                    assert r.kept[rows, 0][firsts].all()


@SETTINGS
@given(routing_case(min_e=2))
def test_switch_and_gshard_capacity_and_order(case):
    logits, e, groups, s, _, cf, convention = case
    r = switch_gating(logits, cf, group_size=s, convention=convention)
    check_capacity(r, e, groups, s)
    # Kept tokens of an expert are the first ones in row order within the group.
    for g in range(groups):
        rows = torch.arange(g * s, (g + 1) * s)
        for ex in range(e):
            mine = rows[r.experts[rows, 0] == ex]
            kept = r.kept[mine, 0]
            assert not (kept[1:] & ~kept[:-1]).any()
    for queue in ("paper", "lingvo"):
        r2 = gshard_top2_gating(logits, cf, group_size=s, queue=queue)
        check_capacity(r2, e, groups, s)
        assert (r2.gates.sum(-1) <= 1 + 1e-5).all()


@SETTINGS
@given(routing_case(min_e=2))
def test_noisy_gates_sum_to_one_when_kept(case):
    logits, e, groups, s, k, _, _ = case
    k = max(k, 2)
    r = noisy_top_k_gating(logits, torch.zeros_like(logits), k, training=True)
    assert torch.allclose(r.gates.sum(-1), torch.ones(groups * s), atol=1e-5)
    assert ((r.weights() > 0).sum(-1) <= k).all()


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 5), st.integers(2, 30), st.floats(0.2, 3.0), st.integers(0, 999))
def test_expert_choice_exact_loads(e, groups, n, c, seed):
    k = round(n * c / e)
    if not 1 <= k <= n:
        return
    logits = torch.randn(groups * n, e, generator=torch.Generator().manual_seed(seed))
    r = expert_choice_gating(logits, c, group_size=n)
    per_group = r.kept.view(groups, n, e).sum(1)
    assert (per_group == k).all()


@SETTINGS
@given(st.integers(1, 5), st.integers(1, 12), st.integers(0, 30), st.integers(0, 6), st.integers(0, 999))
def test_routed_experts_matches_dense_oracle(e, t, n, hidden, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    experts = StackedExperts(e, 3, 2, hidden)
    x = torch.randn(t, 3, generator=g)
    token = torch.randint(0, t, (n,), generator=g)
    expert = torch.randint(0, e, (n,), generator=g)
    gate = torch.rand(n, generator=g)
    w = torch.zeros(t, e).index_put((token, expert), gate, accumulate=True)
    expected = torch.einsum("te,teo->to", w, experts(x))
    assert torch.allclose(routed_experts(x, token, expert, gate, experts), expected, atol=1e-5)
