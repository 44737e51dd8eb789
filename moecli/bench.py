"""`moecli bench moe-layer`: forward + backward time and peak memory of the project's MoE layers against a
dense FFN with the same active parameters per token (issue 3 §6).

Timing alternates the variants (A/B/C/… then again) inside one process, so that the load of a shared machine
hits them alike, and reports medians. Peak memory runs each variant in its own process (RSS high-water mark of
one forward + backward above the RSS after set-up, with glibc's mmap threshold lowered so freed blocks leave
RSS at once). The machine's GEMM rate is measured in the same run. float32, `--threads` intra-op threads.

OpenMP: the spin-wait policy is fixed when the OpenMP runtime starts, so set it in the environment
(`OMP_WAIT_POLICY=PASSIVE moecli bench moe-layer`); the table says which policy ran.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass

D_MODEL, D_FF = 256, 1024
FULL_GRID = [(e, k, t) for e in (8, 32) for k in (1, 2) for t in (4096, 16384)]
QUICK_GRID = [(8, 1, 4096), (32, 2, 16384)]


@dataclass
class Row:
    experts: int
    k: int
    tokens: int
    variant: str
    median_ms: float
    ratio: float | None = None
    peak_mb: float | None = None
    param_mb: float | None = None
    mem_ratio: float | None = None
    gflops: float | None = None


def variants_for(k: int) -> list[str]:
    """The layers compared at k experts per token (dense first: every ratio is against it)."""
    names = ["dense", "topk"]
    names += ["switch"] if k == 1 else ["gshard", "noisy_topk"]
    return names + ["expert_choice"]


def build_layer(variant: str, experts: int, k: int, d_model: int | None = None, d_ff: int | None = None):
    """The project's combiner for a representation slot with the benchmark's sizes."""
    from omegaconf import OmegaConf

    from moecli import registry
    from moecli.slots import Slot

    d_model, d_ff = d_model or D_MODEL, d_ff or D_FF
    slot = Slot("bench", "representation", in_dim=d_model, out_dim=d_model, expert_hidden=d_ff)
    cfg = OmegaConf.to_container(
        OmegaConf.load(registry.conf_dir() / "combiner" / f"{variant}.yaml"), resolve=True
    )
    cfg.pop("_target_")
    cfg.pop("expert_hidden", None)
    if variant == "dense":
        cfg["hidden"] = k * d_ff  # same active parameters per token as k experts of width d_ff
    else:
        cfg["num_experts"] = experts
    if variant == "topk":
        cfg.update(top_k=k, renormalize=k > 1)
    if variant == "noisy_topk":
        cfg["top_k"] = k
    if variant == "expert_choice":
        cfg["capacity_factor"] = float(k)
    return registry.combiner_class(variant)(slot=slot, **cfg)


def step(layer, x, grad):
    """One forward + backward; returns nothing (gradients land in the layer and x)."""
    out = layer(x)
    loss = (out.output * grad).sum() + out.aux_loss
    loss.backward()


def _inputs(tokens: int, d_model: int | None = None):
    import torch

    d_model = d_model or D_MODEL
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d_model, generator=g).requires_grad_()
    return x, torch.randn(tokens, d_model, generator=g)


def gemm_rate(tokens: int, width: int, repeats: int = 3) -> float:
    """GFLOP/s of one [T, D] × [D, width] float32 matmul (median of `repeats`)."""
    import torch

    a, b = torch.randn(tokens, D_MODEL), torch.randn(D_MODEL, width)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * tokens * D_MODEL * width / statistics.median(times[1:]) / 1e9


def time_config(experts: int, k: int, tokens: int, repeats: int) -> list[Row]:
    """Alternating A/B timing of all variants of one configuration; medians in ms."""
    import torch

    torch.manual_seed(0)
    names = variants_for(k)
    layers = {n: build_layer(n, experts, k) for n in names}
    x, grad = _inputs(tokens)
    times: dict[str, list[float]] = {n: [] for n in names}
    for n in names:  # warm-up
        step(layers[n], x, grad)
    for i in range(repeats):
        order = names if i % 2 == 0 else names[::-1]  # alternate the order as well
        for n in order:
            for p in layers[n].parameters():
                p.grad = None
            x.grad = None
            t0 = time.perf_counter()
            step(layers[n], x, grad)
            times[n].append(time.perf_counter() - t0)
    flops = 6 * 2 * tokens * D_MODEL * k * D_FF  # two matmuls, forward + two backward products
    rows = []
    dense = statistics.median(times["dense"])
    for n in names:
        med = statistics.median(times[n])
        rows.append(Row(experts, k, tokens, n, med * 1e3, med / dense, gflops=flops / med / 1e9))
    return rows


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_child(variant: str, experts: int, k: int, tokens: int) -> dict:
    """In a fresh process: RSS peak of one forward + backward above the RSS after set-up and a warm-up."""
    import torch

    torch.manual_seed(0)
    layer = build_layer(variant, experts, k)
    x, grad = _inputs(tokens)
    step(layer, x, grad)
    for p in layer.parameters():
        p.grad = None
    x.grad = None
    base, peak, running = _rss_bytes(), [0], [True]

    def poll():
        while running[0]:
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    step(layer, x, grad)
    peak[0] = max(peak[0], _rss_bytes())
    running[0] = False
    thread.join()
    params = sum(p.numel() * p.element_size() for p in layer.parameters())
    return {"peak_bytes": max(peak[0] - base, 0), "param_bytes": params}


def measure_memory(variant: str, experts: int, k: int, tokens: int, threads: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    cmd = [
        sys.executable,
        "-c",
        "import json, sys; from moecli.bench import peak_memory_child as f; "
        f"print(json.dumps(f({variant!r}, {experts}, {k}, {tokens})))",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_moe_layer(grid, repeats: int, threads: int, memory: bool, progress=None) -> dict:
    import torch

    torch.set_num_threads(threads)
    rows: list[Row] = []
    gemm_before = gemm_rate(16384, 2 * D_FF)
    for experts, k, tokens in grid:
        if progress:
            progress(f"E={experts} k={k} T={tokens}: timing")
        config_rows = time_config(experts, k, tokens, repeats)
        if memory:
            mem = {r.variant: measure_memory(r.variant, experts, k, tokens, threads) for r in config_rows}
            dense = mem["dense"]
            for r in config_rows:
                r.peak_mb, r.param_mb = (
                    mem[r.variant]["peak_bytes"] / 2**20,
                    mem[r.variant]["param_bytes"] / 2**20,
                )
                # Allowance: the extra expert weights (their gradients appear during backward).
                extra = max(mem[r.variant]["param_bytes"] - dense["param_bytes"], 0)
                r.mem_ratio = (mem[r.variant]["peak_bytes"] - extra) / max(dense["peak_bytes"], 1)
        rows += config_rows
    gemm_after = gemm_rate(16384, 2 * D_FF)
    return {
        "rows": [asdict(r) for r in rows],
        "gemm_gflops": [gemm_before, gemm_after],
        "threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (libgomp default: spin, then sleep)"),
        "torch": torch.__version__,
        "d_model": D_MODEL,
        "d_ff": D_FF,
        "repeats": repeats,
        "checks": acceptance(rows),
    }


def acceptance(rows: list[Row]) -> list[dict]:
    """The issue's acceptance checks, evaluated on the rows that exist."""
    checks = []
    for r in rows:
        if (r.experts, r.k, r.tokens, r.variant) == (32, 2, 16384, "topk"):
            checks.append(
                {
                    "check": "topk time ≤ 1.10× dense-active (E=32, k=2, T=16384)",
                    "value": r.ratio,
                    "ok": r.ratio <= 1.10,
                }
            )
            if r.mem_ratio is not None:
                checks.append(
                    {
                        "check": "topk peak − extra expert weights ≤ 1.15× dense-active peak",
                        "value": r.mem_ratio,
                        "ok": r.mem_ratio <= 1.15,
                    }
                )
        if (r.experts, r.k, r.tokens, r.variant) == (8, 1, 4096, "switch"):
            checks.append(
                {
                    "check": "switch time ≤ 1.10× dense-active (E=8, k=1, T=4096, CF 1.25)",
                    "value": r.ratio,
                    "ok": r.ratio <= 1.10,
                }
            )
    return checks


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"moe-layer forward+backward, d_model {result['d_model']}, d_ff {result['d_ff']}, "
        f"float32, {result['threads']} threads, median of {result['repeats']}"
    )
    for col in ("E", "k", "T", "layer", "ms", "× dense", "GFLOP/s", "peak MB", "params MB", "mem ×"):
        table.add_column(col, justify="right" if col != "layer" else "left")

    def fmt(value, spec):
        return "–" if value is None else format(value, spec)

    for r in result["rows"]:
        table.add_row(
            str(r["experts"]),
            str(r["k"]),
            str(r["tokens"]),
            r["variant"],
            f"{r['median_ms']:.1f}",
            fmt(r["ratio"], ".2f"),
            fmt(r["gflops"], ".1f"),
            fmt(r["peak_mb"], ".0f"),
            fmt(r["param_mb"], ".1f"),
            fmt(r["mem_ratio"], ".2f"),
        )
    console = Console()
    console.print(table)
    g = result["gemm_gflops"]
    console.print(
        f"GEMM rate [16384×256]·[256×2048]: {g[0]:.1f} GFLOP/s before, {g[1]:.1f} after; "
        f"OMP_WAIT_POLICY={result['omp_wait_policy']}; torch {result['torch']}"
    )
    console.print("mem × = (peak − the MoE's extra expert weights) / dense peak; peaks exclude the weights.")
    for c in result["checks"]:
        mark = "[green]ok[/green]" if c["ok"] else "[red]FAIL[/red]"
        console.print(f"{mark}  {c['check']}: {c['value']:.2f}")


def bench_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="moecli bench", description="benchmarks")
    sub = parser.add_subparsers(dest="name", required=True)
    p = sub.add_parser(
        "moe-layer", help="MoE layers vs the dense-active FFN: forward+backward time, peak memory"
    )
    p.add_argument("--quick", action="store_true", help="only the two acceptance configurations, 5 repeats")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant, alternating (default 5)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory processes")
    p.add_argument(
        "--config",
        action="append",
        default=None,
        metavar="E,K,T",
        help="a configuration to run (repeatable), e.g. --config 32,2,16384",
    )
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="PATH",
        help="write the results as JSON to PATH (or stdout without a path)",
    )
    args = parser.parse_args(argv)
    from moecli.cli import fail

    try:
        grid = [tuple(int(v) for v in c.split(",")) for c in args.config] if args.config else None
    except ValueError:
        return fail(f"--config={args.config} is not valid; write E,K,T, e.g. 32,2,16384")
    if grid and any(len(c) != 3 or c[1] not in (1, 2) for c in grid):
        return fail("--config needs E,K,T with K in 1, 2")
    grid = grid or (QUICK_GRID if args.quick else FULL_GRID)
    repeats = args.repeats or 5
    to_stdout = args.json == "-"
    log = None if to_stdout else (lambda m: print(m, file=sys.stderr))
    result = run_moe_layer(grid, repeats, args.threads, not args.no_memory, log)
    if args.json and not to_stdout:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if to_stdout:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0
