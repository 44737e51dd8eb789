"""Evaluation protocols and plots of the multimodal VAE task (methods-multimodal §3, §5.3).

* Latent linear probes per non-empty modality subset (§3.2): logistic regression on posterior means (mixtures:
  the mixture mean), fitted on the clean training split (`probe_train_size` first examples, null = all),
  scored on test: `test/latent_acc/<subset>` (`image`, `label`, `image+label`, ...) and
  `test/latent_acc/joint`.
* Cross-modal coherence (§3.1): one z ~ q(z | X_S), decode the mean of the target modality, classify it with a
  classifier trained on clean training data in this run (logistic regression; its clean test accuracy is
  `test/classifier_acc/<m>`; labels: argmax), compare with the true class: `test/coherence/<S>_to_<m>`;
  for M > 2 also the mean over source subsets of each size, `test/coherence/inputs<k>`. Joint coherence:
  z ~ p(z), every decoded modality classified, coherent when all agree: `test/coherence/joint`.
* Fusion statistics on the clean joint posterior (§3.5), schema `route/posterior/<stat>/e<i>`, i = modality:
  combiner weights through `RoutingAccumulator` (gPoE: mean α; mixtures: π), PoE precision share T_m/T_S,
  expert mean log-variance and share of dimensions within 0.5 of the bound (`at_bound`, the variance trap),
  mixture responsibilities at the mixture mean (`responsibility/e<k>`, k = component: modality or subset).
* Robustness (§3.4): the test input of `robust_modality` replaced by clip(x + σ·ε) with one fixed ε, the
  others as observed; per σ (key suffix `s<σ>`): `test/robust/latent_acc/joint/s<σ>` (readout fitted on clean
  joint training representations), `test/robust/decoded_acc/s<σ>` (class decoded from the joint posterior
  mean),
  `test/robust/coherence/<m>_to_label/s<σ>`, `test/robust/weight/<m>/s<σ>` (combiner weight of the corrupted
  modality; gPoE α) or `test/robust/precision_share/<m>/s<σ>` (plain products).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moecli.posteriors import GaussianPosterior, GaussianPosteriorMixture, as_posterior, nonempty_subsets
from moecli.routing.stats import RoutingAccumulator

NUM_CLASSES = 10


def fit_logistic(x: torch.Tensor, y: torch.Tensor):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=2000).fit(x.numpy().astype(np.float64), y.numpy())


def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(model.score(x.numpy().astype(np.float64), y.numpy()))


def draw(post) -> torch.Tensor:
    """One z per example `[B, Z]` from a posterior (mixtures: ancestral, as MMVAE's coherence does)."""
    return post.sample() if isinstance(post, GaussianPosteriorMixture) else post.rsample(1)[0]


def subset_posteriors(task, model, inputs) -> dict[str, object]:
    """Posterior of every non-empty subset (names joined by '+'), from one encoding of `inputs`."""
    from tasks.mmvae import subset_name

    mean, logvar = model.encode(inputs)
    batch = mean.shape[0]
    out = {}
    for row in nonempty_subsets(len(task.names)):
        mask = row.unsqueeze(0).expand(batch, -1)
        out[subset_name(list(task.names), row)] = as_posterior(model.fuse(inputs, mean, logvar, mask).output)
    return out


class Classifiers:
    """Clean-data classifiers per modality (labels: argmax of the decoded class probabilities)."""

    def __init__(self, task):
        train = task.data["train"]
        n = task.probe_train_size or len(train.y)
        self.models = {m: fit_logistic(train.targets[m][:n], train.y[:n]) for m in task.names if m != "label"}

    def predict(self, name: str, decoded: torch.Tensor) -> torch.Tensor:
        if name == "label":
            return decoded.argmax(-1)
        return torch.as_tensor(self.models[name].predict(decoded.numpy().astype(np.float64)))


def test_metrics(task, model, data) -> dict[str, float]:
    """Probes, coherence, fusion statistics and robustness on the test split (see the module docstring)."""
    names, y = list(task.names), data["y"]
    train = task.data["train"].index(torch.arange(len(task.data["train"].y)))
    n = task.probe_train_size or len(train["y"])
    post_train = subset_posteriors(task, model, train["inputs"])
    post_test = subset_posteriors(task, model, data["inputs"])
    metrics, probes = {}, {}
    for name, post in post_test.items():
        probes[name] = fit_logistic(post_train[name].point()[:n], train["y"][:n])
        metrics[f"test/latent_acc/{name}"] = accuracy(probes[name], post.point(), y)
    joint = "+".join(names)
    metrics["test/latent_acc/joint"] = metrics[f"test/latent_acc/{joint}"]
    classifiers = Classifiers(task)
    for m, clf in classifiers.models.items():
        metrics[f"test/classifier_acc/{m}"] = accuracy(clf, data["targets"][m], y)
    metrics.update(coherence(task, model, post_test, classifiers, y))
    metrics.update(fusion_stats(task, model, data["inputs"], y))
    metrics.update(robustness(task, model, data, probes[joint], classifiers))
    return metrics


def coherence(task, model, posts, classifiers, y) -> dict[str, float]:
    names, out, by_size = list(task.names), {}, {}
    for source, post in posts.items():
        members = source.split("+")
        z = draw(post)
        for target in names:
            if target in members:
                continue
            correct = (classifiers.predict(target, model.decode_mean(target, z)) == y).float().mean()
            out[f"test/coherence/{source}_to_{target}"] = float(correct)
            by_size.setdefault(len(members), []).append(float(correct))
    if len(names) > 2:
        out.update({f"test/coherence/inputs{k}": float(np.mean(v)) for k, v in sorted(by_size.items())})
    z = torch.randn(task.joint_coherence_samples, task.latent_dim)
    preds = torch.stack([classifiers.predict(m, model.decode_mean(m, z)) for m in names])
    out["test/coherence/joint"] = float((preds == preds[0]).all(0).float().mean())
    return out


def fusion_stats(task, model, inputs, y, prefix: str = "route/posterior") -> dict[str, float]:
    """Statistics of the clean joint posterior (§3.5)."""
    mean, logvar = model.encode(inputs)
    full = torch.ones(mean.shape[0], len(task.names), dtype=torch.bool)
    out = model.fuse(inputs, mean, logvar, full)
    post = as_posterior(out.output)
    metrics = {}
    if out.weights is not None:
        acc = RoutingAccumulator("posterior", len(task.names), [str(c) for c in range(NUM_CLASSES)])
        acc.add(out.weights, y, out.stats)
        metrics.update(acc.metrics())
    if isinstance(post, GaussianPosterior) and out.weights is None:
        share = torch.exp(post.logvar.unsqueeze(1) - logvar).mean((0, 2))  # T_m / T_S
        metrics.update({f"{prefix}/precision_share/e{i}": float(v) for i, v in enumerate(share)})
    if isinstance(post, GaussianPosteriorMixture):
        resp = post.responsibilities(post.point()).mean(0)
        metrics.update({f"{prefix}/responsibility/e{k}": float(v) for k, v in enumerate(resp)})
    at_bound = (logvar.abs() > task.logvar_bound - 0.5).float().mean((0, 2))
    for i in range(len(task.names)):
        metrics[f"{prefix}/at_bound/e{i}"] = float(at_bound[i])
        metrics[f"{prefix}/logvar/e{i}"] = float(logvar[:, i].mean())
    return metrics


def robustness(task, model, data, joint_probe, classifiers) -> dict[str, float]:
    """Metrics as σ of Gaussian noise on `task.robust_modality` grows (§3.4); also kept for the plot."""
    m = task.robust_modality
    idx, clean, y = task.names.index(m), data["targets"][m], data["y"]
    eps = torch.randn(clean.shape, generator=torch.Generator().manual_seed(task.noise_seed + 7))
    full = torch.ones(len(y), len(task.names), dtype=torch.bool)
    alone = torch.zeros_like(full)
    alone[:, idx] = True
    metrics, curve = {}, {}
    for sigma in task.robust_sigmas:
        inputs = dict(data["inputs"])
        inputs[m] = (clean + sigma * eps).clamp(0.0, 1.0)
        mean, logvar = model.encode(inputs)
        out = model.fuse(inputs, mean, logvar, full)
        post = as_posterior(out.output)
        row = {"latent_acc/joint": accuracy(joint_probe, post.point(), y)}
        if "label" in task.names:
            decoded = model.decode_mean("label", post.point()).argmax(-1)
            row["decoded_acc"] = float((decoded == y).float().mean())
            z = draw(as_posterior(model.fuse(inputs, mean, logvar, alone).output))
            crossed = classifiers.predict("label", model.decode_mean("label", z))
            row[f"coherence/{m}_to_label"] = float((crossed == y).float().mean())
        if out.weights is not None:
            row[f"weight/{m}"] = float(out.weights[:, idx].mean())
        elif isinstance(post, GaussianPosterior):
            row[f"precision_share/{m}"] = float(torch.exp(post.logvar - logvar[:, idx]).mean())
        curve[sigma] = row
        metrics.update({f"test/robust/{k}/s{sigma:g}": v for k, v in row.items()})
    task.cache["robust"] = curve
    return metrics


# ------------------------------------------------------------------------------------------------------ plots
def tile(images: torch.Tensor) -> np.ndarray:
    """`[R, C, 64]` -> one `[R·9 − 1, C·9 − 1]` array with 1-pixel gaps."""
    rows, cols = images.shape[:2]
    canvas = np.ones((rows * 9 - 1, cols * 9 - 1))
    for r in range(rows):
        for c in range(cols):
            canvas[r * 9:r * 9 + 8, c * 9:c * 9 + 8] = images[r, c].view(8, 8).numpy()
    return canvas


def save_plots(task, model, folder: Path) -> None:
    """reconstructions.png (image decoded from every subset), cross_generation.png (label → image samples),
    robustness.png (the §3.4 curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    data, y = task.data["test"], task.data["test"].y
    picks = torch.stack([(y == c).nonzero()[0, 0] for c in range(NUM_CLASSES)])
    inputs = {k: v[picks] for k, v in data.inputs.items()}
    target = "image" if "image" in task.names else task.robust_modality
    posts = subset_posteriors(task, model, inputs)
    rows = [data.targets[target][picks], inputs[target]] + [model.decode_mean(target, p.point())
                                                             for p in posts.values()]
    labels = [f"{target} (clean)", f"{target} (input)"] + [f"from {s}" for s in posts]
    fig, ax = plt.subplots(figsize=(6, 0.55 * len(rows) + 0.8))
    ax.imshow(tile(torch.stack(rows)), cmap="gray_r", vmin=0, vmax=1)
    ax.set_yticks([r * 9 + 3.5 for r in range(len(rows))], labels)
    ax.set_xticks([])
    ax.set_title(f"{target}: decoded means from each subset's posterior", fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / "reconstructions.png", dpi=120)
    plt.close(fig)
    if "label" in task.names:
        save_cross_generation(task, model, folder, target, plt)
    if task.cache.get("robust"):
        save_robustness(task.cache["robust"], task.robust_modality, folder / "robustness.png", plt)


def save_cross_generation(task, model, folder: Path, target: str, plt) -> None:
    labels = torch.eye(NUM_CLASSES)
    inputs = {m: torch.zeros(NUM_CLASSES, d) for m, d in task.dims.items()}
    inputs["label"] = labels
    mean, logvar = model.encode(inputs)
    mask = torch.zeros(NUM_CLASSES, len(task.names), dtype=torch.bool)
    mask[:, task.names.index("label")] = True
    post = as_posterior(model.fuse(inputs, mean, logvar, mask).output)
    samples = torch.stack([model.decode_mean(target, draw(post)) for _ in range(8)], dim=1)  # [10, 8, 64]
    fig, ax = plt.subplots(figsize=(4.5, 5.5))
    ax.imshow(tile(samples), cmap="gray_r", vmin=0, vmax=1)
    ax.set_yticks([r * 9 + 3.5 for r in range(NUM_CLASSES)], [str(c) for c in range(NUM_CLASSES)])
    ax.set_xticks([])
    ax.set_title(f"label → {target}: 8 samples per class")
    fig.tight_layout()
    fig.savefig(folder / "cross_generation.png", dpi=120)
    plt.close(fig)


def save_robustness(curve: dict, modality: str, path: Path, plt) -> None:
    sigmas = sorted(curve)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key in curve[sigmas[0]]:
        ax.plot(sigmas, [curve[s][key] for s in sigmas], marker="o", label=key)
    ax.set_xlabel(f"σ of Gaussian noise on {modality} (test)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
