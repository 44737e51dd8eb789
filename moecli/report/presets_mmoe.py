"""Report of `experiment=mmoe_correlation` (Ma et al. 2018 §5, Figs. 4–5; methods-classic §4.6–4.7, §4.9).

At the end of the sweep: a table of final test loss (mean of the tasks' test MSE) per model and task
correlation ρ, as mean ± std over seeds with the spread over seeds (min, 90th percentile, max: the paper's
trainability view), the gap `mean(ρ = 0.5) − mean(ρ = 1.0)` per model, and the gate overlap between the tasks
against ρ. It writes `mmoe_correlation.md` (the same tables) and `mmoe_correlation.png` (loss against ρ per
model) into the sweep folder. Reads the run records only (summary.json and each run's .hydra/config.yaml).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from rich.console import Console
from rich.table import Table

from moecli.report.compare import Run, collect_runs, mean_std

MODEL_NAMES = {"dense": "shared-bottom", "omoe": "OMoE", "mmoe": "MMoE"}


def run_cell(run: Run) -> tuple[str, float]:
    """(combiner name, ρ) of a run, from its resolved config."""
    from omegaconf import OmegaConf

    cfg_path = run.path / ".hydra" / "config.yaml"
    choices = run.summary.get("choices", {})
    rho = math.nan
    if cfg_path.exists():
        rho = float(OmegaConf.load(cfg_path).task.rho)
    return choices.get("combiner", "?"), rho


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile of the values (NaN when empty)."""
    v = sorted(values)
    if not v:
        return math.nan
    pos = q * (len(v) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def cells(runs: list[Run], key: str) -> dict[tuple[str, float], list[float]]:
    """Final values of `key` of the completed runs, per (combiner, ρ)."""
    out: dict[tuple[str, float], list[float]] = {}
    for run in runs:
        value = run.summary.get("final", {}).get(key)
        done = run.summary.get("status") == "completed"
        if done and isinstance(value, (int, float)) and math.isfinite(value):
            out.setdefault(run_cell(run), []).append(float(value))
    return out


def paired_gaps(runs: list[Run], model: str) -> dict[int, float]:
    """Per seed: test loss at ρ = 0.5 minus at ρ = 1.0 (same seed = same α, β, x and noise draws)."""
    by_seed: dict[tuple[float, int], float] = {}
    for run in runs:
        combiner, rho = run_cell(run)
        value = run.summary.get("final", {}).get("test/loss")
        if combiner == model and run.summary.get("status") == "completed" and isinstance(value, (int, float)):
            by_seed[(rho, int(run.summary.get("seed", -1)))] = float(value)
    return {seed: by_seed[(0.5, seed)] - v for (rho, seed), v in by_seed.items() if rho == 1.0
            and (0.5, seed) in by_seed}


def summarise(runs: list[Run]) -> dict[str, Any]:
    """Everything the report shows: models, ρ values (descending), loss and overlap cells, gaps."""
    loss, overlap = cells(runs, "test/loss"), cells(runs, "test/gate_overlap")
    per_ex = cells(runs, "test/gate_overlap_per_example")
    models = [m for m in MODEL_NAMES if any(c[0] == m for c in loss)]
    models += sorted({c[0] for c in loss} - set(models))
    rhos = sorted({c[1] for c in loss}, reverse=True)
    gaps = {}
    for m in models:
        if (m, 1.0) in loss and (m, 0.5) in loss:
            gaps[m] = mean_std(loss[(m, 0.5)])[0] - mean_std(loss[(m, 1.0)])[0]
    return {"models": models, "rhos": rhos, "loss": loss, "overlap": overlap, "overlap_per_example": per_ex,
            "gaps": gaps, "paired": {m: paired_gaps(runs, m) for m in models}}


def markdown(s: dict[str, Any]) -> str:
    """The loss table, the gaps and the gate-overlap table as Markdown."""
    rhos, lines = s["rhos"], []
    lines.append("| model | " + " | ".join(f"ρ = {r:g}: mean ± std [min, p90, max] (n)" for r in rhos)
                 + " | gap ρ 0.5 − 1.0 |")
    lines.append("|---" * (len(rhos) + 2) + "|")
    for m in s["models"]:
        row = [MODEL_NAMES.get(m, m)]
        for r in rhos:
            v = s["loss"].get((m, r), [])
            mu, sd = mean_std(v)
            row.append(f"{mu:.4f} ± {sd:.4f} [{min(v, default=math.nan):.4f}, {quantile(v, 0.9):.4f}, "
                       f"{max(v, default=math.nan):.4f}] ({len(v)})")
        row.append(f"{s['gaps'][m]:+.4f}" if m in s["gaps"] else "–")
        lines.append("| " + " | ".join(row) + " |")
    head = " | ".join(f"overlap ρ = {r:g} (mean gates / per example)" for r in rhos)
    lines += ["", f"| model | {head} |", "|---" * (len(rhos) + 1) + "|"]
    for m in s["models"]:
        if not any((m, r) in s["overlap"] for r in rhos):
            continue
        row = [MODEL_NAMES.get(m, m)]
        for r in rhos:
            a, b = mean_std(s["overlap"].get((m, r), [])), mean_std(s["overlap_per_example"].get((m, r), []))
            row.append(f"{a[0]:.3f} ± {a[1]:.3f} / {b[0]:.3f} ± {b[1]:.3f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(s: dict[str, Any], path: Path) -> None:
    """Mean test loss against ρ per model, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m in s["models"]:
        rs = [r for r in sorted(s["rhos"]) if (m, r) in s["loss"]]
        stats = [mean_std(s["loss"][(m, r)]) for r in rs]
        ax.errorbar(rs, [a for a, _ in stats], yerr=[b for _, b in stats], marker="o", capsize=3,
                    label=MODEL_NAMES.get(m, m))
    ax.set_xlabel("task correlation ρ = cos(w1, w2)")
    ax.set_ylabel("final test loss (mean task MSE)")
    ax.set_title("Ma et al. 2018, synthetic data")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class MMoECorrelationReport(Callback):
    """Hydra callback of the preset: prints the tables and saves them and the plot into the sweep folder."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        runs = collect_runs([sweep_dir])
        if runs:
            report(runs, sweep_dir, Console(width=160))


def report(runs: list[Run], sweep_dir: Path, console: Console) -> dict[str, Any]:
    s = summarise(runs)
    table = Table(title=f"Ma et al. 2018 synthetic: final test loss by model and ρ ({sweep_dir})",
                  title_justify="left")
    table.add_column("model")
    for r in s["rhos"]:
        table.add_column(f"ρ = {r:g}\nmean ± std [min, p90, max]", justify="right")
    table.add_column("gap 0.5 − 1.0", justify="right")
    table.add_column("gate overlap by ρ\n(mean gates/per example)", justify="right")
    for m in s["models"]:
        row = [MODEL_NAMES.get(m, m)]
        for r in s["rhos"]:
            v = s["loss"].get((m, r), [])
            mu, sd = mean_std(v)
            row.append(f"{mu:.4f} ± {sd:.4f} [{min(v, default=math.nan):.3f}, {quantile(v, 0.9):.3f}, "
                       f"{max(v, default=math.nan):.3f}]")
        row.append(f"{s['gaps'][m]:+.4f}" if m in s["gaps"] else "–")
        row.append(" ".join(f"{mean_std(s['overlap'][(m, r)])[0]:.3f}/"
                            f"{mean_std(s['overlap_per_example'].get((m, r), []))[0]:.3f}" if (m, r) in s["overlap"]
                            else "–" for r in s["rhos"]))
        table.add_row(*row)
    console.print(table)
    gaps = s["gaps"]
    if "mmoe" in gaps and "dense" in gaps:
        verdict = "smaller" if gaps["mmoe"] < gaps["dense"] else "NOT smaller"
        console.print(f"MMoE's loss increase from ρ = 1.0 to 0.5 ({gaps['mmoe']:+.4f}) is {verdict} than "
                      f"shared-bottom's ({gaps['dense']:+.4f}) (paper: much smaller).")
        a, b = s["paired"]["mmoe"], s["paired"]["dense"]
        seeds = sorted(set(a) & set(b))
        wins = sum(a[k] < b[k] for k in seeds)
        console.print(f"Per seed (paired data draws): MMoE's gap is the smaller one for {wins} of {len(seeds)} "
                      "seeds.")
    (sweep_dir / "mmoe_correlation.md").write_text(markdown(s), encoding="utf-8")
    plot(s, sweep_dir / "mmoe_correlation.png")
    console.print(f"wrote {sweep_dir / 'mmoe_correlation.md'} and {sweep_dir / 'mmoe_correlation.png'}")
    return s
