"""Shared fixtures: an isolated results folder per test, a small synthetic benchmark, test-only detectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zsadbench import registry


@pytest.fixture(autouse=True)
def isolated_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Points the results folder (runs, embedded MLflow store, generated data) at a fresh temporary folder."""
    folder = tmp_path / "results"
    monkeypatch.setenv("ZSADBENCH_RESULTS", str(folder))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return folder


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic benchmark (3 categories, 48 px), generated once per session."""
    from zsadbench.datasets.synthetic import load_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    load_synthetic(root, image_size=48, n_train=3, n_test_normal=4, n_test_anomalous=4,
                   categories=("carpet", "tile", "brain"))
    return root


SMALL_SYNTHETIC = ["--dataset-option", "image_size=48", "--dataset-option", "n_train=3",
                   "--dataset-option", "n_test_normal=4", "--dataset-option", "n_test_anomalous=4",
                   "--dataset-option", "categories=carpet,tile,brain"]


@pytest.fixture
def test_methods():
    """Registers the test-only detectors for the duration of a test."""
    from detectors import ColourDistance, MutualColour

    registry._discover()
    added = {"test-colour": ColourDistance, "test-mutual": MutualColour}
    for name, cls in added.items():
        registry._methods[name] = cls
        cls.name = name
    ColourDistance.calls.clear()
    MutualColour.seen_sets.clear()
    yield added
    for name in added:
        registry._methods.pop(name, None)


def write_image(path: Path, array: np.ndarray, **save_options) -> Path:
    """Writes a uint8 array as an image file (format from the suffix) and returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **save_options)
    return path


def noise_image(height: int, width: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """Returns a random uint8 image of the given size."""
    rng = np.random.default_rng(seed)
    shape = (height, width, channels) if channels > 1 else (height, width)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def box_mask(height: int, width: int, value: int = 255) -> np.ndarray:
    """Returns a uint8 mask with one rectangle of ``value`` in the upper-left quadrant."""
    mask = np.zeros((height, width), np.uint8)
    mask[1:height // 2, 2:width // 2] = value
    return mask
