"""The table of preset `experiment=segmentation_moe` (Pavlitskaya et al. 2020; methods-multimodal §8.5, §8.7):
per-domain mIoU of every model over seeds, the gate's weights, the disagreement analysis, and the paper's
qualitative claims with the §8.7 pass bands checked against the measured numbers.

`SegmentationTable` is a Hydra callback: at the end of the sweep it reads every job's `summary.json` under the
sweep folder, prints the table and writes it to `<sweep>/segmentation_table.md`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import mean

from hydra.experimental.callback import Callback

MODELS = [("baseline", "baseline (all data)"), ("expert_urban", "urban expert"),
          ("expert_highway", "highway expert"), ("ensemble_mean", "ensemble, mean"),
          ("ensemble_max", "ensemble, max of logits"), ("ensemble_maxconf", "ensemble, max confidence"),
          ("moe", "MoE (gate)")]
SCOPES = [("urban", "/urban"), ("highway", "/highway"), ("pooled", ""), ("ambiguous", "/ambiguous")]


def _key(model: str, metric: str, suffix: str) -> str:
    return f"test/{metric}{suffix}" if model == "moe" else f"test/{model}/{metric}{suffix}"


def _stat(finals: list[dict], key: str) -> tuple[float, float, float] | None:
    values = [float(f[key]) for f in finals if key in f and not math.isnan(float(f[key]))]
    return (mean(values), min(values), max(values)) if values else None


def _cell(stat, scale: float = 100.0, digits: int = 1) -> str:
    if stat is None:
        return "–"
    m, lo, hi = (v * scale for v in stat)
    return f"{m:.{digits}f}" if lo == hi else f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def claims(finals: list[dict]) -> list[tuple[str, bool | None, str]]:
    """(claim, holds, measured) for the paper's qualitative pattern (§8.5) and the §8.7 pass bands, on seed
    means."""
    def m(key):
        s = _stat(finals, key)
        return s[0] if s else math.nan

    out = []
    in_u, in_h = m("test/expert_urban/miou/urban"), m("test/expert_highway/miou/highway")
    out_u, out_h = m("test/expert_urban/miou/highway"), m("test/expert_highway/miou/urban")
    out.append(("experts strong in domain (≥ 95) and weak out of domain (≤ 40)",
                min(in_u, in_h) >= 0.95 and max(out_u, out_h) <= 0.40,
                f"in {100 * in_u:.1f} / {100 * in_h:.1f}, out {100 * out_u:.1f} / {100 * out_h:.1f}"))
    g_u, g_h = m("test/gate/urban_weight/urban"), m("test/gate/urban_weight/highway")
    out.append(("gate picks the matching expert (urban weight > 0.9 on urban, < 0.1 on highway)",
                g_u > 0.9 and g_h < 0.1, f"{g_u:.3f} / {g_h:.3f}"))
    moe = m("test/miou")
    singles = [m("test/expert_urban/miou"), m("test/expert_highway/miou"), m("test/ensemble_mean/miou")]
    out.append(("MoE pooled mIoU ≥ each single expert and the mean ensemble", moe >= max(singles),
                f"{100 * moe:.1f} vs {', '.join(f'{100 * v:.1f}' for v in singles)}"))
    base = m("test/baseline/miou")
    out.append(("MoE within 1 pp of the baseline or above (paper: similar to the baseline)",
                None if math.isnan(base) else moe >= base - 0.01, f"{100 * moe:.1f} vs {100 * base:.1f}"))
    ens = max(m("test/ensemble_mean/miou"), m("test/ensemble_max/miou"), m("test/ensemble_maxconf/miou"))
    out.append(("MoE above the best untrained ensemble (§8.7 band: + 10 pp)", moe >= ens + 0.10,
                f"{100 * moe:.1f} vs {100 * ens:.1f}"))
    crit = m("test/disagree/critical")
    out.append(("critical pixels (MoE differs from both experts) < 1 %", crit < 0.01, f"{100 * crit:.2f} %"))
    g_a = m("test/gate/urban_weight/ambiguous")
    if not math.isnan(g_a):
        out.append(("ambiguous scenes get mixed gate weights, 0.2–0.8 (expected; uncertain)",
                    0.2 <= g_a <= 0.8, f"{g_a:.3f}"))
        agree, dis = m("test/disagree/moe_acc_agree/ambiguous"), m("test/disagree/moe_acc_disagree/ambiguous")
        out.append(("on ambiguous scenes the MoE is less accurate where the experts disagree (expected)",
                    dis < agree, f"{dis:.3f} vs {agree:.3f}"))
    return out


def table(finals: list[dict]) -> str:
    """Markdown: mIoU % per model and domain (seed mean [min, max]), gate weights, disagreement, claims."""
    lines = [f"## Segmentation MoE (Pavlitskaya et al. 2020, §8.7 reproduction) — {len(finals)} seed(s)", "",
             "mIoU % on the test split, mean [min, max] over seeds (pooled = urban + highway in one "
             "confusion matrix)", "", "| model | " + " | ".join(s for s, _ in SCOPES) + " |",
             "|---|" + "---|" * len(SCOPES)]
    for model, label in MODELS:
        cells = [_cell(_stat(finals, _key(model, "miou", suffix))) for _, suffix in SCOPES]
        if any(c != "–" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| mean gate weight of the urban expert | urban | highway | ambiguous |",
              "|---|---|---|---|",
              "| MoE | " + " | ".join(_cell(_stat(finals, f"test/gate/urban_weight/{d}"), 1.0, 3)
                                    for d in ("urban", "highway", "ambiguous")) + " |", ""]
    lines += ["| disagreement (test; fractions in %) | pooled | ambiguous |", "|---|---|---|"]
    for key, label in [("fraction", "pixels where the experts disagree"), ("critical", "critical pixels"),
                       ("moe_acc_agree", "MoE accuracy where they agree"),
                       ("moe_acc_disagree", "MoE accuracy where they disagree"),
                       ("error_rank_corr", "rank corr. disagreement vs error, per image")]:
        scale, digits = (1.0, 3) if key == "error_rank_corr" or key.startswith("moe_acc") else (100.0, 2)
        cells = [_cell(_stat(finals, f"test/disagree/{key}{s}"), scale, digits) for s in ("", "/ambiguous")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| paper's claim (§8.5) / pass band (§8.7) | holds | measured |", "|---|---|---|"]
    for text, holds, measured in claims(finals):
        lines.append(f"| {text} | {'–' if holds is None else ('yes' if holds else 'NO')} | {measured} |")
    return "\n".join(lines) + "\n"


def sweep_finals(sweep_dir: Path) -> list[dict]:
    """The `final` metrics of every completed job under `sweep_dir`."""
    finals = []
    for path in sorted(Path(sweep_dir).glob("*/summary.json")):
        summary = json.loads(path.read_text())
        if summary.get("status") == "completed":
            finals.append(summary["final"])
    return finals


class SegmentationTable(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        finals = sweep_finals(sweep_dir)
        if not finals:
            print(f"segmentation_moe: no completed run under {sweep_dir}")
            return
        text = table(finals)
        (sweep_dir / "segmentation_table.md").write_text(text)
        print(text)
