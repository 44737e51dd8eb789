"""task=segmentation (methods-multimodal §8): generator, fusion, freezing, metrics, disagreement, stages."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moecli.combiners.competitive import Competitive
from moecli.combiners.cooperative import Cooperative
from moecli.combiners.poe import Poe
from moecli.errors import ConfigError
from moecli.record import RunRecord
from moecli.report.console import ConsoleView
from moecli.report.reporter import Reporter
from moecli.staged import StagedTrainer
from moecli.trainer import Trainer
from tasks import seg_scenes
from tasks.segmentation import FCN, Segmentation, confusion, disagreement, moe_log_probs, scores, spearman
from tests.conftest import moecli

C = seg_scenes


def small_task(**kw) -> Segmentation:
    args = dict(train_per_domain=8, val_per_domain=4, test_per_domain=4, width=4, decoder_reduce=4,
                gate_hidden=8, batch_size=8, num_pictures=1)
    args.update(kw)
    task = Segmentation(**args)
    task.setup(0)
    return task


def quiet(run_dir) -> Reporter:
    return Reporter(RunRecord(run_dir), {}, ConsoleView(enabled=False))


def make(cls, **kw):
    return lambda slot: cls(slot=slot, **kw)


# ---------------------------------------------------------------------------------------------- generator


def test_generator_is_deterministic_and_seeded():
    a = C.generate("urban", 3, "train", 5)
    b = C.generate("urban", 3, "train", 5)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.masks, b.masks)
    assert not np.array_equal(a.masks, C.generate("urban", 4, "train", 5).masks)
    assert not np.array_equal(a.masks, C.generate("urban", 3, "test", 5).masks)  # splits are separate streams
    assert a.images.shape == (5, 3, 32, 32) and a.masks.shape == (5, 32, 32)
    assert a.images.dtype == np.float32 and 0 <= a.images.min() and a.images.max() <= 1


def test_domains_differ_as_specified():
    urban, highway = C.generate("urban", 0, "train", 200), C.generate("highway", 0, "train", 200)
    fu = np.bincount(urban.masks.ravel(), minlength=6) / urban.masks.size
    fh = np.bincount(highway.masks.ravel(), minlength=6) / highway.masks.size
    assert fu[C.BUILDING] > 0.2 and fh[C.BUILDING] == 0  # buildings only in town
    assert fh[C.VEGETATION] > 0.05 and fu[C.VEGETATION] == 0  # the vegetation strip only on highways
    assert all(f[c] > 0 for f in (fu, fh) for c in (C.SKY, C.ROAD, C.VEHICLE, C.THIN))

    def horizon(mask):  # first row that is not entirely sky
        return int(np.argmax((mask != C.SKY).any(1)))

    # urban horizon 6–11, but building tops may start higher; highway: vegetation strip 3 rows above 10–15
    assert all(7 <= horizon(m) <= 12 for m in highway.masks)
    assert all(1 <= horizon(m) <= 11 for m in urban.masks)
    # the confound: highway road looks like urban building, and the vehicles change colour
    cu, ch = C.COLOURS["urban"], C.COLOURS["highway"]
    assert np.abs(ch[C.ROAD] - cu[C.BUILDING]).max() < 0.03
    assert np.abs(ch[C.ROAD] - cu[C.ROAD]).max() > 0.2
    assert cu[C.VEHICLE].argmax() == 0 and ch[C.VEHICLE].argmax() == 2  # red in town, blue on highways
    mean_road_h = highway.images.transpose(1, 0, 2, 3)[:, highway.masks == C.ROAD].mean(1)
    assert np.abs(mean_road_h - cu[C.BUILDING]).max() < 0.05


def test_ambiguous_joins_urban_left_and_highway_right():
    image, mask = C.scene("ambiguous", 1, "test", 2)
    _, left = C.scene("urban", 1, "test", 10_000_002)
    _, right = C.scene("highway", 1, "test", 10_000_002)
    assert np.array_equal(mask[:, :16], left[:, :16]) and np.array_equal(mask[:, 16:], right[:, 16:])
    assert image.shape == (3, 32, 32)


def test_user_folder_layout(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for domain, splits in [("a", ("train", "test")), ("b", ("train", "test")), ("c", ("test",))]:
        for split in splits:
            for k in range(10 if split == "train" else 2):
                (tmp_path / domain / split / "images").mkdir(parents=True, exist_ok=True)
                (tmp_path / domain / split / "masks").mkdir(parents=True, exist_ok=True)
                img = (rng.random((16, 20, 3)) * 255).astype(np.uint8)
                Image.fromarray(img).save(tmp_path / domain / split / "images" / f"{k}.png")
                mask = rng.integers(0, 3, (16, 20)).astype(np.uint8)
                Image.fromarray(mask).save(tmp_path / domain / split / "masks" / f"{k}.png")
    (tmp_path / "classes.txt").write_text("x\ny\nz\n")
    task = Segmentation(data_path=str(tmp_path), gate_scope="pixel", width=4, gate_hidden=4)
    task.setup(0)
    assert task.train_domains == ("a", "b") and task.classes == ("x", "y", "z")
    assert len(task.data["a"]["train"][1]) == 9 and len(task.data["a"]["val"][1]) == 1  # every 10th is val
    assert set(task.data["c"]) == {"test"} and task.data["a"]["test"][0].shape == (2, 3, 16, 20)
    assert task.slots()[0].num_experts == 2
    (tmp_path / "b" / "train" / "masks" / "3.png").unlink()
    with pytest.raises(ConfigError, match="has no mask"):
        Segmentation(data_path=str(tmp_path)).setup(0)


# -------------------------------------------------------------------------------------------------- fusion


def _force_gate(model, expert: int):
    """Make the router's softmax exactly one-hot on `expert`: zero weights, bias 0 / −inf."""
    linear = model.moe.combiner.router.linear
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.fill_(-math.inf)
        linear.bias[expert] = 0.0


@pytest.mark.parametrize("cls", [Cooperative, Competitive])
@pytest.mark.parametrize("scope", ["image", "pixel"])
def test_one_hot_gate_gives_the_chosen_expert(cls, scope):
    task = small_task(gate_scope=scope)
    model = task.build_model(make(cls))
    model.eval()
    x = task.data["urban"]["test"][0]
    for e in (0, 1):
        _force_gate(model, e)
        out = model.moe(x)
        expected = out.logits[:, e].log_softmax(1)
        assert torch.equal(moe_log_probs(out).log(), expected) or torch.allclose(
            moe_log_probs(out).log(), expected, atol=1e-6, rtol=0)
        assert torch.equal(out.weights[..., e], torch.ones_like(out.weights[..., e]))
        preds, _ = task.predictions(model, x)
        assert torch.equal(preds["moe"], preds[f"expert_{task.train_domains[e]}"])


def test_weights_positive_and_sum_to_one_per_image():
    task = small_task()
    model = task.build_model(make(Cooperative))
    out = model.moe(task.data["highway"]["test"][0])
    w = out.weights  # [B, H, W, E], one vector per image for the image gate
    assert (w > 0).all() and torch.allclose(w.sum(-1), torch.ones_like(w[..., 0]))
    assert torch.equal(w, w[:, :1, :1].expand_as(w))


def test_poe_at_the_pixel_slot_has_no_gate_stage():
    task = small_task()
    model = task.build_model(make(Poe))
    assert [s.kind for s in task.stages(model)] == ["expert", "expert", "baseline"]
    out = model.moe(task.data["urban"]["test"][0])
    product = torch.log_softmax(out.logits.log_softmax(2).sum(1), 1)
    assert torch.allclose(moe_log_probs(out).log(), product, atol=1e-5)


def test_end_to_end_trains_experts_and_gate_together():
    task = small_task(training="end_to_end", baseline=False)
    model = task.build_model(make(Cooperative))
    stages = task.stages(model)
    assert [(s.name, s.kind) for s in stages] == [("moe", "moe")]
    stages[0].prepare()
    assert all(p.requires_grad for p in model.moe.parameters())
    model.moe.train()
    assert all(m.training for m in model.moe.experts.modules())


def test_gate_input_size_is_checked():
    task = small_task()
    model = task.build_model(make(Cooperative))
    with pytest.raises(ConfigError, match="expects 8×8"):
        model.moe(torch.rand(2, 3, 48, 48))
    task = small_task(gate_pool="adaptive")
    model = task.build_model(make(Cooperative))
    assert model.moe(torch.rand(2, 3, 48, 48)).weights.shape == (2, 48, 48, 2)


# ------------------------------------------------------------------------------------------------ freezing


def _expert_state(model):
    return {k: v.clone() for k, v in model.moe.experts.state_dict().items()}


def test_frozen_experts_unchanged_while_the_gate_trains(tmp_path):
    task = small_task()
    model = task.build_model(make(Cooperative))
    gate_stage = task.stages(model)[-1]
    assert gate_stage.kind == "gate"
    gate_stage.prepare()
    before, gate_before = _expert_state(model), model.moe.gate.linear.weight.clone()
    model.moe.train()  # §8.6 item 2: .train() must not put the experts' BatchNorm back into training mode
    assert not any(m.training for m in model.moe.experts.modules())
    model.moe(task.data["urban"]["train"][0])
    trainer = Trainer(max_epochs=2, eval_every=1, log_every=1, optimizer={"name": "adam", "lr": 0.05})
    result = trainer.fit(gate_stage.task, gate_stage.module, RunRecord(tmp_path), quiet(tmp_path), 0)
    assert result["status"] == "completed" and result["steps"] == 4
    after = _expert_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # parameters and running statistics
    assert any("running_mean" in k for k in before)
    assert not torch.equal(gate_before, model.moe.gate.linear.weight)


def test_staged_trainer_runs_every_stage_and_reports(tmp_path):
    task = small_task()
    model = task.build_model(make(Cooperative))
    trainer = StagedTrainer(max_epochs=1, eval_every=1, log_every=1, stages={"gate": {"max_epochs": 2}})
    class FakeWandb:  # the wandb view's interface: metrics and the task's pictures
        def __init__(self):
            self.images, self.keys = [], set()

        def log(self, step, metrics):
            self.keys.update(metrics)

        def log_image(self, key, path, step=None):
            self.images.append(key)

    wandb = FakeWandb()
    reporter = Reporter(RunRecord(tmp_path), {}, ConsoleView(enabled=False), wandb)
    summary = trainer.fit(task, model, RunRecord(tmp_path), reporter, 0)
    assert summary["status"] == "completed"
    assert wandb.images == ["pictures/test_ambiguous", "pictures/test_highway", "pictures/test_urban"]
    assert "stage/gate/val/miou" in wandb.keys and "final/test/miou" in wandb.keys
    assert list(summary["stages"]) == ["expert_urban", "expert_highway", "baseline", "gate"]
    assert summary["stages"]["gate"]["steps"] == 4 and summary["steps"] == 1 + 1 + 2 + 4
    final = summary["final"]
    for key in ("test/miou", "test/miou/urban", "test/miou/highway", "test/gate/urban_weight/urban",
                "test/expert_urban/miou/highway", "test/ensemble_mean/miou", "test/baseline/miou",
                "test/disagree/fraction", "route/seg/affinity/urban/e0"):
        assert key in final, key
    assert (tmp_path / "pictures" / "test_urban.png").exists()
    assert (tmp_path / "stages" / "gate" / "module.pt").exists()
    with pytest.raises(ConfigError, match="trainer.stages.gate"):
        StagedTrainer(stages={"gate": {"max_epoch": 2}})


# ------------------------------------------------------------------------------------------------- metrics


def test_miou_hand_computed():
    cm = confusion(torch.tensor([0, 1, 1, 1]), torch.tensor([0, 0, 1, 1]), 3)  # class 2 absent: skipped
    s = scores(cm)
    assert s["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2) and s["miou"] == pytest.approx(0.58333, abs=1e-5)
    assert s["pixel_acc"] == pytest.approx(0.75) and s["class_acc"] == pytest.approx((0.5 + 1) / 2)
    assert s["fwiou"] == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    # two images in one confusion matrix differ from the mean of their per-image mIoUs
    a = confusion(torch.tensor([0, 0]), torch.tensor([0, 0]), 3)   # mIoU 1
    b = confusion(torch.tensor([1, 0]), torch.tensor([1, 1]), 3)   # IoUs 0 and 1/2 -> 1/4
    pooled = scores(a + b)["miou"]  # class 0: 2/(2+1) , class 1: 1/2
    assert pooled == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert pooled != pytest.approx((scores(a)["miou"] + scores(b)["miou"]) / 2)


@pytest.mark.filterwarnings("ignore:An input array is constant")  # constant inputs: both sides give NaN
@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=3, max_size=30), st.integers(0, 1000))
def test_spearman_matches_scipy(values, seed):
    from scipy.stats import spearmanr

    a = torch.tensor(values, dtype=torch.float64)
    b = torch.tensor(np.random.default_rng(seed).integers(0, 4, len(values)), dtype=torch.float64)
    expected = spearmanr(a.numpy(), b.numpy()).statistic
    got = spearman(a, b)
    assert (math.isnan(expected) and math.isnan(got)) or got == pytest.approx(expected, abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_disagreement_categories_partition_the_pixels(seed):
    g = torch.Generator().manual_seed(seed)
    experts = torch.randint(0, 3, (3, 2, 4, 5), generator=g)
    moe = torch.randint(0, 3, (3, 4, 5), generator=g)
    target = torch.randint(0, 3, (3, 4, 5), generator=g)
    c = disagreement(experts, moe, target)
    total = c["agree_moe"] + c["follows/e0"] + c["follows/e1"] + c["critical"]
    assert torch.equal(total, torch.full((3,), 20))
    assert torch.equal(c["correct_agree"] + c["correct_disagree"] + c["errors"], torch.full((3,), 20))
    one_hot = disagreement(experts, experts[:, 0], target)  # a one-hot gate follows expert 0
    assert int(one_hot["critical"].sum()) == 0


def test_equal_weights_can_make_a_critical_pixel():
    logits = torch.tensor([[2.0, 1.9, 0.0], [0.0, 1.9, 2.0]])  # [E, L]: the experts say 0 and 2
    from moecli.rules import weighted_sum

    blend = weighted_sum(torch.tensor([[0.5, 0.5]]), logits[None])
    moe = blend.argmax(-1).view(1, 1, 1)
    c = disagreement(logits.argmax(-1).view(1, 2, 1, 1), moe, torch.zeros(1, 1, 1, dtype=torch.long))
    assert int(moe) == 1 and int(c["critical"]) == 1


def test_bad_choices_raise_config_errors():
    with pytest.raises(ConfigError, match="task.gate_layer"):
        Segmentation(gate_layer="deepest")
    with pytest.raises(ConfigError, match="task.image_size"):
        Segmentation(image_size=30)


def test_fcn_shapes():
    logits, feats = FCN(6, 4, "batch", 4)(torch.rand(2, 3, 32, 36))
    assert logits.shape == (2, 6, 32, 36) and feats["deep"].shape == (2, 16, 8, 9)


# ------------------------------------------------------------------------------------------------- the CLI


def test_cli_run_writes_the_acceptance_keys(tmp_path):
    res = moecli("train", "task=segmentation", "combiner=cooperative", "task.train_per_domain=8",
                 "task.val_per_domain=2", "task.test_per_domain=2", "task.width=4", "task.num_pictures=1",
                 "task.baseline=false", "trainer.max_epochs=1", "logger=quiet", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("test/miou", "test/miou/urban", "test/miou/highway", "test/gate/urban_weight/urban"):
        assert 0 <= summary["final"][key] <= 1
    assert set(summary["stages"]) == {"expert_urban", "expert_highway", "gate"}  # summary.json sorts keys
    assert (tmp_path / "pictures" / "test_highway.png").exists()


# ------------------------------------------------------------------------------------------ preset table


def _fake_final(moe: float, gate_u: float) -> dict:
    f = {"test/miou": moe, "test/miou/urban": moe, "test/miou/highway": moe,
         "test/expert_urban/miou/urban": 0.99, "test/expert_urban/miou/highway": 0.2,
         "test/expert_highway/miou/highway": 0.99, "test/expert_highway/miou/urban": 0.25,
         "test/expert_urban/miou": 0.45, "test/expert_highway/miou": 0.55, "test/ensemble_mean/miou": 0.6,
         "test/ensemble_max/miou": 0.7, "test/ensemble_maxconf/miou": 0.65, "test/baseline/miou": 0.98,
         "test/gate/urban_weight/urban": gate_u, "test/gate/urban_weight/highway": 0.01,
         "test/disagree/critical": 0.001}
    return f


def test_preset_table_checks_the_claims(tmp_path):
    from moecli.report.presets_seg import claims, sweep_finals, table

    good = [_fake_final(0.99, 0.99), _fake_final(0.97, 0.95)]
    result = {text: holds for text, holds, _ in claims(good)}
    assert all(result.values()), result
    bad = {text: holds for text, holds, _ in claims([_fake_final(0.5, 0.6)])}
    assert not bad["gate picks the matching expert (urban weight > 0.9 on urban, < 0.1 on highway)"]
    assert not bad["MoE pooled mIoU ≥ each single expert and the mean ensemble"]
    text = table(good)
    assert "| MoE (gate) | 98.0 [97.0, 99.0] |" in text
    assert "| urban expert | 99.0 | 20.0 | 45.0 | – |" in text
    for i, (status, final) in enumerate([("completed", good[0]), ("failed", {})]):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "summary.json").write_text(json.dumps({"status": status, "final": final}))
    assert sweep_finals(tmp_path) == [good[0]]


def test_disagreement_csv_matches_the_counts(tmp_path):
    import csv

    task = small_task()
    model = task.build_model(make(Cooperative))
    model.eval()
    with torch.no_grad():
        metrics = task.evaluate(model, "test")
    task.finish(model, tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "disagreement.csv")))
    assert len(rows) == 12 and [r["index"] for r in rows[:4]] == ["0", "1", "2", "3"]
    for r in rows:  # the categories partition the 32 × 32 pixels
        assert int(r["agree_moe"]) + int(r["follows_e0"]) + int(r["follows_e1"]) + int(r["critical"]) == 1024
    urban = [r for r in rows if r["domain"] == "urban"]
    mean_gate = sum(float(r["gate_urban"]) for r in urban) / len(urban)
    assert mean_gate == pytest.approx(metrics["test/gate/urban_weight/urban"], abs=1e-5)
    fraction = 1 - sum(int(r["agree"]) for r in urban) / (1024 * len(urban))
    assert fraction == pytest.approx(metrics["test/disagree/fraction/urban"])


def test_resume_skips_finished_stages_and_restores_them(tmp_path):
    task = small_task()
    torch.manual_seed(0)
    first = StagedTrainer(max_epochs=1, eval_every=1, log_every=1).fit(
        task, task.build_model(make(Cooperative)), RunRecord(tmp_path), quiet(tmp_path), 0)
    torch.manual_seed(1)  # a differently initialised model: every module must come from the stage folders
    resumed = StagedTrainer(max_epochs=1, eval_every=1, log_every=1, resume=True).fit(
        task, task.build_model(make(Cooperative)), RunRecord(tmp_path), quiet(tmp_path), 0)
    assert resumed["status"] == "completed" and resumed["steps"] == first["steps"]
    assert resumed["final"]["test/miou"] == first["final"]["test/miou"]
    assert resumed["final"]["test/gate/urban_weight/urban"] == first["final"]["test/gate/urban_weight/urban"]
