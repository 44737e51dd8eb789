"""Tables of the toy-LM presets (switch_scaling, switch_capacity, shazeer_balance, routing_zoo).

Each preset registers one of these as a Hydra callback; at the end of the sweep it reads the sweep's run
records (summary.json, metrics.jsonl) and prints its table. The same tables for an existing sweep folder:
`python -m moecli.report.presets_lm <preset> <sweep dir>`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from moecli.report.compare import Run, collect_runs, mean_std
from moecli.report.presets import PresetReport, arm_name

ARM_KEYS = {"switch_scaling": "experiment/switch_scaling_arm", "switch_capacity": "combiner.capacity_factor",
            "shazeer_balance": "experiment/shazeer_balance_arm", "routing_zoo": "experiment/routing_zoo_arm"}


# ------------------------------------------------------------------------------------------------- helpers
def by_arm(runs: list[Run], key: str) -> dict[str, list[Run]]:
    """Completed runs grouped by the value of the arm override `key`, in first-seen order."""
    arms: dict[str, list[Run]] = {}
    for run in runs:
        if run.summary.get("status") == "completed":
            arms.setdefault(arm_name(run, key), []).append(run)
    return arms


def pm(values: list[float], digits: int = 3) -> str:
    mean, std = mean_std(values)
    return "–" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def layer_stat(final: dict[str, float], stat: str, how=max, prefix: str = "route/") -> float:
    """`how` (max or mean) over MoE layers of `<prefix><layer>/<stat>`; NaN when no layer reports it.

    prefix "route/": validation windows, eval mode; "train/route/": training batches, the gate as trained."""
    values = [v for k, v in final.items() if k.startswith(prefix) and k.count("/") == prefix.count("/") + 1
              and k.endswith("/" + stat) and isinstance(v, (int, float))]
    if not values:
        return math.nan
    return how(values) if how is max else sum(values) / len(values)


def vector_cv(final: dict[str, float], stat: str) -> float:
    """Worst-layer CV (std / mean, population) of the vector `route/<layer>/<stat>/e<i>`; NaN if absent."""
    layers: dict[str, list[float]] = {}
    for key, value in final.items():
        parts = key.split("/")
        if len(parts) == 4 and parts[0] == "route" and parts[2] == stat and parts[3].startswith("e"):
            layers.setdefault(parts[1], []).append(float(value))
    cvs = []
    for values in layers.values():
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / len(values)
        cvs.append(math.sqrt(var) / mean if mean > 0 else math.nan)
    return max(cvs) if cvs else math.nan


def load_cv(final: dict[str, float]) -> float:
    """CV of tokens per expert (post-capacity `dispatch`, all k choices), else of the top-1 load."""
    value = vector_cv(final, "dispatch")
    return value if not math.isnan(value) else math.sqrt(layer_stat(final, "cv2_load"))


def dropped(final: dict[str, float], prefix: str = "route/") -> float:
    """Mean dropped fraction over MoE layers (0 for routers without capacity)."""
    for name in ("dropped_fraction", "drop_fraction", "dropped"):
        value = layer_stat(final, name, how=_mean, prefix=prefix)
        if not math.isnan(value):
            return value
    return 0.0


def _mean(values):
    return sum(values) / len(values)


def seconds_per_step(run: Run) -> float:
    """Training seconds per optimiser step from the task's measured throughput (evaluation excluded)."""
    final = run.summary["final"]
    config = _task_config(run)
    tokens = config.get("batch_size", 1) * config.get("context", 1)
    rate = final.get("train/tokens_per_s", math.nan)
    return tokens / rate if rate and rate > 0 else math.nan


def _task_config(run: Run) -> dict:
    path = run.path / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path).task, resolve=False)


def val_curve(run: Run) -> list[tuple[int, float]]:
    """(step, val/loss) pairs from metrics.jsonl, in step order."""
    path = run.path / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted({(r["step"], r["val/loss"]) for r in rows
                   if "val/loss" in r and isinstance(r["val/loss"], float)})


def step_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First (linearly interpolated) step at which the validation loss is ≤ target; None if never."""
    prev = (0, math.inf)
    for step, loss in curve:
        if loss <= target:
            if math.isinf(prev[1]):
                return float(step)
            frac = (prev[1] - target) / max(prev[1] - loss, 1e-12)
            return prev[0] + frac * (step - prev[0])
        prev = (step, loss)
    return None


# ------------------------------------------------------------------------------------------------- reports
class SwitchScalingReport(PresetReport):
    """Dense vs switch E ∈ {2, 4, 8, 16}: val bpb (mean ± std over seeds), and wall time to dense quality."""

    def report(self, runs: list[Run], sweep_dir: Path, console: Console) -> None:
        console.print(switch_scaling_table(runs, sweep_dir))


def switch_scaling_table(runs: list[Run], sweep_dir: Path) -> Table:
    arms = by_arm(runs, ARM_KEYS["switch_scaling"])
    dense = arms.get("dense", [])
    dense_loss = mean_std([r.summary["final"]["val/loss"] for r in dense])[0] if dense else math.nan
    dense_time = mean_std([r.summary["steps"] * seconds_per_step(r) for r in dense])[0] if dense else math.nan
    table = Table(title=f"Switch scaling at equal steps and active FLOPs ({sweep_dir})\n"
                  f"time-to-dense-quality: wall time (training only) to reach the dense mean final val loss "
                  f"{dense_loss:.4f}, / dense training time; step ratio: steps to reach it / steps run (device-free)",
                  title_justify="left")
    for col in ("arm", "seeds", "val bpb", "val loss", "params", "tokens/s", "time to dense quality (s)",
                "time ratio", "step ratio", "reached"):
        table.add_column(col, justify="left" if col == "arm" else "right")
    for name in sorted(arms, key=_arm_order):
        members = arms[name]
        times, step_ratios = [], []
        for run in members:
            step = step_to_reach(val_curve(run), dense_loss)
            if step is not None:
                times.append(step * seconds_per_step(run))
                step_ratios.append(step / run.summary["steps"])
        ratio = [t / dense_time for t in times] if dense_time and not math.isnan(dense_time) else []
        table.add_row(name, str(len(members)), pm([r.summary["final"]["val/bpb"] for r in members]),
                      pm([r.summary["final"]["val/loss"] for r in members], 4),
                      f"{mean_std([r.summary.get('parameters', math.nan) for r in members])[0]:,.0f}",
                      f"{_mean_rate(members):,.0f}",
                      pm(times, 1) if times else "–", pm(ratio, 2) if ratio else "–",
                      pm(step_ratios, 2) if step_ratios else "–",
                      f"{len(times)}/{len(members)}")
    return table


def _mean_rate(members: list[Run]) -> float:
    return mean_std([r.summary["final"].get("train/tokens_per_s", math.nan) for r in members])[0]


def _arm_order(name: str) -> tuple[int, str]:
    digits = "".join(c for c in name if c.isdigit())
    return (0 if name == "dense" else 1, f"{int(digits):05d}" if digits else name)


class SwitchCapacityReport(PresetReport):
    """Switch Table 1's trade-off: capacity factor vs quality, dropped fraction and speed."""

    def report(self, runs: list[Run], sweep_dir: Path, console: Console) -> None:
        console.print(routing_table(runs, ARM_KEYS["switch_capacity"],
                                    f"Switch capacity factor (train = eval) trade-off ({sweep_dir})"))


class ShazeerBalanceReport(PresetReport):
    """Noisy top-k with and without the importance and load losses (Shazeer 2017 Table 6)."""

    def report(self, runs: list[Run], sweep_dir: Path, console: Console) -> None:
        console.print(routing_table(runs, ARM_KEYS["shazeer_balance"],
                                    "Noisy top-k balancing losses, Shazeer et al. 2017 Table 6 "
                                    f"({sweep_dir})\n"
                                    "CV(importance) train: per training batch, the gate as trained (noise on); "
                                    "other columns on validation tokens (eval mode); worst MoE layer"))


class RoutingZooReport(PresetReport):
    """Every router at equal active FLOPs, same seeds: quality, balance, drops, speed."""

    def report(self, runs: list[Run], sweep_dir: Path, console: Console) -> None:
        title = f"Routing zoo at equal active FLOPs ({sweep_dir})"
        console.print(routing_table(runs, ARM_KEYS["routing_zoo"], title))


def routing_table(runs: list[Run], key: str, title: str) -> Table:
    """One row per arm: quality, balance (worst layer), dead experts, dropped fraction, throughput."""
    table = Table(title=title, title_justify="left")
    columns = ("arm", "seeds", "val bpb", "CV(importance) train", "CV(importance)", "CV(load)", "dead experts",
               "dropped train", "dropped", "tokens/s")
    for col in columns:
        table.add_column(col, justify="left" if col == "arm" else "right")
    for name, members in by_arm(runs, key).items():
        finals = [r.summary["final"] for r in members]
        table.add_row(name, str(len(members)), pm([f["val/bpb"] for f in finals]),
                      pm([layer_stat(f, "cv_importance_batch", prefix="train/route/") for f in finals], 3),
                      pm([math.sqrt(layer_stat(f, "cv2_importance")) for f in finals], 3),
                      pm([load_cv(f) for f in finals], 3),
                      pm([layer_stat(f, "dead", how=_mean) * 1.0 for f in finals], 1),
                      pm([dropped(f, "train/route/") for f in finals], 4), pm([dropped(f) for f in finals], 4),
                      f"{mean_std([f.get('train/tokens_per_s', math.nan) for f in finals])[0]:,.0f}")
    return table


def _table(preset: str, runs: list[Run], sweep_dir: Path) -> Table:
    if preset == "switch_scaling":
        return switch_scaling_table(runs, sweep_dir)
    return routing_table(runs, ARM_KEYS[preset], f"{preset} ({sweep_dir})")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] not in ARM_KEYS:
        print(f"usage: python -m moecli.report.presets_lm {{{','.join(ARM_KEYS)}}} <sweep dir>...",
              file=sys.stderr)
        return 2
    runs = collect_runs([Path(d) for d in argv[1:]])
    Console(width=160).print(_table(argv[0], runs, Path(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
