"""Preset reports: Hydra callbacks that print a paper preset's table when its sweep ends.

A preset YAML registers one under `hydra.callbacks`; the report reads the sweep's run records only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from rich.console import Console
from rich.table import Table

from moecli.report.compare import Run, collect_runs, mean_std


class PresetReport(Callback):
    """Base: on the end of a multirun, collect the sweep's runs and hand them to `report`."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        runs = collect_runs([sweep_dir])
        if runs:
            self.report(runs, sweep_dir, Console(width=140))

    def report(self, runs: list[Run], sweep_dir: Path, console: Console) -> None:
        raise NotImplementedError


def arm_name(run: Run, key: str) -> str:
    """The value of override `key` (e.g. "+experiment/jacobs1991_arm") in a run's arm."""
    for o in run.arm:
        if o.lstrip("+").split("=", 1)[0] == key.lstrip("+"):
            return o.split("=", 1)[1]
    return "?"


# Jacobs et al. 1991, Table 1 (methods-classic §1.6; exact values uncertain there).
JACOBS_PAPER = {"moe4": (88, 90, 1124, 23), "moe8": (88, 90, 1083, 12), "bp6": (88, 90, 2209, 83),
                "bp12": (88, 90, 2435, 124)}


def surviving_experts(final: dict[str, float], threshold: float = 0.05) -> list[int]:
    """Experts whose mean training-set gate weight exceeds `threshold` (methods-classic §1.8)."""
    out, i = [], 0
    while f"route/out/importance/e{i}" in final:
        if final[f"route/out/importance/e{i}"] > threshold:
            out.append(i)
        i += 1
    return out


def vowel_partition(final: dict[str, float], experts: list[int]) -> str:
    """Which vowels each surviving expert takes (largest mean gate weight per vowel), e.g. "{IY,IH}|{AA,AH}"."""
    owner: dict[int, list[str]] = {e: [] for e in experts}
    prefix = "route/out/affinity/"
    vowels = sorted({k[len(prefix):].rsplit("/", 1)[0] for k in final if k.startswith(prefix)})
    for v in vowels:
        weights = {e: final.get(f"{prefix}{v}/e{e}", 0.0) for e in experts}
        if weights:
            owner[max(weights, key=weights.get)].append(v)
    # Canonical form (groups sorted), so that the same partition by differently numbered experts reads the same.
    return "|".join(sorted("{" + ",".join(sorted(vs)) + "}" for vs in owner.values() if vs))


class Jacobs1991Report(PresetReport):
    """Table 1 of Jacobs et al. (1991) beside this sweep's figures."""

    def report(self, runs: list[Run], sweep_dir: Path, console: Console) -> None:
        arms: dict[str, list[Run]] = {}
        for run in runs:
            arms.setdefault(arm_name(run, "experiment/jacobs1991_arm"), []).append(run)
        table = Table(title=f"Jacobs et al. 1991, Table 1 — paper vs this sweep ({sweep_dir})", title_justify="left")
        for col in ("system", "runs", "train % (paper)", "test % (paper)", "epochs to criterion (paper)",
                    "reached", "surviving experts", "most common split"):
            table.add_column(col, justify="left" if col in ("system", "most common split") else "right")
        epochs: dict[str, float] = {}
        for name in ("moe4", "moe8", "bp6", "bp12"):
            done = [r.summary for r in arms.get(name, []) if r.summary.get("status") == "completed"]
            if not done:
                continue
            tr = mean_std([100 * s["final"].get("train/acc", math.nan) for s in done])
            te = mean_std([100 * s["final"].get("test/acc", math.nan) for s in done])
            reached = [s["final"]["train/epochs_to_criterion"] for s in done
                       if "train/epochs_to_criterion" in s["final"]]
            ep = mean_std(reached)
            epochs[name] = ep[0]
            paper = JACOBS_PAPER[name]
            survivors, split = "–", "–"
            if name.startswith("moe"):
                counts = [len(surviving_experts(s["final"])) for s in done]
                survivors = f"{mean_std(counts)[0]:.1f} [{min(counts)}–{max(counts)}]"
                splits = [vowel_partition(s["final"], surviving_experts(s["final"])) for s in done]
                common = max(set(splits), key=splits.count)
                split = f"{common} ({splits.count(common)}/{len(splits)})"
            table.add_row(name, str(len(done)), f"{tr[0]:.1f} ± {tr[1]:.1f} ({paper[0]})",
                          f"{te[0]:.1f} ± {te[1]:.1f} ({paper[1]})",
                          f"{ep[0]:.0f} ± {ep[1]:.0f} ({paper[2]} ± {paper[3]})", f"{len(reached)}/{len(done)}",
                          survivors, split)
        console.print(table)
        if "moe4" in epochs and "bp6" in epochs and epochs["bp6"] > 0:
            console.print(f"mixture/backprop epochs ratio (moe4 / bp6): {epochs['moe4'] / epochs['bp6']:.2f} "
                          f"(paper 1124/2209 = 0.51)")
