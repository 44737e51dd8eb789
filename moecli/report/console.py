"""Console view (rich): resolved-config tree, live progress with loss, routing table at each evaluation."""

from __future__ import annotations

import re
from collections import defaultdict

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

_LOAD = re.compile(r"^route/(?P<slot>.+)/load/e(?P<i>\d+)$")
BAR_WIDTH = 20


def config_tree(cfg: dict, title: str = "config") -> Tree:
    """A short tree of the resolved config (groups and their keys, nested dicts one level deep)."""
    tree = Tree(f"[bold]{title}")
    for key, value in cfg.items():
        if isinstance(value, dict):
            branch = tree.add(f"[cyan]{key}")
            for k, v in value.items():
                branch.add(f"{k}: {v}" if not isinstance(v, dict) else f"{k}: {{…{len(v)} keys}}")
        else:
            tree.add(f"{key}: {value}")
    return tree


def routing_tables(metrics: dict[str, float]) -> list[Group]:
    """One compact table per slot: load as bars, importance, and the slot's entropy and dead count."""
    loads: dict[str, dict[int, float]] = defaultdict(dict)
    for key, value in metrics.items():
        m = _LOAD.match(key)
        if m:
            loads[m["slot"]][int(m["i"])] = value
    tables = []
    for slot, per_expert in loads.items():
        p = f"route/{slot}"
        caption = (f"entropy {metrics.get(p + '/entropy', float('nan')):.3f} · marginal "
                   f"{metrics.get(p + '/marginal_entropy', float('nan')):.3f} nats · dead "
                   f"{metrics.get(p + '/dead', 0):.0f}/{len(per_expert)}")
        if p + "/dropped_fraction" in metrics:
            caption += f" · dropped {metrics[p + '/dropped_fraction']:.1%}"
        table = Table(title=f"routing {slot}", box=None, pad_edge=False, title_justify="left")
        for col in ("expert", "load", "", "importance"):
            table.add_column(col, justify="right" if col != "" else "left")
        for i in sorted(per_expert):
            load = per_expert[i]
            bar = "█" * round(load * BAR_WIDTH)
            table.add_row(f"e{i}", f"{load:.2f}", f"[green]{bar}", f"{metrics.get(f'{p}/importance/e{i}', 0):.3f}")
        tables.append(Group(table, Text(caption, style="dim")))
    return tables


def headline(metrics: dict[str, float], limit: int = 6) -> str:
    """The few non-routing metrics worth a glance, as one line."""
    items = [(k, v) for k, v in metrics.items() if not k.startswith("route/") and k.count("/") <= 1]
    return "  ".join(f"{k}={v:.4g}" for k, v in items[:limit])


class ConsoleView:
    """Live view: the progress bar with the running loss, and below it the routing tables of the latest
    evaluation, redrawn in place at each evaluation (one line of headline metrics is printed above).
    `enabled=False` keeps it silent (tests, parallel sweeps)."""

    def __init__(self, enabled: bool = True):
        self.console = Console(highlight=False)
        self.enabled = enabled
        self.progress: Progress | None = None
        self.live: Live | None = None
        self.task_id = None

    def start(self, cfg: dict, total: int, step: int) -> None:
        if not self.enabled:
            return
        self.console.print(config_tree(cfg))
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=self.console)
        self.task_id = self.progress.add_task("train", total=total or None, completed=step, info="")
        self.live = Live(Group(self.progress), console=self.console, refresh_per_second=4)
        self.live.start()

    def step(self, step: int, loss: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task_id, completed=step, info=f"loss {loss:.4f}")

    def evaluation(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.console.print(f"[dim]step {step}[/]  {headline(metrics)}")
        if self.live is not None:
            self.live.update(Group(self.progress, *routing_tables(metrics)))
        else:
            for table in routing_tables(metrics):
                self.console.print(table)

    def warn(self, message: str) -> None:
        if self.enabled:
            self.console.print(f"[yellow]warning:[/] {message}")

    def finish(self, summary: dict) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
            if not self.console.is_terminal:
                self.console.print()
        if not self.enabled:
            return
        colour = {"completed": "green", "failed": "red"}.get(summary["status"], "yellow")
        line = f"[{colour}]{summary['status']}[/] in {summary['wall_time_s']:.1f}s"
        if summary.get("message"):
            line += f": {summary['message']}"
        self.console.print(line)
        if summary.get("final"):
            self.console.print(headline(summary["final"], limit=12))
