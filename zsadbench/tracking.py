"""MLflow tracking: each job's MLflow run mirrors its results folder, in an embedded SQLite store by default.

``MLFLOW_TRACKING_URI`` or ``--tracking-uri`` sends runs to a shared MLflow server instead. Metric keys: the class
mean under the metric's own name (``image_auroc``) and each category under ``<category>/<metric>``. The tag
``zsadbench.status`` says whether a run is ``running``, ``complete``, ``interrupted`` or ``failed``; reports use
complete runs only.

The store is checked before a job starts (:func:`check_store`, seconds, one line naming the folder or URI). MLflow's
HTTP retries are bounded (a few seconds, not MLflow's minutes); when the server goes away mid-job the
:class:`Tracker` goes offline after one failed call, says so once, and the job carries on writing its folder, from
which ``zsadbench sync`` copies it into MLflow later.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

from zsadbench.paths import results_dir

log = logging.getLogger(__name__)

STATUS_TAG = "zsadbench.status"
KIND_TAG = "zsadbench.kind"  # "evaluation" or "training"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter value
# MLflow retries an unreachable server for minutes by default; a job fails fast or goes offline instead.
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                 "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}  # the job prints where its results are
PROBE_TIMEOUT = 5.0  # seconds to wait for a tracking server's health answer

T = TypeVar("T")


class TrackingError(RuntimeError):
    """The tracking store cannot be used: the message names the folder or URI."""


def tracking_uri(uri: str | None = None) -> str:
    """Returns the tracking URI: ``uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded SQLite store."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{results_dir() / 'mlflow.db'}"


def redact(uri: str) -> str:
    """Returns the URI without credentials (``user:password@`` becomes ``***@``), safe to print and store."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def bound_http_retries() -> None:
    """Bounds MLflow's HTTP retries and timeouts in this process (settings the user made are kept)."""
    for key, value in HTTP_SETTINGS.items():
        os.environ.setdefault(key, value)


def check_writable(folder: Path) -> None:
    """Raises a one-line :class:`TrackingError` unless ``folder`` can be created and written (a probe file)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
    except OSError as exc:
        raise TrackingError(f"results folder {folder} is not writable ({exc.strerror or exc}); pass a writable "
                            "one with ZSADBENCH_RESULTS=DIR") from None


def check_store(uri: str) -> None:
    """Checks in seconds that the results folder is writable and the tracking store reachable; raises otherwise."""
    check_writable(results_dir())
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme == "sqlite":
        path = Path(uri.removeprefix("sqlite:///"))
        check_writable(path.parent)
        if path.exists() and not os.access(path, os.W_OK):
            raise TrackingError(f"MLflow store {path} is read-only")
    elif scheme in ("http", "https"):
        probe, request = _health_request(uri)
        try:
            with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT) as answer:  # noqa: S310 (a user-given URI)
                answer.read(64)
        except urllib.error.HTTPError as exc:  # it answered: a server that has no /health is still reachable
            log.debug("%s answered %s", redact(probe), exc.code)
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(f"MLflow tracking server {redact(uri)} is unreachable ({reason}); start it, or "
                                "leave --tracking-uri and MLFLOW_TRACKING_URI unset to use the embedded store under "
                                f"{results_dir()}") from None


def _health_request(uri: str) -> tuple[str, urllib.request.Request]:
    """Returns the server's health URL and its request; credentials in the URI go to a Basic auth header (urllib
    cannot open ``http://user:password@host``)."""
    import base64

    parts = urllib.parse.urlsplit(uri)
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    probe = urllib.parse.urlunsplit((parts.scheme, host, parts.path.rstrip("/") + "/health", "", ""))
    request = urllib.request.Request(probe)
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    return probe, request


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
    """A thin wrapper over ``MlflowClient`` bound to one experiment and one run, that never blocks a job for long.

    With ``retry_offline`` (jobs), a failed call after the run has started switches the tracker off: it logs one
    warning, records why in :attr:`offline`, and ignores later calls; the job's folder keeps everything.
    """

    def __init__(self, uri: str | None = None, experiment: str = "zsadbench", retry_offline: bool = True) -> None:
        from mlflow.tracking import MlflowClient

        bound_http_retries()
        self.uri = tracking_uri(uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.retry_offline = retry_offline
        self.offline: str = ""  # why MLflow was given up on during the job ("" while it works)
        self.run_id: str | None = None
        try:
            found = self.client.get_experiment_by_name(experiment)
            if found is not None:
                self.experiment_id = found.experiment_id
            else:
                location = None
                if self.uri.startswith("sqlite:"):  # keep artifacts beside the embedded store, not in ./mlruns
                    location = (results_dir() / "mlartifacts").as_uri()
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        except Exception as exc:
            raise TrackingError(f"MLflow at {redact(self.uri)}: cannot open experiment {experiment!r}: "
                                f"{_first_line(exc)}") from None

    @property
    def _run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("no MLflow run started; call start() or resume() first")
        return self.run_id

    def _call(self, what: str, call: Callable[[], T]) -> T | None:
        """Runs one MLflow call; after the first failure of a job's tracker, MLflow is given up on (see class)."""
        if self.offline:
            return None
        try:
            return call()
        except Exception as exc:
            if not self.retry_offline:
                raise TrackingError(f"MLflow at {redact(self.uri)}: {what} failed: {_first_line(exc)}") from None
            self.offline = f"{what} failed: {_first_line(exc)}"
            log.warning("MLflow at %s stopped answering (%s); the job goes on and keeps its results folder",
                        redact(self.uri), self.offline)
            return None

    def start(self, run_name: str, tags: dict[str, str] | None = None) -> str:
        """Starts a new run and returns its id."""
        try:
            run = self.client.create_run(self.experiment_id, run_name=run_name,
                                         tags={STATUS_TAG: "running", **(tags or {})})
        except Exception as exc:
            raise TrackingError(f"MLflow at {redact(self.uri)}: cannot start a run: {_first_line(exc)}") from None
        self.run_id = run.info.run_id
        return self.run_id

    def resume(self, run_id: str) -> None:
        """Re-opens an earlier run for logging."""
        try:
            self.client.get_run(run_id)  # raises if the store does not know it
        except Exception as exc:
            raise TrackingError(f"MLflow at {redact(self.uri)}: run {run_id}: {_first_line(exc)}") from None
        self.run_id = run_id

        def reopen() -> None:
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, STATUS_TAG, "running")

        self._call("reopening the run", reopen)

    def log_params(self, params: dict[str, Any]) -> None:
        """Logs parameters (values stringified; over-long values are truncated with a marker)."""
        from mlflow.entities import Param

        def log() -> None:
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

        self._call("logging parameters", log)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Logs metrics (NaN values are stored as NaN)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v) if v is not None else math.nan, now, step) for k, v in metrics.items()]

        def log() -> None:
            for begin in range(0, len(items), 1000):
                self.client.log_batch(self._run, metrics=items[begin:begin + 1000])

        self._call("logging metrics", log)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Sets run tags."""
        self._call("setting tags", lambda: [self.client.set_tag(self._run, k, v) for k, v in tags.items()])

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        """Uploads a folder's files as run artifacts."""
        self._call("uploading artifacts", lambda: self.client.log_artifacts(self._run, str(folder), artifact_path))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Uploads one file as a run artifact (under ``artifact_path``)."""
        self._call("uploading an artifact", lambda: self.client.log_artifact(self._run, str(path), artifact_path))

    def finish(self, status: str) -> None:
        """Ends the run: ``complete`` → FINISHED, ``interrupted`` → KILLED, anything else → FAILED."""
        mlflow_status = {"complete": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED")

        def end() -> None:
            self.client.set_tag(self._run, STATUS_TAG, status)
            self.client.set_terminated(self._run, status=mlflow_status)

        self._call("ending the run", end)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
