"""`moecli compare` and the preset reports read only the run records; check their arithmetic on made-up runs."""

from __future__ import annotations

import json
import math

import pytest

from moecli.report.compare import aggregate, arm_of, collect_runs, mean_std
from moecli.report.presets import surviving_experts, vowel_partition
from tests.conftest import moecli


def _run(root, name, overrides, acc, status="completed"):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"status": status, "overrides": overrides,
                                                     "final": {"test/acc": acc}}))


def test_runs_group_by_overrides_except_seed_and_aggregate_mean_and_sample_std(tmp_path):
    _run(tmp_path, "a0", ["combiner=poe", "seed=0"], 0.8)
    _run(tmp_path, "a1", ["combiner=poe", "seed=1"], 0.9)
    _run(tmp_path, "a2", ["seed=2", "combiner=poe"], 1.0)
    _run(tmp_path, "b0", ["combiner=dense", "seed=0"], 0.5)
    _run(tmp_path, "b1", ["combiner=dense", "seed=1"], 0.1, status="failed")
    rows = {r["arm"]: r for r in aggregate(collect_runs([tmp_path]), ["test/acc"])}
    assert set(rows) == {("combiner=poe",), ("combiner=dense",)}
    mean, std = rows[("combiner=poe",)]["test/acc"]
    assert mean == pytest.approx(0.9) and std == pytest.approx(0.1)
    assert rows[("combiner=dense",)]["n"] == 1 and rows[("combiner=dense",)]["failed"] == 1
    assert rows[("combiner=dense",)]["test/acc"] == (0.5, 0.0)


def test_arm_ignores_seed_logger_resume_and_hydra_keys_only():
    arm = arm_of(["seed=3", "seeds=5", "logger=quiet", "trainer.resume=true", "hydra.run.dir=x",
                  "+experiment/jacobs1991_arm=moe4", "experiment=jacobs1991", "trainer.max_epochs=5"])
    assert arm == ("+experiment/jacobs1991_arm=moe4", "trainer.max_epochs=5")


def test_mean_std_skips_non_finite_values():
    assert mean_std([1.0, float("nan"), 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert all(math.isnan(v) for v in mean_std([]))


def test_vowel_partition_is_canonical_and_surviving_experts_use_the_threshold():
    final = {"route/out/importance/e0": 0.5, "route/out/importance/e1": 0.01, "route/out/importance/e2": 0.49}
    for v, owner in {"IY": 2, "IH": 2, "AA": 0, "AH": 0}.items():
        for e in range(3):
            final[f"route/out/affinity/{v}/e{e}"] = 0.9 if e == owner else 0.05
    assert surviving_experts(final) == [0, 2]
    swapped = {k.replace("/e0", "/eX").replace("/e2", "/e0").replace("/eX", "/e2"): v for k, v in final.items()}
    assert vowel_partition(final, [0, 2]) == vowel_partition(swapped, [0, 2]) == "{AA,AH}|{IH,IY}"


def test_compare_cli_prints_and_writes_csv(tmp_path):
    _run(tmp_path / "s", "0", ["combiner=poe", "seed=0"], 0.75)
    _run(tmp_path / "s", "1", ["combiner=poe", "seed=1"], 0.85)
    res = moecli("compare", str(tmp_path / "s"), "--csv", str(tmp_path / "t.csv"))
    assert res.returncode == 0, res.stderr
    assert "0.8 ± 0.071" in res.stdout
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0] == "arm,n,failed,test/acc/mean,test/acc/std" and lines[1].startswith("(all),2,0,0.8")
