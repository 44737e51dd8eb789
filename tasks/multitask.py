"""Multi-task regression with a shared bottom (Ma et al. 2018, MMoE; methods-classic §4).

Data: the paper's synthetic pair of regression tasks whose relatedness is the cosine ρ between their weight
vectors (§4.3), or a user's multi-target CSV (`data_path` + `targets`; regression or binary 0/1 targets).
Model: one representation slot "bottom" (`num_tasks = H`, `labels` = task names) and one tower per task,
`y_k = h^k(f^k(x))` with h^k = Linear(tower_units) -> act -> Linear(1) (§4.5).

The slot asks for one-layer experts (`extra["expert_layers"] = 1`: expert i is `relu(W_i x + b_i)` with
`expert_units` units, the paper's 8 × 16) and gives `dense` its parameter-matched width
(`extra["dense_hidden"]`, 113 for the paper's sizes: §4.5 parameter budget). The bottom returns `[B, U]` (one
representation for all towers: dense, omoe, cooperative) or `[B, H, U]` (one per task: mmoe); towers read
whichever width the bottom produces.

Loss: sum of the per-task losses (MSE, or binary cross-entropy for 0/1 targets). Metrics per split:
`<split>/<task>/mse` (regression) or `<split>/<task>/auc` and `/bce` (binary), `<split>/loss` = mean of the
per-task losses, and, on val and test, `<split>/gate_overlap` (cosine of the tasks' mean gate vectors,
averaged over task pairs) plus the routing statistics of the tasks' gates (`route/bottom/...`, affinity table
task × expert; per-task gates under `route/bottom/<task>/...`).
"""

from __future__ import annotations

import csv
import itertools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moecli.errors import ConfigError, check_choice, check_positive
from moecli.experts import MLP
from moecli.routing.stats import RoutingAccumulator
from moecli.slots import Slot
from moecli.task import CombinerFactory, StepOutput, Task

# ------------------------------------------------------------------------------------------ synthetic data


@dataclass(frozen=True)
class SyntheticPair:
    """One synthetic dataset (§4.3): x `[N, D]`, labels y `[N, 2]`, weights w `[2, D]`, alpha/beta `[m]`."""

    x: torch.Tensor
    y: torch.Tensor
    w: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor


def task_weights(dim: int, rho: float, scale: float, gen: torch.Generator) -> torch.Tensor:
    """w1 = c·u1, w2 = c·(ρ u1 + sqrt(1 − ρ²) u2) `[2, D]`; u1 ⟂ u2 unit vectors (QR of a `[D, 2]` normal)."""
    u, _ = torch.linalg.qr(torch.randn(dim, 2, generator=gen, dtype=torch.float64))
    u1, u2 = u[:, 0], u[:, 1]
    return scale * torch.stack([u1, rho * u1 + math.sqrt(max(0.0, 1.0 - rho * rho)) * u2])


def synthetic_pair(n: int, dim: int = 100, rho: float = 0.5, scale: float = 1.0, num_sinusoids: int = 10,
                   sin_param_std: float = 1.0, label_noise_std: float = 0.1, seed: int = 0) -> SyntheticPair:
    """The paper's generator (§4.3): y_k = w_kᵀx + Σ_i sin(α_i w_kᵀx + β_i) + ε_k, x ~ N(0, I_D).

    α, β ~ N(0, sin_param_std²) are drawn once per dataset and shared by both tasks (§4.8 pitfall 1);
    ε_k ~ N(0, label_noise_std²) (std 0.1 = the paper's N(0, 0.01) read as a variance; §5).
    Everything comes from a generator seeded with `seed`, in float64, so cos(w1, w2) = ρ to machine precision.
    """
    gen = torch.Generator().manual_seed(seed)
    w = task_weights(dim, rho, scale, gen)
    alpha = sin_param_std * torch.randn(num_sinusoids, generator=gen, dtype=torch.float64)
    beta = sin_param_std * torch.randn(num_sinusoids, generator=gen, dtype=torch.float64)
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    proj = x @ w.T  # [N, 2]
    y = proj + torch.sin(proj.unsqueeze(-1) * alpha + beta).sum(-1)
    y = y + label_noise_std * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    return SyntheticPair(x, y, w, alpha, beta)


# ---------------------------------------------------------------------------------------------- CSV tables


def load_rows(path: Path, columns: list[str] | None) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a CSV; cells stripped (UCI files put a space after each comma, §4.8 pitfall 5).
    `columns` names the columns of a file without a header line."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = [[c.strip() for c in r] for r in csv.reader(f) if any(c.strip() for c in r)]
    header = list(columns) if columns is not None else (rows.pop(0) if rows else [])
    if not rows:
        raise ConfigError(f"task.data_path={path} has no data rows")
    bad = next((i for i, r in enumerate(rows) if len(r) != len(header)), None)
    if bad is not None:
        raise ConfigError(f"task.data_path={path}: data row {bad + 1} has {len(rows[bad])} cells but there "
                          f"are {len(header)} columns")
    return header, rows


def read_table(path: Path, targets: list[str], features: list[str] | None, drop: list[str],
               columns: list[str] | None = None, positive: dict | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Features x `[N, F]` (numeric columns as they are, text columns one-hot) and targets y `[N, H]` from a
    CSV. A target named in `positive` (column -> values) is binary: 1 where its cell is one of the values.
    Empty numeric cells become NaN (imputed after standardisation). Returns (x, y, feature names)."""
    header, body = load_rows(path, columns)
    positive = dict(positive or {})
    for name in [*targets, *(features or []), *drop, *positive]:
        check_choice("task.targets/features/drop/positive column", name, header)
    chosen = features if features is not None else [h for h in header if h not in targets and h not in drop]
    cols = {h: [r[i] for r in body] for i, h in enumerate(header)}
    y = torch.stack([_target(cols[t], t, positive.get(t)) for t in targets], dim=1)
    blocks, names = [], []
    for name in chosen:
        try:
            blocks.append(_numeric(cols[name], name).unsqueeze(1))
            names.append(name)
        except ConfigError:  # a text column: one-hot over its sorted values
            values = sorted(set(cols[name]))
            onehot = [[float(c == v) for v in values] for c in cols[name]]
            blocks.append(torch.tensor(onehot, dtype=torch.float64))
            names += [f"{name}={v}" for v in values]
    return torch.cat(blocks, dim=1), y, names


def _target(cells: list[str], name: str, positive) -> torch.Tensor:
    if positive is not None:
        values = {str(v).strip() for v in positive}
        y = torch.tensor([float(c in values) for c in cells], dtype=torch.float64)
        if y.sum() == 0:
            raise ConfigError(f"task.positive.{name}={positive} matches no cell of column {name}")
        return y
    y = _numeric(cells, f"task.targets column {name} (text targets need task.positive.{name}=<value>)")
    if torch.isnan(y).any():
        raise ConfigError(f"task.targets column {name} has empty cells")
    return y


def _numeric(cells: list[str], name: str) -> torch.Tensor:
    try:
        return torch.tensor([float(c) if c else math.nan for c in cells], dtype=torch.float64)
    except ValueError:
        raise ConfigError(f"{name} is not numeric") from None


def _task_name(column: str) -> str:
    # Task names become metric path segments: keep them free of slashes and spaces.
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", column)


# ------------------------------------------------------------------------------------------------- model


class MultiTaskModel(nn.Module):
    """Shared bottom (slot "bottom"'s combiner) and one tower per task: x `[B, D]` -> (y `[B, H]`, out)."""

    def __init__(self, bottom: nn.Module, in_dim: int, num_tasks: int, tower_units: int, act: str):
        super().__init__()
        self.bottom = bottom
        width = self._bottom_width(in_dim)
        self.towers = nn.ModuleList(MLP(width, 1, tower_units, act) for _ in range(num_tasks))

    @torch.no_grad()
    def _bottom_width(self, in_dim: int) -> int:
        # dense's shared bottom (113 units) and the MoE bottoms (16 units) differ in width; ask the bottom,
        # without moving the global RNG (a noisy gate would draw noise).
        with torch.random.fork_rng(devices=[]):
            was_training = self.bottom.training
            self.bottom.eval()
            # 64 rows: capacity-based gates (expert choice) need several tokens per expert.
            width = self.bottom(torch.zeros(64, in_dim)).output.shape[-1]
            self.bottom.train(was_training)
        return int(width)

    def forward(self, x: torch.Tensor):
        out = self.bottom(x)
        feats = out.output
        per_task = [feats if feats.dim() == 2 else feats[:, k] for k in range(len(self.towers))]
        y = torch.cat([tower(f) for tower, f in zip(self.towers, per_task)], dim=1)
        return y, out


def task_gates(weights: torch.Tensor | None, num_tasks: int) -> torch.Tensor | None:
    """Gate weights as `[B, H, E]`: a single gate `[B, E]` is every task's gate."""
    if weights is None:
        return None
    return weights if weights.dim() == 3 else weights.unsqueeze(1).expand(-1, num_tasks, -1)


def gate_overlap(gates: torch.Tensor) -> dict[str, float]:
    """Overlap between the tasks' gates `[B, H, E]`, averaged over task pairs (1 = same mix of experts):
    `gate_overlap` = cosine of the mean gate vectors; `gate_overlap_per_example` = mean over x of the cosine
    of the tasks' gate rows (sensitive to input-dependent differences that the means average away)."""
    num_tasks = gates.shape[1]
    if num_tasks < 2:
        return {}
    means = gates.mean(0)
    pairs = list(itertools.combinations(range(num_tasks), 2))
    cos = nn.functional.cosine_similarity
    return {"gate_overlap": sum(float(cos(means[j], means[k], dim=0)) for j, k in pairs) / len(pairs),
            "gate_overlap_per_example": sum(float(cos(gates[:, j], gates[:, k], dim=-1).mean())
                                            for j, k in pairs) / len(pairs)}


# -------------------------------------------------------------------------------------------------- task


class MultiTask(Task):
    monitor = ("val/loss", "min")

    def __init__(self, rho: float = 0.5, scale: float = 1.0, num_sinusoids: int = 10,
                 sin_param_std: float = 1.0, label_noise_std: float = 0.1, input_dim: int = 100,
                 train_size: int = 10000, val_size: int = 2000, test_size: int = 2000,
                 data_path: str | None = None, targets: list[str] | None = None,
                 features: list[str] | None = None, drop: list[str] | None = None,
                 columns: list[str] | None = None, positive: dict | None = None, val_fraction: float = 0.1,
                 test_fraction: float = 0.1, expert_units: int = 16, tower_units: int = 8,
                 activation: str = "relu", shared_bottom_width: int | None = None, match_experts: int = 8,
                 batch_size: int = 128):
        if not -1.0 <= rho <= 1.0:
            raise ConfigError(f"task.rho={rho} is not valid; it must lie in [-1, 1]")
        for key, value in [("task.input_dim", input_dim), ("task.train_size", train_size),
                           ("task.val_size", val_size), ("task.test_size", test_size),
                           ("task.expert_units", expert_units), ("task.tower_units", tower_units),
                           ("task.match_experts", match_experts), ("task.batch_size", batch_size)]:
            check_positive(key, value)
        check_positive("task.num_sinusoids", num_sinusoids, minimum=0)
        check_positive("task.label_noise_std", label_noise_std, minimum=0.0)
        if data_path is not None and not targets:
            raise ConfigError("task.data_path is set but task.targets is empty; name the target columns, "
                              "e.g. task.targets=[income,marital]")
        if not 0 < val_fraction + test_fraction < 1:
            raise ConfigError(f"task.val_fraction + task.test_fraction = {val_fraction + test_fraction} "
                              "must lie in (0, 1)")
        self.rho, self.scale, self.num_sinusoids = rho, scale, num_sinusoids
        self.sin_param_std = sin_param_std
        self.label_noise_std, self.input_dim = label_noise_std, input_dim
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.data_path, self.targets = data_path, list(targets or [])
        self.features, self.drop = (list(features) if features is not None else None), list(drop or [])
        self.columns = list(columns) if columns is not None else None
        # {column: value or [values]} -> {column: [values as text]} (Hydra passes ListConfig, not list)
        self.positive = {str(k): [str(v)] if isinstance(v, (str, int, float)) else [str(x) for x in v]
                         for k, v in dict(positive or {}).items()}
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.expert_units, self.tower_units, self.activation = expert_units, tower_units, activation
        self.shared_bottom_width, self.match_experts = shared_bottom_width, match_experts
        self.batch_size = batch_size
        self.data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.task_names: tuple[str, ...] = ("task0", "task1")
        self.binary: tuple[bool, ...] = (False, False)

    # -------------------------------------------------------------------------------------------------- data
    def setup(self, seed: int) -> None:
        if self.data_path is None:
            self._setup_synthetic(seed)
        else:
            self._setup_table(seed)
        self.steps_per_epoch = math.ceil(len(self.data["train"][0]) / self.batch_size)

    def _setup_synthetic(self, seed: int) -> None:
        # A fresh dataset per seed (the paper's runs draw independent data and initialisations).
        n = sum(self.sizes.values())
        pair = synthetic_pair(n, self.input_dim, self.rho, self.scale, self.num_sinusoids, self.sin_param_std,
                              self.label_noise_std, seed)
        start = 0
        for split, size in self.sizes.items():
            self.data[split] = (pair.x[start:start + size].float(), pair.y[start:start + size].float())
            start += size
        self.task_names, self.binary = ("task0", "task1"), (False, False)

    def _setup_table(self, seed: int) -> None:
        path = Path(self.data_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"task.data_path={self.data_path} is not a file")
        x, y, _ = read_table(path, self.targets, self.features, self.drop, self.columns, self.positive)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        n_val, n_test = round(self.val_fraction * len(y)), round(self.test_fraction * len(y))
        parts = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
        train = x[parts["train"]]
        mean, std = train.nanmean(0), _nanstd(train)
        x = torch.nan_to_num((x - mean) / std)  # standardised on the train split; missing cells -> mean
        self.data = {s: (x[idx].float(), y[idx].float()) for s, idx in parts.items()}
        self.task_names = tuple(_task_name(t) for t in self.targets)
        self.binary = tuple(bool(((col == 0) | (col == 1)).all()) for col in y.T)
        self.input_dim = x.shape[1]

    def to(self, device: torch.device) -> None:
        self.data = {k: (x.to(device), y.to(device)) for k, (x, y) in self.data.items()}

    # ------------------------------------------------------------------------------------------------- model
    def dense_width(self) -> int:
        """Shared-bottom width with the parameter count of `match_experts` experts of `expert_units` units
        plus towers (§4.5): round((E·U·D + H·U·T) / (D + H·T)), 113 for D 100, E 8, U 16, H 2, T 8."""
        if self.shared_bottom_width is not None:
            return self.shared_bottom_width
        h, d, u, t = len(self.task_names), self.input_dim, self.expert_units, self.tower_units
        return round((self.match_experts * u * d + h * u * t) / (d + h * t))

    def slots(self) -> list[Slot]:
        return [Slot("bottom", "representation", in_dim=self.input_dim, out_dim=self.expert_units,
                     expert_hidden=self.expert_units, num_tasks=len(self.task_names), labels=self.task_names,
                     extra={"expert_layers": 1, "dense_hidden": self.dense_width()})]

    def build_model(self, make_combiner: CombinerFactory) -> nn.Module:
        bottom = make_combiner(self.slots()[0])
        return MultiTaskModel(bottom, self.input_dim, len(self.task_names), self.tower_units, self.activation)

    def train_batches(self, epoch: int, generator: torch.Generator) -> Iterator:
        x, y = self.data["train"]
        order = torch.randperm(len(y), generator=generator).to(x.device)
        for start in range(0, len(y), self.batch_size):
            idx = order[start:start + self.batch_size]
            yield x[idx], y[idx]

    # ---------------------------------------------------------------------------------------- train / eval
    def _task_losses(self, pred: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """Per-task loss: MSE for regression targets, binary cross-entropy on logits for 0/1 targets."""
        return [nn.functional.binary_cross_entropy_with_logits(pred[:, k], y[:, k]) if self.binary[k]
                else nn.functional.mse_loss(pred[:, k], y[:, k]) for k in range(len(self.task_names))]

    def training_step(self, model: nn.Module, batch) -> StepOutput:
        x, y = batch
        pred, out = model(x)
        losses = dict(zip(self.task_names, self._task_losses(pred, y)))  # summed by the trainer (§4.2)
        if out.aux_loss.requires_grad:
            losses["aux/bottom"] = out.aux_loss
        return StepOutput(losses, num_items=len(y))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        x, y = self.data[split]
        pred, out = model(x)
        per_task = self._task_losses(pred, y)
        metrics = {f"{split}/loss": sum(float(loss) for loss in per_task) / len(per_task)}
        for k, (name, loss) in enumerate(zip(self.task_names, per_task)):
            if self.binary[k]:
                metrics[f"{split}/{name}/bce"] = float(loss)
                metrics[f"{split}/{name}/auc"] = _auc(pred[:, k], y[:, k])
            else:
                metrics[f"{split}/{name}/mse"] = float(loss)
        gates = task_gates(out.weights, len(self.task_names))
        if gates is not None and split in ("val", "test"):  # routing on held-out data; final = test
            metrics.update({f"{split}/{k}": v for k, v in gate_overlap(gates).items()})
            metrics.update(self._routing(gates, out.stats))
        return metrics

    def _routing(self, gates: torch.Tensor, stats) -> dict[str, float]:
        """`route/bottom/...` over all tasks' gate rows with the task × expert affinity table, and each task's
        gate on its own under `route/bottom/<task>/...`."""
        b, h, e = gates.shape
        labels = torch.arange(h).repeat(b)  # row b·H + k of the flattened gates belongs to task k
        acc = RoutingAccumulator("bottom", e, self.task_names)
        acc.add(gates.reshape(b * h, e), labels, stats)
        metrics = acc.metrics()
        for k, name in enumerate(self.task_names):
            one = RoutingAccumulator(f"bottom/{name}", e)
            one.add(gates[:, k])
            metrics.update(one.metrics())
        return metrics

    def eval_splits(self) -> tuple[str, ...]:
        return ("train", "val")

    def finish(self, model: nn.Module, run_dir: Path) -> dict[str, float]:
        """Parameter counts by part: the bottom's experts, its gates (routers), and the towers."""
        gates = sum(p.numel() for n, p in model.bottom.named_parameters() if "router" in n)
        bottom = sum(p.numel() for p in model.bottom.parameters())
        return {"parameters/bottom": float(bottom - gates), "parameters/gates": float(gates),
                "parameters/towers": float(sum(p.numel() for p in model.towers.parameters()))}


def _nanstd(x: torch.Tensor) -> torch.Tensor:
    mean = x.nanmean(0)
    std = ((x - mean) ** 2).nanmean(0).sqrt()
    return torch.where(torch.isfinite(std) & (std > 0), std, torch.ones_like(std))


def _auc(scores: torch.Tensor, target: torch.Tensor) -> float:
    """Area under the ROC curve (torchmetrics); NaN when the split holds one class only."""
    from torchmetrics.functional.classification import binary_auroc

    if target.min() == target.max():
        return math.nan
    return float(binary_auroc(scores, target.long()))
