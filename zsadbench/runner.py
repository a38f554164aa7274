"""``zsadbench run``: load a method and a dataset, evaluate, write the results folder, record an MLflow run.

Results of run ``<id>`` (the MLflow run id) go to ``results/runs/<id>/``: ``state.json`` (what was asked, for
``--resume``), ``categories/<category>.json`` (written as each category finishes), and at the end ``results.json``,
``metrics.csv``, ``scores.csv`` (every image's score), ``config.json`` and ``overlays/*.png``. An interrupted run
resumes with ``--resume <id>`` without recomputing finished categories.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from zsadbench.config import to_dict
from zsadbench.evaluation import CategoryResult, EvalOptions, EvaluationResult, evaluate
from zsadbench.jobs import JobSpec, build, job_params, open_run, read_state
from zsadbench.metrics import IMPLEMENTATION_TAGS, MAD_RECIPES, MetricWarning, aupro_tag
from zsadbench.visualize import save_overlay

log = logging.getLogger(__name__)

COLUMN_TITLES = {
    "image_auroc": "I-AUROC", "image_ap": "I-AP", "image_f1max": "I-F1max", "pixel_auroc": "P-AUROC",
    "pixel_ap": "P-AP", "pixel_f1max": "P-F1max", "pixel_aupro": "AUPRO", "mad_image": "mAD-img",
    "mad_pixel": "mAD-px", "mad_all7": "mAD-all7",
}


@dataclass
class RunSpec(JobSpec):
    """An evaluation job: the shared job fields plus how the dataset is evaluated."""

    eval: EvalOptions = field(default_factory=EvalOptions)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSpec:
        """Returns the spec stored by ``asdict``."""
        return cls(**{**data, "eval": EvalOptions(**data["eval"])})


def format_table(result: EvaluationResult) -> str:
    """Returns the per-category and mean table as text, values in percent."""
    table = result.table() * 100
    table = table.rename(columns=COLUMN_TITLES)
    return table.to_string(float_format=lambda v: f"{v:6.2f}", na_rep="   n/a")


def write_json(result: EvaluationResult, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Writes {"categories": {...}, "mean": {...}, "tags": {category: {metric: implementation}}} (plus ``extra``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tags = {c: r.tags for c, r in result.categories.items()}
    path.write_text(json.dumps({**result.to_json(), "tags": tags, **(extra or {})}, indent=2))
    return path


def metric_definitions(options: EvalOptions) -> dict[str, str]:
    """Returns the run parameters that define the metrics: each metric's implementation and each mAD recipe."""
    tags = {**IMPLEMENTATION_TAGS, "pixel_aupro": aupro_tag(options.aupro)}
    return {**{f"metric.{name}": tag for name, tag in tags.items() if not name.startswith("mad_")},
            **{f"mad_recipe.{recipe}": "mean(" + ", ".join(names) + ")" for recipe, names in MAD_RECIPES.items()}}


def _write_outputs(run_dir: Path, result: EvaluationResult, config: dict[str, Any], dataset: str) -> None:
    write_json(result, run_dir / "results.json")
    result.table().to_csv(run_dir / "metrics.csv", index_label="category")
    rows = [{"category": c, "image": p, "label": y, "score": s}
            for c, r in result.categories.items() for p, y, s in zip(r.image_paths, r.labels, r.image_scores)]
    pd.DataFrame(rows).to_csv(run_dir / "scores.csv", index=False)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    for category, r in result.categories.items():
        for n, overlay in enumerate(r.overlays):
            save_overlay(overlay.sample.image_path, overlay.anomaly_map, overlay.mask,
                         run_dir / "overlays" / f"{category}_{n}.png",
                         f"{dataset} / {category} / {overlay.sample.defect_type}")


def run(spec: RunSpec | None = None, *, resume: str | None = None, tracking_uri: str | None = None,
        json_path: str | Path | None = None, progress: bool = True) -> tuple[str, EvaluationResult]:
    """Runs (or resumes) an evaluation and returns (run id, result)."""
    done: dict[str, CategoryResult] = {}
    if resume is not None:
        folder, stored = read_state("runs", resume)
        spec = RunSpec.from_json(stored)
        for file in sorted((folder / "categories").glob("*.json")):
            finished_category = CategoryResult.from_json(json.loads(file.read_text()))
            done[finished_category.category] = finished_category
    if spec is None:
        raise ValueError("run() needs a RunSpec or a run id to resume")

    method_cls, dataset, detector = build(spec)
    categories = spec.categories or dataset.categories("test")
    job = open_run(spec, method_cls, kind="evaluation", folder_name="runs", command="zsadbench run",
                   tracking_uri=tracking_uri, resume=resume)
    run_dir, tracker = job.folder, job.tracker
    (run_dir / "categories").mkdir(exist_ok=True)
    tracker.log_params({**job_params(spec, method_cls, detector, categories),
                        **{f"eval.{k}": v for k, v in asdict(spec.eval).items()}, **metric_definitions(spec.eval)})

    def finished(result: CategoryResult) -> None:
        (run_dir / "categories" / f"{result.category}.json").write_text(json.dumps(result.to_json()))
        tracker.log_metrics({f"{result.category}/{k}": v for k, v in result.metrics.items()})

    with job.finishing():
        result = evaluate(detector, dataset, categories, spec.eval, done=done, on_category=finished,
                          progress=progress)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        mean = result.mean()
    tracker.log_metrics(mean)
    _write_outputs(run_dir, result, to_dict(detector.config), spec.dataset)
    if json_path is not None:
        write_json(result, json_path)
    tracker.log_artifacts(run_dir)
    tracker.finish("complete")
    return job.run_id, result
