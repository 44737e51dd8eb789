"""`moecli compare`: mean ± std of final metrics over run folders, grouped by the overrides except the seed.

Reads only the run record (summary.json), so it works on sweeps of any task and on runs copied elsewhere.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Overrides that never distinguish arms of a comparison (keys, or key prefixes ending in ".").
IGNORED_KEYS = ("seed", "seeds", "experiment", "logger", "trainer.resume", "hydra.")


@dataclass(frozen=True)
class Run:
    path: Path
    summary: dict[str, Any]
    arm: tuple[str, ...]  # the overrides that define the arm, sorted


def arm_of(overrides: list[str]) -> tuple[str, ...]:
    def ignored(key: str) -> bool:
        return any(key == k or (k.endswith(".") and key.startswith(k)) for k in IGNORED_KEYS)

    keep = [o for o in overrides if not ignored(o.lstrip("+~").split("=", 1)[0])]
    return tuple(sorted(keep))


def collect_runs(dirs: list[Path]) -> list[Run]:
    """Every run folder (one holding summary.json) under `dirs`, in path order."""
    runs = []
    for root in dirs:
        for path in sorted(Path(root).rglob("summary.json")):
            summary = json.loads(path.read_text())
            overrides = summary.get("overrides")
            if overrides is None:
                hydra_overrides = path.parent / ".hydra" / "overrides.yaml"
                overrides = _read_yaml_list(hydra_overrides) if hydra_overrides.exists() else []
            runs.append(Run(path.parent, summary, arm_of(overrides)))
    return runs


def _read_yaml_list(path: Path) -> list[str]:
    from omegaconf import OmegaConf

    return [str(x) for x in OmegaConf.load(path)]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of the finite values."""
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def default_metrics(runs: list[Run]) -> list[str]:
    """Headline metrics: final keys with at most one slash that are not routing statistics."""
    keys = {k for r in runs for k in r.summary.get("final", {}) if k.count("/") <= 1 and not k.startswith("route/")}
    return sorted(keys)


def aggregate(runs: list[Run], metrics: list[str]) -> list[dict[str, Any]]:
    """One row per arm: {"arm": ..., "n": completed runs, "failed": n, metric: (mean, std), ...}."""
    arms: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        arms.setdefault(run.arm, []).append(run)
    rows = []
    for arm, members in arms.items():
        done = [r for r in members if r.summary.get("status") == "completed"]
        row: dict[str, Any] = {"arm": arm, "n": len(done), "failed": len(members) - len(done)}
        for m in metrics:
            row[m] = mean_std([r.summary.get("final", {}).get(m, math.nan) for r in done])
        rows.append(row)
    return rows


def select_metrics(runs: list[Run], patterns: list[str] | None) -> list[str]:
    if not patterns:
        return default_metrics(runs)
    keys = sorted({k for r in runs for k in r.summary.get("final", {})})
    return [k for k in keys if any(fnmatch.fnmatch(k, p) for p in patterns)]


def varying(rows: list[dict[str, Any]]) -> tuple[list[str], dict[tuple[str, ...], str]]:
    """Split each arm's overrides into those shared by all arms (returned once) and a short label."""
    sets = [set(r["arm"]) for r in rows]
    common = set.intersection(*sets) if sets else set()
    labels = {r["arm"]: " ".join(o for o in r["arm"] if o not in common) or "(all)" for r in rows}
    return sorted(common), labels


def fmt(ms: tuple[float, float]) -> str:
    mean, std = ms
    return "–" if math.isnan(mean) else f"{mean:.4g} ± {std:.2g}"


def compare_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="moecli compare", description="Mean ± std of final metrics over runs, "
                                     "grouped by their overrides except the seed.")
    parser.add_argument("dirs", nargs="+", type=Path, help="run folders or sweep folders")
    parser.add_argument("--metrics", nargs="*", help="metric names or glob patterns (default: headline metrics)")
    parser.add_argument("--csv", type=Path, help="also write the table to this CSV file")
    args = parser.parse_args(argv)
    for d in args.dirs:
        if not d.exists():
            print(f"error: {d} does not exist", file=sys.stderr)
            return 2
    runs = collect_runs(args.dirs)
    if not runs:
        print(f"error: no summary.json found under {', '.join(map(str, args.dirs))}", file=sys.stderr)
        return 2
    metrics = select_metrics(runs, args.metrics)
    rows = aggregate(runs, metrics)
    common, labels = varying(rows)
    print_table(rows, metrics, common, labels)
    if args.csv:
        write_csv(args.csv, rows, metrics, labels)
    return 0


def print_table(rows, metrics, common, labels, title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title or ("common: " + " ".join(common) if common else "runs"), title_justify="left")
    table.add_column("arm")
    table.add_column("n", justify="right")
    for m in metrics:
        table.add_column(m, justify="right")
    for row in rows:
        n = f"{row['n']}" + (f" [red](+{row['failed']} failed)" if row["failed"] else "")
        table.add_row(labels[row["arm"]], n, *(fmt(row[m]) for m in metrics))
    Console(width=max(120, 24 * (len(metrics) + 2))).print(table)


def write_csv(path: Path, rows, metrics, labels) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["arm", "n", "failed"] + [f"{m}/{s}" for m in metrics for s in ("mean", "std")])
        for row in rows:
            writer.writerow([labels[row["arm"]], row["n"], row["failed"]] +
                            [v for m in metrics for v in row[m]])
