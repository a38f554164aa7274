"""Paper-reported numbers (``results/paper_reported.csv``) and whether a measured number can be compared with them.

One row per method x dataset x category x metric x source, values in percent as published. ``metric_variant`` names
the implementation behind a published number, in the vocabulary of :data:`VARIANTS`; a measured number is comparable
with a reported one only when both variants agree (our exact AUPRO is not the papers' 200-step AUPRO, and AdaptCLIP's
trapezoid AUPR is not the step-wise AP we compute). ``results/paper_reported.md`` documents the columns and sources.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from zsadbench.metrics import METRIC_NAMES
from zsadbench.paths import results_dir

COLUMNS = ("method", "dataset", "category", "metric", "value_pct", "metric_variant", "shots", "training_set",
           "backbone", "source_kind", "source", "notes")
VARIANTS = {
    "auroc": "area under the ROC curve (exact; every implementation agrees)",
    "ap.step": "step-wise average precision (sklearn average_precision_score; what zsadbench computes)",
    "ap.trapz": "trapezoid area under the PR curve (AdaptCLIP's 'AUPR'; not comparable with ap.step)",
    "ap.unconfirmed": "an AP or AUPR whose implementation the source does not state",
    "f1max": "maximum F1 over all thresholds",
    "aupro.exact": "official MVTec AD AU-PRO@0.3 (what zsadbench computes by default)",
    "aupro.step200": "AnomalyCLIP / MuSc / cflow AUPRO: 200 score steps, rescaled FPR axis (`--aupro step200`)",
    "aupro.anomalib": "the older anomalib AUPRO AdaptCLIP vendors (resampled per-region curves)",
    "aupro.unconfirmed": "a PRO whose implementation the source does not state",
}
SOURCE_KINDS = ("paper", "code-release", "reproduction", "secondary")
FILENAME = "paper_reported.csv"

# Methods whose publications give no absolute number to put beside ours, and what they give instead.
METHOD_NOTES = {
    "headclip": "HeadCLIP publishes only relative gains (arXiv 2505.22259v2 abstract): up to +4.9 / +3.7 %p pixel / "
                "image mAD on industrial and +3.2 / +3.2 %p on medical datasets over the best prior method, with an "
                "unpublished mAD definition; zsadbench's HeadCLIP is a labelled reconstruction, so there is nothing "
                "to compare its numbers with (results/paper_reported.md).",
}

COMPARABLE = "comparable"
NOT_COMPARABLE = "not comparable"
UNCONFIRMED = "variant unconfirmed"


def default_path() -> Path | None:
    """Returns the paper-reported table: ``results/`` of the results folder, else of the source checkout, else None."""
    for folder in (results_dir(), Path(__file__).resolve().parents[1] / "results"):
        if (folder / FILENAME).is_file():
            return folder / FILENAME
    return None


def load_reported(path: str | Path | None = None) -> pd.DataFrame:
    """Returns the paper-reported table, validated (an empty table when no file is found and none was asked for)."""
    if path is None:
        path = default_path()
        if path is None:
            return pd.DataFrame(columns=list(COLUMNS))
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"paper-reported numbers not found: {path}")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; expected {list(COLUMNS)}")
    problems = []
    values = pd.to_numeric(table["value_pct"], errors="coerce")
    for index, row in table.iterrows():
        line = index + 2  # header is line 1
        if math.isnan(values[index]) or not 0 <= values[index] <= 100:
            problems.append(f"line {line}: value_pct {row.value_pct!r} is not a percentage in [0, 100]")
        if row.metric not in METRIC_NAMES:
            problems.append(f"line {line}: unknown metric {row.metric!r} (one of {', '.join(METRIC_NAMES)})")
        if row.metric_variant not in VARIANTS:
            problems.append(f"line {line}: unknown metric_variant {row.metric_variant!r} "
                            f"(one of {', '.join(VARIANTS)})")
        if row.source_kind not in SOURCE_KINDS:
            problems.append(f"line {line}: unknown source_kind {row.source_kind!r} (one of {', '.join(SOURCE_KINDS)})")
        if not row.source.strip():
            problems.append(f"line {line}: every number needs its source")
        if not row.shots.isdigit():
            problems.append(f"line {line}: shots must be a whole number, got {row.shots!r}")
    if problems:
        raise ValueError(f"{path}: {len(problems)} invalid rows:\n  " + "\n  ".join(problems[:20]))
    table["value"] = values / 100
    table["shots"] = table["shots"].astype(int)
    return table


def measured_variant(metric: str, aupro: str = "exact", tags: dict[str, str] | None = None) -> str:
    """Returns the variant of a measured metric, from the run's implementation tags or its ``eval.aupro`` setting."""
    tag = (tags or {}).get(metric, "")
    if metric.endswith("aupro"):
        kind = tag.split("@")[0].split(".")[1] if tag.startswith("aupro.") else aupro
        return f"aupro.{kind}"
    if metric.endswith("_ap"):
        return "ap.trapz" if tag.startswith("ap.trapz") else "ap.step"
    if metric.endswith("_auroc"):
        return "auroc"
    if metric.endswith("_f1max"):
        return "f1max"
    return metric


def comparability(measured: str, reported: str) -> str:
    """Returns whether a measured and a reported number of the given variants can be compared."""
    if measured == reported:
        return COMPARABLE
    if reported.endswith(".unconfirmed"):
        return UNCONFIRMED
    return NOT_COMPARABLE


def _backbone(model: str, size: str) -> str:
    return f"{model.lower().removesuffix('-quickgelu')}@{size.split('x')[0]}" if model else ""


def matching(table: pd.DataFrame, method: str, dataset: str, shots: int, model: str = "", image_size: str = "",
             default_backbone: bool = True) -> pd.DataFrame:
    """Returns the reported rows that describe the same method, dataset and shots as a measured run.

    Rows that name a backbone match a run with that backbone (open_clip name @ input size, ``-quickgelu`` ignored);
    rows without one describe the method's published default and match a run of the default backbone.
    """
    if table.empty:
        return table
    rows = table[(table["method"] == method) & (table["dataset"] == dataset) & (table["shots"] == shots)]
    ours = _backbone(model, image_size)
    named = rows["backbone"].map(lambda b: _backbone(*b.split("@")) if "@" in b else b.lower())
    keep = (rows["backbone"] != "") & (named == ours)
    if default_backbone:
        keep |= rows["backbone"] == ""
    return rows[keep]
