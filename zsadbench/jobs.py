"""What ``zsadbench run`` and ``zsadbench train`` share: a spec stored for ``--resume``, the method and dataset it
names, and one MLflow run that ends as complete, interrupted or failed."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zsadbench.detector import Detector
from zsadbench.paths import results_dir
from zsadbench.registry import get_dataset, get_method
from zsadbench.tracking import KIND_TAG, Tracker, environment, weights_id
from zsadbench.types import Dataset

log = logging.getLogger(__name__)


@dataclass
class JobSpec:
    """What a job was asked to do: stored in its state.json, so that ``--resume`` repeats it exactly."""

    method: str
    dataset: str
    data_root: str | None = None
    categories: list[str] | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    dataset_options: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    device: str = "cpu"
    experiment: str = "zsadbench"
    run_name: str | None = None


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def read_state(folder_name: str, job_id: str) -> tuple[Path, dict[str, Any]]:
    """Returns (the job's folder, its stored spec) for ``--resume``; names the missing file otherwise."""
    folder = results_dir() / folder_name / job_id
    state = folder / "state.json"
    if not state.is_file():
        what = {"runs": "run", "training": "training"}.get(folder_name, folder_name)
        raise FileNotFoundError(f"cannot resume {what} {job_id!r}: {state} not found ({what}s live in "
                                f"{results_dir() / folder_name})")
    return folder, json.loads(state.read_text())["spec"]


def build(spec: JobSpec) -> tuple[type[Detector], Dataset, Detector]:
    """Returns the method class, the dataset (restricted to the spec's categories) and the ready detector."""
    seed_everything(spec.seed)
    method_cls = get_method(spec.method)
    dataset = get_dataset(spec.dataset).load(spec.data_root, **spec.dataset_options)
    if spec.categories:
        dataset = dataset.subset(spec.categories)
    return method_cls, dataset, method_cls(seed=spec.seed, **spec.overrides).to(spec.device)


@dataclass
class TrackedJob:
    """A job's MLflow run and its results folder."""

    tracker: Tracker
    run_id: str
    folder: Path
    command: str  # how to resume it, e.g. "zsadbench run"

    @contextmanager
    def finishing(self) -> Iterator[None]:
        """Marks the MLflow run interrupted or failed when the body raises, and says how to resume."""
        try:
            yield
        except KeyboardInterrupt:
            self.tracker.finish("interrupted")
            log.error("interrupted; resume with: %s --resume %s", self.command, self.run_id)
            raise
        except BaseException:
            self.tracker.finish("failed")
            log.error("%s failed; what finished is kept, resume with: %s --resume %s", self.run_id, self.command,
                      self.run_id)
            raise


def open_run(spec: JobSpec, method_cls: type[Detector], *, kind: str, folder_name: str, command: str,
             tracking_uri: str | None, resume: str | None) -> TrackedJob:
    """Starts (or re-opens) the job's MLflow run, creates its folder and stores its spec."""
    tracker = Tracker(tracking_uri, spec.experiment)
    if resume is not None:
        tracker.resume(resume)
        run_id = resume
    else:
        prefix = "train-" if kind == "training" else ""
        run_id = tracker.start(spec.run_name or f"{prefix}{spec.method}-{spec.dataset}", {
            KIND_TAG: kind, "zsadbench.method": spec.method, "zsadbench.dataset": spec.dataset,
            "zsadbench.method_label": method_cls.display_name()})
    folder = results_dir() / folder_name / run_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "state.json").write_text(json.dumps({"spec": asdict(spec), "run_id": run_id}, indent=2, default=str))
    return TrackedJob(tracker, run_id, folder, command)


def job_params(spec: JobSpec, method_cls: type[Detector], detector: Detector, categories: list[str]) -> dict[str, Any]:
    """Returns the parameters every job records: what ran on what, the full config, weights and environment."""
    params = {"method": spec.method, "method_label": method_cls.display_name(), "dataset": spec.dataset,
              "data_root": spec.data_root, "categories": ",".join(categories), "seed": spec.seed,
              "device": spec.device, "image_size": "x".join(map(str, detector.input_size)),
              **{f"dataset_option.{k}": v for k, v in spec.dataset_options.items()},
              **{f"config.{k}": v for k, v in detector.resolved_config().items()},
              **environment(), **detector.describe()}
    pretrained = getattr(detector.config, "pretrained", None)
    if pretrained is not None:
        params["weights"] = weights_id(pretrained)
    from zsadbench.fingerprint import registered_fingerprint

    # which exact files (all categories of the copy): cached file hashes make this a stat per file after the first run
    params["dataset_fingerprint"] = registered_fingerprint(spec.dataset, spec.data_root, spec.dataset_options)
    return params
