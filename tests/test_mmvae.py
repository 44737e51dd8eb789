"""Multimodal VAE task and posterior fusions (methods-multimodal §1–2, §7): oracles, equivalences, a run."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from moecli.combiners.competitive import Competitive
from moecli.combiners.gpoe import Gpoe
from moecli.combiners.mopoe import Mopoe
from moecli.combiners.poe import Poe
from moecli.errors import ConfigError
from moecli.posteriors import (
    GaussianPosterior,
    GaussianPosteriorMixture,
    clamp_logvar,
    gaussian_log_prob,
    kl_standard_normal,
    nonempty_subsets,
)
from moecli.registry import conf_dir
from moecli.rules import gaussian_product
from moecli.run import combiner_factory
from moecli.slots import Slot
from tasks.mmvae import Mmvae, Noise, bound, corrupt_image, flip_labels, occlusion_mask, same_class_partners


def posterior_slot(num_modalities: int = 2, latent: int = 1, dims=None) -> Slot:
    dims = tuple(dims or [3] * num_modalities)
    return Slot("posterior", "distribution", in_dim=sum(dims), out_dim=latent, family="gaussian",
                num_experts=num_modalities, external_experts=True,
                extra={"posterior": True, "prior_expert": True, "modality_dims": dims})


def experts(means, logvars):
    """[M] lists -> (mean, logvar) `[1, M, 1]`."""
    return (torch.tensor(means, dtype=torch.float64).view(1, -1, 1),
            torch.tensor(logvars, dtype=torch.float64).view(1, -1, 1))


# ------------------------------------------------------------------------------------------- product oracles
def test_product_with_prior_expert_gives_two_thirds_and_one_third():
    mean, logvar = experts([0.0, 2.0], [0.0, 0.0])
    m, lv = gaussian_product(mean, logvar, prior=True)
    assert m.item() == pytest.approx(2 / 3, abs=1e-6)
    assert lv.exp().item() == pytest.approx(1 / 3, abs=1e-6)


def test_poe_combiner_takes_the_prior_expert_from_the_posterior_slot():
    out = Poe(posterior_slot(), prior=None)(torch.zeros(1, 6), experts=experts([0.0, 2.0], [0.0, 0.0]))
    assert out.output.mean.item() == pytest.approx(2 / 3, abs=1e-6)
    assert out.output.logvar.exp().item() == pytest.approx(1 / 3, abs=1e-6)
    # Other slots keep the old default (no prior): N(1, 1/2).
    plain = Slot("out", "distribution", in_dim=6, out_dim=1, family="gaussian", num_experts=2,
                 external_experts=True)
    out = Poe(plain, prior=None)(torch.zeros(1, 6), experts=experts([0.0, 2.0], [0.0, 0.0]))
    assert out.output.mean.item() == pytest.approx(1.0)
    assert out.output.logvar.exp().item() == pytest.approx(0.5)


def test_product_of_one_expert_without_prior_returns_it():
    mean, logvar = experts([1.3], [0.7])
    m, lv = gaussian_product(mean, logvar)
    assert m.item() == pytest.approx(1.3) and lv.item() == pytest.approx(0.7)


def test_absent_modality_with_nan_input_is_left_out_and_gets_no_gradient():
    mean = torch.tensor([[[2.0], [float("nan")]]], requires_grad=True)
    logvar = torch.zeros(1, 2, 1)
    m, lv = gaussian_product(mean, logvar, mask=torch.tensor([[True, False]]), prior=True)
    assert m.item() == pytest.approx(1.0) and lv.exp().item() == pytest.approx(0.5)
    (grad,) = torch.autograd.grad(m.sum() + lv.sum(), mean)
    assert grad[0, 1, 0].item() == 0.0 and torch.isfinite(grad).all()


# ------------------------------------------------------------------------------------------------------ gPoE
def test_gpoe_equal_weights_is_a_tempered_poe():
    """α = ½ each on N(0,1), N(2,1): no prior N(1, 1) (PoE mean, 2× its variance); with prior N(½, ½)."""
    x = torch.zeros(1, 6, dtype=torch.float64)
    no_prior = Gpoe(posterior_slot(), prior_expert=False).double()
    out = no_prior(x, experts=experts([0.0, 2.0], [0.0, 0.0]))
    assert out.output.mean.item() == pytest.approx(1.0)
    assert out.output.logvar.exp().item() == pytest.approx(1.0)
    with_prior = Gpoe(posterior_slot(), prior_expert=True).double()
    out = with_prior(x, experts=experts([0.0, 2.0], [0.0, 0.0]))
    assert out.output.mean.item() == pytest.approx(0.5)
    assert out.output.logvar.exp().item() == pytest.approx(0.5)
    assert torch.allclose(out.weights, torch.full((1, 2), 0.5, dtype=torch.float64))


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 4), st.integers(1, 3), st.integers(0, 10_000))
def test_gpoe_uniform_weights_equal_poe_of_experts_raised_to_one_over_m(num_mod, latent, seed):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(3, num_mod, latent, generator=g, dtype=torch.float64)
    logvar = 6 * torch.tanh(torch.randn(3, num_mod, latent, generator=g, dtype=torch.float64))
    gpoe = Gpoe(posterior_slot(num_mod, latent), prior_expert=False).double()  # zero-initialised: uniform α
    out = gpoe(torch.randn(3, 3 * num_mod, dtype=torch.float64), experts=(mean, logvar)).output
    poe_mean, poe_logvar = gaussian_product(mean, logvar)
    assert torch.allclose(out.mean, poe_mean, atol=1e-9)
    assert torch.allclose(out.logvar, poe_logvar + math.log(num_mod), atol=1e-9)


def test_gpoe_weights_sum_to_one_over_modalities_and_skip_absent_ones():
    torch.manual_seed(0)
    gpoe = Gpoe(posterior_slot(3, 5, dims=[4, 6, 2]))
    for p in gpoe.parameters():  # leave the zero init so that α is not trivially uniform
        torch.nn.init.normal_(p)
    mask = torch.tensor([[True, True, True], [True, False, True], [False, True, False], [True, True, False]])
    from moecli.combiners.gpoe import normalise_credibility

    for norm in ("softmax", "sum"):
        alpha = normalise_credibility(torch.randn(4, 3, 5), mask, norm)
        assert torch.allclose(alpha.sum(1), torch.ones(4, 5), atol=1e-6)
        assert (alpha[~mask] == 0).all()
    mean, logvar = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    out = gpoe(torch.randn(4, 12), experts=(mean, logvar), mask=mask)
    only = gaussian_product(mean[2:3, 1:2], logvar[2:3, 1:2], prior=True)  # one modality present: α = 1
    assert torch.allclose(out.output.mean[2], only[0][0], atol=1e-5)
    assert torch.allclose(out.output.logvar[2], only[1][0], atol=1e-5)


# ------------------------------------------------------------------------------------------------- mixtures
def test_mixture_log_density_is_log_mean_exp_of_components_even_far_out():
    torch.manual_seed(1)
    mean, logvar = torch.randn(2, 3, 4), torch.randn(2, 3, 4).clamp(-2, 2)
    out = Competitive(posterior_slot(3, 4), gate="uniform")(torch.zeros(2, 9), experts=(mean, logvar))
    mix = out.output
    z = torch.cat([torch.randn(5, 2, 4), torch.full((1, 2, 4), 30.0)])  # the last point is ~30σ from all
    direct = torch.stack([gaussian_log_prob(z, mean[:, k].double(), logvar[:, k].double())
                          for k in range(3)], -1)
    expected = torch.logsumexp(direct, -1) - math.log(3)
    assert torch.allclose(mix.log_prob(z).double(), expected, atol=1e-3, rtol=1e-5)
    assert torch.isfinite(mix.log_prob(z)).all()


def test_identical_components_give_the_component_density():
    mean, logvar = torch.randn(2, 1, 3).expand(2, 3, 3), torch.zeros(2, 3, 3)
    mix = GaussianPosteriorMixture(torch.full((2, 3), -math.log(3)), mean, logvar)
    z = torch.randn(4, 2, 3)
    assert torch.allclose(mix.log_prob(z), GaussianPosterior(mean[:, 0], logvar[:, 0]).log_prob(z), atol=1e-5)


def test_stratified_sampler_shape_and_gradient_paths():
    mean = torch.randn(2, 3, 4, requires_grad=True)
    mix = GaussianPosteriorMixture(torch.zeros(2, 3), mean, torch.zeros(2, 3, 4))
    z = mix.rsample(5)
    assert z.shape == (3, 5, 2, 4)
    (grad,) = torch.autograd.grad(z[1].sum(), mean)
    assert (grad[:, 1] == 5).all() and (grad[:, [0, 2]] == 0).all()


def test_competitive_mixture_drops_absent_modalities_and_keeps_supervised_behaviour():
    mean, logvar = torch.randn(2, 3, 4), torch.zeros(2, 3, 4)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    out = Competitive(posterior_slot(3, 4), gate="uniform")(torch.zeros(2, 9), (mean, logvar), mask)
    assert torch.allclose(out.weights, torch.tensor([[0.5, 0.0, 0.5], [1 / 3, 1 / 3, 1 / 3]]))
    vowel = Slot("out", "distribution", in_dim=2, out_dim=3, family="gaussian")
    supervised = Competitive(vowel, num_experts=2)(torch.randn(5, 2))
    assert supervised.output.nll(torch.randn(5, 3)).shape == (5,)


def test_mopoe_enumerates_subsets_mixes_products_and_adds_the_prior_once():
    assert nonempty_subsets(2).shape == (3, 2) and nonempty_subsets(3).shape == (7, 3)
    mean, logvar = experts([0.0, 2.0], [0.0, 0.0])
    mix = Mopoe(posterior_slot())(torch.zeros(1, 6), experts=(mean, logvar)).output
    assert torch.allclose(mix.weights, torch.full((1, 3), 1 / 3, dtype=torch.float64))
    assert mix.mean[0, :2, 0].tolist() == [0.0, 2.0] and mix.logvar[0, :2, 0].tolist() == [0.0, 0.0]
    assert mix.mean[0, 2, 0].item() == pytest.approx(2 / 3)
    assert mix.logvar[0, 2].exp().item() == pytest.approx(1 / 3)
    # Only the first modality present: one valid subset, the product of every present modality with the prior.
    only_first = torch.tensor([[True, False]])
    out = Mopoe(posterior_slot())(torch.zeros(1, 6), experts=(mean, logvar), mask=only_first)
    mix = out.output
    assert mix.weights[0].tolist() == [1.0, 0.0, 0.0] and out.weights[0].tolist() == [1.0, 0.0]
    assert mix.logvar[0, 0].exp().item() == pytest.approx(0.5) and torch.isfinite(mix.mean).all()


# ----------------------------------------------------------------------------------------- bounds and ELBO
def test_iwae_is_exact_with_the_true_posterior():
    """p(z) = N(0,1), p(x|z) = N(z,1), q = N(x/2, 1/2): every log-weight is log p(x) = log N(x; 0, 2)."""
    x = torch.tensor([0.7, -1.2])
    post = GaussianPosterior(x.view(2, 1) / 2, torch.full((2, 1), math.log(0.5)))
    mix = post.as_mixture()
    z = mix.rsample(7)
    rec = gaussian_log_prob(z, x.view(2, 1), torch.zeros(2, 1))
    log_px = -0.5 * (x**2 / 2 + math.log(2 * math.pi * 2))
    for iw in ("looser", "tight"):
        assert torch.allclose(bound(mix, z, rec, 1.0, iw), log_px, atol=1e-5)
    mixture = GaussianPosteriorMixture(mix.log_weights, mix.mean, mix.logvar, kl="mixture")
    assert torch.allclose(bound(mixture, z, rec, 1.0, "none"), log_px, atol=1e-5)


def test_looser_bound_is_below_tight_bound_on_the_same_draws():
    torch.manual_seed(2)
    mix = GaussianPosteriorMixture(torch.log_softmax(torch.randn(3, 2), -1), torch.randn(3, 2, 4),
                                   torch.randn(3, 2, 4))
    z = mix.rsample(6)
    rec = -(z**2).sum(-1)
    assert (bound(mix, z, rec, 1.0, "looser") <= bound(mix, z, rec, 1.0, "tight") + 1e-5).all()


def test_kl_closed_form_matches_monte_carlo_and_vanishes_at_the_prior():
    torch.manual_seed(3)
    post = GaussianPosterior(torch.tensor([[0.5, -1.0]]), torch.tensor([[0.3, -0.7]]))
    z = post.rsample(200_000)
    mc = (post.log_prob(z) + 0.5 * (z**2 + math.log(2 * math.pi)).sum(-1)).mean()
    assert post.kl_prior().item() == pytest.approx(mc.item(), abs=2e-2)
    assert kl_standard_normal(torch.zeros(3), torch.zeros(3)).item() == 0.0


def test_soft_clamp_keeps_a_gradient_at_the_bound():
    lv = torch.tensor(6.0, requires_grad=True)
    (g,) = torch.autograd.grad(clamp_logvar(lv, "soft", 6.0), lv)
    assert g.item() > 0.4
    beyond = torch.tensor(7.0, requires_grad=True)
    (g,) = torch.autograd.grad(clamp_logvar(beyond, "hard", 6.0), beyond)
    assert g.item() == 0.0  # the variance trap: a hard clamp never lets the expert come back


def small_task(**kw) -> Mmvae:
    task = Mmvae(train_size=256, batch_size=64, latent_dim=4, hidden=32, plots=False, **kw)
    task.setup(0)
    return task


def build(task: Mmvae, name: str, **overrides):
    cfg = OmegaConf.merge(OmegaConf.load(conf_dir() / "combiner" / f"{name}.yaml"), overrides)
    return task.build_model(combiner_factory(cfg, name, "mmvae"))


def test_warmup_schedule_and_auto_likelihood_scaling():
    task = Mmvae(kl_warmup_epochs=10)
    betas = []
    for t in (0, 5, 10, 20):
        task.progress = t
        betas.append(task.beta())
    assert betas == [0.0, 0.5, 1.0, 1.0]
    assert task.llik == {"image": 1.0, "label": 6.4}


@pytest.mark.parametrize("name", ["poe", "competitive", "mopoe", "gpoe"])
def test_elbo_terms_are_finite_with_the_right_sign(name):
    torch.manual_seed(0)
    task = small_task()
    model = build(task, name)
    batch = next(task.train_batches(0, torch.Generator().manual_seed(0)))
    mean, logvar = model.encode(batch["inputs"])
    full = torch.ones(len(batch["y"]), 2, dtype=torch.bool)
    post = model.fuse(batch["inputs"], mean, logvar, full).output
    mix = post.as_mixture() if hasattr(post, "as_mixture") else GaussianPosterior(post.mean, post.logvar)
    z = mix.as_mixture().rsample(1)
    for m in task.names:
        assert (model.log_lik(m, z, batch["targets"][m]) <= 0).all()  # Bernoulli and categorical log-probs
    assert (mix.as_mixture().kl_components() >= 0).all()
    unit = {"image": 1.0, "label": 1.0}
    value = task.subset_bound(model, mix, batch["targets"], range(2), 1.0, unit, 1, "none")
    assert torch.isfinite(value).all() and (value <= 0).all()
    out = task.training_step(model, batch)
    assert all(torch.isfinite(v) for v in out.losses.values())


def written_out_mvae_objective(model, x, lbl, eps, lam_label, beta):
    """The MVAE subsampled ELBO of §2.2 written out from the equations, independently of the task's code:
    joint (image + label), image only (image), label only (label); prior expert N(0, I) in every product,
    Bernoulli image summed over the 64 pixels, categorical label × λ, closed-form KL summed over Z. `[B]`."""
    def expert(name, v):
        mu, lv = model.encoders[name](v).chunk(2, -1)
        return mu, 6.0 * torch.tanh(lv / 6.0)

    def product(parts):  # precisions add; the prior expert contributes T = 1 at mean 0
        prec = 1.0 + sum(torch.exp(-lv) for _, lv in parts)
        mean = sum(mu * torch.exp(-lv) for mu, lv in parts) / prec
        return mean, -torch.log(prec)

    def elbo(parts, e, with_image, with_label):
        mu, lv = product(parts)
        z = mu + torch.exp(0.5 * lv) * e
        rec = torch.zeros(x.shape[0], dtype=x.dtype)
        if with_image:
            rec = rec - torch.nn.functional.binary_cross_entropy_with_logits(
                model.decoders["image"](z), x, reduction="none").sum(-1)
        if with_label:
            rec = rec + lam_label * (lbl * torch.log_softmax(model.decoders["label"](z), -1)).sum(-1)
        return rec - beta * 0.5 * (mu ** 2 + lv.exp() - 1.0 - lv).sum(-1)

    img, lab = expert("image", x), expert("label", lbl)
    return elbo([img, lab], eps[0], True, True) + elbo([img], eps[1], True, False) + elbo([lab], eps[2], False, True)


def test_mvae_objective_equals_the_written_out_subsampled_elbo():
    """The task's product path (poe, prior from the slot) = the §2.2 objective written out, values and gradients."""
    torch.manual_seed(0)
    task = small_task(llik_scaling={"label": 5.0})
    model = build(task, "poe")
    batch = next(task.train_batches(2, torch.Generator().manual_seed(0)))
    x, lbl = batch["inputs"]["image"], batch["inputs"]["label"]
    torch.manual_seed(5)  # the task draws one [1, 1, B, Z] normal per subset: joint, image, label
    eps = [torch.randn(1, 1, x.shape[0], task.latent_dim)[0, 0] for _ in range(3)]
    expected = written_out_mvae_objective(model, x, lbl, eps, 5.0, 0.7)
    torch.manual_seed(5)
    value, _ = task.objective(model, batch, 0.7, task.llik)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-4)
    params = list(model.parameters())
    got = torch.autograd.grad(value.mean(), params, retain_graph=False, allow_unused=True)
    want = torch.autograd.grad(expected.mean(), params, allow_unused=True)
    for g, w in zip(got, want):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["poe", "competitive"])
def test_a_tiny_run_learns(name):
    torch.manual_seed(0)
    task = small_task(kl_warmup_epochs=0)
    model = build(task, name)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        before = task.evaluate(model, "train")["train/elbo"]
    gen = torch.Generator().manual_seed(0)
    for epoch in range(12):
        for batch in task.train_batches(epoch, gen):
            loss = sum(task.training_step(model, batch).losses.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        after = task.evaluate(model, "train")["train/elbo"]
    assert after > before + 5.0


def test_test_metrics_repeat_exactly_and_cover_every_subset():
    torch.manual_seed(0)
    task = small_task(robust_sigmas=[0.0, 2.0], joint_coherence_samples=200, eval_num_samples=5)
    model = build(task, "gpoe")
    with torch.no_grad():
        first, second = task.evaluate(model, "test"), task.evaluate(model, "test")
    assert first == second
    for key in ("test/elbo", "test/latent_acc/image", "test/latent_acc/label", "test/latent_acc/joint",
                "test/coherence/image_to_label", "test/coherence/label_to_image", "test/coherence/joint",
                "test/robust/latent_acc/joint/s2", "test/robust/weight/image/s2", "route/posterior/importance/e0"):
        assert math.isfinite(first[key]), key
    assert first["test/log_px"] >= first["test/elbo"] - 5.0  # the tight IWAE is no looser than the ELBO (MC)


# ---------------------------------------------------------------------------------------------- data, noise
def test_views_pair_a_different_example_of_the_same_class():
    y = torch.tensor([0, 1, 0, 1, 0, 2, 2])
    partner = same_class_partners(y, torch.Generator().manual_seed(0))
    assert (y[partner] == y).all() and (partner != torch.arange(7)).all()
    task = Mmvae(modalities=["image", "view", "view2", "label"], train_size=200, plots=False)
    task.setup(0)
    data = task.data["train"]
    assert set(data.inputs) == {"image", "view", "view2", "label"}
    assert all(0 <= float(t.min()) and float(t.max()) <= 1 for t in data.inputs.values())


def test_noise_models():
    g = torch.Generator().manual_seed(0)
    x = torch.full((500, 64), 0.5)
    noisy = corrupt_image(x, Noise(sigma=2.0), g)
    assert noisy.min() >= 0 and noisy.max() <= 1 and (noisy != x).float().mean() > 0.9
    mask = occlusion_mask(50, 0.25, g)
    assert ((mask == 0).sum(-1) == 4).all()  # a 2×2 square
    half = corrupt_image(x, Noise(uniform=0.5), g)
    assert 0.4 < (half != x).any(-1).float().mean() < 0.6
    y = torch.zeros(4000, dtype=torch.long)
    assert 0.25 < (flip_labels(y, 0.3, g) != y).float().mean() < 0.29  # 0.3 · 9/10


def test_bad_configuration_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="choose one of"):
        Mmvae(modalities=["image", "sound"])
    with pytest.raises(ConfigError, match="flip"):
        Mmvae(train_noise={"image": {"flip": 0.2}})
    task = small_task()
    for name in ("dense", "cooperative"):
        with pytest.raises(ConfigError, match="compatible combiners: .*competitive.*gpoe.*mopoe.*poe"):
            build(task, name)
    vowel_slot = Slot("out", "distribution", in_dim=2, out_dim=4, family="gaussian")
    assert Mopoe.incompatibility(vowel_slot) and Gpoe.incompatibility(vowel_slot)
