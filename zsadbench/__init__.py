"""zsadbench: a benchmark harness for zero-shot anomaly detection.

Python API (the CLI is a thin layer over it)::

    import zsadbench
    detector = zsadbench.load_method("winclip", pretrained="random")
    dataset = zsadbench.load_dataset("synthetic")
    table = zsadbench.evaluate(detector, dataset)   # per-category and mean metrics (pandas DataFrame)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    import pandas as pd

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

__version__ = "0.1.0"

# Names are imported on first use, so that `zsadbench --help` and `import zsadbench.metrics` stay free of torch.
_LAZY = {
    "Detector": "zsadbench.detector", "FewShot": "zsadbench.detector", "ImageSet": "zsadbench.detector",
    "Trainable": "zsadbench.detector", "TransductiveDetector": "zsadbench.detector",
    "get_dataset": "zsadbench.registry", "get_method": "zsadbench.registry", "list_datasets": "zsadbench.registry",
    "list_methods": "zsadbench.registry", "register_dataset": "zsadbench.registry",
    "register_method": "zsadbench.registry",
    "Dataset": "zsadbench.types", "Prediction": "zsadbench.types", "Sample": "zsadbench.types",
}

__all__ = [
    "Dataset", "Detector", "FewShot", "ImageSet", "Prediction", "Sample", "Trainable", "TransductiveDetector",
    "evaluate", "get_dataset", "get_method", "list_datasets", "list_methods", "load_dataset", "load_method",
    "register_dataset", "register_method",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'zsadbench' has no attribute {name!r}")


def load_method(name: str, *, seed: int = 0, device: str = "cpu", **config: Any) -> Detector:
    """Returns a ready detector of method ``name``, built after seeding every RNG with ``seed``.

    Keyword arguments override its config (dotted keys allowed for groups: ``**{"train.lr": 1e-4}``).
    """
    from zsadbench.registry import get_method
    from zsadbench.seeding import seed_everything

    cls = get_method(name)
    seed_everything(seed)
    return cls(seed=seed, **config).to(device)


def load_dataset(name: str, root: str | Path | None = None, **options: Any) -> Dataset:
    """Returns dataset ``name`` read from ``root`` (the synthetic benchmark needs no root)."""
    from zsadbench.registry import get_dataset

    return get_dataset(name).load(root, **options)


def evaluate(detector: Detector, dataset: Dataset, categories: list[str] | None = None, *, batch_size: int = 8,
             num_workers: int = 0, resolution: str = "input", mask_resize: str = "bilinear", aupro: str = "exact",
             skip_bad: bool = False, progress: bool = True) -> pd.DataFrame:
    """Returns per-category and mean metrics (fractions in [0, 1]) of ``detector`` on ``dataset`` as a DataFrame.

    The keywords are ``zsadbench run``'s evaluation options (``--batch-size``, ``--eval-resolution``,
    ``--mask-resize``, ``--aupro``, ``--skip-bad``); see :class:`zsadbench.evaluation.EvalOptions`.
    """
    from zsadbench.evaluation import EvalOptions
    from zsadbench.evaluation import evaluate as run_evaluation

    options = EvalOptions(batch_size=batch_size, num_workers=num_workers, resolution=resolution,
                          mask_resize=mask_resize, aupro=aupro, skip_bad=skip_bad)
    return run_evaluation(detector, dataset, categories, options, progress=progress).table()
