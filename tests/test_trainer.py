"""The training loop: determinism, kill-and-resume equality, the NaN/Inf guard, the stopping criterion."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from moecli.record import RunRecord
from moecli.report.reporter import Reporter
from moecli.task import StepOutput, Task
from moecli.trainer import Trainer
from tests.conftest import train_inprocess

QUICK = ["task=vowel", "trainer.max_epochs=12", "trainer.eval_every=20", "trainer.checkpoint_every=20"]


def test_same_config_and_seed_give_the_same_metrics(tmp_path):
    a = train_inprocess(QUICK + ["task.batch_size=64"], tmp_path / "a")
    b = train_inprocess(QUICK + ["task.batch_size=64"], tmp_path / "b")
    c = train_inprocess(QUICK + ["task.batch_size=64", "seed=1"], tmp_path / "c")
    assert a["final"] == b["final"]
    assert a["final"] != c["final"]
    assert (tmp_path / "a" / "metrics.jsonl").read_text().count("\n") > 3


class _Abort(BaseException):
    """Stands in for SIGKILL inside the process: nothing after it runs, not even the summary."""


class _KillingReporter(Reporter):
    def __init__(self, record, at_step):
        super().__init__(record, {}, None, None)
        self.at_step = at_step

    def step(self, step, loss):
        if step == self.at_step:
            raise _Abort


def test_resume_in_process_equals_an_uninterrupted_run(tmp_path):
    from moecli.run import build
    from tests.conftest import compose

    overrides = QUICK + ["task.batch_size=50", "combiner=competitive"]
    full = train_inprocess(overrides, tmp_path / "full")
    cfg, choices = compose(["logger=quiet", *overrides])
    torch.manual_seed(0)
    task, model, trainer = build(cfg, choices)
    record = RunRecord(tmp_path / "killed")
    with pytest.raises(_Abort):
        trainer.fit(task, model, record, _KillingReporter(record, at_step=53), seed=0)
    record.close()
    resumed = train_inprocess(overrides + ["trainer.resume=true"], tmp_path / "killed")
    assert resumed["final"] == full["final"]
    assert resumed["best"] == full["best"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps), "metrics logged after the checkpoint must be dropped on resume"


def _start_and_kill_after_first_checkpoint(cmd, env, run_dir) -> bool:
    """Start a run, SIGKILL it once its first checkpoint exists; True when it was killed before finishing."""
    proc = subprocess.Popen(cmd + [f"hydra.run.dir={run_dir}"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return not (run_dir / "summary.json").exists()


def test_sigkill_then_resume_ends_with_the_uninterrupted_metrics(tmp_path):
    """The acceptance check: a real SIGKILL after the first checkpoint, then trainer.resume=true."""
    args = ["task=vowel", "trainer.max_epochs=400", "trainer.checkpoint_every=20", "logger=quiet"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "moecli.cli", "train", *args]
    ref = subprocess.run(cmd + [f"hydra.run.dir={tmp_path / 'ref'}"], env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    # The whole run takes about a second after start-up; on a loaded machine it can finish before the kill
    # lands, so try a few fresh folders.
    for attempt in range(4):
        run_dir = tmp_path / f"killed{attempt}"
        if _start_and_kill_after_first_checkpoint(cmd, env, run_dir):
            break
    else:
        pytest.fail("every run finished before SIGKILL could interrupt it")
    res = subprocess.run(cmd + [f"hydra.run.dir={run_dir}", "trainer.resume=true"], env=env, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    want = json.loads((tmp_path / "ref" / "summary.json").read_text())["final"]
    got = json.loads((run_dir / "summary.json").read_text())["final"]
    assert got == want


class _ExplodingTask(Task):
    """A linear regression whose loss term "boom" becomes NaN at a chosen step."""

    steps_per_epoch = 1

    def __init__(self, nan_at: int):
        self.nan_at, self.calls = nan_at, 0

    def setup(self, seed):
        self.x, self.y = torch.randn(8, 2), torch.randn(8, 1)

    def slots(self):
        return []

    def build_model(self, make_combiner):
        return nn.Linear(2, 1)

    def train_batches(self, epoch, generator):
        yield self.x, self.y

    def training_step(self, model, batch):
        self.calls += 1
        x, y = batch
        mse = ((model(x) - y) ** 2).mean()
        boom = mse * (float("nan") if self.calls >= self.nan_at else 0.0)
        return StepOutput({"mse": mse, "boom": boom}, num_items=8)

    def evaluate(self, model, split):
        return {f"{split}/loss": float(((model(self.x) - self.y) ** 2).mean())}


def test_nan_guard_fails_the_run_naming_step_and_term_and_keeps_the_last_good_checkpoint(tmp_path):
    task = _ExplodingTask(nan_at=7)
    task.setup(0)
    model = task.build_model(None)
    record = RunRecord(tmp_path)
    trainer = Trainer(max_epochs=20, eval_every=1, log_every=1, checkpoint_every=5)
    summary = trainer.fit(task, model, record, Reporter(record, {}), seed=0)
    assert summary["status"] == "failed"
    assert "'boom'" in summary["message"] and "step 7" in summary["message"]
    ckpt = record.load_checkpoint()
    assert ckpt["state"]["step"] == 5
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_stop_rule_records_epochs_to_criterion(tmp_path):
    summary = train_inprocess(["task=vowel", "trainer.max_epochs=500", "trainer.eval_every=1",
                               "trainer.stop.metric=train/acc", "trainer.stop.threshold=0.85"], tmp_path)
    assert summary["status"] == "completed"
    reached = summary["final"]["train/epochs_to_criterion"]
    assert 1 <= reached < 500 and summary["steps"] == reached
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    accs = [r["train/acc"] for r in rows if "train/acc" in r and r["step"] < reached]
    assert all(a < 0.85 for a in accs)


def test_checkpoint_loads_without_unpickling_code(tmp_path):
    train_inprocess(QUICK, tmp_path)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "torch_rng", "data_rng", "state"} <= set(state)
