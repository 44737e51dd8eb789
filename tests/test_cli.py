"""The CLI end to end, as a user types it: help, a tiny run, a two-job sweep, compare, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import moecli

TINY = ["task=vowel", "trainer.max_epochs=20", "trainer.eval_every=10", "logger=quiet"]


def test_help_lists_subcommands_without_importing_torch():
    code = "import sys, moecli.cli as c; c.main(['--help']); print('torch' in sys.modules, 'hydra' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for command in ("train", "compare", "bench", "sample", "list"):
        assert command in out
    assert out.strip().endswith("False False")


def test_train_help_lists_group_options():
    res = moecli("train", "--help")
    assert res.returncode == 0
    assert "combiner:" in res.stdout and "competitive" in res.stdout and "poe" in res.stdout


def test_cfg_job_prints_the_composed_config():
    res = moecli("train", "combiner=poe", "--cfg", "job")
    assert res.returncode == 0 and "moecli.combiners.poe.Poe" in res.stdout


def test_tiny_run_writes_the_run_record(tmp_path):
    run_dir = tmp_path / "run"
    res = moecli("train", *TINY, f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["seed"] == 0 and summary["wall_time_s"] > 0
    assert 0 <= summary["final"]["test/acc"] <= 1 and "train/acc" in summary["best"]
    assert (run_dir / ".hydra" / "config.yaml").exists()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("step" in r for r in rows)
    assert any("route/out/load/e0" in r for r in rows)


def test_two_job_multirun_then_compare(tmp_path):
    sweep = tmp_path / "sweep"
    res = moecli("train", "-m", *TINY, "combiner=poe,cooperative", f"hydra.sweep.dir={sweep}")
    assert res.returncode == 0, res.stderr
    assert len(list(sweep.glob("*/summary.json"))) == 2
    res = moecli("compare", str(sweep), "--csv", str(tmp_path / "t.csv"))
    assert res.returncode == 0, res.stderr
    assert "combiner=poe" in res.stdout and "combiner=cooperative" in res.stdout and "±" in res.stdout
    assert (tmp_path / "t.csv").read_text().startswith("arm,n,failed,")


@pytest.mark.parametrize("args,needle", [
    (["combiner=nonexistent"], "combiner=nonexistent is not a known combiner; choose one of: "),
    (["task=vowel", "combiner=competitive", "combiner.num_experts=0"], "combiner.num_experts=0"),
    (["combiner.num_expertz=3"], "combiner.num_expertz is not a key of combiner; valid keys: "),
    (["task=vowel", "task.likelihood=poisson"], "task.likelihood='poisson' is not valid; choose one of"),
    (["-m", "combiner=poe,nope"], "combiner=nope is not a known combiner"),
])
def test_bad_input_gives_one_line_and_nonzero_exit(tmp_path, args, needle):
    res = moecli("train", *args, "logger=quiet", f"hydra.run.dir={tmp_path / 'r'}",
                 f"hydra.sweep.dir={tmp_path / 's'}")
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and needle in lines[0]
    assert "Traceback" not in res.stderr + res.stdout


def test_an_occupied_run_folder_is_never_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    assert moecli("train", *TINY, f"hydra.run.dir={run_dir}").returncode == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    res = moecli("train", *TINY, "seed=1", f"hydra.run.dir={run_dir}")
    assert res.returncode == 2 and "already holds a run" in res.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_compare_on_missing_folder_fails_cleanly(tmp_path):
    res = moecli("compare", str(tmp_path / "nothing"))
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr


def test_unknown_subcommand(tmp_path):
    res = moecli("frobnicate")
    assert res.returncode == 2 and "choose one of: train" in res.stderr
