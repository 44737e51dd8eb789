"""Semantic segmentation with gated experts (Pavlitskaya et al. 2020; methods-multimodal §8).

Two small fully convolutional experts of one architecture, each trained on its own domain (urban, highway);
a gate reads the experts' intermediate feature maps and weights their logits per image (or per pixel); a
baseline of the same architecture is trained on all data. The staged procedure (experts → baseline → gate on
frozen experts, or end-to-end) is run by `moecli.staged.StagedTrainer`; this task supplies the stages.

The combiner contract: one per-pixel distribution slot "seg" (family categorical, `external_experts=True`,
`num_experts` = number of training domains, 2 for the synthetic scenes). Pixels are flattened into the batch
axis, `N = B·H·W`; the model calls `combiner(x_gate [N, G], experts=logits [N, E, L])`. `x_gate` are the
gate's features: the task owns a small convolutional gate trunk on the concatenated expert feature maps of
layer `gate_layer`; its output feeds the combiner's linear router, so the router is the gate's last layer.

* `gate_scope: image` (the paper's simple gate, §8.2): conv3×3 (E·C → `gate_channels`) → LeakyReLU (§8.6 item
  6: a plain ReLU bottleneck can die) → flatten → Linear(→ `gate_hidden`) → LeakyReLU, one feature vector per
  image, repeated at every pixel, so the router gives one weight vector per image.
* `gate_scope: pixel`: conv3×3 (E·C → `gate_hidden`) → LeakyReLU → bilinear upsampling to H × W; one feature
  vector (and so one weight vector) per pixel.

Metrics are fractions in [0, 1] (tables print %): mIoU from one confusion matrix accumulated over the split
(torchmetrics' multiclass confusion matrix; IoU averaged over classes present in prediction or ground truth),
pixel accuracy, class-mean accuracy and frequency-weighted IoU, per domain and pooled over the training
domains, for the MoE (`<split>/miou`, `<split>/miou/<domain>`), each expert alone (`<split>/expert_<d>/...`),
the ensembles (`ensemble_mean`, `ensemble_max` = element-wise max of logits, `ensemble_maxconf` = the more
confident expert per pixel) and the baseline; mean gate weight of each expert per domain
(`<split>/gate/<d>_weight/<domain>`); the disagreement analysis of §8.4 (`<split>/disagree/...`).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moecli.errors import ConfigError, check_choice, check_positive
from moecli.routing.stats import RoutingAccumulator
from moecli.slots import Slot
from moecli.staged import Stage
from moecli.task import CombinerFactory, StepOutput, Task
from tasks import seg_scenes

LAYERS = ("shallow", "mid", "deep")
# ------------------------------------------------------------------------------------------------- networks


def _block(cin: int, cout: int, stride: int, norm: str) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, stride, 1, bias=norm == "none")]
    if norm == "batch":
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class FCN(nn.Module):
    """Tiny fully convolutional network (§8.7): conv w; conv 2w stride 2; conv 4w stride 2 (deepest, H/4 ×
    W/4); bilinear upsampling concatenated with the first stage; conv 2w; 1 × 1 to L classes. `reduce` > 0
    first maps the deepest features to `reduce` channels with a 1 × 1 convolution (a project addition: the
    full-resolution convolution then costs less than half, which keeps the staged run within minutes on one
    CPU thread).

    x `[B, 3, H, W]` -> (logits `[B, L, H, W]`, features {"shallow": `[B, w, H, W]`, "mid": `[B, 2w, H/2,
    W/2]`, "deep": `[B, 4w, H/4, W/4]`}).
    """

    def __init__(self, num_classes: int, width: int = 16, norm: str = "batch", reduce: int = 0):
        super().__init__()
        self.channels = {"shallow": width, "mid": 2 * width, "deep": 4 * width}
        self.stage1 = _block(3, width, 1, norm)
        self.stage2 = _block(width, 2 * width, 2, norm)
        self.stage3 = _block(2 * width, 4 * width, 2, norm)
        self.reduce = nn.Conv2d(4 * width, reduce, 1) if reduce else nn.Identity()
        self.fuse = _block(width + (reduce or 4 * width), 2 * width, 1, norm)
        self.head = nn.Conv2d(2 * width, num_classes, 1)

    def forward(self, x: torch.Tensor):
        f1 = self.stage1(x)
        f2 = self.stage2(f1)
        f3 = self.stage3(f2)
        up = F.interpolate(self.reduce(f3), size=f1.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.head(self.fuse(torch.cat([f1, up], 1)))
        return logits, {"shallow": f1, "mid": f2, "deep": f3}


class GateTrunk(nn.Module):
    """The task-owned part of the gate: expert feature maps `[B, E·C, h, w]` -> gate features.

    scope "image": `[B, G]` (flattened bottleneck, fixed input grid `grid`; §8.6 item 1: another size raises
    unless `pool: adaptive`); scope "pixel": `[B, H, W, G]`.
    """

    def __init__(self, in_channels: int, grid: tuple[int, int], scope: str, channels: int, hidden: int,
                 pool: str):
        super().__init__()
        self.scope, self.grid, self.pool = scope, grid, pool
        if scope == "image":
            self.conv = nn.Conv2d(in_channels, channels, 3, padding=1)
            self.linear = nn.Linear(channels * grid[0] * grid[1], hidden)
        else:
            self.conv = nn.Conv2d(in_channels, hidden, 3, padding=1)

    def forward(self, feats: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        if self.scope == "pixel":
            g = F.leaky_relu(self.conv(feats), 0.1)
            return F.interpolate(g, size=out_size, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
        if tuple(feats.shape[-2:]) != self.grid:
            if self.pool != "adaptive":
                raise ConfigError(f"the image gate expects {self.grid[0]}×{self.grid[1]} feature maps (the "
                                  f"training size) but got {tuple(feats.shape[-2:])}; use "
                                  "task.gate_pool=adaptive or task.gate_scope=pixel")
            feats = F.adaptive_avg_pool2d(feats, self.grid)
        g = F.leaky_relu(self.conv(feats), 0.1).flatten(1)
        return F.leaky_relu(self.linear(g), 0.1)


@dataclass
class MoEOutput:
    """combined: the combiner's output over N = B·H·W pixels; logits `[B, E, L, H, W]`; weights `[B, H, W, E]`
    (None for a combiner without a gate)."""

    combined: object
    logits: torch.Tensor
    weights: torch.Tensor | None


class MoENet(nn.Module):
    """Experts + gate trunk + combiner. `freeze_experts(True)` sets `requires_grad=False` and keeps the
    experts in eval mode through every later `.train()` (§8.6 item 2: frozen is not enough)."""

    def __init__(self, experts: list[FCN], gate: GateTrunk, combiner: nn.Module, gate_layer: str):
        super().__init__()
        self.experts, self.gate, self.combiner = nn.ModuleList(experts), gate, combiner
        self.gate_layer = gate_layer
        self.frozen = False

    def freeze_experts(self, frozen: bool = True) -> None:
        self.frozen = frozen
        for p in self.experts.parameters():
            p.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.experts.eval()
        return self

    def forward(self, x: torch.Tensor) -> MoEOutput:
        outs = [expert(x) for expert in self.experts]
        logits = torch.stack([o[0] for o in outs], 1)
        feats = torch.cat([o[1][self.gate_layer] for o in outs], 1)
        b, e, num_classes, h, w = logits.shape
        g = self.gate(feats, (h, w))
        if g.dim() == 2:  # one feature vector per image, repeated at every pixel
            g = g[:, None, None, :].expand(b, h, w, g.shape[-1])
        flat = logits.permute(0, 3, 4, 1, 2).reshape(b * h * w, e, num_classes)
        out = self.combiner(g.reshape(b * h * w, -1), experts=flat)
        weights = out.weights.reshape(b, h, w, e) if out.weights is not None else None
        return MoEOutput(out, logits, weights)


class SegModel(nn.Module):
    """The whole model: the MoE (experts, gate, combiner) and the same-architecture baseline (or None)."""

    def __init__(self, moe: MoENet, baseline: FCN | None):
        super().__init__()
        self.moe, self.baseline = moe, baseline


def moe_log_probs(out: MoEOutput) -> torch.Tensor:
    """The MoE's per-pixel class scores `[B, L, H, W]` (probabilities; argmax is the prediction)."""
    b, _, num_classes, h, w = out.logits.shape
    return out.combined.output.point().reshape(b, h, w, num_classes).permute(0, 3, 1, 2)


# -------------------------------------------------------------------------------------------------- metrics


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Confusion matrix `[L, L]` (rows = ground truth) through torchmetrics, int64 on CPU."""
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    return multiclass_confusion_matrix(pred.reshape(-1), target.reshape(-1), num_classes).long().cpu()


def scores(cm: torch.Tensor) -> dict[str, float]:
    """From one accumulated confusion matrix (§8.3): mIoU averaged over classes present in prediction or
    ground truth (nanmean), pixel accuracy, class-mean accuracy, frequency-weighted IoU."""
    cm = cm.double()
    tp, gt, pr = cm.diag(), cm.sum(1), cm.sum(0)
    union = gt + pr - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))
    acc = torch.where(gt > 0, tp / gt.clamp_min(1), torch.full_like(tp, math.nan))
    freq = gt / gt.sum().clamp_min(1)
    return {"miou": float(iou.nanmean()), "pixel_acc": float(tp.sum() / cm.sum().clamp_min(1)),
            "class_acc": float(acc.nanmean()), "fwiou": float((freq * iou.nan_to_num(0.0)).sum())}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two `[n]` vectors (average ranks for ties)."""
    def ranks(x):
        order = x.double().argsort()
        r = torch.empty_like(order, dtype=torch.float64)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        uniq, inv = torch.unique(x, return_inverse=True)  # average ranks of tied values
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, r)
        counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))
        return (sums / counts)[inv]

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra * rb).sum() / denom) if denom > 0 else math.nan


def disagreement(expert_preds: torch.Tensor, moe_pred: torch.Tensor,
                 target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image pixel counts of the §8.4 categories. expert_preds `[B, E, H, W]`, moe_pred and target `[B, H,
    W]`.

    agree: all experts agree (and so does the MoE, or it is critical); follows/e<i>: the experts disagree and
    the MoE equals expert i; critical: the MoE differs from every expert. For E = 2, agree-and-MoE-agrees +
    follows/e0 + follows/e1 + critical = H·W. Returns `[B]` count tensors.
    """
    agree = (expert_preds == expert_preds[:, :1]).all(1)
    same = expert_preds == moe_pred[:, None]
    critical = ~same.any(1)
    correct = moe_pred == target
    out = {"agree": agree.sum((1, 2)), "critical": critical.sum((1, 2)),
           "agree_moe": (agree & ~critical).sum((1, 2)),
           "correct_agree": (correct & agree).sum((1, 2)), "correct_disagree": (correct & ~agree).sum((1, 2)),
           "errors": (~correct).sum((1, 2))}
    for i in range(expert_preds.shape[1]):
        out[f"follows/e{i}"] = (~agree & same[:, i] & ~critical).sum((1, 2))
    return out


# ----------------------------------------------------------------------------------------------------- task


class Segmentation(Task):
    monitor = ("val/miou", "max")
    items_name = "images"

    def __init__(self, data_path: str | None = None, image_size: int = 32, noise: float = 0.06,
                 train_per_domain: int = 800, val_per_domain: int = 100, test_per_domain: int = 300,
                 ambiguous: bool = True, width: int = 16, norm: str = "batch", decoder_reduce: int = 16,
                 gate_layer: str = "deep", gate_scope: str = "image", gate_channels: int = 1,
                 gate_hidden: int = 32, gate_pool: str = "none", training: str = "staged",
                 baseline: bool = True, ensemble_mean: str = "logits", batch_size: int = 32,
                 eval_batch_size: int = 300, num_pictures: int = 3):
        check_choice("task.norm", norm, ["batch", "none"])
        check_positive("task.decoder_reduce", decoder_reduce, minimum=0)
        check_choice("task.gate_layer", gate_layer, LAYERS)
        check_choice("task.gate_scope", gate_scope, ["image", "pixel"])
        check_choice("task.gate_pool", gate_pool, ["none", "adaptive"])
        check_choice("task.training", training, ["staged", "end_to_end"])
        check_choice("task.ensemble_mean", ensemble_mean, ["logits", "probs"])
        sizes = {"image_size": image_size, "width": width, "batch_size": batch_size,
                 "gate_hidden": gate_hidden, "gate_channels": gate_channels,
                 "train_per_domain": train_per_domain, "val_per_domain": val_per_domain,
                 "test_per_domain": test_per_domain, "eval_batch_size": eval_batch_size}
        for key, value in sizes.items():
            check_positive(f"task.{key}", value)
        if data_path is None and (image_size < 32 or image_size % 4):
            raise ConfigError(f"task.image_size={image_size} is not valid; it must be a multiple of 4 and "
                              ">= 32")
        self.data_path, self.image_size, self.noise, self.ambiguous = data_path, image_size, noise, ambiguous
        self.counts = {"train": train_per_domain, "val": val_per_domain, "test": test_per_domain}
        self.decoder_reduce = decoder_reduce
        self.width, self.norm, self.gate_layer, self.gate_scope = width, norm, gate_layer, gate_scope
        self.gate_channels, self.gate_hidden, self.gate_pool = gate_channels, gate_hidden, gate_pool
        self.training, self.use_baseline, self.ensemble_mean = training, baseline, ensemble_mean
        self.batch_size, self.eval_batch_size, self.num_pictures = batch_size, eval_batch_size, num_pictures
        self.data: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.classes: tuple[str, ...] = seg_scenes.CLASSES
        self.train_domains: tuple[str, ...] = ()
        self.test_per_image: dict[str, torch.Tensor] | None = None  # from the latest test evaluation

    # -------------------------------------------------------------------------------------------------- data
    def setup(self, seed: int) -> None:
        if self.data_path is not None:
            sets, self.classes = seg_scenes.read_folder(self.data_path)
        else:
            domains = ["urban", "highway"] + (["ambiguous"] if self.ambiguous else [])
            sets = {d: {s: seg_scenes.generate(d, seed, s, self.counts[s], self.image_size, self.noise)
                        for s in (("test",) if d == "ambiguous" else seg_scenes.SPLITS)} for d in domains}
        self.data = {d: {s: (torch.from_numpy(v.images), torch.from_numpy(v.masks))
                         for s, v in splits.items()} for d, splits in sets.items()}
        self.train_domains = tuple(d for d, s in self.data.items() if "train" in s)
        self.steps_per_epoch = math.ceil(sum(len(self.data[d]["train"][1]) for d in self.train_domains)
                                         / self.batch_size)

    def to(self, device: torch.device) -> None:
        self.data = {d: {s: (x.to(device), y.to(device)) for s, (x, y) in splits.items()}
                     for d, splits in self.data.items()}

    def image_shape(self) -> tuple[int, int]:
        return tuple(next(iter(self.data.values()))["test"][1].shape[-2:])

    def slots(self) -> list[Slot]:
        return [Slot("seg", "distribution", in_dim=self.gate_hidden, out_dim=len(self.classes),
                     family="categorical", num_experts=len(self.train_domains), external_experts=True,
                     labels=tuple(self.data))]

    def build_model(self, make_combiner: CombinerFactory) -> nn.Module:
        num_classes, e = len(self.classes), len(self.train_domains)
        experts = [FCN(num_classes, self.width, self.norm, self.decoder_reduce) for _ in range(e)]
        h, w = self.image_shape()
        scale = {"shallow": 1, "mid": 2, "deep": 4}[self.gate_layer]
        gate = GateTrunk(e * experts[0].channels[self.gate_layer], (h // scale, w // scale), self.gate_scope,
                         self.gate_channels, self.gate_hidden, self.gate_pool)
        moe = MoENet(experts, gate, make_combiner(self.slots()[0]), self.gate_layer)
        baseline = FCN(num_classes, self.width, self.norm, self.decoder_reduce) if self.use_baseline else None
        return SegModel(moe, baseline)

    # ------------------------------------------------------------------------------------------------ stages
    def stages(self, model: SegModel) -> list[Stage]:
        """The paper's procedure (§8.2): each expert on its domain, the baseline on the union, then the gate
        on the union with the experts frozen; `training: end_to_end` trains experts and gate together
        instead."""
        union, moe = self.train_domains, model.moe
        stages = []
        if self.training == "staged":
            for i, d in enumerate(union):
                stages.append(Stage(f"expert_{d}", "expert", SegStage(self, "fcn", (d,)), moe.experts[i],
                                    lambda: moe.freeze_experts(False)))
        if model.baseline is not None:
            stages.append(Stage("baseline", "baseline", SegStage(self, "fcn", union), model.baseline))
        if self.training == "end_to_end":
            stages.append(Stage("moe", "moe", SegStage(self, "moe", union), moe,
                                lambda: moe.freeze_experts(False)))
        elif any(p.requires_grad for p in moe.combiner.parameters()):  # poe without a gate: nothing to fit
            stages.append(Stage("gate", "gate", SegStage(self, "moe", union), moe,
                                lambda: moe.freeze_experts(True)))
        return stages

    def batches(self, domains, split: str, generator: torch.Generator | None, batch_size: int) -> Iterator:
        """Batches `(images, masks, domain_index)` over `domains`; shuffled when a generator is given."""
        parts = [self.data[d][split] for d in domains]
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        dom = torch.cat([torch.full((len(p[1]),), list(self.data).index(d)) for d, p in zip(domains, parts)])
        order = torch.randperm(len(y), generator=generator) if generator is not None else torch.arange(len(y))
        order = order.to(x.device)
        for start in range(0, len(y), batch_size):
            idx = order[start:start + batch_size]
            yield x[idx], y[idx], dom[idx.cpu()]

    # The full model is trained by the stages; the plain interface trains the MoE on the union end to end.
    def train_batches(self, epoch: int, generator: torch.Generator) -> Iterator:
        return self.batches(self.train_domains, "train", generator, self.batch_size)

    def training_step(self, model: nn.Module, batch) -> StepOutput:
        return SegStage(self, "moe", self.train_domains).training_step(model.moe, batch)

    # ------------------------------------------------------------------------------------------ evaluation
    def predictions(self, model: SegModel, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], MoEOutput]:
        """Argmax maps `[B, H, W]` of every model on one batch, and the MoE output."""
        out = model.moe(x)
        logits = out.logits
        preds = {"moe": moe_log_probs(out).argmax(1)}
        for i, d in enumerate(self.train_domains):
            preds[f"expert_{d}"] = logits[:, i].argmax(1)
        mean = logits.mean(1) if self.ensemble_mean == "logits" else logits.softmax(2).mean(1)
        preds["ensemble_mean"] = mean.argmax(1)
        preds["ensemble_max"] = logits.max(1).values.argmax(1)
        # [B, 1, H, W]: index of the more confident expert at each pixel
        conf = logits.softmax(2).max(2).values.argmax(1, keepdim=True)
        preds["ensemble_maxconf"] = logits.argmax(2).gather(1, conf).squeeze(1)
        if model.baseline is not None:
            preds["baseline"] = model.baseline(x)[0].argmax(1)
        return preds, out

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        domains = [d for d in self.data if split in self.data[d]]
        num_classes, e = len(self.classes), len(self.train_domains)
        cms: dict[tuple[str, str], torch.Tensor] = {}
        gate_sum, counts = {}, {}
        dis: dict[str, list] = {}
        routing = RoutingAccumulator("seg", e, tuple(self.data))
        for d in domains:
            for x, y, dom in self.batches((d,), split, None, self.eval_batch_size):
                preds, out = self.predictions(model, x)
                for name, p in preds.items():
                    cms[name, d] = cms.get((name, d), 0) + confusion(p, y, num_classes)
                expert_preds = torch.stack([preds[f"expert_{t}"] for t in self.train_domains], 1)
                for k, v in disagreement(expert_preds, preds["moe"], y).items():
                    dis.setdefault(k, []).append(v.cpu())
                dis.setdefault("domain", []).append(dom)
                counts[d] = counts.get(d, 0) + len(y)
                if out.weights is not None:
                    per_image = out.weights.mean((1, 2)).cpu()  # [B, E]
                    dis.setdefault("gate", []).append(per_image)
                    gate_sum[d] = gate_sum.get(d, 0) + per_image.sum(0)
                    per_pixel = out.weights.reshape(-1, e)
                    routing.add(per_pixel, dom.repeat_interleave(per_pixel.shape[0] // len(y)))
        metrics = self._score_tables(split, cms, domains)
        for d, total in gate_sum.items():
            for i, t in enumerate(self.train_domains):
                metrics[f"{split}/gate/{t}_weight/{d}"] = float(total[i] / counts[d])
        per_image = {k: torch.cat(v) for k, v in dis.items()}
        if split == "test":  # kept for disagreement.csv
            self.test_per_image = per_image
        metrics.update(self._disagreement_metrics(split, per_image))
        if split == "test":  # the routing schema has no split in its keys: report the test split's
            metrics.update(routing.metrics())
        return metrics

    def _score_tables(self, split: str, cms: dict, domains: list[str]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        names = sorted({name for name, _ in cms}, key=lambda n: (n != "moe", n))
        pooled_domains = [d for d in self.train_domains if d in domains]
        for name in names:
            prefix = f"{split}" if name == "moe" else f"{split}/{name}"
            pooled = sum(cms[name, d] for d in pooled_domains)
            for key, value in scores(pooled).items():
                metrics[f"{prefix}/{key}"] = value
            for d in domains:
                for key, value in scores(cms[name, d]).items():
                    metrics[f"{prefix}/{key}/{d}"] = value
        return metrics

    def _disagreement_metrics(self, split: str, dis: dict[str, torch.Tensor]) -> dict[str, float]:
        pixels = math.prod(self.image_shape())
        metrics: dict[str, float] = {}
        names = list(self.data)
        train_ids = torch.tensor([names.index(d) for d in self.train_domains])
        scopes = [(None, torch.isin(dis["domain"], train_ids))]
        scopes += [(d, dis["domain"] == i) for i, d in enumerate(names) if (dis["domain"] == i).any()]
        for d, mask in scopes:
            suffix = "" if d is None else f"/{d}"
            n = float(mask.sum()) * pixels
            agree = float(dis["agree"][mask].sum())
            stats = {"fraction": 1 - agree / n, "critical": float(dis["critical"][mask].sum()) / n,
                     "moe_acc_agree": float(dis["correct_agree"][mask].sum()) / max(agree, 1),
                     "moe_acc_disagree": float(dis["correct_disagree"][mask].sum()) / max(n - agree, 1)}
            for i, t in enumerate(self.train_domains):
                stats[f"follows_{t}"] = float(dis[f"follows/e{i}"][mask].sum()) / n
            if mask.sum() > 2:
                disagree_img = pixels - dis["agree"][mask]
                stats["error_rank_corr"] = spearman(disagree_img.double(), dis["errors"][mask].double())
            for key, value in stats.items():
                metrics[f"{split}/disagree/{key}{suffix}"] = value
        return metrics

    def eval_splits(self) -> tuple[str, ...]:
        return ("val",)

    # ------------------------------------------------------------------------------------------ pictures
    def finish(self, model: nn.Module, run_dir: Path) -> dict[str, float]:
        """Picture grids `pictures/test_<domain>.png` and per-image disagreement counts `disagreement.csv`."""
        model.eval()
        with torch.no_grad():
            if self.test_per_image is None:
                self.evaluate(model, "test")
            self._write_csv(self.test_per_image, Path(run_dir) / "disagreement.csv")
            if self.num_pictures > 0:
                for d in self.data:
                    x, y = (t[:self.num_pictures] for t in self.data[d]["test"])
                    preds, out = self.predictions(model, x)
                    self._picture(Path(run_dir) / "pictures" / f"test_{d}.png", x, y, preds, out)
        return {}

    def _write_csv(self, per_image: dict[str, torch.Tensor], path: Path) -> None:
        """One row per test image: domain, index within the domain, the §8.4 counts and the gate weights."""
        names, seen = list(self.data), {}
        rows = []
        for j, dom in enumerate(per_image["domain"].tolist()):
            d = names[dom]
            row = {"domain": d, "index": seen.setdefault(d, 0)}
            seen[d] += 1
            row.update({k.replace("/", "_"): int(v[j]) for k, v in per_image.items()
                        if k not in ("domain", "gate")})
            if "gate" in per_image:
                row.update({f"gate_{t}": round(float(per_image["gate"][j, i]), 6)
                            for i, t in enumerate(self.train_domains)})
            rows.append(row)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    def _picture(self, path: Path, x, y, preds: dict, out: MoEOutput) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap

        cmap = ListedColormap(plt.get_cmap("tab10").colors[:len(self.classes)])
        columns = ["image", "ground truth"] + [f"expert_{t}" for t in self.train_domains] + ["moe"]
        columns += [f"gate: {self.train_domains[0]}", "experts disagree (white)"]
        fig, axes = plt.subplots(len(y), len(columns), figsize=(1.6 * len(columns), 1.7 * len(y)),
                                 squeeze=False)
        expert_preds = torch.stack([preds[f"expert_{t}"] for t in self.train_domains], 1)
        disagree = ~(expert_preds == expert_preds[:, :1]).all(1)
        for r in range(len(y)):
            panels = [x[r].permute(1, 2, 0).cpu().numpy(), y[r], *[preds[c][r] for c in columns[2:-2]]]
            no_gate = torch.full(y[r].shape, math.nan)
            weight = out.weights[r, ..., 0] if out.weights is not None else no_gate
            for c, panel in enumerate(panels):
                kwargs = {} if c == 0 else {"cmap": cmap, "vmin": 0, "vmax": len(self.classes) - 1}
                axes[r, c].imshow(np.asarray(panel.cpu() if torch.is_tensor(panel) else panel), **kwargs)
            axes[r, -2].imshow(weight.cpu().numpy(), cmap="viridis", vmin=0, vmax=1)
            axes[r, -2].set_xlabel(f"mean {float(weight.mean()):.3f}", fontsize=7)
            axes[r, -1].imshow(disagree[r].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        for c, title in enumerate(columns):
            axes[0, c].set_title(title, fontsize=7)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(len(self.classes))]
        fig.legend(handles, self.classes, loc="lower center", ncol=len(self.classes), fontsize=7)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)


class SegStage(Task):
    """One stage of the procedure as a plain Task, so that `moecli.trainer.Trainer` runs it unchanged.

    kind "fcn": the model is one FCN (an expert or the baseline), trained with pixel-wise cross-entropy on
    `domains`; kind "moe": the model is the MoENet, trained with the combiner's per-pixel NLL (plus its
    auxiliary loss) on `domains`. Evaluation scores only this stage's model on its domains (`<split>/miou`,
    `.../<domain>`).
    """

    monitor = ("val/miou", "max")
    items_name = "images"

    def __init__(self, parent: Segmentation, kind: str, domains: tuple[str, ...]):
        self.parent, self.kind, self.domains = parent, kind, tuple(domains)
        n = sum(len(parent.data[d]["train"][1]) for d in self.domains)
        self.steps_per_epoch = math.ceil(n / parent.batch_size)

    def setup(self, seed: int) -> None:  # the parent task holds the data
        pass

    def to(self, device: torch.device) -> None:
        self.parent.to(device)

    def slots(self) -> list[Slot]:
        return self.parent.slots()

    def build_model(self, make_combiner: CombinerFactory) -> nn.Module:
        raise NotImplementedError("a stage trains a module of the parent task's model")

    def train_batches(self, epoch: int, generator: torch.Generator) -> Iterator:
        return self.parent.batches(self.domains, "train", generator, self.parent.batch_size)

    def training_step(self, model: nn.Module, batch) -> StepOutput:
        x, y, _ = batch
        if self.kind == "fcn":
            return StepOutput({"ce": F.cross_entropy(model(x)[0], y)}, num_items=len(y))
        out = model(x)
        losses = {"nll": out.combined.output.nll(y.reshape(-1)).mean()}
        if out.combined.aux_loss.requires_grad:
            losses["aux/seg"] = out.combined.aux_loss
        metrics = {}
        if out.weights is not None:
            metrics = {f"train/gate/{t}_weight": float(out.weights[..., i].detach().mean())
                       for i, t in enumerate(self.parent.train_domains)}
        return StepOutput(losses, metrics, num_items=len(y))

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        num_classes = len(self.parent.classes)
        metrics, pooled = {}, 0
        for d in self.domains:
            cm = 0
            for x, y, _ in self.parent.batches((d,), split, None, self.parent.eval_batch_size):
                pred = model(x)[0].argmax(1) if self.kind == "fcn" else moe_log_probs(model(x)).argmax(1)
                cm = cm + confusion(pred, y, num_classes)
            pooled = pooled + cm
            metrics.update({f"{split}/{k}/{d}": v for k, v in scores(cm).items() if len(self.domains) > 1})
        metrics.update({f"{split}/{k}": v for k, v in scores(pooled).items()})
        return metrics

    def eval_splits(self) -> tuple[str, ...]:
        return ("val",)
