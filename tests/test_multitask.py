"""Multi-task regression with MMoE (Ma et al. 2018; methods-classic §4.3, §4.5, §4.9): generator, combiners,
parameter parity, routing statistics, the task end to end, the CSV path and the preset's report."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moecli.combiners.dense import Dense
from moecli.combiners.mmoe import MMoE
from moecli.combiners.omoe import OMoE
from moecli.errors import ConfigError
from moecli.slots import Slot
from tasks.multitask import MultiTask, MultiTaskModel, gate_overlap, synthetic_pair
from tests.conftest import compose, train_inprocess


def paper_slot(num_tasks: int = 2, in_dim: int = 100, units: int = 16, dense_hidden: int = 113) -> Slot:
    return Slot("bottom", "representation", in_dim=in_dim, out_dim=units, expert_hidden=units,
                num_tasks=num_tasks, labels=tuple(f"task{k}" for k in range(num_tasks)),
                extra={"expert_layers": 1, "dense_hidden": dense_hidden})


def corr(y: torch.Tensor) -> float:
    return float(torch.corrcoef(y.T)[0, 1])


# ------------------------------------------------------------------------------------------------ generator


@settings(max_examples=30, deadline=None)
@given(rho=st.floats(-1.0, 1.0), scale=st.floats(0.1, 5.0), dim=st.integers(2, 200),
       seed=st.integers(0, 10**6))
def test_generator_weight_cosine_is_rho_and_norms_are_c(rho, scale, dim, seed):
    w = synthetic_pair(1, dim=dim, rho=rho, scale=scale, seed=seed).w
    assert abs(float(torch.nn.functional.cosine_similarity(w[0], w[1], dim=0)) - rho) < 1e-12
    norms = torch.full((2,), scale, dtype=torch.float64)
    torch.testing.assert_close(w.norm(dim=1), norms, rtol=1e-12, atol=0)


@pytest.mark.parametrize("rho", [0.9, 0.5])
def test_linear_generator_label_correlation_is_rho_over_1_01(rho):
    # §4.9: m = 0, c = 1, noise variance 0.01, 2·10^5 samples: corr(y1, y2) = ρ / 1.01 ± 0.005.
    pair = synthetic_pair(200_000, rho=rho, num_sinusoids=0, label_noise_std=0.1, seed=1)
    assert abs(corr(pair.y) - rho / 1.01) < 0.005


def test_sinusoid_label_correlation_is_below_rho_increasing_and_in_the_spec_ranges():
    # §4.3 (project simulation, 5 draws of α, β): mean [min, max] per ρ; we check each ρ's median over 5 seeds
    # lies in the range (a single draw can fall outside: see the issue note), and ordering per seed.
    spec = {1.0: (0.992, 0.998), 0.9: (0.65, 0.89), 0.5: (0.11, 0.49)}
    values = {rho: [corr(synthetic_pair(20_000, rho=rho, seed=s).y) for s in range(5)] for rho in spec}
    for rho, (lo, hi) in spec.items():
        assert lo <= sorted(values[rho])[2] <= hi, (rho, values[rho])
    for s in range(5):
        assert values[0.5][s] < values[0.9][s] < values[1.0][s]
        assert values[0.5][s] <= 0.5 and values[0.9][s] <= 0.9


def test_rho_one_labels_differ_only_by_noise():
    exact = synthetic_pair(1000, rho=1.0, label_noise_std=0.0, seed=3)
    torch.testing.assert_close(exact.y[:, 0], exact.y[:, 1], rtol=0, atol=1e-12)
    noisy = synthetic_pair(50_000, rho=1.0, label_noise_std=0.1, seed=3)
    torch.testing.assert_close(noisy.x, synthetic_pair(50_000, rho=1.0, label_noise_std=0.0, seed=3).x)
    assert abs(float((noisy.y[:, 0] - noisy.y[:, 1]).std()) - 0.1 * math.sqrt(2)) < 0.003


def test_generator_shares_alpha_beta_and_is_seeded():
    a, b = synthetic_pair(100, rho=0.5, seed=7), synthetic_pair(100, rho=0.5, seed=7)
    torch.testing.assert_close(a.y, b.y, rtol=0, atol=0)
    # The noise-free labels are the same function of each task's projection: y_k = g(w_kᵀx).
    pair = synthetic_pair(200, rho=0.3, label_noise_std=0.0, seed=7)
    proj = pair.x @ pair.w.T
    g = proj + torch.sin(proj.unsqueeze(-1) * pair.alpha + pair.beta).sum(-1)
    torch.testing.assert_close(pair.y, g)


# ------------------------------------------------------------------------------------------------ combiners


@settings(max_examples=25, deadline=None)
@given(num_tasks=st.integers(1, 4), num_experts=st.integers(1, 6), top_k=st.integers(0, 6),
       seed=st.integers(0, 999))
def test_per_task_gates_sum_to_one_and_keep_top_k(num_tasks, num_experts, top_k, seed):
    torch.manual_seed(seed)
    k = None if top_k == 0 or top_k > num_experts else top_k
    mmoe = MMoE(paper_slot(num_tasks, in_dim=5, units=3), num_experts=num_experts, top_k=k)
    out = mmoe(torch.randn(9, 5))
    w = out.weights if num_tasks > 1 else out.weights.unsqueeze(1)
    assert w.shape == (9, num_tasks, num_experts)
    torch.testing.assert_close(w.sum(-1), torch.ones(9, num_tasks))
    assert (w >= 0).all()
    if k is not None:
        assert ((w > 0).sum(-1) <= k).all()
    expected = (9, num_tasks, 3) if num_tasks > 1 else (9, 3)
    assert out.output.shape == expected


def test_mmoe_output_is_each_tasks_gate_mixture_of_expert_outputs():
    torch.manual_seed(0)
    mmoe = MMoE(paper_slot(2, in_dim=4, units=3), num_experts=3)
    x = torch.randn(5, 4)
    out = mmoe(x)
    experts = torch.relu(torch.einsum("bd,edu->beu", x, mmoe.experts.linear.w1) + mmoe.experts.linear.b1)
    gates = torch.softmax((x @ mmoe.router.linear.weight.T).view(5, 2, 3), -1)  # gate_bias false: no bias
    assert mmoe.router.linear.bias is None
    for k in range(2):
        torch.testing.assert_close(out.output[:, k], (gates[:, k].unsqueeze(-1) * experts).sum(1))


def test_mmoe_with_one_expert_equals_a_shared_bottom_of_that_expert():
    torch.manual_seed(0)
    slot = paper_slot(2, in_dim=6, units=4, dense_hidden=4)
    mmoe, dense = MMoE(slot, num_experts=1), Dense(slot)
    with torch.no_grad():
        dense.net.layers[0].weight.copy_(mmoe.experts.linear.w1[0].T)
        dense.net.layers[0].bias.copy_(mmoe.experts.linear.b1[0])
    a, b = MultiTaskModel(mmoe, 6, 2, 3, "relu"), MultiTaskModel(dense, 6, 2, 3, "relu")
    b.towers.load_state_dict(a.towers.state_dict())
    x = torch.randn(11, 6)
    torch.testing.assert_close(a(x)[0], b(x)[0])
    torch.testing.assert_close(a(x)[1].output[:, 0], dense(x).output)


def test_mmoe_with_tied_gates_equals_omoe():
    # §4.9: equal gate weights for all tasks give OMoE.
    torch.manual_seed(0)
    slot = paper_slot(2, in_dim=5, units=3)
    mmoe, omoe = MMoE(slot, num_experts=4), OMoE(slot, num_experts=4)
    with torch.no_grad():
        omoe.experts.load_state_dict(mmoe.experts.state_dict())
        w = omoe.router.linear.weight  # [E, D]
        mmoe.router.linear.weight.copy_(torch.cat([w, w]))
    x = torch.randn(7, 5)
    m, o = mmoe(x), omoe(x)
    for k in range(2):
        torch.testing.assert_close(m.output[:, k], o.output)
        torch.testing.assert_close(m.weights[:, k], o.weights)
    single = MMoE(paper_slot(1, in_dim=5, units=3), num_experts=4)  # H = 1 is OMoE too
    single.load_state_dict(omoe.state_dict())
    torch.testing.assert_close(single(x).output, o.output)
    torch.testing.assert_close(single(x).weights, o.weights)


def test_top_k_mmoe_uses_the_routing_core_and_reports_balance():
    torch.manual_seed(0)
    mmoe = MMoE(paper_slot(2, in_dim=5, units=3), num_experts=4, top_k=2, balance_coef=0.01)
    out = mmoe(torch.randn(16, 5))
    assert set(out.losses) >= {"balance", "z"}
    torch.testing.assert_close(out.aux_loss, 0.01 * out.losses["balance"])
    out.output.sum().backward()
    assert mmoe.router.linear.weight.grad.abs().sum() > 0


def test_bad_top_k_is_a_config_error():
    with pytest.raises(ConfigError, match="combiner.top_k=9"):
        MMoE(paper_slot(), num_experts=8, top_k=9)


# --------------------------------------------------------------------------------------- parameter parity


def weight_count(model: MultiTaskModel) -> int:
    """Weights (no biases) of the bottom's experts and the towers' first layers (§4.5 parameter budget)."""
    bottom = sum(p.numel() for n, p in model.bottom.named_parameters()
                 if "router" not in n and n.rsplit(".", 1)[-1] in ("w1", "weight"))
    return bottom + sum(t.layers[0].weight.numel() for t in model.towers)


def test_parameter_parity_matches_the_paper_budget():
    task = MultiTask(train_size=8, val_size=8, test_size=8)
    task.setup(0)
    assert task.dense_width() == 113
    mmoe = task.build_model(lambda slot: MMoE(slot, num_experts=8))
    omoe = task.build_model(lambda slot: OMoE(slot, num_experts=8))
    dense = task.build_model(lambda slot: Dense(slot))
    assert weight_count(mmoe) == weight_count(omoe) == 100 * 16 * 8 + 16 * 8 * 2 == 13_056
    assert weight_count(dense) == 100 * 113 + 113 * 8 * 2 == 13_108
    assert sum(p.numel() for p in mmoe.bottom.router.parameters()) == 2 * 800  # one E·D gate per task
    assert sum(p.numel() for p in omoe.bottom.router.parameters()) == 800


# ----------------------------------------------------------------------------------------- routing metrics


def test_gate_overlap_hand_cases():
    same = torch.tensor([[[0.5, 0.5], [0.5, 0.5]], [[1.0, 0.0], [1.0, 0.0]]])
    assert gate_overlap(same)["gate_overlap"] == pytest.approx(1.0)
    apart = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert gate_overlap(apart)["gate_overlap"] == pytest.approx(0.0)
    # Means (0.5, 0.5) for both tasks, but opposite choices on every example.
    swap = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])
    assert gate_overlap(swap) == pytest.approx({"gate_overlap": 1.0, "gate_overlap_per_example": 0.0})


def test_evaluate_reports_per_task_metrics_affinity_and_overlap():
    torch.manual_seed(0)
    task = MultiTask(train_size=64, val_size=32, test_size=32)
    task.setup(0)
    model = task.build_model(lambda slot: MMoE(slot, num_experts=3))
    m = task.evaluate(model, "test")
    with torch.no_grad():
        pred, out = model(task.data["test"][0])
    y = task.data["test"][1]
    for k in range(2):
        assert m[f"test/task{k}/mse"] == pytest.approx(float(((pred[:, k] - y[:, k]) ** 2).mean()), rel=1e-6)
        for e in range(3):
            mean_gate = float(out.weights[:, k, e].mean())
            assert m[f"route/bottom/affinity/task{k}/e{e}"] == pytest.approx(mean_gate, rel=1e-6)
            assert m[f"route/bottom/task{k}/importance/e{e}"] == pytest.approx(
                m[f"route/bottom/affinity/task{k}/e{e}"], rel=1e-6)
    assert m["test/loss"] == pytest.approx((m["test/task0/mse"] + m["test/task1/mse"]) / 2)
    assert 0.0 <= m["test/gate_overlap"] <= 1.0 + 1e-6
    assert "route/bottom/marginal_entropy" in m
    assert "train/gate_overlap" not in task.evaluate(model, "train")


def test_task_config_errors():
    with pytest.raises(ConfigError, match="task.rho=1.5"):
        MultiTask(rho=1.5)
    with pytest.raises(ConfigError, match="task.targets"):
        MultiTask(data_path="x.csv")


# ---------------------------------------------------------------------------------------------- end to end

SMALL = ["task=multitask", "task.train_size=512", "task.val_size=128", "task.test_size=128",
         "trainer.max_epochs=3", "trainer.eval_every=8", "trainer.log_every=4"]


@pytest.mark.parametrize("combiner", ["mmoe", "omoe", "dense", "cooperative"])
def test_train_end_to_end_writes_per_task_metrics(tmp_path, combiner):
    summary = train_inprocess([*SMALL, f"combiner={combiner}"], tmp_path / "run")
    assert summary["status"] == "completed"
    final = summary["final"]
    for split in ("train", "test"):
        for k in range(2):
            assert math.isfinite(final[f"{split}/task{k}/mse"])
    assert final["parameters/bottom"] + final["parameters/gates"] + final["parameters/towers"] == \
        summary["parameters"]
    if combiner in ("mmoe", "omoe", "cooperative"):
        assert "test/gate_overlap" in final and "route/bottom/affinity/task1/e0" in final
    if combiner != "mmoe":  # one gate (or none) for both tasks
        assert final.get("test/gate_overlap", 1.0) == pytest.approx(1.0)


def test_same_seed_same_metrics(tmp_path):
    a = train_inprocess([*SMALL, "combiner=mmoe", "trainer.max_epochs=1"], tmp_path / "a")
    b = train_inprocess([*SMALL, "combiner=mmoe", "trainer.max_epochs=1"], tmp_path / "b")
    assert a["final"] == b["final"]


def write_csv(path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 2, generator=g)
    lines = ["a,b,colour,reg,flag,weight"]
    for i in range(200):
        colour = ["red", "green", "blue"][i % 3]
        reg = 2 * x[i, 0] - x[i, 1] + (1.0 if colour == "red" else 0.0)
        flag = int(x[i, 0] > 0)
        a = "" if i == 5 else f"{x[i, 0]:.4f}"  # one missing cell
        lines.append(f"{a},{x[i, 1]:.4f},{colour},{reg:.4f},{flag},{i}")
    path.write_text("\n".join(lines) + "\n")


def test_csv_table_with_regression_and_binary_targets(tmp_path):
    path = tmp_path / "table.csv"
    write_csv(path)
    task = MultiTask(data_path=str(path), targets=["reg", "flag"], drop=["weight"], val_fraction=0.2,
                     test_fraction=0.2)
    task.setup(1)
    assert task.task_names == ("reg", "flag") and task.binary == (False, True)
    assert task.input_dim == 2 + 3  # a, b and the colour one-hot
    assert [len(task.data[s][0]) for s in ("train", "val", "test")] == [120, 40, 40]
    assert torch.isfinite(task.data["train"][0]).all()
    model = task.build_model(lambda slot: MMoE(slot, num_experts=2))
    m = task.evaluate(model, "test")
    assert {"test/reg/mse", "test/flag/auc", "test/flag/bce"} <= set(m)
    assert 0.0 <= m["test/flag/auc"] <= 1.0


def test_csv_runs_through_the_cli_config(tmp_path):
    path = tmp_path / "table.csv"
    write_csv(path)
    summary = train_inprocess(["task=multitask", "combiner=mmoe", f"task.data_path={path}",
                               "task.targets=[reg,flag]", "task.drop=[weight]", "task.batch_size=32",
                               "trainer.max_epochs=2", "trainer.eval_every=5"], tmp_path / "run")
    assert summary["status"] == "completed"
    assert "test/flag/auc" in summary["final"] and "test/reg/mse" in summary["final"]


def test_headerless_csv_with_text_targets_as_in_census_income(tmp_path):
    # UCI style: no header, a space after each comma, text labels turned binary by task.positive (§4.6, §4.8).
    rows = [f"{age}, {edu}, {status}, {income}, 1.5" for age, edu, status, income in [
        (25, "Bachelors", "Never married", "- 50000."), (52, "HS-grad", "Married", "50000+."),
        (33, "Masters", "Never married", "50000+."), (41, "HS-grad", "Divorced", "- 50000.")] * 10]
    path = tmp_path / "census.data"
    path.write_text("\n".join(rows) + "\n")
    columns = ["age", "education", "marital", "income", "instance weight"]
    task = MultiTask(data_path=str(path), columns=columns, targets=["income", "marital"],
                     drop=["instance weight"], positive={"income": "50000+.", "marital": ["Never married"]},
                     val_fraction=0.25, test_fraction=0.25)
    task.setup(0)
    x, y = (torch.cat([task.data[s][i] for s in ("train", "val", "test")]) for i in (0, 1))
    assert task.binary == (True, True) and task.input_dim == 1 + 3  # age and the education one-hot
    assert float(y[:, 0].mean()) == 0.5 and float(y[:, 1].mean()) == 0.5
    with pytest.raises(ConfigError, match="matches no cell"):
        MultiTask(data_path=str(path), columns=["age", "education", "marital", "income", "w"],
                  targets=["income"], positive={"income": "50000+"}).setup(0)


def test_csv_unknown_column_is_a_config_error(tmp_path):
    path = tmp_path / "table.csv"
    write_csv(path)
    with pytest.raises(ConfigError, match="choose one of"):
        MultiTask(data_path=str(path), targets=["nope"]).setup(0)


# ------------------------------------------------------------------------------------------------- preset


def test_preset_composes_as_the_paper_sweep():
    cfg, choices = compose(["experiment=mmoe_correlation"])
    assert choices["task"] == "multitask" and cfg.trainer.optimizer.lr == 0.001
    assert cfg.seeds >= 5 and cfg.task.scale == 3.0


@pytest.mark.slow
def test_preset_behaviour_at_20_seeds(tmp_path):
    # §4.9 behaviour checks at the spec's CI size (20 seeds, 180 runs; ~40 min on 2 busy cores). Not yet run:
    # at 10 seeds Gap(MMoE) < Gap(shared-bottom) did not hold (issue-5 note), so this may fail at 20 epochs.
    from moecli.report.compare import collect_runs, mean_std
    from moecli.report.presets_mmoe import summarise
    from tests.conftest import moecli

    result = moecli("train", "experiment=mmoe_correlation", "seeds=20", f"hydra.sweep.dir={tmp_path}",
                    timeout=4 * 3600)
    assert result.returncode == 0, result.stderr[-2000:]
    s = summarise(collect_runs([tmp_path]))
    per_example = [mean_std(s["overlap_per_example"][("mmoe", r)])[0] for r in (1.0, 0.9, 0.5)]
    assert per_example[0] > per_example[1] > per_example[2]  # the tasks' gates drift apart as ρ falls
    assert s["gaps"]["mmoe"] < s["gaps"]["omoe"]
    assert s["gaps"]["mmoe"] < s["gaps"]["dense"]


def test_report_table_gaps_and_plot(tmp_path):
    from rich.console import Console

    from moecli.report.compare import collect_runs
    from moecli.report.presets_mmoe import report

    losses = {("dense", 1.0): [0.1, 0.2], ("dense", 0.5): [0.4, 0.5], ("mmoe", 1.0): [0.1, 0.1],
              ("mmoe", 0.5): [0.15, 0.25]}
    for i, ((combiner, rho), values) in enumerate(losses.items()):
        for seed, v in enumerate(values):
            run = tmp_path / f"{i}_{seed}"
            (run / ".hydra").mkdir(parents=True)
            (run / ".hydra" / "config.yaml").write_text(f"task:\n  rho: {rho}\n")
            final = {"test/loss": v, "test/gate_overlap": 0.9 if combiner == "mmoe" else math.nan}
            summary = {"status": "completed", "final": final, "choices": {"combiner": combiner}, "seed": seed,
                       "overrides": [f"combiner={combiner}", f"seed={seed}"]}
            (run / "summary.json").write_text(json.dumps(summary))
    console = Console(record=True, width=200)
    s = report(collect_runs([tmp_path]), tmp_path, console)
    assert s["gaps"]["dense"] == pytest.approx(0.3) and s["gaps"]["mmoe"] == pytest.approx(0.1)
    text = console.export_text()
    assert "is smaller than" in text and "MMoE's gap is the smaller one for 2 of 2 seeds" in text
    assert s["paired"]["dense"] == pytest.approx({0: 0.3, 1: 0.3})
    assert (tmp_path / "mmoe_correlation.png").stat().st_size > 0
    assert "0.9" in (tmp_path / "mmoe_correlation.md").read_text()
