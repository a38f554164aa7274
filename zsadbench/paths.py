"""Where zsadbench writes: the results folder (runs, the embedded MLflow store, generated data)."""

from __future__ import annotations

import os
from pathlib import Path


def results_dir() -> Path:
    """Returns the results folder: ``$ZSADBENCH_RESULTS`` or ``./results``."""
    return Path(os.environ.get("ZSADBENCH_RESULTS", "results")).expanduser().resolve()
