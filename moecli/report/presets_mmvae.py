"""Report of the `mmvae_fusion` preset (methods-multimodal §5.3–5.4): a Hydra callback that, when the sweep
ends, prints one row per fusion × training regime (mean ± std over seeds), writes `mmvae_fusion.md` and saves
`mmvae_fusion_robustness.png` (joint latent accuracy and gPoE image weight vs test σ) in the sweep folder.
"""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moecli.report.compare import Run, mean_std
from moecli.report.presets import PresetReport, arm_name

ARM = "+experiment/mmvae_fusion_arm"
NOISE = "task.train_noise.image.uniform"
FUSIONS = ("poe", "competitive", "mopoe", "gpoe")
CLEAN_COLUMNS = [("probe img", "test/latent_acc/image"), ("probe joint", "test/latent_acc/joint"),
                 ("coh img→lbl", "test/coherence/image_to_label"),
                 ("coh lbl→img", "test/coherence/label_to_image"),
                 ("joint coh", "test/coherence/joint"), ("test ELBO", "test/elbo")]


def sigmas_of(runs: list[Run]) -> list[str]:
    """Test σ suffixes present in the runs' robustness metrics, sorted numerically (e.g. "0", "0.5", "2")."""
    prefix = "test/robust/latent_acc/joint/s"
    found = {k[len(prefix):] for r in runs for k in r.summary.get("final", {}) if k.startswith(prefix)}
    return sorted(found, key=float)


def fmt(values: list[float], spread: bool = False) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "–"
    text = f"{mean:.3f}±{std:.3f}"
    if spread and len(values) > 1:
        text += f" [{min(values):.2f}–{max(values):.2f}]"
    return text


def group(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    """(fusion, training noise) -> completed runs, fusions in the preset's order."""
    out: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        if run.summary.get("status") == "completed":
            out.setdefault((arm_name(run, ARM), arm_name(run, NOISE)), []).append(run)
    order = {f: i for i, f in enumerate(FUSIONS)}
    return dict(sorted(out.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1])))


def rows(groups, sigmas) -> tuple[list[str], list[list[str]]]:
    header = ["fusion", "train noise", "n"] + [c for c, _ in CLEAN_COLUMNS]
    header += [f"joint σ={s}" for s in sigmas] + [f"α_img σ={s}" for s in sigmas]
    body = []
    for (fusion, noise), members in groups.items():
        finals = [r.summary["final"] for r in members]
        row = [fusion, noise, str(len(members))] + [fmt([f.get(k, math.nan) for f in finals])
                                                     for _, k in CLEAN_COLUMNS]
        row += [fmt([f.get(f"test/robust/latent_acc/joint/s{s}", math.nan) for f in finals], s == sigmas[-1])
                for s in sigmas]
        row += [fmt([f.get(f"test/robust/weight/image/s{s}", math.nan) for f in finals]) if fusion == "gpoe"
                else "–" for s in sigmas]
        body.append(row)
    return header, body


def save_plot(groups, sigmas, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [float(s) for s in sigmas]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for (fusion, noise), members in groups.items():
        style = "-" if float(noise) == 0 else "--"
        finals = [r.summary["final"] for r in members]
        ys = [mean_std([f.get(f"test/robust/latent_acc/joint/s{s}", math.nan) for f in finals])[0]
              for s in sigmas]
        axes[0].plot(xs, ys, style, marker="o", label=f"{fusion}, train noise {noise}")
        if fusion == "gpoe":
            ws = [mean_std([f.get(f"test/robust/weight/image/s{s}", math.nan) for f in finals])[0]
                  for s in sigmas]
            axes[1].plot(xs, ws, style, marker="o", label=f"gpoe, train noise {noise}")
    axes[0].set(xlabel="σ of Gaussian noise on the test image", ylabel="joint latent probe accuracy",
                ylim=(0, 1.02))
    axes[1].set(xlabel="σ of Gaussian noise on the test image", ylabel="mean gPoE weight α_image",
                ylim=(0, 1.02))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class MMVAEFusionReport(PresetReport):
    """Fusion × training noise table over seeds (methods-multimodal §5.4 tables A and B)."""

    def report(self, runs: list[Run], sweep_dir: Path, console: Console) -> None:
        console.width = max(console.width, 200)
        groups = group(runs)
        if not groups:
            console.print("mmvae_fusion: no completed runs")
            return
        sigmas = sigmas_of(runs)
        header, body = rows(groups, sigmas)
        split = 3 + len(CLEAN_COLUMNS)  # table A: clean test; table B: robustness (fusion, noise, n repeated)
        titles = ["A: clean test", "B: joint latent probe and gPoE image weight as test σ on the image grows"]
        column_sets = [list(range(split)), list(range(3)) + list(range(split, len(header)))]
        for title, cols in zip(titles, column_sets):
            title = f"mmvae_fusion {title} (mean±std over seeds; [range] at the largest σ)"
            table = Table(title=escape(title))
            for c in cols:
                table.add_column(header[c])
            for row in body:
                table.add_row(*[escape(row[c]) for c in cols])
            console.print(table)
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        (sweep_dir / "mmvae_fusion.md").write_text("\n".join(lines) + "\n")
        save_plot(groups, sigmas, sweep_dir / "mmvae_fusion_robustness.png")
        console.print(f"table: {sweep_dir / 'mmvae_fusion.md'}; "
                      f"plot: {sweep_dir / 'mmvae_fusion_robustness.png'}")
