"""``zsadbench run``: load a method and a dataset, evaluate, write the results folder, record an MLflow run.

Results of run ``<id>`` (the MLflow run id) go to ``results/runs/<id>/``: ``state.json`` (what was asked, for
``--resume``), ``categories/<category>.json`` (written as each category finishes), and at the end ``results.json``,
``metrics.csv``, ``scores.csv`` (every image's score), ``config.json`` and ``overlays/*.png``. An interrupted run
resumes with ``--resume <id>`` without recomputing finished categories.
"""

from __future__ import annotations

import json
import logging
import random
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from zsadbench.config import to_dict
from zsadbench.evaluation import CategoryResult, EvalOptions, EvaluationResult, evaluate
from zsadbench.metrics import MetricWarning
from zsadbench.paths import results_dir
from zsadbench.registry import get_dataset, get_method
from zsadbench.tracking import KIND_TAG, Tracker, environment, weights_id
from zsadbench.visualize import save_overlay

log = logging.getLogger(__name__)

COLUMN_TITLES = {
    "image_auroc": "I-AUROC", "image_ap": "I-AP", "image_f1max": "I-F1max", "pixel_auroc": "P-AUROC",
    "pixel_ap": "P-AP", "pixel_f1max": "P-F1max", "pixel_aupro": "AUPRO", "mad_image": "mAD-img",
    "mad_pixel": "mAD-px", "mad_all7": "mAD-all7",
}


@dataclass
class RunSpec:
    """Everything a run was asked to do (stored in state.json so that ``--resume`` repeats it exactly)."""

    method: str
    dataset: str
    data_root: str | None = None
    categories: list[str] | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    dataset_options: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    device: str = "cpu"
    eval: EvalOptions = field(default_factory=EvalOptions)
    experiment: str = "zsadbench"
    run_name: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSpec:
        """Returns the spec stored by ``asdict``."""
        return cls(**{**data, "eval": EvalOptions(**data["eval"])})


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
        run_dir = results_dir() / "runs" / resume
        state = run_dir / "state.json"
        if not state.is_file():
            raise FileNotFoundError(f"cannot resume run {resume!r}: {state} not found (runs live in "
                                    f"{results_dir() / 'runs'})")
        spec = RunSpec.from_json(json.loads(state.read_text())["spec"])
        for file in sorted((run_dir / "categories").glob("*.json")):
            finished_category = CategoryResult.from_json(json.loads(file.read_text()))
            done[finished_category.category] = finished_category
    if spec is None:
        raise ValueError("run() needs a RunSpec or a run id to resume")

    seed_everything(spec.seed)
    method_cls = get_method(spec.method)
    dataset = get_dataset(spec.dataset).load(spec.data_root, **spec.dataset_options)
    categories = spec.categories or dataset.categories("test")
    if spec.categories:
        dataset = dataset.subset(spec.categories)
    detector = method_cls(seed=spec.seed, **spec.overrides).to(spec.device)
    config = to_dict(detector.config)

    tracker = Tracker(tracking_uri, spec.experiment)
    if resume is not None:
        tracker.resume(resume)
        run_id = resume
    else:
        run_id = tracker.start(spec.run_name or f"{spec.method}-{spec.dataset}", {
            KIND_TAG: "evaluation", "zsadbench.method": spec.method, "zsadbench.dataset": spec.dataset,
            "zsadbench.method_label": method_cls.display_name()})
    run_dir = results_dir() / "runs" / run_id
    (run_dir / "categories").mkdir(parents=True, exist_ok=True)
    (run_dir / "state.json").write_text(json.dumps({"spec": asdict(spec), "run_id": run_id}, indent=2, default=str))

    pretrained = getattr(detector.config, "pretrained", None)
    params = {"method": spec.method, "method_label": method_cls.display_name(), "dataset": spec.dataset,
              "data_root": spec.data_root, "categories": ",".join(categories), "seed": spec.seed,
              "device": spec.device, "image_size": "x".join(map(str, detector.input_size)),
              **{f"dataset_option.{k}": v for k, v in spec.dataset_options.items()},
              **{f"eval.{k}": v for k, v in asdict(spec.eval).items()},
              **{f"config.{k}": v for k, v in detector.resolved_config().items()},
              **environment(), **detector.describe()}
    if pretrained is not None:
        params["weights"] = weights_id(pretrained)
    tracker.log_params(params)

    def finished(result: CategoryResult) -> None:
        (run_dir / "categories" / f"{result.category}.json").write_text(json.dumps(result.to_json()))
        tracker.log_metrics({f"{result.category}/{k}": v for k, v in result.metrics.items()})

    try:
        result = evaluate(detector, dataset, categories, spec.eval, done=done, on_category=finished,
                          progress=progress)
    except KeyboardInterrupt:
        tracker.finish("interrupted")
        log.error("interrupted; resume with: zsadbench run --resume %s", run_id)
        raise
    except BaseException:
        tracker.finish("failed")
        log.error("run %s failed; finished categories are kept, resume with: zsadbench run --resume %s",
                  run_id, run_id)
        raise

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        mean = result.mean()
    tracker.log_metrics(mean)
    _write_outputs(run_dir, result, config, spec.dataset)
    if json_path is not None:
        write_json(result, json_path)
    tracker.log_artifacts(run_dir)
    tracker.finish("complete")
    return run_id, result
