"""A procedural benchmark that needs no download: textures, objects and medical-like scans with exact defect masks.

Every image is drawn from a seeded generator, so the same options give bit-identical files. The benchmark is written
in the MVTec AD layout and read back by the MVTec-tree reader (``{category}/train/good``, ``test/good``,
``test/{defect}``, ``ground_truth/{defect}/NNN_mask.png``), so it exercises the same code path as real data. Its
test split holds anomalies with masks, so it also serves as auxiliary training data (the protocol of AnomalyCLIP and
its successors trains on another dataset's test split).

Categories: ``carpet`` (woven texture), ``tile`` (tiles and grout), ``bottle`` (a round object seen from above),
``brain`` (an MRI-like axial slice, medical) and ``skin`` (a dermoscopy-like patch, medical). Defects are drawn with
hard edges inside an exact mask: scratches, holes, stains and cracks (industrial), tumours and lesions (medical).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from zsadbench.paths import results_dir
from zsadbench.registry import register_dataset
from zsadbench.types import Dataset

VERSION = 1  # bump when the drawing code changes: cached trees are keyed by it
MARKER = "synthetic.json"  # the file that makes a folder a synthetic benchmark (the only kind ever replaced)
MEDICAL = ("brain", "skin")
DEFECTS = {
    "carpet": ("scratch", "hole", "stain"),
    "tile": ("crack", "hole", "stain"),
    "bottle": ("scratch", "crack", "stain"),
    "brain": ("tumor", "lesion"),
    "skin": ("lesion", "stain"),
}


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Returns zero-mean, unit-std Gaussian-filtered noise of shape (size, size)."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-8)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    return y / size, x / size


def _carpet(rng: np.random.Generator, size: int) -> np.ndarray:
    y, x = _grid(size)
    period, phase = rng.uniform(9, 11), rng.uniform(0, 2 * np.pi, 2)
    weave = np.sin(2 * np.pi * period * x + phase[0]) * np.sin(2 * np.pi * period * y + phase[1])
    base = 0.55 + 0.12 * weave + 0.05 * _smooth_noise(rng, size, 1.0)
    tint = np.array([0.75, 0.55, 0.4]) * rng.uniform(0.95, 1.05)
    return base[..., None] * tint


def _tile(rng: np.random.Generator, size: int) -> np.ndarray:
    y, x = _grid(size)
    cells, offset = 4, rng.uniform(0, 1, 2)
    fy, fx = (y * cells + offset[0]) % 1.0, (x * cells + offset[1]) % 1.0
    grout = (np.minimum(fy, 1 - fy) < 0.06) | (np.minimum(fx, 1 - fx) < 0.06)
    base = 0.7 + 0.04 * _smooth_noise(rng, size, 2.0)
    base = np.where(grout, 0.35, base)
    return base[..., None] * np.array([0.85, 0.85, 0.9])


def _bottle(rng: np.random.Generator, size: int) -> np.ndarray:
    y, x = _grid(size)
    cy, cx = 0.5 + rng.uniform(-0.03, 0.03, 2)
    r = np.hypot(y - cy, x - cx)
    image = np.full((size, size, 3), 0.08) + 0.02 * _smooth_noise(rng, size, 3.0)[..., None]
    body = r < 0.38
    image[body] = (np.array([0.2, 0.45, 0.25]) * (1.1 - r[body, None] * 1.2))
    image[r < 0.16] = np.array([0.05, 0.12, 0.06])  # the bottle's neck seen from above
    ring = np.abs(r - 0.27) < 0.015
    image[ring] = np.array([0.35, 0.6, 0.4])
    return image


def _brain(rng: np.random.Generator, size: int) -> np.ndarray:
    y, x = _grid(size)
    cy, cx = 0.5 + rng.uniform(-0.02, 0.02, 2)
    e = np.hypot((y - cy) / 0.42, (x - cx) / 0.34)
    tissue = 0.45 + 0.08 * _smooth_noise(rng, size, 2.5) + 0.1 * np.cos(12 * np.arctan2(y - cy, x - cx)) * (e > 0.6)
    image = np.where(e < 0.85, tissue, 0.0)
    image = np.where((e >= 0.85) & (e < 1.0), 0.85, image)  # skull
    ventricles = np.hypot((y - cy) / 0.05, (np.abs(x - cx) - 0.06) / 0.03) < 1
    image = np.where(ventricles, 0.15, image)
    return np.repeat(image[..., None], 3, axis=2)


def _skin(rng: np.random.Generator, size: int) -> np.ndarray:
    base = 0.72 + 0.03 * _smooth_noise(rng, size, 4.0) + 0.015 * _smooth_noise(rng, size, 0.8)
    image = base[..., None] * np.array([0.95, 0.75, 0.65])
    y, x = _grid(size)
    for _ in range(rng.integers(2, 5)):  # small benign freckles are normal
        cy, cx, rad = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.01, 0.02)
        image[np.hypot(y - cy, x - cx) < rad] *= 0.8
    return image


BACKGROUNDS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "carpet": _carpet, "tile": _tile, "bottle": _bottle, "brain": _brain, "skin": _skin,
}


def _blob(rng: np.random.Generator, size: int, radius: tuple[float, float], center: tuple[float, float]) -> np.ndarray:
    """Returns a boolean mask of an irregular blob (an ellipse with a noisy boundary)."""
    y, x = _grid(size)
    cy, cx = center
    ry, rx = rng.uniform(*radius, 2)
    angle = rng.uniform(0, np.pi)
    dy, dx = y - cy, x - cx
    u, v = dy * np.cos(angle) + dx * np.sin(angle), -dy * np.sin(angle) + dx * np.cos(angle)
    wobble = 1 + 0.25 * _smooth_noise(rng, size, size / 12)
    return np.hypot(u / ry, v / rx) < wobble.clip(0.5, 1.5)


def _polyline(rng: np.random.Generator, size: int, n: int, step: float, width: float, jagged: float) -> np.ndarray:
    """Returns a boolean mask of a thick random polyline (a scratch when smooth, a crack when jagged)."""
    points = [rng.uniform(0.25, 0.75, 2)]
    heading = rng.uniform(0, 2 * np.pi)
    for _ in range(n):
        heading += rng.normal(0, jagged)
        points.append(np.clip(points[-1] + step * np.array([np.sin(heading), np.cos(heading)]), 0.05, 0.95))
    y, x = _grid(size)
    mask = np.zeros((size, size), bool)
    for a, b in zip(points[:-1], points[1:]):
        ab = b - a
        t = np.clip(((y - a[0]) * ab[0] + (x - a[1]) * ab[1]) / (ab @ ab + 1e-12), 0, 1)
        mask |= np.hypot(y - a[0] - t * ab[0], x - a[1] - t * ab[1]) < width / 2
    return mask


def _draw_defect(rng: np.random.Generator, image: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (image with the defect, its exact boolean mask)."""
    size = image.shape[0]
    px = 1.0 / size
    center = tuple(rng.uniform(0.3, 0.7, 2))
    if kind == "scratch":
        mask = _polyline(rng, size, 3, 0.12, max(2.5 * px, 0.02), 0.2)
        colour = np.array([0.95, 0.95, 0.9])
    elif kind == "crack":
        mask = _polyline(rng, size, 8, 0.05, max(2.0 * px, 0.015), 0.9)
        colour = np.array([0.05, 0.04, 0.04])
    elif kind == "hole":
        mask = _blob(rng, size, (0.05, 0.09), center)
        colour = np.array([0.02, 0.02, 0.02])
    elif kind == "stain":
        mask = _blob(rng, size, (0.07, 0.12), center)
        colour = np.array([0.55, 0.2, 0.6])
    elif kind == "tumor":
        mask = _blob(rng, size, (0.06, 0.1), center)
        colour = np.array([0.95, 0.95, 0.95])
    elif kind == "lesion":
        mask = _blob(rng, size, (0.08, 0.13), center)
        colour = np.array([0.25, 0.12, 0.08])
    else:
        raise ValueError(f"unknown defect kind {kind!r}")
    out = image.copy()
    shade = 1 + 0.1 * _smooth_noise(rng, size, 2.0)[..., None]
    out[mask] = (colour * shade)[mask]
    return out, mask


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(array * 255 + 0.5, 0, 255).astype(np.uint8)).save(path)


def generate(root: Path, *, image_size: int = 128, n_train: int = 6, n_test_normal: int = 6,
             n_test_anomalous: int = 6, categories: tuple[str, ...] = tuple(BACKGROUNDS), seed: int = 0) -> Path:
    """Writes the benchmark in the MVTec AD layout under ``root`` and returns ``root``."""
    unknown = [c for c in categories if c not in BACKGROUNDS]
    if unknown:
        raise ValueError(f"unknown synthetic categories {unknown}; available: {list(BACKGROUNDS)}")
    for ci, category in enumerate(categories):
        draw = BACKGROUNDS[category]
        for split_index, (split, count) in enumerate((("train", n_train), ("test", n_test_normal))):
            for i in range(count):
                rng = np.random.default_rng([seed, ci, split_index, i])
                _save(draw(rng, image_size), root / category / split / "good" / f"{i:03d}.png")
        kinds = DEFECTS[category]
        counters = dict.fromkeys(kinds, 0)
        for i in range(n_test_anomalous):
            kind = kinds[i % len(kinds)]
            rng = np.random.default_rng([seed, ci, 2, i])
            image, mask = _draw_defect(rng, draw(rng, image_size), kind)
            if category == "brain":  # MRI is grayscale, its defects too
                image = np.repeat(image.mean(axis=2, keepdims=True), 3, axis=2)
            n, counters[kind] = counters[kind], counters[kind] + 1
            _save(image, root / category / "test" / kind / f"{n:03d}.png")
            _save(mask.astype(np.float64), root / category / "ground_truth" / kind / f"{n:03d}_mask.png")
    return root


def _cache_root(options: dict) -> Path:
    key = hashlib.sha256(json.dumps({"version": VERSION, **options}, sort_keys=True).encode()).hexdigest()[:12]
    return results_dir() / "data" / f"synthetic-v{VERSION}-{key}"


@register_dataset("synthetic", description="procedural benchmark (3 industrial + 2 medical categories), no download",
                  layout="generated on first use under results/data/ (or --data-root)", needs_root=False)
def load_synthetic(root: Path | None = None, *, image_size: int = 128, n_train: int = 6, n_test_normal: int = 6,
                   n_test_anomalous: int = 6, categories: str | tuple[str, ...] = tuple(BACKGROUNDS),
                   seed: int = 0) -> Dataset:
    """Synthetic benchmark: carpet, tile, bottle (industrial), brain, skin (medical); generated on first use."""
    from zsadbench.datasets.mvtec import read_tree

    if isinstance(categories, str):
        categories = tuple(c.strip() for c in categories.split(",") if c.strip())
    counts = {"image_size": int(image_size), "n_train": int(n_train), "n_test_normal": int(n_test_normal),
              "n_test_anomalous": int(n_test_anomalous), "seed": int(seed)}
    if min(counts["n_train"], counts["n_test_normal"], counts["n_test_anomalous"]) < 0 or counts["image_size"] < 16:
        raise ValueError(f"synthetic options out of range: {counts}")
    unknown = [c for c in categories if c not in BACKGROUNDS]
    if unknown or not categories:
        raise ValueError(f"synthetic categories {unknown or '(none)'}: choose from {', '.join(BACKGROUNDS)}")
    options: dict[str, Any] = {**counts, "categories": list(categories)}
    target = Path(root) if root is not None else _cache_root(options)
    manifest = target / MARKER
    if not manifest.is_file() or json.loads(manifest.read_text()) != {"version": VERSION, **options}:
        if target.exists() and not manifest.is_file() and (not target.is_dir() or any(target.iterdir())):
            # never replace a folder that is not a synthetic benchmark: it may hold the user's files
            raise ValueError(f"--data-root {target} is not empty and not a synthetic benchmark (no {MARKER}); "
                             "pass an empty or new folder, or leave --data-root out to use the results folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=target.parent))
        try:  # generate aside, then move into place: an interrupted generation never looks complete
            generate(staging, **counts, categories=tuple(categories))
            (staging / MARKER).write_text(json.dumps({"version": VERSION, **options}, sort_keys=True))
            if target.exists():  # empty, or a synthetic benchmark of other options (checked above)
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    samples = read_tree(target, "synthetic", domain=lambda c: "medical" if c in MEDICAL else "industrial")
    return Dataset("synthetic", target, samples, "industrial", "zsadbench synthetic benchmark")
