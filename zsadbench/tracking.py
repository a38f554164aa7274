"""MLflow tracking: one MLflow run per ``zsadbench run`` (or training), in an embedded SQLite store by default.

``MLFLOW_TRACKING_URI`` or ``--tracking-uri`` sends runs to a shared MLflow server instead. Metric keys: the class
mean under the metric's own name (``image_auroc``) and each category under ``<category>/<metric>``. The tag
``zsadbench.status`` says whether a run is ``running``, ``complete``, ``interrupted`` or ``failed``; reports use
complete runs only.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from zsadbench.paths import results_dir

STATUS_TAG = "zsadbench.status"
KIND_TAG = "zsadbench.kind"  # "evaluation" or "training"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter value


def tracking_uri(uri: str | None = None) -> str:
    """Returns the tracking URI: ``uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded SQLite store."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    store = results_dir() / "mlflow.db"
    store.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store}"


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Returns the SHA-256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weights_id(pretrained: str | None) -> str:
    """Returns how a weights setting is recorded: the tag itself, or ``sha256:<digest>`` of a local file."""
    if pretrained and Path(pretrained).expanduser().is_file():
        return f"sha256:{file_sha256(Path(pretrained).expanduser())}"
    return str(pretrained)


def environment() -> dict[str, str]:
    """Returns package versions and the git commit of the zsadbench source, for reproducibility."""
    out = {"python": platform.python_version()}
    for package in ("zsadbench", "torch", "open_clip_torch", "timm", "numpy", "mlflow"):
        try:
            out[f"version.{package}"] = version(package)
        except PackageNotFoundError:
            out[f"version.{package}"] = "not installed"
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        out["git_commit"] = commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = "unknown (not a git checkout)"
    return out


class Tracker:
    """A thin wrapper over ``MlflowClient`` bound to one experiment and one run."""

    def __init__(self, uri: str | None = None, experiment: str = "zsadbench") -> None:
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri(uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            location = None
            if self.uri.startswith("sqlite:"):  # keep artifacts beside the embedded store, not in ./mlruns
                location = (results_dir() / "mlartifacts").as_uri()
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        self.run_id: str | None = None

    @property
    def _run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("no MLflow run started; call start() or resume() first")
        return self.run_id

    def start(self, run_name: str, tags: dict[str, str] | None = None) -> str:
        """Starts a new run and returns its id."""
        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags={STATUS_TAG: "running", **(tags or {})})
        self.run_id = run.info.run_id
        return self.run_id

    def resume(self, run_id: str) -> None:
        """Re-opens an interrupted run for logging."""
        self.client.get_run(run_id)  # raises if the store does not know it
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")
        self.client.set_tag(run_id, STATUS_TAG, "running")

    def log_params(self, params: dict[str, Any]) -> None:
        """Logs parameters (values stringified; over-long values are truncated with a marker)."""
        from mlflow.entities import Param

        existing = self.client.get_run(self._run).data.params
        items = []
        for key, value in params.items():
            text = str(value)
            if len(text) > MAX_PARAM_LENGTH:
                text = text[: MAX_PARAM_LENGTH - 15] + "...[truncated]"
            if key not in existing:  # MLflow refuses to change a logged parameter (resumed runs re-log)
                items.append(Param(key, text))
        for begin in range(0, len(items), 100):
            self.client.log_batch(self._run, params=items[begin:begin + 100])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Logs metrics (NaN values are stored as NaN)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v) if v is not None else math.nan, now, step) for k, v in metrics.items()]
        for begin in range(0, len(items), 1000):
            self.client.log_batch(self._run, metrics=items[begin:begin + 1000])

    def set_tags(self, tags: dict[str, str]) -> None:
        """Sets run tags."""
        for key, value in tags.items():
            self.client.set_tag(self._run, key, value)

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        """Uploads a folder's files as run artifacts."""
        self.client.log_artifacts(self._run, str(folder), artifact_path)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Uploads one file as a run artifact (under ``artifact_path``)."""
        self.client.log_artifact(self._run, str(path), artifact_path)

    def finish(self, status: str) -> None:
        """Ends the run: ``complete`` → FINISHED, ``interrupted`` → KILLED, anything else → FAILED."""
        self.client.set_tag(self._run, STATUS_TAG, status)
        mlflow_status = {"complete": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED")
        self.client.set_terminated(self._run, status=mlflow_status)
