"""Fan one metrics dictionary out to the run record, the console and wandb (design §6.12)."""

from __future__ import annotations

from moecli.record import RunRecord
from moecli.report.console import ConsoleView


class Reporter:
    def __init__(self, record: RunRecord, cfg: dict, console: ConsoleView | None = None, wandb=None):
        self.record, self.cfg, self.console, self.wandb = record, cfg, console, wandb

    def start(self, total: int, step: int) -> None:
        if self.console:
            self.console.start(self.cfg, total, step)

    def step(self, step: int, loss: float) -> None:
        if self.console:
            self.console.step(step, loss)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.record.log(step, metrics)
        if self.wandb:
            self.wandb.log(step, metrics)

    def evaluation(self, step: int, metrics: dict[str, float]) -> None:
        if self.console:
            self.console.evaluation(step, metrics)

    def warn(self, message: str) -> None:
        if self.console:
            self.console.warn(message)
        self.record.log_event(message)

    def finish(self, summary: dict) -> None:
        if self.console:
            self.console.finish(summary)
        if self.wandb:
            self.wandb.finish(summary)
        self.record.close()
