"""Procedural two-domain street scenes and the user-folder reader for task=segmentation (methods-multimodal
§8.7).

Synthetic data: `H × W` RGB scenes (32 × 32 by default; larger sizes scale the layout) with six classes
`CLASSES`. Two training domains with their own layouts, class frequencies and colour tables:

* urban: horizon at row 6–11, building blocks 6–10 px wide on both sides, 1–3 persons (4 × 2 px, class "thin")
  and 1–3 vehicles (3 × 5 px); no vegetation.
* highway: horizon at row 10–15, a vegetation strip in the 3 rows above it, two dashed lane lines (class
  "thin"), 2–4 vehicles; no buildings.

The confound (§8.7): highway *road* is almost the colour of urban *building*, vehicles are red in urban scenes
and blue on highways, so an expert trained on one domain is confidently wrong on the other. Pixel noise `N(0,
noise²)`, clipped to [0, 1]. The test-only domain "ambiguous" joins the left half of an urban scene to the
right half of a highway scene. Every scene is a pure function of `(seed, split, domain, index)`.

User data (`task.data_path=<folder>`): `<folder>/<domain>/<split>/images/<name>.png` with label masks
`<folder>/<domain>/<split>/masks/<name>.png` (same stem; single-channel PNG whose pixel values are class
indices); optional `<folder>/classes.txt`, one class name per line. A domain with a `train` split gets an
expert; a domain with only `test` is test-only (like "ambiguous"). A missing `val` split is carved from
`train` (every 10th image).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moecli.errors import ConfigError

CLASSES = ("sky", "road", "building", "vegetation", "vehicle", "thin")
SKY, ROAD, BUILDING, VEGETATION, VEHICLE, THIN = range(6)
SPLITS = ("train", "val", "test")

# RGB colour per class and domain. Highway road ≈ urban building (the deliberate confound); vehicles red in
# town, blue on highways.
COLOURS = {
    "urban": np.array([[0.55, 0.70, 0.90],   # sky
                       [0.32, 0.32, 0.35],   # road: dark grey asphalt
                       [0.62, 0.47, 0.36],   # building: brown brick
                       [0.20, 0.50, 0.20],   # vegetation (unused in urban layouts)
                       [0.85, 0.12, 0.10],   # vehicle: red
                       [0.92, 0.82, 0.20]]),  # thin = persons: yellow
    "highway": np.array([[0.78, 0.83, 0.95],   # sky: paler
                         [0.60, 0.47, 0.37],   # road: almost the urban building colour
                         [0.40, 0.40, 0.45],   # building (unused in highway layouts)
                         [0.22, 0.55, 0.18],   # vegetation
                         [0.12, 0.22, 0.85],   # vehicle: blue
                         [0.95, 0.95, 0.95]]),  # thin = lane marks: white
}
DOMAIN_INDEX = {"urban": 0, "highway": 1, "ambiguous": 2}


@dataclass(frozen=True)
class SceneSet:
    """Images `[n, 3, H, W]` float32 in [0, 1] and masks `[n, H, W]` int64 class indices (one domain, one
    split)."""

    images: np.ndarray
    masks: np.ndarray

    def __len__(self) -> int:
        return len(self.masks)


def _urban_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    s = size / 32
    m = np.full((size, size), SKY, dtype=np.int64)
    horizon = int(rng.integers(6, 12) * s)
    m[horizon:] = ROAD
    for side in (0, 1):  # one building block on each side, from a random top down to the bottom
        width, top = int(rng.integers(6, 11) * s), int(rng.integers(1, horizon + 1))
        cols = slice(0, width) if side == 0 else slice(size - width, size)
        m[top:, cols] = BUILDING
    for _ in range(int(rng.integers(1, 4))):  # vehicles 3 × 5 on the road
        r, c = int(rng.integers(horizon + 1, size - 3 * s + 1)), int(rng.integers(6 * s, size - 11 * s + 1))
        m[r:r + int(3 * s), c:c + int(5 * s)] = VEHICLE
    for _ in range(int(rng.integers(1, 4))):  # persons 4 × 2, anywhere below the horizon (pavements and road)
        r, c = int(rng.integers(horizon, size - 4 * s + 1)), int(rng.integers(0, size - 2 * s + 1))
        m[r:r + int(4 * s), c:c + int(2 * s)] = THIN
    return m


def _highway_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    s = size / 32
    m = np.full((size, size), SKY, dtype=np.int64)
    horizon = int(rng.integers(10, 16) * s)
    m[horizon - int(3 * s):horizon] = VEGETATION
    m[horizon:] = ROAD
    phase = int(rng.integers(0, 4))
    for col in (int(rng.integers(9, 12) * s), int(rng.integers(20, 23) * s)):  # two dashed lane lines
        rows = np.arange(horizon, size)
        dashed = rows[((rows + phase) // max(int(2 * s), 1)) % 2 == 0]
        m[dashed, col:col + max(int(s), 1)] = THIN
    for _ in range(int(rng.integers(2, 5))):  # vehicles 3 × 5 on the road
        r, c = int(rng.integers(horizon + 1, size - 3 * s + 1)), int(rng.integers(0, size - 5 * s + 1))
        m[r:r + int(3 * s), c:c + int(5 * s)] = VEHICLE
    return m


def render(mask: np.ndarray, colours: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """Colour a mask `[H, W]` with `colours [L, 3]` and add clipped Gaussian noise; returns `[3, H, W]`."""
    image = colours[mask].transpose(2, 0, 1)
    image = image + rng.normal(0.0, noise, size=image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def scene(domain: str, seed: int, split: str, index: int, size: int = 32, noise: float = 0.06):
    """One scene `(image [3, H, W], mask [H, W])`, a pure function of its arguments."""
    rng = np.random.default_rng([seed, SPLITS.index(split), DOMAIN_INDEX[domain], index])
    if domain == "ambiguous":  # left half urban, right half highway, each rendered in its own colours
        left_img, left = scene("urban", seed, split, 10_000_000 + index, size, noise)
        right_img, right = scene("highway", seed, split, 10_000_000 + index, size, noise)
        half = size // 2
        image = np.concatenate([left_img[:, :, :half], right_img[:, :, half:]], axis=2)
        return image, np.concatenate([left[:, :half], right[:, half:]], axis=1)
    mask = (_urban_mask if domain == "urban" else _highway_mask)(rng, size)
    return render(mask, COLOURS[domain], rng, noise), mask


def generate(domain: str, seed: int, split: str, count: int, size: int = 32, noise: float = 0.06) -> SceneSet:
    """`count` scenes of one domain and split."""
    pairs = [scene(domain, seed, split, i, size, noise) for i in range(count)]
    return SceneSet(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))


# ------------------------------------------------------------------------------------------------ user folder


def _read_pair(image_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    image = np.asarray(Image.open(image_path).convert("RGB"), dtype=np.float32) / 255.0
    mask = np.asarray(Image.open(mask_path), dtype=np.int64)
    if mask.ndim != 2:
        raise ConfigError(f"task.data_path: mask {mask_path} must be single-channel (class index per pixel)")
    if mask.shape != image.shape[:2]:
        raise ConfigError(f"task.data_path: {mask_path} is {mask.shape}, its image is {image.shape[:2]}")
    return image.transpose(2, 0, 1), mask


def read_split(folder: Path) -> SceneSet:
    """`folder/images/*.png` with `folder/masks/<same stem>.png`."""
    images = sorted((folder / "images").glob("*.png"))
    if not images:
        raise ConfigError(f"task.data_path: no images/*.png in {folder}")
    pairs = []
    for path in images:
        mask_path = folder / "masks" / path.name
        if not mask_path.is_file():
            raise ConfigError(f"task.data_path: image {path} has no mask {mask_path}")
        pairs.append(_read_pair(path, mask_path))
    shapes = {p[1].shape for p in pairs}
    if len(shapes) != 1:
        raise ConfigError(f"task.data_path: images in {folder} have different sizes {sorted(shapes)}; "
                          "resize them to one size")
    return SceneSet(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))


def read_folder(data_path: str) -> tuple[dict[str, dict[str, SceneSet]], tuple[str, ...]]:
    """Read the documented layout; returns ({domain: {split: SceneSet}}, class names)."""
    root = Path(data_path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"task.data_path={data_path} is not a folder")
    data: dict[str, dict[str, SceneSet]] = {}
    for domain_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        splits = {s: read_split(domain_dir / s) for s in SPLITS if (domain_dir / s / "images").is_dir()}
        if "train" in splits and "val" not in splits:
            tr = splits["train"]
            val = np.arange(len(tr)) % 10 == 9
            splits["val"] = SceneSet(tr.images[val], tr.masks[val])
            splits["train"] = SceneSet(tr.images[~val], tr.masks[~val])
        if splits:
            data[domain_dir.name] = splits
    train_domains = [d for d, s in data.items() if "train" in s]
    if len(train_domains) < 2:
        raise ConfigError(f"task.data_path={data_path} needs at least two domain folders with a train split "
                          f"(<domain>/train/images/*.png); found {train_domains}")
    names_file = root / "classes.txt"
    max_label = max(int(s.masks.max()) for splits in data.values() for s in splits.values())
    if names_file.is_file():
        names = tuple(line.strip() for line in names_file.read_text().splitlines() if line.strip())
        if max_label >= len(names):
            raise ConfigError(f"task.data_path: a mask holds class {max_label} but classes.txt names "
                              f"{len(names)} classes")
    else:
        names = tuple(f"class{i}" for i in range(max_label + 1))
    return data, names
