"""Recorded runs read back from MLflow (the embedded store or a server), and which of them a report uses.

A leaderboard row is one *setup*: a method with its backbone, image size, weights, checkpoint, shots, evaluation
protocol (AUPRO variant, resolution) and category set, on one dataset (name plus loader options). When several runs
exist for a setup, the newest complete one is used (``zsadbench.status`` = complete); the others are kept on the
selection so that a report can say which run it used and what it passed over.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zsadbench.paths import results_dir
from zsadbench.tracking import KIND_TAG, STATUS_TAG, tracking_uri

log = logging.getLogger(__name__)

_MLFLOW_STATUS = {"FINISHED": "complete", "FAILED": "failed", "KILLED": "interrupted", "RUNNING": "running",
                  "SCHEDULED": "running"}


def _clean(value: str | None) -> str:
    return "" if value in (None, "None", "none", "null") else str(value)


@dataclass
class RunRecord:
    """One evaluation run as MLflow stores it: parameters, tags, class-mean and per-category metrics."""

    run_id: str
    run_name: str
    start_time: dt.datetime
    status: str  # complete | running | interrupted | failed
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]  # class means, by metric name
    category_metrics: dict[str, dict[str, float]]  # category -> metric -> value

    @classmethod
    def from_mlflow(cls, run: Any) -> RunRecord:
        """Returns the record of an ``mlflow.entities.Run``."""
        params, tags = dict(run.data.params), dict(run.data.tags)
        means: dict[str, float] = {}
        per_category: dict[str, dict[str, float]] = {}
        for key, value in run.data.metrics.items():
            category, sep, metric = key.rpartition("/")
            if sep:
                per_category.setdefault(category, {})[metric] = float(value)
            else:
                means[key] = float(value)
        status = tags.get(STATUS_TAG) or _MLFLOW_STATUS.get(run.info.status, run.info.status.lower())
        start = dt.datetime.fromtimestamp((run.info.start_time or 0) / 1000, tz=dt.UTC)
        return cls(run.info.run_id, run.info.run_name or "", start, status, params, tags, means, per_category)

    @property
    def method(self) -> str:
        """Returns the registered method name."""
        return self.params.get("method") or self.tags.get("zsadbench.method", "?")

    @property
    def method_label(self) -> str:
        """Returns the method's display name (e.g. "HeadCLIP (reconstruction)")."""
        return self.params.get("method_label") or self.tags.get("zsadbench.method_label") or self.method

    @property
    def dataset(self) -> str:
        """Returns the registered dataset name."""
        return self.params.get("dataset") or self.tags.get("zsadbench.dataset", "?")

    @property
    def dataset_options(self) -> dict[str, str]:
        """Returns the loader options the run was given (e.g. the synthetic benchmark's size)."""
        prefix = "dataset_option."
        return {k[len(prefix):]: v for k, v in sorted(self.params.items()) if k.startswith(prefix)}

    @property
    def dataset_key(self) -> str:
        """Returns the dataset with its options, e.g. ``synthetic[image_size=48]``: runs on it share one table."""
        options = self.dataset_options
        return self.dataset + (f"[{', '.join(f'{k}={v}' for k, v in options.items())}]" if options else "")

    @property
    def categories(self) -> list[str]:
        """Returns the categories the run evaluated."""
        listed = [c for c in self.params.get("categories", "").split(",") if c]
        return listed or sorted(self.category_metrics)

    @property
    def backbone(self) -> str:
        """Returns the backbone (``config.model``), or "" for a method without one."""
        return _clean(self.params.get("config.model"))

    @property
    def image_size(self) -> str:
        """Returns the method's input size as recorded (``HxW``)."""
        return _clean(self.params.get("image_size"))

    @property
    def weights(self) -> str:
        """Returns the weights: an open_clip tag, ``sha256:<hash>`` of a local file, ``random``, or ""."""
        return _clean(self.params.get("weights") or self.params.get("config.pretrained"))

    @property
    def checkpoint(self) -> str:
        """Returns the trained checkpoint the method loaded (a file name), or ""."""
        value = _clean(self.params.get("config.checkpoint"))
        return Path(value).name if value else ""

    @property
    def shots(self) -> int:
        """Returns k, the normal reference images per category (0 = zero-shot)."""
        try:
            return int(float(self.params.get("config.shots", 0)))
        except ValueError:
            return 0

    @property
    def random_weights(self) -> bool:
        """Returns whether the run used random weights (its numbers say nothing about the method)."""
        return self.weights == "random"

    @property
    def metric_tags(self) -> dict[str, str]:
        """Returns the implementation tag of each metric, as the run recorded them (``metric.<name>`` params)."""
        prefix = "metric."
        return {k[len(prefix):]: v for k, v in self.params.items() if k.startswith(prefix)}

    @property
    def aupro_variant(self) -> str:
        """Returns the AUPRO implementation used: ``exact`` (default) or ``step200``."""
        return self.params.get("eval.aupro", "exact")

    @property
    def resolution(self) -> str:
        """Returns the evaluation resolution: ``input`` (the method's input size) or ``native``."""
        return self.params.get("eval.resolution", "input")

    @property
    def setup_key(self) -> tuple[Any, ...]:
        """Returns what identifies a leaderboard row within a dataset (runs with equal keys replace each other)."""
        return (self.method, self.backbone, self.image_size, self.weights, self.checkpoint, self.shots,
                self.aupro_variant, self.resolution, tuple(self.categories))

    def metric(self, name: str, category: str | None = None) -> float:
        """Returns a class-mean metric, or one category's value; NaN when not recorded."""
        source = self.metrics if category is None else self.category_metrics.get(category, {})
        value = source.get(name, math.nan)
        return math.nan if value is None else float(value)


@dataclass
class Selection:
    """The run a leaderboard row uses, and the runs of the same setup it passed over."""

    record: RunRecord
    older: list[RunRecord] = field(default_factory=list)  # complete runs of the same setup, not the newest
    unfinished: list[RunRecord] = field(default_factory=list)  # running, interrupted or failed runs of the setup

    def describe_choice(self) -> str:
        """Returns a one-line account of why this run was used."""
        complete = 1 + len(self.older)
        text = "only complete run" if complete == 1 else f"newest of {complete} complete runs"
        if self.older:
            text += " (older: " + ", ".join(r.run_id[:8] for r in self.older[:3])
            text += " ...)" if len(self.older) > 3 else ")"
        if self.unfinished:
            states: dict[str, int] = {}
            for r in self.unfinished:
                states[r.status] = states.get(r.status, 0) + 1
            text += "; ignored " + ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
        return text


def load_runs(experiment: str = "zsadbench", uri: str | None = None) -> list[RunRecord]:
    """Returns every evaluation run of ``experiment`` (any status), newest first."""
    from mlflow.tracking import MlflowClient

    resolved = tracking_uri(uri)
    client = MlflowClient(tracking_uri=resolved)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"no MLflow experiment {experiment!r} at {resolved}; experiments there: "
                         f"{', '.join(names) or 'none'} (record runs with `zsadbench run`, or pass --experiment / "
                         f"--tracking-uri)")
    records: list[RunRecord] = []
    token = None
    while True:
        page = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"], page_token=token,
                                  max_results=1000)
        records.extend(RunRecord.from_mlflow(run) for run in page
                       if run.data.tags.get(KIND_TAG, "evaluation") == "evaluation")
        token = page.token
        if not token:
            break
    records.sort(key=lambda r: r.start_time, reverse=True)
    return records


def select_runs(records: list[RunRecord], datasets: list[str] | None = None) -> dict[str, list[Selection]]:
    """Returns, per dataset key, one selection per setup: its newest complete run (setups never complete are left out).

    ``datasets`` keeps only those dataset names (or dataset keys); unknown names raise a ValueError listing the
    recorded ones.
    """
    if datasets:
        known = {r.dataset for r in records} | {r.dataset_key for r in records}
        missing = [d for d in datasets if d not in known]
        if missing:
            raise ValueError(f"no recorded runs on dataset{'s' if len(missing) > 1 else ''} {missing}; recorded: "
                             f"{', '.join(sorted({r.dataset for r in records})) or 'none'}")
        records = [r for r in records if r.dataset in datasets or r.dataset_key in datasets]
    groups: dict[tuple[str, tuple[Any, ...]], list[RunRecord]] = {}
    for record in records:
        groups.setdefault((record.dataset_key, record.setup_key), []).append(record)
    out: dict[str, list[Selection]] = {}
    for (dataset_key, _), members in groups.items():
        members = sorted(members, key=lambda r: r.start_time, reverse=True)
        complete = [r for r in members if r.status == "complete"]
        if not complete:
            log.info("%s: no complete run of %s (%d unfinished); left out", dataset_key, members[0].method,
                     len(members))
            continue
        out.setdefault(dataset_key, []).append(
            Selection(complete[0], complete[1:], [r for r in members if r.status != "complete"]))
    for selections in out.values():
        selections.sort(key=lambda s: (s.record.method_label.lower(), s.record.setup_key))
    return dict(sorted(out.items()))


@contextlib.contextmanager
def _quiet_downloads() -> Iterator[None]:
    """Turns MLflow's per-file download progress bars off for a block (the report has its own)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def fetch_artifact(record: RunRecord, name: str, into: Path, uri: str | None = None) -> Path | None:
    """Returns a local copy of one of the run's artifacts (from MLflow, else the local results folder), or None."""
    target = into / record.run_id
    target.mkdir(parents=True, exist_ok=True)
    try:
        from mlflow.artifacts import download_artifacts

        with _quiet_downloads():
            return Path(download_artifacts(run_id=record.run_id, artifact_path=name, dst_path=str(target),
                                           tracking_uri=tracking_uri(uri)))
    except Exception as exc:  # an artifact store may be unreachable while the local copy is still there
        local = results_dir() / "runs" / record.run_id / name
        if local.is_file():
            shutil.copy(local, target / name)
            return target / name
        log.warning("run %s: artifact %s not available (%s)", record.run_id, name, exc)
        return None
