"""``zsadbench sweep``: a whole ZSAD comparison (methods x datasets x checkpoints x shots x seeds) from one command.

A sweep is a TOML file (or a built-in preset, :data:`PRESETS`) that :func:`load_spec` reads and :func:`expand`
turns into a grid of **cells**. Each cell is one job of the job layer (:func:`zsadbench.jobs.train` or
:func:`zsadbench.jobs.run`), keyed by a hash of its full spec (:func:`cell_key`: the method's resolved config,
dataset, loader options, data root, the dataset's fingerprint where its folder is here, weights, checkpoint, seed,
evaluation options). A learned method marked ``train = true`` is first trained on each test dataset's auxiliary
dataset (``trained_on``, the ZSAD protocol: VisA -> MVTec AD, MVTec AD -> everything else); the runs that use its
checkpoint depend on that training cell.

Execution is Ray's (:func:`execute`): a local instance the sweep starts (one slot per GPU, else CPU slots that fit
the cores and memory; node address 127.0.0.1, no dashboard) or an existing cluster (``--ray-address``). Each cell is
a Ray task with bounded retries (``max_retries`` for a lost worker, ``retry_exceptions`` for an error); a training's
object reference is an argument of the runs that need its checkpoint, so Ray orders them. A cell is idempotent: its job
is named after its key (``run_name``), a finished job is never recomputed, an unfinished one (a killed worker, an
interrupted sweep) is resumed in its own folder and MLflow run, so every cell has exactly one MLflow run.

Tracking: unless ``--tracking-uri`` is given, the sweep starts and owns an ``mlflow server`` on 127.0.0.1 with the
embedded SQLite store (``results/mlflow.db``) behind it, so that no two processes write one SQLite file; workers log
over HTTP. The driver creates the experiment and a parent run holding the grid's progress table. Tracking URIs are
only ever stored, printed or logged through :func:`zsadbench.tracking.redact`.

The sweep's own records live in ``results/sweeps/<name>/``: ``cells/<key>.json`` (status, attempts, run id, error of
each cell), ``grid.csv`` and ``leaderboard/``. On several machines the results folder must be shared (the same path
everywhere, e.g. NFS), as must the data folders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from zsadbench.evaluation import EvalOptions
from zsadbench.jobs import JobFolder, JobSpec, RunSpec, TrainSpec
from zsadbench.paths import results_dir
from zsadbench.tracking import KIND_TAG, redact

log = logging.getLogger(__name__)

SWEEP_TAG = "zsadbench.sweep"  # the sweep's name, on its parent run and every cell's run
CELL_TAG = "zsadbench.cell"  # a cell's key, on its run
PARENT_TAG = "mlflow.parentRunId"  # nests the cells' runs under the sweep's parent run in the MLflow UI
KEY_LENGTH = 12  # hex digits of the cell key in run names and file names
STATES = ("done", "running", "failed", "queued")
OBJECT_STORE_BYTES = 256 * 2**20  # cells pass small dicts: Ray's default (30 % of memory) would be wasted

# --------------------------------------------------------------------------------------------------------- presets

_TINY = """
# The tiny sweep: the ZSAD protocol in miniature on the synthetic benchmark, tiny random-weight models (a minute or
# two on a laptop). Industrial categories trained on the medical ones and back, as the real protocol does with
# VisA and MVTec AD.
name = "tiny"
seeds = [0]
shots = [0]
retries = 2
include_random = true  # every run uses random weights: rank them anyway
bootstrap = 0

[eval]
batch_size = 8

[datasets.synthetic-industrial]
dataset = "synthetic"
options = {image_size = 48, n_train = 2, n_test_normal = 3, n_test_anomalous = 3, categories = "carpet,tile"}
trained_on = "synthetic-medical"

[datasets.synthetic-medical]
dataset = "synthetic"
options = {image_size = 48, n_train = 2, n_test_normal = 3, n_test_anomalous = 3, categories = "brain,skin"}
trained_on = "synthetic-industrial"

[methods.winclip]
preset = "smoke"

[methods.anomalyclip]
preset = "smoke"
train = true
set = {"train.epochs" = 1}
"""

_INDUSTRIAL_DATASETS = """
[datasets.mvtec]
data_root = "{data}/mvtec"
trained_on = "visa"

[datasets.visa]
data_root = "{data}/visa"
trained_on = "mvtec"

[datasets.btad]
data_root = "{data}/btad"
trained_on = "mvtec"

[datasets.mpdd]
data_root = "{data}/mpdd"
trained_on = "mvtec"

[datasets.ksdd2]
data_root = "{data}/ksdd2"
trained_on = "mvtec"

[datasets.dtd]
data_root = "{data}/dtd"
trained_on = "mvtec"

[datasets.dagm]
data_root = "{data}/dagm"
trained_on = "mvtec"
"""

_MEDICAL_DATASETS = "".join(f"""
[datasets.{name}]
data_root = "{{data}}/{name}"
trained_on = "mvtec"
""" for name in ("headct", "brainmri", "br35h", "isic", "clinicdb", "colondb", "kvasir", "endo", "tn3k"))

_MVTEC_AUXILIARY = """
[datasets.mvtec]
data_root = "{data}/mvtec"
evaluate = false  # only the auxiliary dataset of the medical protocol
"""

_ZSAD_METHODS = """
[methods.winclip]

[methods.musc]

[methods.aprilgan]
train = true

[methods.anomalyclip]
train = true

[methods.adaclip]
train = true

[methods.adaptclip]
train = true
"""

_ZSAD_HEADER = """
# The standard {what} ZSAD protocol: each learned method is trained on VisA to be tested on MVTec AD, and on MVTec
# AD to be tested on every other dataset; zero-shot methods run as they are. Data folders: --data-dir DIR holding
# one folder per dataset (DIR/mvtec, DIR/visa, ...).
name = "{name}"
seeds = [0]
shots = [0]
retries = 2
"""

PRESETS: dict[str, str] = {
    "tiny": _TINY,
    "zsad-industrial": _ZSAD_HEADER.format(what="industrial", name="zsad-industrial") + _INDUSTRIAL_DATASETS
    + _ZSAD_METHODS,
    "zsad-medical": _ZSAD_HEADER.format(what="medical", name="zsad-medical") + _MEDICAL_DATASETS
    + _MVTEC_AUXILIARY + _ZSAD_METHODS,
    "zsad": _ZSAD_HEADER.format(what="industrial and medical", name="zsad") + _INDUSTRIAL_DATASETS
    + _MEDICAL_DATASETS + _ZSAD_METHODS,
}


# ------------------------------------------------------------------------------------------------------------ spec

@dataclass
class DatasetEntry:
    """One dataset of a sweep: a registered dataset with its folder and loader options."""

    key: str
    dataset: str
    data_root: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    categories: list[str] | None = None
    trained_on: str | None = None  # the key of the auxiliary dataset learned methods are trained on
    evaluate: bool = True  # False: only an auxiliary dataset


@dataclass
class MethodEntry:
    """One method of a sweep: a registered method, its option overrides and where its checkpoints come from."""

    key: str
    method: str
    overrides: dict[str, str] = field(default_factory=dict)
    train: bool = False  # trained by the sweep on each dataset's auxiliary dataset
    checkpoints: list[str] = field(default_factory=list)  # given checkpoint files (another axis of the grid)
    shots: list[int] | None = None  # default: the sweep's
    datasets: list[str] | None = None  # default: every evaluated dataset


@dataclass
class SweepSpec:
    """A sweep as read from its TOML file: the axes of the grid and how it runs."""

    name: str
    methods: list[MethodEntry]
    datasets: dict[str, DatasetEntry]
    seeds: list[int] = field(default_factory=lambda: [0])
    shots: list[int] = field(default_factory=lambda: [0])
    retries: int = 2
    device: str = "auto"
    experiment: str | None = None
    eval: EvalOptions = field(default_factory=EvalOptions)
    include_random: bool = False
    bootstrap: int = 1000
    source: str = ""  # the file or preset it was read from

    @property
    def experiment_name(self) -> str:
        """Returns the MLflow experiment of the sweep's runs (default: ``sweep-<name>``)."""
        return self.experiment or f"sweep-{self.name}"

    @property
    def folder(self) -> Path:
        """Returns the sweep's own folder (cell records, grid, leaderboard)."""
        return results_dir() / "sweeps" / self.name


class SpecError(ValueError):
    """A sweep file asks for something that cannot be run; the message names the file and the key."""


_TOP_KEYS = {"name", "seeds", "shots", "retries", "device", "experiment", "eval", "include_random", "bootstrap",
             "datasets", "methods", "data_dir"}
_DATASET_KEYS = {"dataset", "data_root", "options", "categories", "trained_on", "evaluate"}
_METHOD_KEYS = {"method", "preset", "set", "pretrained", "train", "checkpoints", "shots", "datasets"}


def load_spec(source: str, *, data_dir: str | None = None) -> SweepSpec:
    """Reads a sweep from a TOML file or a preset name; ``{data}`` in data roots becomes ``data_dir``."""
    if source in PRESETS:
        text, where = PRESETS[source], f"preset {source!r}"
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise SpecError(f"sweep spec {source}: no such file (presets: {', '.join(PRESETS)})")
        text, where = path.read_text(), str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{where}: not a TOML file ({exc})") from None
    default_name = source if source in PRESETS else Path(source).stem
    return parse_spec(data, where, default_name, data_dir)


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise SpecError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                        f"(known: {', '.join(sorted(allowed))})")


def _int_list(value: Any, where: str) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise SpecError(f"{where}: expected a non-empty list of integers >= 0, got {value!r}")
    return list(dict.fromkeys(values))


def parse_spec(data: dict[str, Any], where: str = "sweep spec", default_name: str = "sweep",
               data_dir: str | None = None) -> SweepSpec:
    """Returns the sweep described by a parsed TOML table; raises :class:`SpecError` naming the file and key."""
    from zsadbench.registry import get_dataset, get_method

    _check_keys(data, _TOP_KEYS, where)
    data_dir = data_dir or data.get("data_dir") or os.environ.get("ZSADBENCH_DATA")
    name = str(data.get("name", default_name))
    if not name or any(c in name for c in "/\\ ") or name.startswith("."):
        raise SpecError(f"{where}: name {name!r} must be a plain folder name")
    datasets: dict[str, DatasetEntry] = {}
    for key, table in (data.get("datasets") or {}).items():
        at = f"{where}: [datasets.{key}]"
        if not isinstance(table, dict):
            raise SpecError(f"{at} must be a table")
        _check_keys(table, _DATASET_KEYS, at)
        entry = DatasetEntry(key, str(table.get("dataset", key)),
                             options={k: str(v) for k, v in (table.get("options") or {}).items()},
                             categories=table.get("categories"), trained_on=table.get("trained_on"),
                             evaluate=bool(table.get("evaluate", True)))
        try:
            info = get_dataset(entry.dataset)
            info.check_options(entry.options)
        except (KeyError, ValueError) as exc:
            raise SpecError(f"{at}: {exc.args[0] if exc.args else exc}") from None
        root = table.get("data_root")
        if root is not None:
            root = str(root)
            if "{data}" in root:
                if not data_dir:
                    raise SpecError(f"{at}: data_root {root!r} needs the data folder: pass --data-dir DIR (or set "
                                    "data_dir in the spec, or $ZSADBENCH_DATA)")
                root = root.replace("{data}", str(Path(data_dir).expanduser()))
            entry.data_root = str(Path(root).expanduser().resolve())
        elif info.needs_root:
            raise SpecError(f"{at}: dataset {entry.dataset!r} needs data_root (its folder)")
        datasets[key] = entry
    if not datasets:
        raise SpecError(f"{where}: no [datasets.NAME] table")
    for entry in datasets.values():
        if entry.trained_on is not None and entry.trained_on not in datasets:
            raise SpecError(f"{where}: [datasets.{entry.key}] trained_on {entry.trained_on!r} is not a dataset of "
                            f"the sweep ({', '.join(datasets)})")
    seeds = _int_list(data.get("seeds", [0]), f"{where}: seeds")
    shots = _int_list(data.get("shots", [0]), f"{where}: shots")
    methods = []
    for key, table in (data.get("methods") or {}).items():
        at = f"{where}: [methods.{key}]"
        if not isinstance(table, dict):
            raise SpecError(f"{at} must be a table")
        _check_keys(table, _METHOD_KEYS, at)
        method = str(table.get("method", key))
        try:
            cls = get_method(method)
        except KeyError as exc:
            raise SpecError(f"{at}: {exc.args[0] if exc.args else exc}") from None
        overrides: dict[str, str] = {}
        if "preset" in table:
            if table["preset"] not in cls.presets:
                raise SpecError(f"{at}: {method} has no preset {table['preset']!r}; presets: "
                                f"{', '.join(cls.presets) or 'none'}")
            overrides |= {k: str(v) for k, v in cls.presets[table["preset"]].items()}
        if "pretrained" in table:
            overrides["pretrained"] = str(table["pretrained"])
        overrides |= {k: str(v) for k, v in _flatten(table.get("set") or {}).items()}
        method_entry = MethodEntry(key, method, overrides, train=bool(table.get("train", False)),
                            checkpoints=[str(Path(c).expanduser().resolve()) for c in table.get("checkpoints", [])],
                            shots=_int_list(table["shots"], f"{at} shots") if "shots" in table else None,
                            datasets=table.get("datasets"))
        _check_method(method_entry, cls, datasets, at)
        methods.append(method_entry)
    if not methods:
        raise SpecError(f"{where}: no [methods.NAME] table")
    eval_table = data.get("eval") or {}
    try:
        eval_options = EvalOptions(**eval_table)
    except TypeError as exc:
        raise SpecError(f"{where}: [eval]: {exc}") from None
    retries = data.get("retries", 2)
    if not isinstance(retries, int) or retries < 0:
        raise SpecError(f"{where}: retries must be an integer >= 0, got {retries!r}")
    return SweepSpec(name, methods, datasets, seeds, shots, retries, str(data.get("device", "auto")),
                     data.get("experiment"), eval_options, bool(data.get("include_random", False)),
                     int(data.get("bootstrap", 1000)), where)


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check_method(entry: MethodEntry, cls: type, datasets: dict[str, DatasetEntry], at: str) -> None:
    """Checks a method's options, its training and checkpoints against what the method can do."""
    import dataclasses

    from zsadbench.config import ConfigError, apply_overrides
    from zsadbench.detector import Trainable

    try:
        apply_overrides(cls.Config(), entry.overrides)  # type: ignore[attr-defined]
    except (ConfigError, ValueError, KeyError) as exc:
        raise SpecError(f"{at}: {exc}") from None
    fields = {f.name for f in dataclasses.fields(cls.Config)}  # type: ignore[attr-defined]
    if (entry.train or entry.checkpoints) and "checkpoint" not in fields:
        raise SpecError(f"{at}: {entry.method} has no learned parts (train / checkpoints)")
    if entry.train and not issubclass(cls, Trainable):
        raise SpecError(f"{at}: {entry.method} cannot be trained (train = true)")
    if entry.shots is not None and any(entry.shots) and "shots" not in fields:
        raise SpecError(f"{at}: {entry.method} is not a few-shot method (shots)")
    for path in entry.checkpoints:
        if not Path(path).is_file():
            raise SpecError(f"{at}: checkpoint {path}: no such file")
    for key in entry.datasets or []:
        if key not in datasets:
            raise SpecError(f"{at}: dataset {key!r} is not a dataset of the sweep ({', '.join(datasets)})")
    if entry.train:
        missing = [d.key for d in datasets.values() if d.evaluate and d.trained_on is None
                   and (entry.datasets is None or d.key in entry.datasets)]
        if missing:
            raise SpecError(f"{at}: train = true, but dataset{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(missing)} name{'' if len(missing) > 1 else 's'} no auxiliary dataset "
                            "(trained_on)")


# ------------------------------------------------------------------------------------------------------------ grid

@dataclass
class Cell:
    """One job of the grid: its spec, its key (hash of the full spec) and the training it waits for."""

    key: str
    spec: RunSpec | TrainSpec
    label: str
    dataset_key: str
    needs: str | None = None  # key of the training cell whose checkpoint this run evaluates

    @property
    def kind(self) -> str:
        """Returns ``training`` or ``evaluation``."""
        return self.spec.kind

    @property
    def run_name(self) -> str:
        """Returns the job's MLflow run name: the label's short form and the key, unique per cell."""
        return self.spec.run_name or self.key


def cell_identity(spec: JobSpec, checkpoint: str | None, fingerprint: str | None) -> dict[str, Any]:
    """Returns what makes a job's result what it is: the hashed part of a cell (the device and names excluded)."""
    from zsadbench.config import apply_overrides, to_dict
    from zsadbench.hashing import weights_id
    from zsadbench.registry import get_method

    config = to_dict(apply_overrides(get_method(spec.method).Config(), spec.overrides))
    if "pretrained" in config:
        config["pretrained"] = weights_id(config["pretrained"])
    config.pop("checkpoint", None)
    identity: dict[str, Any] = {
        "kind": spec.kind, "method": spec.method, "config": config, "dataset": spec.dataset,
        "data_root": spec.data_root, "dataset_options": spec.dataset_options, "categories": spec.categories,
        "fingerprint": fingerprint, "checkpoint": checkpoint, "seed": spec.seed}
    if isinstance(spec, RunSpec):
        identity["eval"] = asdict(spec.eval)
    return identity


def cell_key(identity: dict[str, Any]) -> str:
    """Returns the SHA-256 of a cell's identity (canonical JSON)."""
    text = json.dumps(identity, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _fingerprints(spec: SweepSpec, progress: bool) -> dict[str, str | None]:
    """Returns each dataset's fingerprint where its folder is on this machine (cached file hashes after the first)."""
    from zsadbench.fingerprint import registered_fingerprint

    out: dict[str, str | None] = {}
    for key, entry in spec.datasets.items():
        if entry.data_root and Path(entry.data_root).is_dir():
            out[key] = registered_fingerprint(entry.dataset, entry.data_root, entry.options)
        else:  # generated (synthetic: its options define it) or not on this machine
            out[key] = None
    return out


def expand(spec: SweepSpec, *, device: str = "cpu", fingerprints: dict[str, str | None] | None = None) -> list[Cell]:
    """Returns the grid's cells, trainings first; each evaluation of a trained method names its training cell."""
    from zsadbench.registry import get_method

    fingerprints = fingerprints or {}
    trainings: dict[tuple[str, str, int], Cell] = {}
    runs: list[Cell] = []

    def job_fields(entry: DatasetEntry) -> dict[str, Any]:
        return dict(dataset=entry.dataset, data_root=entry.data_root, categories=entry.categories,
                    dataset_options=dict(entry.options), device=device, experiment=spec.experiment_name)

    for method in spec.methods:
        has_shots = "shots" in get_method(method.method).Config.__dataclass_fields__  # type: ignore[attr-defined]
        shots_axis = method.shots if method.shots is not None else spec.shots
        shots_axis = shots_axis if has_shots else [0]  # zero-shot-only methods: the shots axis does not apply
        tested = [d for d in spec.datasets.values() if d.evaluate and (method.datasets is None
                                                                      or d.key in method.datasets)]
        for dataset in tested:
            sources: list[tuple[str, str | None]] = [(c, None) for c in method.checkpoints]
            if method.train:
                sources.append(("train", dataset.trained_on))
            if not sources:
                sources.append(("", None))
            for seed in spec.seeds:
                for source, auxiliary in sources:
                    needs = None
                    checkpoint_id: str | None = None
                    overrides = dict(method.overrides)
                    origin = ""
                    if source == "train":
                        assert auxiliary is not None
                        training = trainings.get((method.key, auxiliary, seed))
                        if training is None:
                            aux = spec.datasets[auxiliary]
                            train_spec = TrainSpec(method=method.method, overrides=dict(method.overrides), seed=seed,
                                                   **job_fields(aux))
                            identity = cell_identity(train_spec, None, fingerprints.get(auxiliary))
                            key = cell_key(identity)
                            label = f"train {method.key} on {auxiliary} (seed {seed})"
                            training = Cell(key, replace(train_spec, run_name=_run_name("train", method.key,
                                                                                        auxiliary, key)),
                                            label, auxiliary)
                            trainings[(method.key, auxiliary, seed)] = training
                        needs = training.key
                        checkpoint_id = f"training:{training.key}"
                        origin = f", trained on {auxiliary}"
                    elif source:
                        from zsadbench.hashing import weights_id

                        overrides["checkpoint"] = source
                        checkpoint_id = weights_id(source)
                        origin = f", {Path(source).name}"
                    for shots in shots_axis:
                        run_overrides = {**overrides, "shots": str(shots)} if has_shots else overrides
                        run_spec = RunSpec(method=method.method, overrides=run_overrides, seed=seed,
                                           eval=replace(spec.eval), **job_fields(dataset))
                        key = cell_key(cell_identity(run_spec, checkpoint_id, fingerprints.get(dataset.key)))
                        shot_text = f", {shots}-shot" if has_shots else ""
                        label = f"{method.key} on {dataset.key}{origin}{shot_text} (seed {seed})"
                        runs.append(Cell(key, replace(run_spec, run_name=_run_name("run", method.key, dataset.key,
                                                                                   key)),
                                         label, dataset.key, needs))
    cells = list(trainings.values()) + runs
    seen: dict[str, Cell] = {}
    for cell in cells:
        if cell.key in seen:
            raise SpecError(f"{spec.source}: {cell.label} and {seen[cell.key].label} are the same job (same key)")
        seen[cell.key] = cell
    return cells


def _run_name(prefix: str, method: str, dataset: str, key: str) -> str:
    return f"{prefix}-{method}-{dataset}-{key[:KEY_LENGTH]}"


# ------------------------------------------------------------------------------------------------- cell records

@dataclass(frozen=True)
class CellRecord:
    """A cell's file in the sweep folder (``cells/<key>.json``): status, attempts, run id, error, timing."""

    path: Path

    def read(self) -> dict[str, Any]:
        """Returns the stored record ({} before the cell first started)."""
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def update(self, **changes: Any) -> dict[str, Any]:
        """Writes fields of the record (atomically) and returns it."""
        record = {**self.read(), **changes}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(record, indent=1, default=str))
        os.replace(temporary, self.path)
        return record


def finished_jobs() -> dict[tuple[str, str], tuple[JobFolder, str]]:
    """Returns (kind, run name) -> (folder, status) of every job in the results folder."""
    found: dict[tuple[str, str], tuple[JobFolder, str]] = {}
    for kind, sub in JobFolder.SUBFOLDERS.items():
        for state_file in sorted((results_dir() / sub).glob("*/state.json")):
            try:
                state = json.loads(state_file.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            name = (state.get("spec") or {}).get("run_name")
            if name:
                found[(kind, name)] = (JobFolder(state_file.parent), state.get("status", ""))
    return found


# --------------------------------------------------------------------------------------------------- the worker

def execute_cell(cell: dict[str, Any], checkpoint: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """Runs one cell as a job (a Ray task's body): resumes its unfinished job, or skips a finished one.

    ``checkpoint`` is the training outcome (a dict) of the cell's training, resolved by Ray before this starts, or
    None. Returns the outcome (run id, folder, seconds, the means of an evaluation, the checkpoint of a training).
    """
    import torch

    from zsadbench import jobs
    from zsadbench.training import last_checkpoint

    os.environ.update(settings["env"])  # per sweep: a worker of a shared cluster may serve several sweeps
    torch.set_num_threads(settings["threads"])
    spec = jobs.SPECS[cell["kind"]].from_json(cell["spec"])
    if isinstance(checkpoint, dict):
        spec.overrides = {**spec.overrides, "checkpoint": checkpoint["checkpoint"]}
    record = CellRecord(Path(settings["sweep_folder"]) / "cells" / f"{cell['key']}.json")
    attempt = record.read().get("attempts", 0) + 1
    started = time.time()
    record.update(key=cell["key"], label=cell["label"], kind=cell["kind"], status="running", attempts=attempt,
                  started=started, host=socket.gethostname(), pid=os.getpid(), error=None)
    existing = finished_jobs().get((cell["kind"], spec.run_name or ""))
    try:
        if existing is not None and existing[1] == "complete":
            folder = existing[0]
        else:
            if existing is None:
                _drop_orphan_runs(spec)
            resume = str(existing[0].path) if existing else None
            if isinstance(spec, TrainSpec):
                folder_path = jobs.train(None if resume else spec, resume=resume, progress=False).folder
            else:
                folder_path = jobs.run(None if resume else spec, resume=resume, progress=False).folder
            folder = JobFolder(folder_path)
        result: dict[str, Any] = {"key": cell["key"], "run_id": folder.run_id, "folder": str(folder.path)}
        if cell["kind"] == "training":
            final = last_checkpoint(folder.path)
            if final is None:
                raise RuntimeError(f"training {folder.run_id} finished without a checkpoint in {folder.path}")
            result["checkpoint"] = str(final)
        elif folder.results.is_file():
            means = json.loads(folder.results.read_text()).get("mean", {})
            result["means"] = {k: v for k, v in means.items() if k in ("image_auroc", "pixel_auroc", "pixel_aupro")}
        _tag_run(folder.run_id, cell["key"], settings)
    except Exception as exc:
        record.update(status="failed", error=_error_line(exc), finished=time.time())
        raise
    except BaseException as exc:  # the worker is being stopped (the sweep was interrupted): not the cell's failure
        record.update(status="queued", error=f"stopped: {_error_line(exc)}", finished=time.time())
        raise
    result["seconds"] = time.time() - started
    record.update(status="done", run_id=result["run_id"], finished=time.time(), seconds=result["seconds"],
                  checkpoint=result.get("checkpoint"), means=result.get("means"))
    return result


def _drop_orphan_runs(spec: JobSpec) -> None:
    """Deletes MLflow runs of this cell that have no job folder (a worker lost between starting a run and its folder).

    Keeps "one MLflow run per cell" true however a worker died.
    """
    from mlflow.tracking import MlflowClient

    from zsadbench.tracking import tracking_uri

    client = MlflowClient(tracking_uri=tracking_uri())
    experiment = client.get_experiment_by_name(spec.experiment)
    if experiment is None:
        return
    name = (spec.run_name or "").replace("'", "")
    for run in client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'"):
        log.warning("deleting MLflow run %s of cell %s: it has no job folder (its worker was lost)",
                    run.info.run_id, name)
        client.delete_run(run.info.run_id)


def _tag_run(run_id: str, key: str, settings: dict[str, Any]) -> None:
    """Tags a cell's run with the sweep, its key and the parent run (best effort: the folder is the truth)."""
    from mlflow.tracking import MlflowClient

    from zsadbench.tracking import tracking_uri

    try:
        client = MlflowClient(tracking_uri=tracking_uri())
        tags = {SWEEP_TAG: settings["sweep"], CELL_TAG: key}
        if settings.get("parent_run"):
            tags[PARENT_TAG] = settings["parent_run"]
        for name, value in tags.items():
            client.set_tag(run_id, name, value)
    except Exception as exc:  # noqa: BLE001 (tags only group runs in the UI)
        log.warning("could not tag run %s with its sweep: %s", run_id, _error_line(exc))


def _error_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)  # a RayTaskError wraps the task's own exception
    if isinstance(cause, BaseException) and cause is not exc:
        exc = cause
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return redact_text(f"{type(exc).__name__}: {text}"[:500])


def redact_text(text: str) -> str:
    """Returns ``text`` with the credentials of any URL in it replaced (``scheme://***@host``)."""
    import re

    return re.sub(r"(\b[a-zA-Z][\w+.-]*://)[^/\s@]+@", r"\1***@", text)


# ------------------------------------------------------------------------------------------------ mlflow server

@contextmanager
def owned_tracking_server(log_path: Path, host: str = "127.0.0.1", timeout: float = 180.0) -> Iterator[str]:
    """Starts an ``mlflow server`` (the embedded SQLite store behind it) on ``host``; yields its URL, stops it."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    store = results_dir() / "mlflow.db"
    store.parent.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    output = log_path.open("a")
    command = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{store}", "--artifacts-destination",
               str(results_dir() / "mlartifacts")]
    # its own session: stopping it stops its web workers too; the job runner (huey) is not needed to record runs
    process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://{host}:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:  # noqa: S310 (our own server)
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.time() > deadline:
                tail = log_path.read_text()[-2000:]
                raise RuntimeError(f"the sweep's mlflow server did not start (log {log_path}):\n{tail}")
            time.sleep(0.3)
        yield url
    finally:
        _stop_group(process)
        output.close()


def _stop_group(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


# --------------------------------------------------------------------------------------------------- resources

@dataclass
class Slots:
    """How many jobs run at once on the local Ray instance, and what each gets."""

    workers: int
    gpus: int
    threads: int

    @property
    def device(self) -> str:
        """Returns the device each job uses."""
        return "cuda" if self.gpus else "cpu"


def local_slots(workers: int | None = None, memory_per_job_gb: float = 3.0) -> Slots:
    """Returns the local slots: one per GPU when there are GPUs, else CPU slots fitting cores and memory."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers is None:
        if gpus:
            workers = gpus
        else:
            memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
            workers = max(1, min(cores, int(memory_gb // memory_per_job_gb)))
    return Slots(workers, min(gpus, workers), max(1, cores // workers))


# ---------------------------------------------------------------------------------------------------- progress

@dataclass
class Grid:
    """The live state of every cell (done, running, failed, queued), read from the cell records."""

    cells: list[Cell]
    folder: Path
    slots: int
    status: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    run_ids: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    skipped: set[str] = field(default_factory=set)  # finished before this sweep started
    started: float = field(default_factory=time.time)

    def record(self, key: str) -> CellRecord:
        """Returns a cell's record file."""
        return CellRecord(self.folder / "cells" / f"{key}.json")

    def refresh(self) -> None:
        """Reads running cells from their records (a cell the driver has not seen finish yet)."""
        for cell in self.cells:
            if self.status.get(cell.key) in ("done", "failed"):
                continue
            stored = self.record(cell.key).read()
            self.status[cell.key] = "running" if stored.get("status") == "running" else "queued"
            self.attempts[cell.key] = stored.get("attempts", 0)

    def counts(self) -> dict[str, int]:
        """Returns how many cells are in each state."""
        values = [self.status.get(c.key, "queued") for c in self.cells]
        return {state: values.count(state) for state in STATES}

    def eta_seconds(self) -> float | None:
        """Returns the expected time left: the mean time of the cells run here, times the cells left per slot."""
        ran = [s for k, s in self.seconds.items() if k not in self.skipped]
        counts = self.counts()
        left = counts["running"] + counts["queued"]
        if not left:
            return 0.0
        if not ran:
            return None
        return sum(ran) / len(ran) * math.ceil(left / max(1, self.slots))

    def summary(self) -> str:
        """Returns one line: counts and ETA."""
        counts = self.counts()
        eta = self.eta_seconds()
        eta_text = "?" if eta is None else _duration(eta)
        return (f"{counts['done']} done, {counts['running']} running, {counts['failed']} failed, "
                f"{counts['queued']} queued of {len(self.cells)}; elapsed {_duration(time.time() - self.started)}, "
                f"ETA {eta_text}")

    def rows(self) -> list[dict[str, Any]]:
        """Returns the grid as a table: one row per cell."""
        rows = []
        for cell in self.cells:
            rows.append({"cell": cell.label, "kind": cell.kind, "key": cell.key[:KEY_LENGTH],
                         "status": self.status.get(cell.key, "queued"), "attempts": self.attempts.get(cell.key, 0),
                         "run_id": self.run_ids.get(cell.key, ""),
                         "seconds": round(self.seconds[cell.key], 1) if cell.key in self.seconds else None,
                         "error": self.errors.get(cell.key, "")})
        return rows

    def markdown(self) -> str:
        """Returns the grid as a Markdown table headed by the summary line."""
        lines = [self.summary(), "", "| cell | kind | status | attempts | seconds | run | error |",
                 "|---|---|---|---|---|---|---|"]
        for row in self.rows():
            error = str(row["error"]).replace("|", "\\|")
            lines.append(f"| {row['cell']} | {row['kind']} | {row['status']} | {row['attempts']} | "
                         f"{'' if row['seconds'] is None else row['seconds']} | {row['run_id']} | {error} |")
        return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ParentRun:
    """The sweep's MLflow parent run: its parameters, and the grid's table as it goes (artifacts and metrics)."""

    def __init__(self, uri: str, spec: SweepSpec, params: dict[str, Any]) -> None:
        from zsadbench.tracking import Tracker

        self.tracker = Tracker(uri, spec.experiment_name)
        client = self.tracker.client
        found = client.search_runs([self.tracker.experiment_id],
                                   filter_string=f"tags.`{SWEEP_TAG}` = '{spec.name}' and tags.`{KIND_TAG}` = 'sweep'")
        if found:
            self.tracker.resume(found[0].info.run_id)
        else:
            self.tracker.start(f"sweep-{spec.name}", {KIND_TAG: "sweep", SWEEP_TAG: spec.name})
        self.tracker.log_params({k: redact_text(str(v)) for k, v in params.items()})
        self.last = 0.0
        self.step = 0

    @property
    def run_id(self) -> str:
        """Returns the parent run's id."""
        assert self.tracker.run_id is not None
        return self.tracker.run_id

    def publish(self, grid: Grid, force: bool = False, every: float = 10.0) -> None:
        """Logs the grid table and the counts (at most every ``every`` seconds unless ``force``)."""
        if not force and time.time() - self.last < every:
            return
        import pandas as pd

        self.last = time.time()
        self.step += 1
        client, run_id = self.tracker.client, self.run_id

        def log() -> None:
            # log_table would append to the earlier table: the file is rewritten in its format ("columns", "data"),
            # and the tag it sets makes the MLflow UI show it as a table
            table = pd.DataFrame(grid.rows()).to_dict(orient="split")
            client.log_dict(run_id, {"columns": table["columns"], "data": table["data"]}, "sweep_grid.json")
            client.log_text(run_id, grid.markdown(), "sweep_grid.md")
            client.set_tag(run_id, "mlflow.loggedArtifacts", json.dumps([{"path": "sweep_grid.json",
                                                                          "type": "table"}]))

        self.tracker._call("logging the grid", log)
        self.tracker.log_metrics({f"cells_{state}": n for state, n in grid.counts().items()}, step=self.step)

    def finish(self, status: str) -> None:
        """Ends the parent run."""
        self.tracker.finish(status)


# ---------------------------------------------------------------------------------------------------- execution

@dataclass
class SweepOutcome:
    """What a sweep did: the grid's final state, the leaderboard's files, the tracking URI (redacted)."""

    grid: Grid
    leaderboard: Path | None
    tracking: str
    parent_run: str | None

    @property
    def failed(self) -> list[tuple[str, str]]:
        """Returns (label, error) of each failed cell."""
        return [(c.label, self.grid.errors.get(c.key, "")) for c in self.grid.cells
                if self.grid.status.get(c.key) == "failed"]


def execute(spec: SweepSpec, *, ray_address: str | None = None, tracking_uri: str | None = None,
            workers: int | None = None, memory_per_job_gb: float = 3.0, progress: bool = True,
            write_leaderboard: bool = True, publish_every: float = 10.0) -> SweepOutcome:
    """Runs the sweep's grid on Ray; finished cells are skipped, failed ones retried then reported; returns how."""
    from zsadbench.jobs import preflight

    slots = local_slots(workers, memory_per_job_gb)
    device = spec.device if spec.device != "auto" else slots.device
    folder = spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    cells = expand(spec, device=device, fingerprints=_fingerprints(spec, progress))
    uri_given = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    with _tracking(uri_given, folder) as uri:
        checked: set[tuple[str, str]] = set()
        for cell in cells:  # every option, folder and the tracking server, before anything runs
            identity = (json.dumps(cell.spec.overrides, sort_keys=True), cell.dataset_key + cell.kind)
            if identity not in checked:
                preflight(cell.spec, uri)
                checked.add(identity)
        _create_experiment(uri, spec.experiment_name, owned=not uri_given)
        parent = ParentRun(uri, spec, {"sweep": spec.name, "spec": spec.source, "cells": len(cells),
                                       "tracking_uri": redact(uri), "ray_address": ray_address or "local",
                                       "workers": slots.workers, "retries": spec.retries, "device": device})
        grid = Grid(cells, folder, slots.workers)
        try:
            _run_on_ray(spec, cells, grid, parent, uri, slots, ray_address, progress, publish_every)
        except KeyboardInterrupt:
            parent.publish(grid, force=True)
            parent.finish("interrupted")
            raise
        parent.publish(grid, force=True)
        _write_grid(grid)
        board = None
        if write_leaderboard and any(grid.status.get(c.key) == "done" and c.kind == "evaluation" for c in cells):
            board = refresh_leaderboard(spec, uri)
        parent.finish("failed" if grid.counts()["failed"] else "complete")
        return SweepOutcome(grid, board, redact(uri), parent.run_id)


@contextmanager
def _tracking(uri: str | None, folder: Path) -> Iterator[str]:
    if uri:
        yield uri
        return
    with owned_tracking_server(folder / "mlflow-server.log") as url:
        yield url


def _create_experiment(uri: str, name: str, owned: bool) -> None:
    """Creates the experiment once, in the driver (workers only find it); with our own server, artifacts stay in
    the results folder as with the embedded store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(name) is None:
        location = (results_dir() / "mlartifacts").as_uri() if owned else None
        client.create_experiment(name, artifact_location=location)


def _write_grid(grid: Grid) -> None:
    import pandas as pd

    pd.DataFrame(grid.rows()).to_csv(grid.folder / "grid.csv", index=False)
    (grid.folder / "grid.md").write_text(grid.markdown())


def _run_on_ray(spec: SweepSpec, cells: list[Cell], grid: Grid, parent: ParentRun, uri: str, slots: Slots,
                ray_address: str | None, progress: bool, publish_every: float) -> None:
    import ray
    from tqdm.auto import tqdm

    jobs_done = {(kind, name): value for (kind, name), value in finished_jobs().items() if value[1] == "complete"}
    outcomes: dict[str, dict[str, Any]] = {}
    for cell in cells:  # finished cells are never recomputed, nor even submitted
        found = jobs_done.get((cell.kind, cell.run_name))
        if found is None:
            continue
        outcome: dict[str, Any] = {"key": cell.key, "run_id": found[0].run_id, "folder": str(found[0].path)}
        if cell.kind == "training":
            from zsadbench.training import last_checkpoint

            final = last_checkpoint(found[0].path)
            if final is None:
                continue
            outcome["checkpoint"] = str(final)
        outcomes[cell.key] = outcome
        grid.status[cell.key] = "done"
        grid.run_ids[cell.key] = found[0].run_id
        grid.skipped.add(cell.key)
        stored = grid.record(cell.key).read()
        grid.seconds[cell.key] = stored.get("seconds", 0.0)
        grid.attempts[cell.key] = stored.get("attempts", 0)
        if stored.get("status") != "done":
            grid.record(cell.key).update(key=cell.key, label=cell.label, kind=cell.kind, status="done",
                                         run_id=found[0].run_id)
    for cell in cells:  # a cell left "running" by an interrupted sweep is queued again
        if cell.key not in outcomes:
            record = grid.record(cell.key)
            if record.read().get("status") in ("running", "failed"):
                record.update(status="queued")
    todo = [c for c in cells if c.key not in outcomes]
    env = {"ZSADBENCH_RESULTS": str(results_dir()), "MLFLOW_TRACKING_URI": uri,
           "OMP_NUM_THREADS": str(slots.threads), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_LOGGING_LEVEL": "WARNING", "TQDM_DISABLE": "1"}
    owned_ray = not ray.is_initialized()  # started (local) or joined (cluster) here: shut down / left at the end
    if owned_ray and ray_address is None:
        ray.init(num_cpus=slots.workers, num_gpus=slots.gpus, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1", configure_logging=False, object_store_memory=OBJECT_STORE_BYTES)
    elif owned_ray:
        ray.init(address=ray_address, log_to_driver=False, configure_logging=False)
    try:
        settings = {"sweep": spec.name, "sweep_folder": str(spec.folder), "parent_run": parent.run_id,
                    "threads": slots.threads, "env": env}
        on_gpu = any(c.spec.device.startswith("cuda") for c in cells)  # one GPU per job (a cluster's too)
        task = ray.remote(num_cpus=1, num_gpus=1 if on_gpu else 0, max_retries=spec.retries,
                          retry_exceptions=True)(execute_cell)
        refs: dict[str, Any] = {}
        by_key = {c.key: c for c in cells}
        for cell in todo:  # trainings come first in the grid, so their references exist for the runs
            dependency = None
            if cell.needs is not None:
                dependency = outcomes.get(cell.needs) or refs[cell.needs]
            payload = {"key": cell.key, "label": cell.label, "kind": cell.kind, "spec": cell.spec.to_json()}
            refs[cell.key] = task.options(name=cell.run_name).remote(payload, dependency, settings)
        pending = {ref: key for key, ref in refs.items()}
        bar = tqdm(total=len(cells), initial=len(outcomes), desc=f"sweep {spec.name}", unit="cell",
                   disable=None if progress else True, dynamic_ncols=True)
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    key = pending.pop(ref)
                    cell = by_key[key]
                    try:
                        outcome = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 (a failed cell is reported, the rest goes on)
                        error = _error_line(exc)
                        if cell.needs is not None and grid.status.get(cell.needs) == "failed":
                            error = f"its training failed: {grid.errors.get(cell.needs, error)}"
                        grid.status[key] = "failed"
                        grid.errors[key] = error
                        stored = grid.record(key).update(key=key, label=cell.label, kind=cell.kind,
                                                         status="failed", error=error)
                        grid.attempts[key] = stored.get("attempts", 0)
                        bar.write(f"failed: {cell.label}: {error}")
                    else:
                        grid.status[key] = "done"
                        grid.run_ids[key] = outcome["run_id"]
                        grid.seconds[key] = outcome["seconds"]
                        grid.attempts[key] = grid.record(key).read().get("attempts", 1)
                        if bar.disable and progress:  # not a terminal: one line per finished cell instead
                            print(f"done: {cell.label} ({outcome['seconds']:.0f} s, run {outcome['run_id']}); "
                                  f"{grid.summary()}", flush=True)
                    bar.update(1)
                grid.refresh()
                counts = grid.counts()
                eta = grid.eta_seconds()
                bar.set_postfix_str(f"done {counts['done']} running {counts['running']} failed {counts['failed']} "
                                    f"queued {counts['queued']} ETA {'?' if eta is None else _duration(eta)}")
                parent.publish(grid, every=publish_every)
        except KeyboardInterrupt:
            # Leaving Ray ends this job's running tasks (Ray kills the workers of a driver that is gone). Cancelling
            # them one by one races with tasks finishing at that moment and can crash Ray's core worker (a known
            # Ray bug, "Tried to complete task that was not pending"), so only a Ray the caller keeps is told to.
            if not owned_ray:
                for ref in pending:
                    ray.cancel(ref, force=True)
            bar.write(f"interrupted: resume with the same command (finished cells are kept): {grid.summary()}")
            raise
        finally:
            bar.close()
    finally:
        if owned_ray:
            ray.shutdown()


def describe_grid(spec: SweepSpec, device: str = "cpu") -> str:
    """Returns the grid as text, one cell a line: finished (its run id) or to run, and what it waits for."""
    cells = expand(spec, device=device, fingerprints=_fingerprints(spec, progress=True))
    done = finished_jobs()
    lines = [f"sweep {spec.name} ({spec.source}): {len(cells)} cells, experiment {spec.experiment_name!r}"]
    labels = {c.key: c.label for c in cells}
    for cell in cells:
        found = done.get((cell.kind, cell.run_name))
        state = f"finished ({found[0].run_id})" if found and found[1] == "complete" else "to run"
        after = f"  [after: {labels[cell.needs]}]" if cell.needs else ""
        lines.append(f"  {cell.key[:KEY_LENGTH]}  {state:<42} {cell.label}{after}")
    return "\n".join(lines)


def refresh_leaderboard(spec: SweepSpec, uri: str | None = None) -> Path:
    """Writes the sweep's leaderboard (``results/sweeps/<name>/leaderboard/``) from its experiment; returns the
    Markdown file. Runs while the sweep does, from its tracking server or store."""
    from zsadbench.report import leaderboard

    _, written = leaderboard(spec.experiment_name, uri, out=spec.folder / "leaderboard", replicates=spec.bootstrap,
                             include_random=spec.include_random, progress=False)
    return written["markdown"]


def default_store_uri() -> str:
    """Returns the store the sweep's own server keeps its runs in (for the leaderboard while it runs)."""
    return f"sqlite:///{results_dir() / 'mlflow.db'}"


__all__ = ["PRESETS", "Cell", "Grid", "SpecError", "SweepOutcome", "SweepSpec", "cell_key", "execute", "expand",
           "load_spec", "parse_spec", "refresh_leaderboard"]
