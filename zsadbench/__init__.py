"""zsadbench: a benchmark harness for zero-shot anomaly detection.

Python API (the CLI is a thin layer over it)::

    import zsadbench
    detector = zsadbench.load_method("winclip", pretrained="random")
    dataset = zsadbench.load_dataset("synthetic")
    table = zsadbench.evaluate(detector, dataset)   # per-category and mean metrics (pandas DataFrame)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zsadbench.detector import Detector, FewShot, ImageSet, Trainable, TransductiveDetector
from zsadbench.registry import (
    get_dataset,
    get_method,
    list_datasets,
    list_methods,
    register_dataset,
    register_method,
)
from zsadbench.types import Dataset, Prediction, Sample

if TYPE_CHECKING:
    from pathlib import Path

    import pandas as pd

__version__ = "0.1.0"

__all__ = [
    "Dataset", "Detector", "FewShot", "ImageSet", "Prediction", "Sample", "Trainable", "TransductiveDetector",
    "evaluate", "get_dataset", "get_method", "list_datasets", "list_methods", "load_dataset", "load_method",
    "register_dataset", "register_method",
]


def load_method(name: str, *, seed: int = 0, device: str = "cpu", **config: Any) -> Detector:
    """Returns a ready detector of method ``name``; keyword arguments override its config (dotted keys allowed)."""
    cls = get_method(name)
    return cls(seed=seed, **config).to(device)


def load_dataset(name: str, root: str | Path | None = None, **options: Any) -> Dataset:
    """Returns dataset ``name`` read from ``root`` (the synthetic benchmark needs no root)."""
    return get_dataset(name).load(root, **options)


def evaluate(detector: Detector, dataset: Dataset, **options: Any) -> pd.DataFrame:
    """Returns per-category and mean metrics of ``detector`` on ``dataset`` (see zsadbench.evaluation.evaluate)."""
    from zsadbench.evaluation import evaluate as _evaluate

    return _evaluate(detector, dataset, **options).table()
