"""Sparse dispatch and the routed combiners on representation and distribution slots (issue 3 §2–5)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from moecli import registry
from moecli.combiners.expert_choice import ExpertChoice
from moecli.combiners.gshard import Gshard
from moecli.combiners.noisy_topk import NoisyTopk
from moecli.combiners.soft_moe import SoftMoe
from moecli.combiners.switch import Switch
from moecli.combiners.topk import Topk
from moecli.errors import ConfigError
from moecli.experts import MLP, StackedExperts
from moecli.routing import routed_experts
from moecli.routing.stats import RoutingAccumulator
from moecli.slots import Slot

ROUTED = ["switch", "topk", "gshard", "noisy_topk", "expert_choice", "soft_moe"]
D, H = 12, 16


def rep_slot(**extra) -> Slot:
    return Slot("ffn", "representation", in_dim=D, out_dim=D, expert_hidden=H, extra=extra)


def build(name: str, slot: Slot, **overrides):
    cfg = OmegaConf.load(registry.conf_dir() / "combiner" / f"{name}.yaml")
    params = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "_target_"}
    params.update(overrides)
    if slot.kind == "representation":
        params.pop("expert_hidden", None)
    return registry.combiner_class(name)(slot=slot, **params)


def dense_reference(x, weights, experts: StackedExperts):
    """Σ_e w[t, e]·FFN_e(x_t), every expert on every token (the test oracle)."""
    return torch.einsum("te,teo->to", weights, experts(x))


# ------------------------------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("mode", ["segments", "padded"])
@pytest.mark.parametrize("act", ["relu", "gelu", "tanh", "sigmoid"])
@pytest.mark.parametrize("hidden", [0, 5])
def test_routed_experts_gradcheck(act, hidden, mode):
    torch.manual_seed(0)
    experts = StackedExperts(3, 4, 3, hidden, act).double()
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    token = torch.tensor([0, 1, 2, 3, 0, 5, 2])
    expert = torch.tensor([2, 0, 0, 1, 1, 2, 2])
    gate = torch.rand(7, dtype=torch.float64, requires_grad=True)
    params = list(experts.parameters())

    def f(x, gate, *p):
        return routed_experts(x, token, expert, gate, experts, mode=mode)

    assert torch.autograd.gradcheck(f, (x, gate, *params), eps=1e-6, atol=1e-6)


def test_threaded_experts_match_single_thread_exactly():
    torch.manual_seed(0)
    experts = StackedExperts(6, D, D, H)
    x = torch.randn(50, D, requires_grad=True)
    expert = torch.randint(0, 6, (80,))
    token, gate = torch.randint(0, 50, (80,)), torch.rand(80)
    threads = torch.get_num_threads()
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        try:
            y = routed_experts(x, token, expert, gate, experts)
            grads = torch.autograd.grad(y.square().sum(), [x, experts.w1, experts.w2])
        finally:
            torch.set_num_threads(threads)
        results.append((y, *grads))
        assert torch.get_num_threads() == threads
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


def test_routed_experts_equals_dense_masked_and_dropped_is_zero():
    torch.manual_seed(0)
    experts = StackedExperts(4, D, D, H)
    x = torch.randn(10, D)
    token = torch.tensor([0, 0, 1, 2, 3, 5, 6, 8])  # tokens 4, 7, 9 have no expert (dropped)
    expert = torch.tensor([1, 3, 0, 0, 2, 1, 1, 3])
    gate = torch.rand(8)
    w = torch.zeros(10, 4).index_put((token, expert), gate, accumulate=True)
    y = routed_experts(x, token, expert, gate, experts)
    assert torch.allclose(y, dense_reference(x, w, experts), atol=1e-5)
    assert torch.equal(y[[4, 7, 9]], torch.zeros(3, D))


def test_no_expert_computes_on_tokens_it_was_not_given(monkeypatch):
    from moecli.routing import dispatch

    seen = []
    real = dispatch._act_forward
    monkeypatch.setattr(dispatch, "_act_forward", lambda name, h: seen.append(h.shape[0]) or real(name, h))
    experts = StackedExperts(4, D, D, H, "tanh")
    expert = torch.tensor([0, 0, 0, 2, 2, 3])
    routed_experts(torch.randn(6, D), torch.arange(6), expert, torch.ones(6), experts)
    # Experts run on worker threads, so the order of the calls is not fixed; the sizes are.
    assert sorted(seen) == [1, 2, 3]  # expert 1 got nothing and ran on nothing


# -------------------------------------------------------------------------------- combiners, representation


@pytest.mark.parametrize("name", ROUTED)
def test_representation_slot_contract(name):
    torch.manual_seed(0)
    comb = build(name, rep_slot())
    x = torch.randn(2, 24, D)
    out = comb(x)
    assert out.output.shape == x.shape
    assert out.weights.shape == (48, 8)
    assert out.aux_loss.dim() == 0
    (out.output.sum() + out.aux_loss).backward()
    assert comb.experts.w1.grad.abs().sum() > 0
    for value in out.stats.values():
        assert value.dim() <= 1 and not value.requires_grad
    acc = RoutingAccumulator("ffn", 8)
    acc.add(out.weights, stats=out.stats)
    assert "route/ffn/dispatch/e0" in acc.metrics()


@pytest.mark.parametrize("name", ["switch", "topk", "gshard"])
def test_balance_and_z_losses_reach_the_router(name):
    torch.manual_seed(0)
    comb = build(name, rep_slot(), z_coef=0.001, balance_coef=0.01)
    out = comb(torch.randn(64, D))
    out.aux_loss.backward()
    assert comb.router.linear.weight.grad.abs().sum() > 0
    for key in ("balance", "z"):
        comb.zero_grad()
        comb(torch.randn(64, D)).losses[key].backward()
        assert comb.router.linear.weight.grad.abs().sum() > 0, key


def test_switch_dropped_token_output_is_exactly_zero():
    torch.manual_seed(0)
    comb = build("switch", rep_slot(), capacity_factor=4, capacity_convention="absolute", jitter_eps=0.0)
    with torch.no_grad():
        comb.router.linear.weight.zero_()
        comb.router.linear.weight[0] = 1.0  # positive inputs all choose expert 0
    x = torch.rand(10, D) + 0.1
    out = comb(x)
    assert out.stats["dropped_fraction"].item() == pytest.approx(0.6)
    assert torch.equal(out.output[4:], torch.zeros(6, D))
    assert torch.equal(out.weights[4:], torch.zeros(6, 8))
    kept = comb.experts.w1.new_zeros(4, 8)
    kept[:, 0] = out.weights[:4, 0]
    assert torch.allclose(out.output[:4], dense_reference(x[:4], kept, comb.experts), atol=1e-5)


def test_topk_with_k_equal_e_equals_dense_softmax_mixture():
    torch.manual_seed(0)
    comb = build("topk", rep_slot(), top_k=8)
    x = torch.randn(30, D)
    out = comb(x)
    probs = torch.softmax(comb.router(x), -1)
    assert torch.allclose(out.output, dense_reference(x, probs, comb.experts), atol=1e-5)
    noisy = build("noisy_topk", rep_slot(), top_k=8).eval()
    probs = torch.softmax(noisy.router(x), -1)
    assert torch.allclose(noisy(x).output, dense_reference(x, probs, noisy.experts), atol=1e-5)


@pytest.mark.parametrize(
    "name,kw",
    [
        ("switch", {"capacity_factor": None, "jitter_eps": 0.0}),
        ("topk", {"top_k": 1, "renormalize": True}),
        ("expert_choice", {"capacity_factor": 1.0}),
    ],
)
def test_one_expert_equals_plain_ffn(name, kw):
    torch.manual_seed(0)
    if name == "topk":
        with pytest.raises(ConfigError, match="constant"):
            build(name, rep_slot(), num_experts=1, **kw)
        kw = {"top_k": 1, "renormalize": True, "num_experts": 1}
        return
    comb = build(name, rep_slot(), num_experts=1, **kw)
    mlp = MLP(D, D, H)
    with torch.no_grad():
        mlp.layers[0].weight.copy_(comb.experts.w1[0].t())
        mlp.layers[0].bias.copy_(comb.experts.b1[0])
        mlp.layers[1].weight.copy_(comb.experts.w2[0].t())
        mlp.layers[1].bias.copy_(comb.experts.b2[0])
    x = torch.randn(20, D, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y_ref = comb(x).output, mlp(x2)
    assert torch.allclose(y, y_ref, atol=1e-5)  # gate = softmax over one expert = 1
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    assert torch.allclose(comb.experts.w1.grad[0], mlp.layers[0].weight.grad.t(), atol=1e-5)
    assert torch.allclose(comb.experts.w2.grad[0], mlp.layers[1].weight.grad.t(), atol=1e-5)


@pytest.mark.parametrize("name", ROUTED)
def test_identical_under_fixed_seed(name):
    def run():
        torch.manual_seed(7)
        comb = build(name, rep_slot())
        x = torch.randn(32, D)
        out = comb(x)
        (out.output.square().mean() + out.aux_loss).backward()
        return out.output.detach(), comb.experts.w1.grad.clone()

    a, b = run(), run()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("name", ROUTED)
def test_eval_is_deterministic(name):
    torch.manual_seed(0)
    comb = build(name, rep_slot()).eval()
    x = torch.randn(32, D)
    with torch.no_grad():
        assert torch.equal(comb(x).output, comb(x).output)


@pytest.mark.parametrize("name", ["expert_choice", "soft_moe"])
def test_token_mixing_combiners_group_per_position_in_causal_slots(name):
    torch.manual_seed(0)
    comb = build(name, rep_slot(causal=True), num_experts=4).eval()
    n, s = 4, 6
    x = torch.randn(s * n, D)  # position-major rows: row s·N + n
    with pytest.raises(ValueError, match="num_sequences"):
        comb(x)
    y = comb(x, num_sequences=n).output
    x2 = x.clone()
    x2[-n:] += 1.0  # change the last position of every sequence
    y2 = comb(x2, num_sequences=n).output
    assert torch.equal(y[:-n], y2[:-n])
    leaky = build(name, rep_slot(causal=True), num_experts=4, allow_future_leak=True)
    assert leaky(x).output.shape == x.shape


def test_soft_moe_single_expert_single_slot_single_token():
    torch.manual_seed(0)
    comb = build("soft_moe", rep_slot(), num_experts=1, slots_per_expert=1)
    x = torch.randn(1, D)
    expected = comb.experts(x)[:, 0]
    assert torch.allclose(comb(x).output, expected, atol=1e-6)


def test_soft_moe_permutation_equivariant():
    torch.manual_seed(0)
    comb = build("soft_moe", rep_slot(), num_experts=4, slots_per_expert=2)
    x = torch.randn(16, D)
    perm = torch.randperm(16)
    assert torch.allclose(comb(x).output[perm], comb(x[perm]).output, atol=1e-5)


def test_shared_experts_and_bias_balancing():
    torch.manual_seed(0)
    comb = build("topk", rep_slot(), num_shared_experts=1, bias_balancing=True)
    with torch.no_grad():
        comb.router.linear.weight.zero_()
        comb.router.linear.bias = None
    x = torch.randn(64, D)
    before = comb.selection_bias.clone()
    out = comb(x)
    assert "shared_norm" in out.stats and "selection_bias" in out.stats
    assert not torch.equal(comb.selection_bias, before)  # updated in training
    assert comb.selection_bias.requires_grad is False
    assert "selection_bias" not in dict(comb.named_parameters())
    comb.eval()
    frozen = comb.selection_bias.clone()
    comb(x)
    assert torch.equal(comb.selection_bias, frozen)
    # Routed gates zero: the output is the shared expert's alone.
    shared_only = comb.shared(x).sum(1)
    with torch.no_grad():
        comb.experts.w2.zero_()
        comb.experts.b2.zero_()
    assert torch.allclose(comb(x).output, shared_only, atol=1e-6)


def test_hierarchical_noisy_topk():
    torch.manual_seed(0)
    comb = build("noisy_topk", rep_slot(), num_experts=16, hierarchical=4, top_k=2)
    with torch.no_grad():
        for r in (comb.router, comb.noise_router, comb.primary, comb.primary_noise):
            r.linear.weight.normal_(0, 0.3)
    out = comb(torch.randn(40, D))
    w = out.weights
    assert ((w > 0).sum(-1) == 4).all() and torch.allclose(w.sum(-1), torch.ones(40), atol=1e-6)
    out.losses["load"].backward()
    assert comb.primary.linear.weight.grad.abs().sum() > 0
    assert comb.primary_noise.linear.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------- distribution slots


@pytest.mark.parametrize("name", ["switch", "topk", "gshard", "noisy_topk", "expert_choice"])
def test_distribution_slot(name):
    slot = Slot("out", "distribution", in_dim=2, out_dim=4, family="categorical")
    comb = build(name, slot, num_experts=4)
    out = comb(torch.randn(40, 2))
    assert out.output.point().shape == (40, 4)
    assert torch.allclose(out.output.point().sum(-1), torch.ones(40), atol=1e-5)
    external = Slot(
        "out", "distribution", in_dim=2, out_dim=4, family="categorical", num_experts=3, external_experts=True
    )
    assert registry.combiner_class(name).incompatibility(external) is None
    ext = build(name, external)
    assert ext.experts is None
    logits = torch.randn(40, 3, 4)
    out = ext(torch.randn(40, 2), logits)
    blend = torch.einsum("te,teo->to", out.weights, logits)
    assert torch.allclose(out.output.point(), torch.softmax(blend, -1), atol=1e-5)
    with pytest.raises(ConfigError, match="external_experts"):
        ext(torch.randn(40, 2))


def test_soft_moe_refuses_distribution_slots():
    slot = Slot("out", "distribution", in_dim=2, out_dim=4, family="categorical")
    assert SoftMoe.incompatibility(slot) is not None


def test_class_names_match():
    assert {Switch, Topk, Gshard, NoisyTopk, ExpertChoice, SoftMoe} == {
        registry.combiner_class(n) for n in ROUTED
    }


def test_bad_keys_raise_config_error():
    with pytest.raises(ConfigError, match="choose one of"):
        build("switch", rep_slot(), capacity_convention="bogus")
    with pytest.raises(ConfigError, match="second_policy"):
        build("gshard", rep_slot(), second_policy="sometimes")
    with pytest.raises(ConfigError, match="top_k"):
        build("noisy_topk", rep_slot(), top_k=1)


# ------------------------------------------------------------------------------------------ runs and alarms


@pytest.mark.parametrize("name", ["switch", "noisy_topk", "gshard", "topk", "expert_choice"])
def test_vowel_trains_and_logs_routing_statistics(name, tmp_path):
    from tests.conftest import train_inprocess

    summary = train_inprocess([f"combiner={name}", "trainer.max_epochs=20"], tmp_path / name)
    assert summary["status"] == "completed"
    final = summary["final"]
    assert final["train/acc"] > 0.3
    for key in ("dispatch/e0", "experts_per_token", "max_violation", "router_prob/e0", "marginal_entropy"):
        assert f"route/out/{key}" in final, key
    if name in ("switch", "gshard"):
        assert "route/out/dropped_fraction" in final and "route/out/capacity" in final
    if name == "gshard":
        assert "route/out/second_dispatch_rate" in final


def test_collapse_alarm_fires_on_a_collapsed_switch_layer():
    from moecli.routing.alarms import CollapseMonitor

    comb = build("switch", rep_slot(), capacity_factor=None, eval_capacity_factor=None).eval()
    with torch.no_grad():
        comb.router.linear.weight.zero_()
        comb.router.linear.weight[0] = 1.0
    x = torch.rand(64, D) + 0.1  # every token prefers expert 0
    out = comb(x)
    acc = RoutingAccumulator("ffn", 8)
    acc.add(out.weights, stats=out.stats)
    metrics = acc.metrics()
    assert metrics["route/ffn/load/e0"] == 1.0 and metrics["route/ffn/dispatch/e0"] == 1.0
    monitor = CollapseMonitor(max_dead=4, min_marginal_entropy=0.5, max_share=0.5, patience=2, abort=True)
    first = monitor.check(metrics)
    assert any("dead experts" in w for w in first) and any("entropy" in w for w in first)
    assert any("took 100%" in w for w in monitor.check(metrics))


def test_dropped_rows_do_not_count_as_expert_zero_in_the_load():
    acc = RoutingAccumulator("ffn", 3)
    acc.add(torch.tensor([[0.0, 0.7, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.9]]))
    m = acc.metrics()
    assert m["route/ffn/load/e0"] == 0.0 and m["route/ffn/load/e1"] == 0.25 and m["route/ffn/load/e2"] == 0.25


def test_bench_moe_layer_json_smoke(monkeypatch, capsys):
    import json

    from moecli import bench

    monkeypatch.setattr(bench, "D_MODEL", 16)
    monkeypatch.setattr(bench, "D_FF", 32)
    assert bench.bench_command(["moe-layer", "--config", "4,2,64", "--repeats", "2", "--no-memory", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    variants = {r["variant"] for r in result["rows"]}
    assert variants == {"dense", "topk", "gshard", "noisy_topk", "expert_choice"}
    assert all(r["median_ms"] > 0 and r["ratio"] > 0 for r in result["rows"])
    assert bench.bench_command(["moe-layer", "--config", "4,3"]) == 2
