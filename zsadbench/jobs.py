"""The job layer: what a ``zsadbench run`` or ``zsadbench train`` is, from its spec to its folder and MLflow run.

A job is

1. a **spec** (:class:`RunSpec`, :class:`TrainSpec`): what was asked, with every path made absolute, stored in the
   job's folder so that ``--resume`` repeats it exactly from any working directory;
2. a **preflight** (:func:`preflight`): every option, the results folder and the tracking store are checked before
   anything is built, loaded, generated or written;
3. a **folder** (:class:`JobFolder`), the source of truth: ``results/runs/<run-id>/`` for evaluations and
   ``results/training/<run-id>/`` for trainings, holding the spec, the parameters, each category's result as it
   finishes (or each epoch's checkpoint), and the final tables;
4. an **MLflow run** that mirrors the folder (:class:`zsadbench.tracking.Tracker`). When the tracking server goes
   away mid-job, the job goes on and ``zsadbench sync`` (:func:`sync`) copies the folder into MLflow later.

Parameter names are defined here once (:func:`job_params`); the run id is the MLflow run id.

Layout of an evaluation folder: ``state.json`` (spec, run id, tracking URI, status), ``params.json``,
``categories/<category>.json`` (written as each category finishes), and at the end ``results.json``,
``metrics.csv``, ``scores.csv`` (every image's score), ``config.json`` and ``overlays/*.png``. A training folder
holds ``state.json``, ``params.json``, ``losses.jsonl`` (every step) and ``epoch_<k>.pth``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

from zsadbench.config import apply_overrides, to_dict
from zsadbench.evaluation import CategoryResult, EvalOptions, EvaluationResult
from zsadbench.fingerprint import registered_fingerprint
from zsadbench.hashing import weights_id
from zsadbench.metrics import MAD_RECIPES, metric_tags
from zsadbench.paths import results_dir
from zsadbench.registry import get_dataset, get_method
from zsadbench.tracking import KIND_TAG, Tracker, TrackingError, check_store, environment, redact, tracking_uri

if TYPE_CHECKING:
    from zsadbench.detector import Detector
    from zsadbench.training import TrainingResult
    from zsadbench.types import Dataset

log = logging.getLogger(__name__)

CHECKPOINT_TAG = "zsadbench.checkpoint"
PATH_OPTIONS = ("pretrained", "checkpoint")  # method options that may name a local file: stored absolute


# ---------------------------------------------------------------------------------------------------------- specs

@dataclass
class JobSpec:
    """What a job was asked to do; stored in its folder so that ``--resume`` repeats it exactly."""

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
    feature_cache: bool | None = None  # keep frozen features on disk; None: the kind's default (FEATURE_CACHE_DEFAULT)
    feature_cache_dir: str | None = None  # None: $ZSADBENCH_FEATURE_CACHE or <results>/cache/features

    kind: ClassVar[str] = ""
    command: ClassVar[str] = ""  # how a user starts (and resumes) this kind of job

    def absolute(self) -> Self:
        """Returns the spec with the data root and local weight / checkpoint files as absolute paths."""
        overrides = dict(self.overrides)
        for key in PATH_OPTIONS:
            value = overrides.get(key)
            if value and Path(value).expanduser().exists():
                overrides[key] = str(Path(value).expanduser().resolve())
        data_root = str(Path(self.data_root).expanduser().resolve()) if self.data_root else None
        cache_dir = str(Path(self.feature_cache_dir).expanduser().resolve()) if self.feature_cache_dir else None
        return replace(self, data_root=data_root, overrides=overrides, feature_cache_dir=cache_dir)

    def to_json(self) -> dict[str, Any]:
        """Returns the spec as stored in ``state.json``."""
        return asdict(self)


@dataclass
class RunSpec(JobSpec):
    """An evaluation job: the shared job fields plus how the dataset is evaluated."""

    eval: EvalOptions = field(default_factory=EvalOptions)

    kind: ClassVar[str] = "evaluation"
    command: ClassVar[str] = "zsadbench run"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSpec:
        """Returns the spec stored by :meth:`to_json`."""
        return cls(**{**data, "eval": EvalOptions(**data["eval"])})


@dataclass
class TrainSpec(JobSpec):
    """A training job (the training options are the method config's ``train`` group)."""

    kind: ClassVar[str] = "training"
    command: ClassVar[str] = "zsadbench train"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainSpec:
        """Returns the spec stored by :meth:`to_json`."""
        return cls(**data)


SPECS: dict[str, type[RunSpec] | type[TrainSpec]] = {"evaluation": RunSpec, "training": TrainSpec}
SpecT = TypeVar("SpecT", RunSpec, TrainSpec)
# the feature cache (zsadbench.feature_cache) is on by default where images repeat within one job (every epoch)
FEATURE_CACHE_DEFAULT = {"evaluation": False, "training": True}


# --------------------------------------------------------------------------------------------------------- folder

@dataclass(frozen=True)
class JobFolder:
    """A job's folder under the results folder: every path of its layout is named here and nowhere else."""

    path: Path

    SUBFOLDERS: ClassVar[dict[str, str]] = {"evaluation": "runs", "training": "training"}

    @classmethod
    def of(cls, kind: str, run_id: str) -> JobFolder:
        """Returns the folder of job ``run_id`` of ``kind`` in the current results folder."""
        return cls(results_dir() / cls.SUBFOLDERS[kind] / run_id)

    @classmethod
    def find(cls, kind: str, ref: str) -> JobFolder:
        """Returns the folder of an earlier job: a run id in the results folder, or the path of its folder."""
        candidates = [Path(ref).expanduser(), results_dir() / cls.SUBFOLDERS[kind] / ref]
        for candidate in candidates:
            if (candidate / "state.json").is_file():
                return cls(candidate.resolve())
        what = {"evaluation": "run", "training": "training"}[kind]
        raise FileNotFoundError(f"cannot resume {what} {ref!r}: no state.json in {candidates[1]} (pass a run id of "
                                f"{results_dir() / cls.SUBFOLDERS[kind]} or the path of the {what}'s folder)")

    @property
    def run_id(self) -> str:
        """Returns the job's run id (the folder's name)."""
        return self.path.name

    state = property(lambda self: self.path / "state.json", doc="the spec, run id, tracking URI and status")
    params = property(lambda self: self.path / "params.json", doc="every parameter the MLflow run records")
    categories = property(lambda self: self.path / "categories", doc="one JSON per finished category")
    results = property(lambda self: self.path / "results.json", doc="per-category and mean metrics")
    metrics_csv = property(lambda self: self.path / "metrics.csv", doc="the metrics table")
    scores_csv = property(lambda self: self.path / "scores.csv", doc="every image's score")
    config = property(lambda self: self.path / "config.json", doc="the method's resolved config")
    overlays = property(lambda self: self.path / "overlays", doc="anomaly-map overlays (PNG)")
    losses = property(lambda self: self.path / "losses.jsonl", doc="every training step's losses")

    def category(self, name: str) -> Path:
        """Returns the result file of one category."""
        return self.categories / f"{name}.json"

    def checkpoint(self, epoch: int) -> Path:
        """Returns the checkpoint file of one epoch."""
        return self.path / f"epoch_{epoch}.pth"

    def read_state(self) -> dict[str, Any]:
        """Returns the stored state (spec, run id, tracking URI, status)."""
        return json.loads(self.state.read_text())

    def write_state(self, **changes: Any) -> None:
        """Updates fields of the stored state (written atomically)."""
        state = self.read_state() if self.state.is_file() else {}
        _write_atomic(self.state, json.dumps({**state, **changes}, indent=2, default=str))

    def finished_categories(self) -> dict[str, CategoryResult]:
        """Returns the categories an earlier attempt finished."""
        if not self.categories.is_dir():
            return {}
        done = (CategoryResult.from_json(json.loads(f.read_text())) for f in sorted(self.categories.glob("*.json")))
        return {r.category: r for r in done}


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


# ------------------------------------------------------------------------------------------------------ preflight

def preflight(spec: JobSpec, uri: str | None = None) -> None:
    """Checks every option, the results folder and the tracking store before any work; raises a one-line error.

    Nothing is built, loaded, generated or written before this returns (the dataset's own folder included).
    """
    method_cls = get_method(spec.method)
    apply_overrides(method_cls.Config(), spec.overrides)  # unknown keys and ill-typed values, by their full name
    info = get_dataset(spec.dataset)
    info.check_options(spec.dataset_options)
    if info.needs_root and not spec.data_root:
        raise ValueError(f"dataset {spec.dataset!r} needs --data-root pointing at its folder; expected layout:\n"
                         f"{info.layout}")
    if spec.data_root and not Path(spec.data_root).is_dir():
        raise FileNotFoundError(f"--data-root {spec.data_root}: no such folder")
    _check_device(spec.device)
    if spec.feature_cache_dir and Path(spec.feature_cache_dir).exists() and not Path(spec.feature_cache_dir).is_dir():
        raise ValueError(f"--feature-cache-dir {spec.feature_cache_dir}: exists and is not a folder")
    if isinstance(spec, RunSpec) and spec.eval.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {spec.eval.batch_size}")
    if isinstance(spec, TrainSpec):
        from zsadbench.detector import Trainable

        if not issubclass(method_cls, Trainable):
            raise ValueError(f"method {spec.method!r} has no learned parts to train")
    check_store(tracking_uri(uri))


def _check_device(device: str) -> None:
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError as exc:
        raise ValueError(f"--device {device!r}: {exc}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}); "
                         "use --device cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available on this machine; use --device cpu")


# ---------------------------------------------------------------------------------------------------- parameters

def job_params(spec: JobSpec, detector: Detector, categories: list[str]) -> dict[str, Any]:
    """Returns the parameters every job records: what ran on what, the full config, weights and environment."""
    method_cls = type(detector)
    params: dict[str, Any] = {
        "method": spec.method, "method_label": method_cls.display_name(), "dataset": spec.dataset,
        "data_root": spec.data_root, "categories": ",".join(categories), "seed": spec.seed, "device": spec.device,
        "image_size": "x".join(map(str, detector.input_size)),
        **{f"dataset_option.{k}": v for k, v in spec.dataset_options.items()},
        **{f"config.{k}": v for k, v in detector.resolved_config().items()},
        **{f"detector.{k}": v for k, v in detector.describe().items()},
        **environment()}
    pretrained = getattr(detector.config, "pretrained", None)
    if pretrained is not None:
        params["weights"] = weights_id(pretrained)
    # which exact files (all categories of the copy): cached file hashes make this a stat per file after the first run
    params["dataset_fingerprint"] = registered_fingerprint(spec.dataset, spec.data_root, spec.dataset_options)
    if isinstance(spec, RunSpec):
        params |= {f"eval.{k}": v for k, v in asdict(spec.eval).items()}
        params |= {f"metric.{name}": tag for name, tag in metric_tags(spec.eval.aupro).items()
                   if not name.startswith("mad_")}
        params |= {f"mad_recipe.{recipe}": "mean(" + ", ".join(names) + ")" for recipe, names in MAD_RECIPES.items()}
    return params


# ---------------------------------------------------------------------------------------------------- lifecycle

@dataclass
class Job:
    """A started (or resumed) job: its spec, folder and MLflow mirror."""

    spec: JobSpec
    folder: JobFolder
    tracker: Tracker

    @property
    def run_id(self) -> str:
        """Returns the job's run id."""
        return self.folder.run_id

    @classmethod
    def start(cls, spec: JobSpec, uri: str | None) -> Job:
        """Starts a new MLflow run and creates the job's folder with its stored spec."""
        tracker = Tracker(tracking_uri(uri), spec.experiment)
        prefix = "train-" if spec.kind == "training" else ""
        run_id = tracker.start(spec.run_name or f"{prefix}{spec.method}-{spec.dataset}", {KIND_TAG: spec.kind})
        folder = JobFolder.of(spec.kind, run_id)
        folder.path.mkdir(parents=True, exist_ok=True)
        folder.write_state(kind=spec.kind, spec=spec.to_json(), run_id=run_id, tracking_uri=redact(tracker.uri),
                           status="running")
        return cls(spec, folder, tracker)

    @classmethod
    def reopen(cls, kind: str, ref: str, uri: str | None) -> Job:
        """Re-opens an earlier job from its folder (run id or path), with the tracking store it used."""
        folder = JobFolder.find(kind, ref)
        state = folder.read_state()
        spec = SPECS[kind].from_json(state["spec"])
        store = tracking_uri(uri) if uri or os.environ.get("MLFLOW_TRACKING_URI") else state["tracking_uri"]
        check_store(store)
        tracker = Tracker(store, spec.experiment)
        tracker.resume(state["run_id"])
        return cls(spec, folder, tracker)

    def record_params(self, params: dict[str, Any]) -> None:
        """Writes the parameters to the folder, then to MLflow."""
        stored = json.loads(self.folder.params.read_text()) if self.folder.params.is_file() else {}
        stored |= {k: str(v) for k, v in params.items()}
        _write_atomic(self.folder.params, json.dumps(stored, indent=1, sort_keys=True))
        self.tracker.log_params(params)

    @contextmanager
    def finishing(self) -> Iterator[None]:
        """Marks the job interrupted or failed when the body raises, and says how to resume it."""
        try:
            yield
        except KeyboardInterrupt:
            self.finish("interrupted")
            log.error("interrupted; resume with: %s --resume %s", self.spec.command, self.folder.path)
            raise
        except BaseException:
            self.finish("failed")
            log.error("%s failed; what finished is kept, resume with: %s --resume %s", self.run_id,
                      self.spec.command, self.folder.path)
            raise

    def finish(self, status: str) -> None:
        """Stores the job's final status in its folder and in MLflow."""
        self.folder.write_state(status=status, mlflow_synced=not self.tracker.offline)
        self.tracker.finish(status)

    def sync_hint(self) -> str | None:
        """Returns how to copy the folder into MLflow when the tracking store went away during the job."""
        if not self.tracker.offline:
            return None
        return (f"MLflow at {redact(self.tracker.uri)} was unreachable during the job ({self.tracker.offline}); "
                f"the results folder {self.folder.path} is complete: copy it into MLflow later with "
                f"`zsadbench sync {self.folder.path}`")


def _build(spec: JobSpec) -> tuple[Dataset, Detector]:
    """Returns the dataset (restricted to the spec's categories) and the ready, seeded detector (with its cache)."""
    import zsadbench

    dataset = get_dataset(spec.dataset).load(spec.data_root, **spec.dataset_options)
    if spec.categories:
        dataset = dataset.subset(spec.categories)
    detector = zsadbench.load_method(spec.method, seed=spec.seed, device=spec.device, **spec.overrides)
    _attach_feature_cache(spec, detector)
    return dataset, detector


def _attach_feature_cache(spec: JobSpec, detector: Detector) -> None:
    """Gives the detector the job's feature cache when the job uses one and the method declares a frozen stage."""
    from zsadbench.feature_cache import FeatureCache, has_frozen_stages, use_feature_cache

    wanted = FEATURE_CACHE_DEFAULT.get(spec.kind, False) if spec.feature_cache is None else spec.feature_cache
    if wanted and has_frozen_stages(type(detector)):
        use_feature_cache(detector, FeatureCache(spec.feature_cache_dir))


def feature_cache_params(detector: Detector) -> dict[str, Any]:
    """Returns the parameters saying whether the job used the feature cache, and where."""
    cache = getattr(detector, "feature_cache", None)
    return {"feature_cache": "off"} if cache is None else {"feature_cache": "on", "feature_cache.root": str(cache.root)}


def log_feature_cache_stats(job: Job, detector: Detector) -> None:
    """Logs the job's feature-cache counts (images read, computed, written, corrupt, evicted) as metrics."""
    cache = getattr(detector, "feature_cache", None)
    if cache is not None:
        job.tracker.log_metrics({f"feature_cache/{k}": float(v) for k, v in vars(cache.stats).items()})


# ----------------------------------------------------------------------------------------------------- evaluation

@dataclass
class RunOutcome:
    """What ``zsadbench run`` reports: the run, where its files are, its metrics, and how to sync it if needed."""

    run_id: str
    folder: Path
    method_label: str
    dataset: str
    result: EvaluationResult
    notes: list[str] = field(default_factory=list)  # what the numbers mean, and what to run next
    sync_hint: str | None = None


def _notes(spec: JobSpec, detector: Detector) -> list[str]:
    """Returns what a reader of the table should know: random weights, and the command to run on real data."""
    notes = []
    label = type(detector).display_name()
    if getattr(detector.config, "pretrained", None) == "random":
        notes.append(f"note: {label} ran with random weights (pretrained=random): the numbers show that the pipeline "
                     f"works, not how well {label} detects anomalies with its real weights.")
    if spec.dataset == "synthetic":
        notes.append(f"next, real weights on a real benchmark: zsadbench run --method {spec.method} --dataset mvtec "
                     "--data-root /path/to/mvtec_anomaly_detection (weights: the default open_clip tag, downloaded "
                     "once, or --pretrained /path/to/weights.pt offline)")
    return notes


def _reopen_or_check(kind: str, spec: SpecT | None, resume: str | None,
                     uri: str | None) -> tuple[Job | None, SpecT]:
    """Returns (the re-opened job, its spec) for a resume, else (None, the absolute spec after :func:`preflight`)."""
    if resume is not None:
        job = Job.reopen(kind, resume, uri)
        return job, job.spec  # type: ignore[return-value]  # Job.reopen reads the spec class of ``kind``
    if spec is None:
        raise ValueError(f"a {kind} needs a spec, or a run id to resume")
    spec = spec.absolute()
    preflight(spec, uri)
    return None, spec


def run(spec: RunSpec | None = None, *, resume: str | None = None, tracking_uri: str | None = None,
        json_path: str | Path | None = None, progress: bool = True) -> RunOutcome:
    """Runs (or resumes, by run id or folder) an evaluation; returns its outcome."""
    from zsadbench.evaluation import evaluate, plan_categories

    reopened, spec = _reopen_or_check("evaluation", spec, resume, tracking_uri)
    dataset, detector = _build(spec)
    categories = spec.categories or dataset.categories("test")
    done = reopened.folder.finished_categories() if reopened is not None else {}
    # every file's header and every draw of shots is checked before a run is recorded or a model runs
    plans = plan_categories(detector, dataset, [c for c in categories if c not in done], spec.eval, progress)
    job = reopened or Job.start(spec, tracking_uri)
    job.record_params(job_params(spec, detector, categories) | feature_cache_params(detector))
    job.folder.categories.mkdir(exist_ok=True)

    def finished(result: CategoryResult) -> None:
        _write_atomic(job.folder.category(result.category), json.dumps(result.to_json()))
        job.tracker.log_metrics({f"{result.category}/{k}": v for k, v in result.metrics.items()})

    with job.finishing():
        result = evaluate(detector, dataset, categories, spec.eval, done=done, on_category=finished,
                          progress=progress, plans=plans)
        _write_outputs(job.folder, result, detector, spec.dataset)
        if json_path is not None:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(json.dumps(result.to_json(), indent=2))
        job.record_params({f"mean_categories.{group}": note for group, note in result.partial_means().items()})
        log_feature_cache_stats(job, detector)
        job.tracker.log_metrics(result.means)
        job.tracker.log_artifacts(job.folder.path)
    job.finish("complete")
    return RunOutcome(job.run_id, job.folder.path, type(detector).display_name(), spec.dataset, result,
                      _notes(spec, detector), job.sync_hint())


def _write_outputs(folder: JobFolder, result: EvaluationResult, detector: Detector, dataset: str) -> None:
    import pandas as pd

    from zsadbench.visualize import save_overlay

    folder.results.write_text(json.dumps(result.to_json(), indent=2))
    result.table().to_csv(folder.metrics_csv, index_label="category")
    rows = [{"category": c, "image": p, "label": y, "score": s}
            for c, r in result.categories.items() for p, y, s in zip(r.image_paths, r.labels, r.image_scores)]
    pd.DataFrame(rows).to_csv(folder.scores_csv, index=False)
    folder.config.write_text(json.dumps(to_dict(detector.config), indent=2))
    for category, r in result.categories.items():
        for n, overlay in enumerate(r.overlays):
            save_overlay(overlay.sample.image_path, overlay.anomaly_map, overlay.mask,
                         folder.overlays / f"{category}_{n}.png",
                         f"{dataset} / {category} / {overlay.sample.defect_type}")


# ------------------------------------------------------------------------------------------------------- training

@dataclass
class TrainOutcome:
    """What ``zsadbench train`` reports: the run, its folder, the losses and the command that evaluates it."""

    run_id: str
    folder: Path
    result: TrainingResult
    evaluate_hint: str | None
    sync_hint: str | None = None


def train(spec: TrainSpec | None = None, *, resume: str | None = None, tracking_uri: str | None = None,
          progress: bool = True) -> TrainOutcome:
    """Trains a method on an auxiliary dataset (or resumes, by run id or folder); returns its outcome."""
    from zsadbench.training import fit, last_checkpoint, training_samples

    reopened, spec = _reopen_or_check("training", spec, resume, tracking_uri)
    dataset, detector = _build(spec)
    samples = training_samples(dataset, detector.config.train.split)  # type: ignore[attr-defined]
    job = reopened or Job.start(spec, tracking_uri)
    categories = sorted({s.category for s in samples})
    job.record_params({**job_params(spec, detector, categories), "split": detector.config.train.split,  # type: ignore[attr-defined]
                       "images": len(samples), "anomalous_images": sum(s.label for s in samples),
                       **feature_cache_params(detector)})

    first_step: list[int] = []  # a resumed training repeats the steps after its last checkpoint: drop their old lines

    def on_step(step: int, losses: dict[str, float]) -> None:
        if not first_step:
            first_step.append(step)
        if step == first_step[0] and job.folder.losses.is_file():
            kept = [line for line in job.folder.losses.read_text().splitlines() if json.loads(line)["step"] < step]
            _write_atomic(job.folder.losses, "".join(line + "\n" for line in kept))
        with job.folder.losses.open("a") as handle:
            handle.write(json.dumps({"step": step, **losses}) + "\n")
        job.tracker.log_metrics({f"train/{k}": v for k, v in losses.items()}, step=step)

    def on_epoch(epoch: int, means: dict[str, float], checkpoint: Path | None) -> None:
        job.tracker.log_metrics({f"epoch/{k}": v for k, v in means.items()}, step=epoch)
        if checkpoint is not None:
            job.tracker.log_artifact(checkpoint, "checkpoints")

    with job.finishing():
        result = fit(detector, dataset, checkpoint_dir=job.folder.path,  # type: ignore[arg-type]
                     resume_from=last_checkpoint(job.folder.path), progress=progress, on_step=on_step,
                     on_epoch=on_epoch)
        log_feature_cache_stats(job, detector)
    final = last_checkpoint(job.folder.path)
    if final is not None:
        job.tracker.set_tags({CHECKPOINT_TAG: str(final)})
    job.finish("complete")
    hint = None if final is None else evaluate_command(spec, final)
    return TrainOutcome(job.run_id, job.folder.path, result, hint, job.sync_hint())


def evaluate_command(spec: TrainSpec, checkpoint: Path) -> str:
    """Returns the ``zsadbench run`` command that evaluates a training's checkpoint with the same model options."""
    import shlex

    model_options = {k: v for k, v in spec.overrides.items() if not k.startswith("train.") and k != "checkpoint"}
    options = "".join(f" --pretrained {shlex.quote(v)}" if k == "pretrained" else f" --set {shlex.quote(f'{k}={v}')}"
                      for k, v in model_options.items())
    checkpoint_option = shlex.quote(str(checkpoint))
    return f"zsadbench run --method {spec.method} --checkpoint {checkpoint_option}{options} --dataset <dataset>"


# ----------------------------------------------------------------------------------------------------------- sync

def sync(ref: str, uri: str | None = None) -> str:
    """Copies a job's folder (run id or path) into MLflow: parameters, metrics, status, artifacts; returns the run id.

    For jobs that went on while the tracking server was unreachable. Logging is idempotent for parameters; metrics
    are logged again at their steps (MLflow keeps the latest value).
    """
    folder = None
    for kind in ("evaluation", "training"):
        try:
            folder = JobFolder.find(kind, ref)
            break
        except FileNotFoundError:
            continue
    if folder is None:
        raise FileNotFoundError(f"no run or training {ref!r}: pass a run id of {results_dir()} or a job's folder")
    state = folder.read_state()
    store = tracking_uri(uri) if uri or os.environ.get("MLFLOW_TRACKING_URI") else state["tracking_uri"]
    check_store(store)
    tracker = Tracker(store, state["spec"].get("experiment", "zsadbench"), retry_offline=False)
    try:
        tracker.resume(state["run_id"])
    except TrackingError as exc:
        raise ValueError(f"the tracking store {redact(store)} does not know run {state['run_id']} ({exc})") from None
    if folder.params.is_file():
        tracker.log_params(json.loads(folder.params.read_text()))
    for result in folder.finished_categories().values():
        tracker.log_metrics({f"{result.category}/{k}": v for k, v in result.metrics.items()})
    if folder.results.is_file():
        tracker.log_metrics({k: v for k, v in json.loads(folder.results.read_text())["mean"].items() if v is not None})
    if folder.losses.is_file():
        for line in folder.losses.read_text().splitlines():
            entry = json.loads(line)
            step = entry.pop("step")
            tracker.log_metrics({f"train/{k}": v for k, v in entry.items()}, step=step)
    tracker.log_artifacts(folder.path)
    status = state.get("status", "interrupted")
    tracker.finish("interrupted" if status == "running" else status)
    folder.write_state(mlflow_synced=True)
    return state["run_id"]


# -------------------------------------------------------------------------------------------------------- predict

@dataclass
class Predictions:
    """What ``zsadbench predict`` wrote: the folder and a printable table of the scores."""

    folder: Path
    table: str


def predict(method: str, images: list[Path], out: str | Path, *, overrides: dict[str, Any] | None = None,
            references: Sequence[Path] = (), category: str = "object", device: str = "cpu", seed: int = 0,
            batch_size: int = 8, progress: bool = True) -> Predictions:
    """Scores arbitrary images with a method; writes ``scores.csv``, ``maps/<name>.tiff`` and ``overlays/<name>.png``.

    ``references`` are normal images of the same kind for few-shot methods; transductive methods score the images as
    one set. ``out`` must be new, empty, or an earlier predict output (its files are replaced).
    """
    import numpy as np
    import pandas as pd
    import tifffile
    import torch
    from tqdm.auto import tqdm

    import zsadbench
    from zsadbench.data import check_files, load_images, read_image
    from zsadbench.detector import FewShot, ImageSet
    from zsadbench.types import Sample
    from zsadbench.visualize import save_overlay

    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()) and not (out / "scores.csv").is_file():
        raise ValueError(f"--out {out} is not empty and holds no earlier predictions (scores.csv); pass a new or "
                         "empty folder")
    samples = [Sample(path, category, 0, None, "unknown", "predict") for path in images]
    shots = [Sample(path, category, 0, None, "good", "predict", split="train") for path in references]
    check_files(samples + shots)
    detector = zsadbench.load_method(method, seed=seed, device=device, **(overrides or {}))
    if references:
        if not isinstance(detector, FewShot):
            raise ValueError(f"{method} is not a few-shot method: it takes no reference images")
        detector.set_reference_images([read_image(s.image_path) for s in shots], category)
    scores: list[float] = []
    maps: list[np.ndarray] = []
    with torch.no_grad():
        if detector.transductive:
            prediction = detector.predict_set(ImageSet(samples, detector.transform, batch_size), category)  # type: ignore[attr-defined]
            scores, maps = prediction.image_scores.double().tolist(), list(prediction.anomaly_maps.float().numpy())
        else:
            for begin in tqdm(range(0, len(samples), batch_size), desc=f"{method} predict", unit="batch",
                              disable=None if progress else True, leave=False):
                batch = load_images(samples[begin:begin + batch_size], detector.transform).to(detector.device)
                prediction = detector.predict(batch, category)
                scores += prediction.image_scores.double().cpu().tolist()
                maps += list(prediction.anomaly_maps.float().cpu().numpy())
    names = _unique_stems(images)
    for name, path, amap in zip(names, images, maps):
        if not np.isfinite(amap).all():
            raise RuntimeError(f"method {method!r} returned a non-finite anomaly map for {path}")
        (out / "maps").mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(out / "maps" / f"{name}.tiff", amap.astype(np.float32))
        save_overlay(path, amap, None, out / "overlays" / f"{name}.png", f"{method}: {path.name}")
    table = pd.DataFrame({"image": [str(p) for p in images], "score": scores})
    table.to_csv(out / "scores.csv", index=False)
    return Predictions(out, table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


def _unique_stems(paths: list[Path]) -> list[str]:
    """Returns each file's stem, numbered where two files share one (a/x.png and b/x.png)."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        count = seen.get(path.stem, 0)
        seen[path.stem] = count + 1
        names.append(path.stem if count == 0 else f"{path.stem}_{count + 1}")
    return names
