"""Vowel discrimination from formants (Jacobs, Jordan, Nowlan & Hinton 1991; methods-classic §1.5).

Data: Peterson & Barney (1952), 76 speakers × 10 vowels × 2 repetitions, from the copy that ships inside the
PyPI package praat-parselmouth (Praat's "Create formant table (Peterson & Barney 1952)"), so no network is
needed. `data_path` reads the Peterson–Barney text format or Hillenbrand et al. (1995) `vowdata.dat`.
The split is by speaker (both repetitions of a speaker stay on one side), seeded; standardisation is fitted on
the training split only. One distribution slot, "out": the experts map the formants to the vowel classes.
"""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moecli.errors import ConfigError, check_choice
from moecli.routing.stats import RoutingAccumulator
from moecli.slots import Slot
from moecli.task import CombinerFactory, StepOutput, Task

FEATURES = ("F0", "F1", "F2", "F3")
PB_VOWELS = ("IY", "IH", "EH", "AE", "AH", "AA", "AO", "UH", "UW", "ER")
# Hillenbrand codes -> Peterson & Barney labels, matched through the hVd word (shared/data/vowels/README.md).
HILLENBRAND_TO_PB = {"iy": "IY", "ih": "IH", "eh": "EH", "ae": "AE", "uh": "AH", "ah": "AA", "aw": "AO",
                     "oo": "UH", "uw": "UW", "er": "ER", "ei": "EY", "oa": "OW"}
_HILLENBRAND_ROW = re.compile(r"^[mwbg]\d\d[a-z]{2}$")


@dataclass(frozen=True)
class VowelTable:
    """Tokens as arrays: speaker `[N]` (str), vowel `[N]` (str label), formants `[N, 4]` (F0–F3, NaN = missing)."""

    speaker: np.ndarray
    vowel: np.ndarray
    formants: np.ndarray
    unanimous: np.ndarray


def _table(rows: list[tuple[str, str, list[float], bool]]) -> VowelTable:
    speaker, vowel, formants, unanimous = zip(*rows)
    return VowelTable(np.array(speaker), np.array(vowel), np.array(formants, dtype=np.float64),
                      np.array(unanimous, dtype=bool))


def read_peterson_barney(path: Path) -> VowelTable:
    """Peterson & Barney text format: `type speaker vowel_no label F0 F1 F2 F3`, `*label` = not unanimous."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        _, spk, _, label, *values = line.split()
        rows.append((spk, label.lstrip("*"), [float(v) for v in values[:4]], not label.startswith("*")))
    return _table(rows)


def read_hillenbrand(path: Path) -> VowelTable:
    """Hillenbrand et al. (1995) vowdata.dat: keep rows whose id matches `[mwbg]NNvv`; 0 means not measured."""
    rows = []
    for line in Path(path).read_text(errors="replace").splitlines():
        parts = line.split()
        if not parts or not _HILLENBRAND_ROW.match(parts[0]):
            continue
        values = [float(v) if float(v) != 0 else math.nan for v in parts[2:6]]  # F0, F1, F2, F3 steady state
        rows.append((parts[0][:3], HILLENBRAND_TO_PB[parts[0][3:]], values, True))
    return _table(rows)


def read_parselmouth() -> VowelTable:
    """The Peterson & Barney table shipped inside praat-parselmouth (no network)."""
    try:
        from parselmouth.praat import call
    except ImportError as err:  # pragma: no cover - a dependency of moecli
        raise ConfigError("task.source=parselmouth needs the package praat-parselmouth; "
                          "install it or pass task.data_path=<file>") from err
    table = call("Create formant table (Peterson & Barney 1952)")
    # One file write is ~100x faster than a Praat call per cell.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pb.tsv"
        call(table, "Save as tab-separated file", str(path))
        lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    col = {name: header.index(name) for name in ("Speaker", "Vowel", *FEATURES)}
    rows = []
    for line in lines[1:]:
        cells = line.split("\t")
        rows.append((cells[col["Speaker"]], cells[col["Vowel"]].upper(),
                     [float(cells[col[f]]) for f in FEATURES], True))
    return _table(rows)


def read_vowels(data_path: str | None) -> VowelTable:
    """Default: praat-parselmouth's Peterson & Barney; else the file at `data_path` (format detected)."""
    if data_path is None:
        return read_parselmouth()
    path = Path(data_path).expanduser()
    if not path.is_file():
        raise ConfigError(f"task.data_path={data_path} is not a file")
    head = path.read_text(errors="replace")[:4096]
    if "Hillenbrand" in head or any(_HILLENBRAND_ROW.match(line.split()[0]) for line in head.splitlines()
                                    if line.split()):
        return read_hillenbrand(path)
    return read_peterson_barney(path)


def speaker_split(speakers: np.ndarray, seed: int, train_speakers: int, test_speakers: int | None,
                  folds: int, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (train, test) over tokens; every speaker's tokens stay on one side."""
    unique = np.array(sorted(set(speakers.tolist())))
    order = unique[np.random.default_rng(seed).permutation(len(unique))]
    if folds > 1:
        test_ids = np.array_split(order, folds)[fold]
        train_ids = np.setdiff1d(order, test_ids)
    else:
        if not 0 < train_speakers < len(unique):
            raise ConfigError(f"task.train_speakers={train_speakers} must be between 1 and {len(unique) - 1}")
        train_ids = order[:train_speakers]
        test_ids = order[train_speakers:] if test_speakers is None else order[train_speakers:train_speakers +
                                                                                 test_speakers]
    return np.isin(speakers, train_ids), np.isin(speakers, test_ids)


class VowelModel(nn.Module):
    """The whole model is the combiner of the single distribution slot "out"."""

    def __init__(self, combiner: nn.Module):
        super().__init__()
        self.combiner = combiner

    def forward(self, x: torch.Tensor):
        return self.combiner(x)


class Vowel(Task):
    monitor = ("train/acc", "max")

    def __init__(self, data_path: str | None = None, vowels=("IY", "IH", "AA", "AH"), features=("F1", "F2"),
                 train_speakers: int = 50, test_speakers: int | None = None, folds: int = 0, fold: int = 0,
                 unanimous_only: bool = False, standardize: bool = True, likelihood: str = "categorical",
                 batch_size: int | None = None):
        check_choice("task.likelihood", likelihood, ["categorical", "gaussian"])
        for f in features:
            check_choice("task.features", f, FEATURES)
        if folds > 1 and not 0 <= fold < folds:
            raise ConfigError(f"task.fold={fold} must be in 0..{folds - 1} for task.folds={folds}")
        self.data_path, self.vowels, self.features = data_path, tuple(vowels), tuple(features)
        self.train_speakers, self.test_speakers, self.folds, self.fold = train_speakers, test_speakers, folds, fold
        self.unanimous_only, self.standardize, self.likelihood = unanimous_only, standardize, likelihood
        self.batch_size = batch_size
        self.data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # -------------------------------------------------------------------------------------------------- data
    def setup(self, seed: int) -> None:
        table = read_vowels(self.data_path)
        for v in self.vowels:
            check_choice("task.vowels", v, sorted(set(table.vowel.tolist())))
        cols = [FEATURES.index(f) for f in self.features]
        x = table.formants[:, cols]
        keep = np.isin(table.vowel, self.vowels) & ~np.isnan(x).any(1)
        if self.unanimous_only:
            keep &= table.unanimous
        train, test = speaker_split(table.speaker[keep], seed, self.train_speakers, self.test_speakers,
                                    self.folds, self.fold)
        x, y = x[keep], np.array([self.vowels.index(v) for v in table.vowel[keep]])
        mean, std = (x[train].mean(0), x[train].std(0)) if self.standardize else (0.0, 1.0)
        x = (x - mean) / std
        for split, mask in (("train", train), ("test", test)):
            self.data[split] = (torch.tensor(x[mask], dtype=torch.float32), torch.tensor(y[mask]))
        n = len(self.data["train"][1])
        self.steps_per_epoch = 1 if not self.batch_size else math.ceil(n / self.batch_size)

    def to(self, device: torch.device) -> None:
        self.data = {k: (x.to(device), y.to(device)) for k, (x, y) in self.data.items()}

    def slots(self) -> list[Slot]:
        return [Slot("out", "distribution", in_dim=len(self.features), out_dim=len(self.vowels),
                     family=self.likelihood, labels=self.vowels)]

    def build_model(self, make_combiner: CombinerFactory) -> nn.Module:
        return VowelModel(make_combiner(self.slots()[0]))

    def train_batches(self, epoch: int, generator: torch.Generator) -> Iterator:
        x, y = self.data["train"]
        if not self.batch_size or self.batch_size >= len(y):
            yield x, y
            return
        order = torch.randperm(len(y), generator=generator).to(x.device)
        for start in range(0, len(y), self.batch_size):
            idx = order[start:start + self.batch_size]
            yield x[idx], y[idx]

    def _target(self, y: torch.Tensor) -> torch.Tensor:
        if self.likelihood == "categorical":
            return y
        return nn.functional.one_hot(y, len(self.vowels)).float()  # the paper's one output unit per vowel

    # ------------------------------------------------------------------------------------------ train / eval
    def training_step(self, model: nn.Module, batch) -> StepOutput:
        x, y = batch
        out = model(x)
        losses = {"nll": out.output.nll(self._target(y)).mean()}
        if out.aux_loss.requires_grad:
            losses["aux/out"] = out.aux_loss
        return StepOutput(losses, num_items=len(y))

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        x, y = self.data[split]
        out = model(x)
        pred = out.output.point().argmax(-1)
        correct = (pred == y).float()
        metrics = {f"{split}/acc": float(correct.mean()),
                   f"{split}/loss": float(out.output.nll(self._target(y)).mean())}
        if self.likelihood == "gaussian":  # the paper's error: squared distance of the output to the target code
            metrics[f"{split}/mse"] = float(((out.output.point() - self._target(y)) ** 2).sum(-1).mean())
        for i, v in enumerate(self.vowels):
            metrics[f"{split}/acc/{v}"] = float(correct[y == i].mean()) if (y == i).any() else math.nan
        if out.weights is not None and split == "train":  # routing on the training set, as Jacobs reports it
            acc = RoutingAccumulator("out", out.weights.shape[-1], self.vowels)
            acc.add(out.weights, y, out.stats)
            metrics.update(acc.metrics())
        return metrics

    def eval_splits(self) -> tuple[str, ...]:
        return ("train",)
