"""Multimodal VAE whose unimodal encoders are the experts of a posterior slot (methods-multimodal §1–5).

Data (§5.1, no network): scikit-learn's bundled 8×8 digits as a multimodal set. Modalities: `image` (64
intensities in [0, 1], Bernoulli likelihood), `label` (one-hot class, categorical likelihood) and
PolyMNIST-like views `view`, `view2`, `view3`, `view4`: another image of the same class from the same split
(a different writer), transformed (transposed, mirrored left-right, mirrored up-down, rotated 90°) on a
background from a bank of 16 smooth random textures of its own (amplitude 0.3), clipped. Training pairs are
redrawn every epoch from the data generator; test pairs are fixed by `split_seed`. A fixed permutation
(`split_seed`) gives 1,200 train and 597 test examples.

Model (§5.2): per-modality MLP encoders `D_m → hidden → hidden → 2Z` (log-variance soft-clamped, §6 item 3),
mirrored decoders. The posterior is the distribution slot "posterior" (family gaussian, external experts, one
expert per modality): the combiner is called as `combiner(x, experts=(mean, logvar), mask=present)` with
mean and logvar `[B, M, Z]`, present `[B, M]`, and gate input x = the concatenated observed modality features
`[B, Σ D_m]` (absent modalities zero-filled). Products (`poe`, `gpoe`) train with the MVAE subsampled ELBO
(§2.2); mixtures (`competitive`, `mopoe`) with the stratified mixture ELBO (§2.3, §2.4).

Noise (§5.3): `train_noise` / `test_noise` map a modality to `{sigma, prob, occlusion, uniform}` (images and
views: additive Gaussian σ on the [0, 1] scale with probability `prob`, a zeroed square of side `occlusion`·8
pixels, replacement by U(0, 1) noise with probability `uniform`) or `{flip}` (label: the shown class is random
with probability `flip`). Image noise corrupts the encoder input only (the decoder target stays clean).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from moecli.errors import ConfigError, check_choice, check_positive
from moecli.posteriors import (
    GaussianPosteriorMixture,
    as_posterior,
    clamp_logvar,
    log_mean_exp,
    nonempty_subsets,
    standard_normal_log_prob,
)
from moecli.slots import Slot
from moecli.task import CombinerFactory, StepOutput, Task

NUM_CLASSES = 10
SIDE = 8
VIEW_TRANSFORMS = {"view": "transpose", "view2": "fliplr", "view3": "flipud", "view4": "rot90"}
MODALITIES = ("image", "label", *VIEW_TRANSFORMS)


# ------------------------------------------------------------------------------------------------------ noise
@dataclass(frozen=True)
class Noise:
    """Corruption of one modality (§5.3). Images/views: sigma, prob, occlusion, uniform; label: flip."""

    sigma: float = 0.0
    prob: float = 1.0
    occlusion: float = 0.0
    uniform: float = 0.0
    flip: float = 0.0


def parse_noise(key: str, spec, modalities: tuple[str, ...]) -> dict[str, Noise]:
    """`{modality: {field: value}}` from YAML -> `{modality: Noise}`, with one-line errors for bad keys."""
    out = {}
    allowed = [f.name for f in fields(Noise)]
    for name, values in dict(spec or {}).items():
        check_choice(f"{key} modality", name, modalities)
        values = dict(values or {})
        for field_name in values:
            check_choice(f"{key}.{name}", field_name, allowed)
        noise = Noise(**{k: float(v) for k, v in values.items()})
        if name == "label" and (noise.sigma or noise.occlusion or noise.uniform):
            raise ConfigError(f"{key}.label supports only flip; sigma, occlusion and uniform are for images")
        if name != "label" and noise.flip:
            raise ConfigError(f"{key}.{name}.flip applies to the label only")
        out[name] = noise
    return out


def corrupt_image(x: torch.Tensor, noise: Noise, gen: torch.Generator, eps: torch.Tensor | None = None):
    """Corrupt images `[N, 64]` in [0, 1]; `eps` `[N, 64]` fixes the Gaussian draw (robustness curves)."""
    n = x.shape[0]
    out = x
    if noise.sigma > 0 or noise.occlusion > 0:
        hit = (torch.rand(n, generator=gen) < noise.prob).unsqueeze(-1)
        if noise.sigma > 0:
            eps = torch.randn(x.shape, generator=gen) if eps is None else eps
            out = torch.where(hit, (out + noise.sigma * eps).clamp(0.0, 1.0), out)
        if noise.occlusion > 0:
            out = torch.where(hit, out * occlusion_mask(n, noise.occlusion, gen), out)
    if noise.uniform > 0:
        replace = (torch.rand(n, generator=gen) < noise.uniform).unsqueeze(-1)
        out = torch.where(replace, torch.rand(x.shape, generator=gen), out)
    return out


def occlusion_mask(n: int, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """`[N, 64]` masks, 0 on a random square of side round(fraction·8) pixels (at least 1), 1 elsewhere."""
    side = max(1, min(SIDE, round(fraction * SIDE)))
    rows = torch.randint(0, SIDE - side + 1, (n, 1, 1), generator=gen)
    cols = torch.randint(0, SIDE - side + 1, (n, 1, 1), generator=gen)
    r, c = torch.arange(SIDE).view(1, SIDE, 1), torch.arange(SIDE).view(1, 1, SIDE)
    inside = (r >= rows) & (r < rows + side) & (c >= cols) & (c < cols + side)
    return (~inside).float().reshape(n, SIDE * SIDE)


def flip_labels(y: torch.Tensor, flip: float, gen: torch.Generator) -> torch.Tensor:
    """With probability `flip` the shown class is uniformly random (it may equal the true one)."""
    if flip <= 0:
        return y
    replace = torch.rand(y.shape[0], generator=gen) < flip
    return torch.where(replace, torch.randint(0, NUM_CLASSES, y.shape, generator=gen), y)


# ------------------------------------------------------------------------------------------------------- data
def load_digit_split(split_seed: int, train_size: int):
    """scikit-learn's bundled digits in [0, 1]: ((x `[N, 64]`, y `[N]`) train, (x, y) test)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    if not 0 < train_size < len(y):
        raise ConfigError(f"task.train_size={train_size} must be between 1 and {len(y) - 1}")
    perm = torch.tensor(np.random.default_rng(split_seed).permutation(len(y)))
    train, test = perm[:train_size], perm[train_size:]
    return (x[train], y[train]), (x[test], y[test])


def texture_bank(seed: int, count: int = 16, amplitude: float = 0.3) -> torch.Tensor:
    """`[count, 64]` smooth backgrounds: 3×3 uniform noise upsampled bilinearly to 8×8, times amplitude."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 1, 3, 3, generator=gen)
    fine = F.interpolate(coarse, size=(SIDE, SIDE), mode="bilinear", align_corners=True)
    return amplitude * fine.reshape(count, SIDE * SIDE)


def transform(images: torch.Tensor, kind: str) -> torch.Tensor:
    """Geometric transform of flat 8×8 images `[N, 64]`."""
    grid = images.view(-1, SIDE, SIDE)
    grid = {"transpose": lambda g: g.transpose(1, 2), "fliplr": lambda g: g.flip(2),
            "flipud": lambda g: g.flip(1), "rot90": lambda g: g.rot90(1, (1, 2))}[kind](grid)
    return grid.reshape(-1, SIDE * SIDE)


def same_class_partners(y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """For every example another example of the same class `[N]` (a different writer, never itself)."""
    out = torch.empty_like(y)
    for c in range(NUM_CLASSES):
        idx = (y == c).nonzero().squeeze(1)
        n = idx.numel()
        if n == 0:
            continue
        if n == 1:
            out[idx] = idx
            continue
        pick = torch.randint(0, n - 1, (n,), generator=gen)
        pick = pick + (pick >= torch.arange(n)).long()  # skip the example's own position
        out[idx] = idx[pick]
    return out


@dataclass
class Split:
    """One split's tensors: encoder inputs and decoder targets per modality (`[N, D_m]`), true class `[N]`."""

    inputs: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]
    y: torch.Tensor

    def index(self, idx: torch.Tensor) -> dict:
        return {"inputs": {k: v[idx] for k, v in self.inputs.items()},
                "targets": {k: v[idx] for k, v in self.targets.items()}, "y": self.y[idx]}


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """`in → hidden → hidden → out` with ReLU (§5.2)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, out_dim))


# ------------------------------------------------------------------------------------------------------ model
class MMVAEModel(nn.Module):
    """Encoders (the posterior experts), decoders, and the posterior combiner. M modalities, Z latent dims."""

    def __init__(self, dims: dict[str, int], latent_dim: int, hidden: int, combiner: nn.Module,
                 logvar_clamp: str, logvar_bound: float):
        super().__init__()
        self.names, self.dims = list(dims), dims
        self.encoders = nn.ModuleDict({m: mlp(d, hidden, 2 * latent_dim) for m, d in dims.items()})
        self.decoders = nn.ModuleDict({m: mlp(latent_dim, hidden, d) for m, d in dims.items()})
        self.posterior = combiner
        self.logvar_clamp, self.logvar_bound = logvar_clamp, logvar_bound

    def encode(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Every modality's expert: (mean, logvar) `[B, M, Z]` (absent ones are masked by the combiner)."""
        out = torch.stack([self.encoders[m](inputs[m]) for m in self.names], dim=1)
        mean, logvar = out.chunk(2, dim=-1)
        return mean, clamp_logvar(logvar, self.logvar_clamp, self.logvar_bound)

    def gate_input(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Concatenated observed features `[B, Σ D_m]`, absent modalities zero-filled (where, never ×)."""
        parts = [torch.where(mask[:, i:i + 1], inputs[m], torch.zeros_like(inputs[m]))
                 for i, m in enumerate(self.names)]
        return torch.cat(parts, dim=-1)

    def fuse(self, inputs, mean, logvar, mask):
        """The combiner's output for the modalities in `mask` `[B, M]` (bool)."""
        return self.posterior(self.gate_input(inputs, mask), experts=(mean, logvar), mask=mask)

    def log_lik(self, name: str, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """log p(x_m | z), z `[..., B, Z]`, target `[B, D_m]` -> `[..., B]`."""
        logits = self.decoders[name](z)
        if name == "label":
            return (target * F.log_softmax(logits, -1)).sum(-1)
        target = target.expand_as(logits)
        return -F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1)

    def decode_mean(self, name: str, z: torch.Tensor) -> torch.Tensor:
        """Mean of p(x_m | z): pixel probabilities, or class probabilities for the label."""
        logits = self.decoders[name](z)
        return torch.softmax(logits, -1) if name == "label" else torch.sigmoid(logits)


def bound(mix: GaussianPosteriorMixture, z: torch.Tensor, rec: torch.Tensor, beta: float,
          iw: str = "none") -> torch.Tensor:
    """The per-example bound `[B]` from samples z `[K, N, B, Z]` and weighted log-likelihoods rec `[K, N, B]`.

    iw "none": Σ_k π_k mean_n (rec − β·reg), reg = KL(q_k‖p) in closed form when `mix.kl == "components"`
    (one Gaussian, MoPoE §2.4) else log q_mix(z) − log p(z) (stratified MMVAE ELBO, §2.3).
    iw "looser": Σ_k π_k lme_n log w_kn; "tight": log Σ_k π_k mean_n w_kn, with
    log w = rec + β(log p(z) − log q_mix(z)).
    """
    pi = mix.weights.transpose(0, 1)  # [K, B]
    if iw == "none" and mix.kl == "components":
        per = rec.mean(1) - beta * mix.kl_components().transpose(0, 1)
        return (pi * per).sum(0)
    log_w = rec + beta * (standard_normal_log_prob(z) - mix.log_prob(z))
    if iw == "tight":
        return torch.logsumexp(mix.log_weights.transpose(0, 1) + log_mean_exp(log_w, 1), dim=0)
    per = log_mean_exp(log_w, 1) if iw == "looser" else log_w.mean(1)
    return (pi * per).sum(0)


def subset_name(names: list[str], members: torch.Tensor) -> str:
    return "+".join(n for n, keep in zip(names, members.tolist()) if keep)


# ------------------------------------------------------------------------------------------------------- task
class Mmvae(Task):
    monitor = ("train/elbo", "max")

    def __init__(self, modalities=("image", "label"), latent_dim: int = 16, hidden: int = 128,
                 batch_size: int = 128, train_size: int = 1200, split_seed: int = 0,
                 logvar_clamp: str = "soft",
                 logvar_bound: float = 6.0, kl_coef: float = 1.0, kl_warmup_epochs: float = 50,
                 llik_scaling="auto", objective: str = "elbo", num_samples: int = 1, iw_bound: str = "looser",
                 subsets: str = "mvae", num_random_subsets: int = 1, train_noise=None, test_noise=None,
                 robust_modality: str = "image", robust_sigmas=(0.0, 0.5, 1.0, 2.0), noise_seed: int = 1234,
                 eval_num_samples: int = 50, joint_coherence_samples: int = 2000, probe_train_size=None,
                 plots: bool = True):
        self.names = tuple(modalities)
        for m in self.names:
            check_choice("task.modalities", m, MODALITIES)
        if len(set(self.names)) != len(self.names) or len(self.names) < 2:
            raise ConfigError(f"task.modalities={list(self.names)} must name two or more distinct modalities")
        check_choice("task.logvar_clamp", logvar_clamp, ["soft", "hard", "none"])
        check_choice("task.objective", objective, ["elbo", "iwae"])
        check_choice("task.iw_bound", iw_bound, ["looser", "tight"])
        check_choice("task.subsets", subsets, ["mvae", "all"])
        check_choice("task.robust_modality", robust_modality, [m for m in self.names if m != "label"])
        for key, value in [("task.latent_dim", latent_dim), ("task.hidden", hidden),
                           ("task.batch_size", batch_size), ("task.num_samples", num_samples)]:
            check_positive(key, value)
        self.latent_dim, self.hidden = latent_dim, hidden
        self.batch_size, self.train_size = batch_size, train_size
        self.split_seed, self.logvar_clamp, self.logvar_bound = split_seed, logvar_clamp, logvar_bound
        self.kl_coef, self.kl_warmup_epochs = kl_coef, kl_warmup_epochs
        self.iw = "none" if objective == "elbo" else iw_bound
        self.num_samples, self.subsets, self.num_random_subsets = num_samples, subsets, num_random_subsets
        self.train_noise = parse_noise("task.train_noise", train_noise, self.names)
        self.test_noise = parse_noise("task.test_noise", test_noise, self.names)
        self.robust_modality, self.robust_sigmas = robust_modality, [float(s) for s in robust_sigmas]
        self.noise_seed, self.eval_num_samples = noise_seed, eval_num_samples
        self.joint_coherence_samples, self.probe_train_size, self.plots = (joint_coherence_samples,
                                                                            probe_train_size, plots)
        self.dims = {m: NUM_CLASSES if m == "label" else SIDE * SIDE for m in self.names}
        self.llik = self._resolve_scaling(llik_scaling)
        self.progress = 0.0  # epochs done, for the KL warm-up (updated per mini-batch)
        self.data: dict[str, Split] = {}
        self.cache: dict = {}

    def _resolve_scaling(self, spec) -> dict[str, float]:
        """λ_m (§2.5): auto = max_dim / dim_m, none = 1, or a `{modality: weight}` mapping (others 1)."""
        if isinstance(spec, str):
            check_choice("task.llik_scaling", spec, ["auto", "none"])
            top = max(self.dims.values())
            return {m: (top / d if spec == "auto" else 1.0) for m, d in self.dims.items()}
        spec = dict(spec)
        for m in spec:
            check_choice("task.llik_scaling modality", m, self.names)
        return {m: float(spec.get(m, 1.0)) for m in self.names}

    # -------------------------------------------------------------------------------------------------- data
    def setup(self, seed: int) -> None:
        (self.x_train, self.y_train), (x_test, y_test) = load_digit_split(self.split_seed, self.train_size)
        self.banks = {v: texture_bank(self.split_seed * 100 + i + 1) for i, v in enumerate(VIEW_TRANSFORMS)}
        fixed = torch.Generator().manual_seed(self.split_seed + 1)
        self.data["train"] = self._make_split(self.x_train, self.y_train, fixed, {})
        test_gen = torch.Generator().manual_seed(self.noise_seed)
        self.data["test"] = self._make_split(x_test, y_test, fixed, self.test_noise, test_gen)
        self.steps_per_epoch = math.ceil(self.train_size / self.batch_size)

    def _make_split(self, x, y, pair_gen, noise: dict[str, Noise], noise_gen=None) -> Split:
        """Build every modality from images x `[N, 64]` and classes y; views draw partners from `pair_gen`."""
        noise_gen = noise_gen or pair_gen
        targets = {}
        for m in self.names:
            if m == "label":
                shown = flip_labels(y, noise["label"].flip, noise_gen) if "label" in noise else y
                targets[m] = F.one_hot(shown, NUM_CLASSES).float()
            elif m == "image":
                targets[m] = x
            else:
                partner = same_class_partners(y, pair_gen)
                background = torch.randint(0, self.banks[m].shape[0], (len(y),), generator=pair_gen)
                view = transform(x[partner], VIEW_TRANSFORMS[m]) + self.banks[m][background]
                targets[m] = view.clamp(0.0, 1.0)
        inputs = {m: (corrupt_image(t, noise[m], noise_gen) if m in noise and m != "label" else t)
                  for m, t in targets.items()}
        return Split(inputs, targets, y)

    def slots(self) -> list[Slot]:
        return [Slot("posterior", "distribution", in_dim=sum(self.dims.values()), out_dim=self.latent_dim,
                     family="gaussian", num_experts=len(self.names), external_experts=True, labels=self.names,
                     extra={"posterior": True, "prior_expert": True,
                            "modality_dims": tuple(self.dims[m] for m in self.names)})]

    def build_model(self, make_combiner: CombinerFactory) -> nn.Module:
        return MMVAEModel(self.dims, self.latent_dim, self.hidden, make_combiner(self.slots()[0]),
                          self.logvar_clamp, self.logvar_bound)

    def train_batches(self, epoch: int, generator: torch.Generator) -> Iterator[dict]:
        # Training pairs and training noise are redrawn every epoch from the data generator only.
        split = self._make_split(self.x_train, self.y_train, generator, self.train_noise)
        order = torch.randperm(self.train_size, generator=generator)
        for i, start in enumerate(range(0, self.train_size, self.batch_size)):
            self.progress = epoch + i / self.steps_per_epoch
            yield split.index(order[start:start + self.batch_size])

    # ------------------------------------------------------------------------------------------- objectives
    def beta(self) -> float:
        """β_t = β · min(1, t / T_w), t in epochs, per mini-batch (§2.5)."""
        if self.kl_warmup_epochs <= 0:
            return self.kl_coef
        return self.kl_coef * min(1.0, self.progress / self.kl_warmup_epochs)

    def subset_bound(self, model, post, targets, recon, beta, lam, num_samples, iw) -> torch.Tensor:
        """Bound `[B]` of one posterior, reconstructing the modalities in `recon` (indices)."""
        mix = post.as_mixture()
        z = mix.rsample(num_samples)
        rec = sum(lam[self.names[m]] * model.log_lik(self.names[m], z, targets[self.names[m]]) for m in recon)
        return bound(mix, z, rec, beta, iw)

    def training_masks(self, batch: int) -> list[torch.Tensor]:
        """MVAE subsets (§2.2): joint, singletons, `num_random_subsets` of size 2..M−1; or every subset."""
        table = nonempty_subsets(len(self.names))
        if self.subsets == "all":
            rows = list(table)
        else:
            rows = [table[-1]] + [table[i] for i in range(len(self.names))]
            middle = table[(table.sum(-1) > 1) & (table.sum(-1) < len(self.names))]
            if len(middle):
                picks = torch.randint(0, len(middle), (self.num_random_subsets,))  # global RNG (checkpointed)
                rows += [middle[int(i)] for i in picks]
        return [row.unsqueeze(0).expand(batch, -1) for row in rows]

    def objective(self, model, batch, beta, lam) -> tuple[torch.Tensor, list]:
        """Per-example objective `[B]` to maximise, and the combiner outputs (for their auxiliary losses)."""
        inputs, targets = batch["inputs"], batch["targets"]
        mean, logvar = model.encode(inputs)
        masks = self.training_masks(mean.shape[0])
        first = model.fuse(inputs, mean, logvar, masks[0])
        post = as_posterior(first.output)
        if isinstance(post, GaussianPosteriorMixture):  # mixtures: every sample reconstructs every modality
            return self.subset_bound(model, post, targets, range(len(self.names)), beta, lam,
                                     self.num_samples, self.iw), [first]
        outs, total = [first], 0.0
        for i, mask in enumerate(masks):  # MVAE: ELBO(S; S) summed over the subsets
            out = first if i == 0 else model.fuse(inputs, mean, logvar, mask)
            if i:
                outs.append(out)
            recon = [j for j in range(len(self.names)) if bool(mask[0, j])]
            total = total + self.subset_bound(model, as_posterior(out.output), targets, recon, beta, lam,
                                              self.num_samples, self.iw)
        return total, outs

    def training_step(self, model: nn.Module, batch) -> StepOutput:
        beta = self.beta()
        value, outs = self.objective(model, batch, beta, self.llik)
        losses = {"nelbo": -value.mean()}
        aux = sum(o.aux_loss for o in outs)
        if isinstance(aux, torch.Tensor) and aux.requires_grad:
            losses["aux/posterior"] = aux
        return StepOutput(losses, {"train/beta": beta}, num_items=len(batch["y"]))

    # ------------------------------------------------------------------------------------------- evaluation
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        torch.manual_seed(self.noise_seed)  # the trainer forks the RNG around evaluation: metrics repeat
        data = self.data[split].index(torch.arange(len(self.data[split].y)))
        ones = {m: 1.0 for m in self.names}
        full = torch.ones(len(data["y"]), len(self.names), dtype=torch.bool)
        mean, logvar = model.encode(data["inputs"])
        post = as_posterior(model.fuse(data["inputs"], mean, logvar, full).output)
        every = range(len(self.names))
        metrics = {f"{split}/elbo": float(self.subset_bound(model, post, data["targets"], every, 1.0, ones, 1,
                                                            "none").mean())}
        if split != "test":
            return metrics
        metrics[f"{split}/log_px"] = float(self.subset_bound(model, post, data["targets"], every, 1.0, ones,
                                                             self.eval_num_samples, "tight").mean())
        from tasks import mmvae_eval  # the metric protocols of §3 live beside the task

        metrics.update(mmvae_eval.test_metrics(self, model, data))
        return metrics

    def finish(self, model: nn.Module, run_dir: Path) -> dict[str, float]:
        out = {f"info/llik_scale/{m}": v for m, v in self.llik.items()}
        if self.plots:
            from tasks import mmvae_eval

            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.noise_seed)
                mmvae_eval.save_plots(self, model, Path(run_dir) / "plots")
        return out

    def eval_splits(self) -> tuple[str, ...]:
        return ("train",)
