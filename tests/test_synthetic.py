"""The synthetic benchmark: deterministic, in the MVTec AD layout, exact masks, industrial and medical categories."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from zsadbench.datasets.synthetic import DEFECTS, MEDICAL, generate

import zsadbench
from zsadbench.data import read_image, read_mask


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))}


def test_generation_is_deterministic(tmp_path: Path) -> None:
    options = dict(image_size=32, n_train=2, n_test_normal=2, n_test_anomalous=3, categories=("tile", "skin"))
    first, second = digest(generate(tmp_path / "a", **options)), digest(generate(tmp_path / "b", **options))
    assert first == second and len(first) == 2 * (2 + 2 + 3 + 3)
    third = digest(generate(tmp_path / "c", **options, seed=1))
    assert third.keys() == first.keys() and third != first


def test_layout_labels_and_masks(synthetic_root: Path) -> None:
    dataset = zsadbench.load_dataset("mvtec", synthetic_root)  # the MVTec loader reads it as is
    assert dataset.categories() == ["brain", "carpet", "tile"]
    synthetic = zsadbench.load_dataset("synthetic", synthetic_root, image_size=48, n_train=3, n_test_normal=4,
                                       n_test_anomalous=4, categories="carpet,tile,brain")
    assert [s.image_path for s in synthetic.samples] == [s.image_path for s in dataset.samples]
    for category in synthetic.categories():
        test = synthetic.test(category)
        assert sum(s.label for s in test) == 4 and len(test) == 8 and len(synthetic.train(category)) == 3
        assert {s.defect_type for s in test if s.label} <= set(DEFECTS[category])
        assert {s.domain for s in test} == {"medical" if category in MEDICAL else "industrial"}
        for sample in test:
            mask = read_mask(sample)
            assert mask.shape == (48, 48)
            assert mask.any() == bool(sample.label)


def test_defect_pixels_differ_from_normal_appearance(synthetic_root: Path) -> None:
    """The mask is exact: the drawn defect changes pixels inside it and nowhere else (same background seed)."""
    dataset = zsadbench.load_dataset("mvtec", synthetic_root)
    sample = next(s for s in dataset.test("carpet") if s.label)
    image = np.asarray(read_image(sample.image_path), np.float64)
    mask = read_mask(sample)
    inside, outside = image[mask].mean(axis=0), image[~mask].mean(axis=0)
    assert np.abs(inside - outside).max() > 40


def test_default_benchmark_is_generated_under_results(isolated_results: Path) -> None:
    dataset = zsadbench.load_dataset("synthetic", image_size=32, n_train=1, n_test_normal=1, n_test_anomalous=2)
    assert dataset.root.parent == isolated_results / "data"
    assert len(dataset.categories()) == 5 and {"brain", "skin"} <= set(dataset.categories())
    again = zsadbench.load_dataset("synthetic", image_size=32, n_train=1, n_test_normal=1, n_test_anomalous=2)
    assert again.root == dataset.root  # cached, not regenerated
