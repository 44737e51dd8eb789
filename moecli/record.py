"""The run folder (design §5): metrics.jsonl, summary.json and checkpoints, written atomically.

Checkpoints are plain `torch.save` dictionaries of tensors and numbers, loaded with `weights_only=True` so
that loading never executes pickled code.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT = "checkpoints/last.pt"


def atomic_write_bytes(path: Path, write) -> None:
    """Write through `write(fileobj)` into a temporary file beside `path`, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _clean(value: Any) -> Any:
    """JSON-safe numbers: NaN and ±Inf become strings rather than invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, obj: Any) -> None:
    """Atomic, pretty JSON."""
    data = json.dumps(_clean(obj), indent=2, sort_keys=True).encode()
    atomic_write_bytes(path, lambda f: f.write(data))


class RunRecord:
    """Everything a run leaves in its folder."""

    def __init__(self, run_dir: Path | str):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.summary_path = self.dir / "summary.json"
        self.checkpoint_path = self.dir / CHECKPOINT
        self._metrics_file = None

    # metrics.jsonl ---------------------------------------------------------------------------------------
    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one JSON object `{"step": step, ...}` and flush it to disk."""
        if self._metrics_file is None:
            self._metrics_file = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115
        self._metrics_file.write(json.dumps(_clean({"step": step, **metrics})) + "\n")
        self._metrics_file.flush()

    def truncate_metrics(self, last_step: int) -> None:
        """Drop lines logged after `last_step` (a resumed run re-logs them) and any torn last line."""
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step", 0) <= last_step:
                kept.append(line)
        data = ("\n".join(kept) + "\n" if kept else "").encode()
        atomic_write_bytes(self.metrics_path, lambda f: f.write(data))

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def log_event(self, message: str) -> None:
        """Append a human-readable line (warnings, alarms) to events.log."""
        with open(self.dir / "events.log", "a", encoding="utf-8") as f:
            f.write(message + "\n")

    def close(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None

    # summary.json -----------------------------------------------------------------------------------------
    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.summary_path, summary)

    def read_summary(self) -> dict[str, Any] | None:
        if not self.summary_path.exists():
            return None
        return json.loads(self.summary_path.read_text())

    # checkpoints ------------------------------------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_write_bytes(self.checkpoint_path, lambda f: torch.save(state, f))

    def load_checkpoint(self) -> dict[str, Any] | None:
        if not self.checkpoint_path.exists():
            return None
        return torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
