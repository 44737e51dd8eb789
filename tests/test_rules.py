"""Oracles for the combination rules and the classic combiners' losses (methods-classic §1.8, §2.10)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moecli.rules import (
    CategoricalMixture,
    ExpectedSquaredError,
    Gaussian,
    GaussianMixture,
    categorical_mixture,
    categorical_product,
    gaussian_product,
    weighted_sum,
)


@pytest.fixture(autouse=True)
def float64():
    """Oracles in double precision; restored afterwards so other test modules keep float32."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def grad(f, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    f(x).sum().backward()
    return x.grad


# ------------------------------------------------------------------------------------------ Jacobs (§1.8)
def test_hand_computable_case_matches_spec_values():
    d, o, s = torch.zeros(1, 1), torch.tensor([[[0.0], [2.0]]]), torch.zeros(1, 2)

    def e_nll(s_, o_=o):
        return GaussianMixture(torch.log_softmax(s_, -1), o_).nll(d)

    assert e_nll(s).item() == pytest.approx(0.5662, abs=1e-4)
    h = GaussianMixture(torch.log_softmax(s, -1), o).responsibilities(d)
    assert h.squeeze().tolist() == pytest.approx([0.8808, 0.1192], abs=1e-4)
    assert grad(e_nll, s).squeeze().tolist() == pytest.approx([-0.3808, 0.3808], abs=1e-4)
    assert grad(lambda o_: e_nll(s, o_), o).squeeze().tolist() == pytest.approx([0.0, 0.2384], abs=1e-4)

    def e_comp(s_, o_=o):
        return ExpectedSquaredError(torch.softmax(s_, -1), o_).nll(d)

    assert e_comp(s).item() == pytest.approx(2.0)
    assert grad(e_comp, s).squeeze().tolist() == pytest.approx([-1.0, 1.0])
    assert grad(lambda o_: e_comp(s, o_), o).squeeze().tolist() == pytest.approx([0.0, 2.0])
    # cooperative: E_coop = ‖d − Σ p o‖² = 1; Gaussian(blend, 0).nll is half of it
    coop = lambda o_: 2 * Gaussian(weighted_sum(torch.softmax(s, -1), o_), torch.zeros(1, 1)).nll(d)  # noqa: E731
    assert coop(o).item() == pytest.approx(1.0)
    assert grad(coop, o).squeeze().tolist() == pytest.approx([1.0, 1.0])


def test_categorical_case_matches_spec_values():
    q = torch.log(torch.tensor([[[0.9, 0.1], [0.2, 0.8]]]))
    s = torch.zeros(1, 2)
    y = torch.tensor([0])
    mix = CategoricalMixture(torch.log_softmax(s, -1), q)
    assert mix.log_probs.exp().squeeze().tolist() == pytest.approx([0.55, 0.45])
    assert mix.nll(y).item() == pytest.approx(0.5978, abs=1e-4)
    assert mix.responsibilities(y).squeeze().tolist() == pytest.approx([0.8182, 0.1818], abs=1e-4)
    g = grad(lambda s_: CategoricalMixture(torch.log_softmax(s_, -1), q).nll(y), s)
    assert g.squeeze().tolist() == pytest.approx([-0.3182, 0.3182], abs=1e-4)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.integers(0, 10_000), st.floats(0.5, 2.0))
def test_gaussian_mixture_gradients_are_p_minus_h_and_h_residual(num_experts, out_dim, seed, sigma):
    g = torch.Generator().manual_seed(seed)
    s, o = torch.randn(3, num_experts, generator=g), torch.randn(3, num_experts, out_dim, generator=g)
    d = torch.randn(3, out_dim, generator=g)
    mix = GaussianMixture(torch.log_softmax(s, -1), o, sigma)
    p, h = torch.softmax(s, -1), mix.responsibilities(d)
    gs = grad(lambda s_: GaussianMixture(torch.log_softmax(s_, -1), o, sigma).nll(d), s)
    go = grad(lambda o_: GaussianMixture(torch.log_softmax(s, -1), o_, sigma).nll(d), o)
    torch.testing.assert_close(gs, p - h)
    torch.testing.assert_close(go, -h.unsqueeze(-1) * (d.unsqueeze(1) - o) / sigma**2)


def test_gradients_against_central_differences():
    g = torch.Generator().manual_seed(0)
    s, o, d = torch.randn(2, 3, generator=g), torch.randn(2, 3, 2, generator=g), torch.randn(2, 2, generator=g)
    for make in (lambda s_: GaussianMixture(torch.log_softmax(s_, -1), o).nll(d).sum(),
                 lambda s_: ExpectedSquaredError(torch.softmax(s_, -1), o).nll(d).sum()):
        assert torch.autograd.gradcheck(make, (s.clone().requires_grad_(),), eps=1e-6, atol=1e-6)


def test_expected_sq_gate_gradient_matches_paper():
    g = torch.Generator().manual_seed(1)
    s, o, d = torch.randn(4, 3, generator=g), torch.randn(4, 3, 2, generator=g), torch.randn(4, 2, generator=g)
    p = torch.softmax(s, -1)
    err = ((d.unsqueeze(1) - o) ** 2).sum(-1)
    expected = p * (err - (p * err).sum(-1, keepdim=True))
    torch.testing.assert_close(grad(lambda s_: ExpectedSquaredError(torch.softmax(s_, -1), o).nll(d), s), expected)


def test_identical_experts_give_h_equal_p_and_zero_gate_gradient():
    s = torch.randn(5, 4)
    o = torch.randn(5, 1, 3).expand(5, 4, 3)
    d = torch.randn(5, 3)
    mix = GaussianMixture(torch.log_softmax(s, -1), o)
    torch.testing.assert_close(mix.responsibilities(d), torch.softmax(s, -1))
    gs = grad(lambda s_: GaussianMixture(torch.log_softmax(s_, -1), o).nll(d), s)
    torch.testing.assert_close(gs, torch.zeros_like(gs))


def test_one_expert_reduces_to_the_experts_own_loss():
    o, d = torch.randn(6, 1, 2), torch.randn(6, 2)
    logw = torch.zeros(6, 1)
    torch.testing.assert_close(GaussianMixture(logw, o).nll(d), 0.5 * ((d - o[:, 0]) ** 2).sum(-1))
    q = torch.log_softmax(torch.randn(6, 1, 3), -1)
    y = torch.randint(0, 3, (6,))
    torch.testing.assert_close(CategoricalMixture(logw, q).nll(y), -q[torch.arange(6), 0, y])


# --------------------------------------------------------------------------------------------- PoE (§2.10)
def _prod(means, variances, prior=False, mask=None):
    m = torch.tensor([means], dtype=torch.float64).unsqueeze(-1)
    lv = torch.log(torch.tensor([variances], dtype=torch.float64)).unsqueeze(-1)
    mu, logvar = gaussian_product(m, lv, mask=mask, prior=prior)
    return mu.item(), logvar.exp().item()


def test_gaussian_product_oracles():
    assert _prod([0, 2], [1, 1]) == pytest.approx((1.0, 0.5))
    assert _prod([2], [1], prior=True) == pytest.approx((1.0, 0.5))
    assert _prod([2, 2], [1, 1], prior=True) == pytest.approx((4 / 3, 1 / 3))
    assert _prod([0, 2], [1, 1], prior=True) == pytest.approx((2 / 3, 1 / 3))
    assert _prod([1.0] * 5, [1.0] * 5)[1] == pytest.approx(0.2)
    assert _prod([3.0], [2.5]) == pytest.approx((3.0, 2.5))


def test_gaussian_product_mask_removes_exactly_that_expert():
    mean, logvar = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    mask = torch.tensor([[1, 0, 1]] * 4)
    got = gaussian_product(mean, logvar, mask=mask, prior=True)
    want = gaussian_product(mean[:, [0, 2]], logvar[:, [0, 2]], prior=True)
    torch.testing.assert_close(got, want)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(0, 10_000))
def test_gaussian_product_log_space_matches_direct_form_and_is_sharper(num_experts, seed):
    g = torch.Generator().manual_seed(seed)
    mean, logvar = torch.randn(3, num_experts, 2, generator=g) * 3, torch.randn(3, num_experts, 2, generator=g)
    mu, lv = gaussian_product(mean, logvar)
    prec = torch.exp(-logvar)
    torch.testing.assert_close(lv.exp(), 1 / prec.sum(1), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(mu, (prec * mean).sum(1) / prec.sum(1), rtol=1e-6, atol=1e-9)
    assert (lv <= logvar.min(1).values + 1e-12).all()
    assert ((mu >= mean.min(1).values - 1e-9) & (mu <= mean.max(1).values + 1e-9)).all()


def test_categorical_product_oracles():
    def prod(*dists):
        return categorical_product(torch.log(torch.tensor([dists], dtype=torch.float64))).exp().squeeze().tolist()

    assert prod((0.5, 0.5), (0.9, 0.1)) == pytest.approx([0.9, 0.1])
    assert prod((0.6, 0.4), (0.6, 0.4)) == pytest.approx([0.6923, 0.3077], abs=1e-4)
    assert prod((0.3, 0.7)) == pytest.approx([0.3, 0.7])
    logits = torch.randn(2, 3, 4)
    shifted = logits.clone()
    shifted[:, 1] += 5.0
    torch.testing.assert_close(categorical_product(logits), categorical_product(shifted))


def test_categorical_mixture_is_log_mean_exp_under_uniform_weights():
    q = torch.log_softmax(torch.randn(3, 4, 5), -1)
    logw = torch.full((3, 4), -math.log(4))
    torch.testing.assert_close(categorical_mixture(logw, q), torch.logsumexp(q, 1) - math.log(4))
