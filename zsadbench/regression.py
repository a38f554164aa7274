"""``zsadbench check``: every registered method against committed goldens, to catch silent drift in CI.

Each method declares, on its detector class, the variants to guard and the config overrides that make them small
(a tiny seeded random backbone, a small input size)::

    class WinCLIP(Detector):
        regression_variants = {"zero-shot": {"model": "tiny-ViT-B-16-plus-240", "pretrained": "random",
                                             "image_size": 80}}

The check builds each variant through the registry (:func:`zsadbench.load_method`), runs it, seeded, on a fixed small
synthetic benchmark (:data:`BENCHMARK`) through the normal evaluator and compares with ``<method>.<variant>.json`` in
the method's goldens folder (:func:`goldens_location`), found wherever the command runs:

- built-in methods: the goldens that ship with zsadbench (``results/regression/`` of the source tree, packaged as
  ``zsadbench/goldens/`` in a wheel);
- a plugin: the folder its class names in ``regression_goldens`` (relative to its module's folder), by default a
  ``goldens`` folder next to its module (ship it as package data);
- ``--goldens DIR``: one folder for every checked method.

What a golden holds:

- every metric of every category and the class means;
- every image's score and a summary of its anomaly map (shape, mean, std, min, max, three quantiles, and the means of
  a 4 x 4 grid of blocks, so that a moved or flipped map is caught too) — a checksum that, unlike a hash, tolerates
  the ~1e-6 float noise between BLAS builds.

Each quantity has a tolerance (:data:`DEFAULT_TOLERANCES`, overridable per method with ``regression_tolerances``);
``|observed - golden| <= atol + rtol * |golden|``. The tolerances are written into the golden file, so a reviewer
sees them next to the numbers, and so are the versions of every package that affects the numbers (``verified_with``).

Goldens must reproduce on any machine and thread count, so ``--update`` refuses to write a golden of an
ill-conditioned variant: it runs the variant a second time with every preprocessed input value scaled by
``1 +`` :data:`PROBE_PERTURBATION` (far above float noise between machines, far below any real change) and requires
its image scores and map summaries to agree with the first run's within the tolerances. A variant whose discrete
choices (a top-k or arg-max over near-tied features) flip under that perturbation would flip between BLAS builds too.
The probe is a guard, not a proof: a choice among ties that no input scaling moves is not caught. Without goldens, or
without a declared configuration, a method fails with a message that says what is missing and where it looked.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import random
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FORMAT = 1
SEED = 0
# --update's conditioning probe: relative size of the input perturbation (BLAS / thread-count noise is ~1e-7)
PROBE_PERTURBATION = 1e-5
# the distributions whose versions can change a golden's numbers (recorded in each golden's ``verified_with``)
VERSIONED_DISTRIBUTIONS = ("zsadbench", "torch", "numpy", "scipy", "pillow", "timm", "open_clip_torch")
# The fixed benchmark: 3 categories (texture, object, medical) x 8 test images (4 anomalous with masks) at 64 px,
# 2 normal training images for few-shot variants. Small enough that all methods together run in about a minute.
BENCHMARK: dict[str, Any] = {"image_size": 64, "n_train": 2, "n_test_normal": 4, "n_test_anomalous": 4,
                             "categories": "carpet,bottle,brain", "seed": 0}
QUANTILES = (0.5, 0.9, 0.99)
GRID = 4
SIGNIFICANT_DIGITS = 8  # goldens store 8 significant digits: far below every tolerance, and readable diffs
DEFAULT_TOLERANCES: dict[str, dict[str, float]] = {
    # metrics are rank-based: float noise can only flip exact near-ties, a real change moves them by >= 1/#images
    **{name: {"atol": 1e-4, "rtol": 0.0} for name in (
        "image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro",
        "mad_image", "mad_pixel", "mad_all7")},
    "image_score": {"atol": 1e-6, "rtol": 1e-4},
    "map": {"atol": 1e-6, "rtol": 1e-4},  # every statistic of the map summary
}
_VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_NUMBER_LIST = re.compile(r"\[\s*((?:-?[\d.eE+-]+|null)(?:,\s*(?:-?[\d.eE+-]+|null))*)\s*\]")


def builtin_goldens() -> Path:
    """Returns the built-in methods' goldens: packaged in ``zsadbench/goldens``, else the source tree's folder."""
    package = Path(__file__).resolve().parent
    packaged = package / "goldens"  # a wheel: results/regression installed as package data
    return packaged if packaged.is_dir() else package.parent / "results" / "regression"


def goldens_location(cls: type) -> tuple[Path, str]:
    """Returns a method's goldens folder and where that choice comes from (quoted in errors)."""
    module = sys.modules.get(cls.__module__)
    module_file = getattr(module, "__file__", None)
    module_dir = Path(module_file).resolve().parent if module_file else Path.cwd()
    declared = getattr(cls, "regression_goldens", None)
    if declared:
        folder = Path(declared).expanduser()
        return (folder if folder.is_absolute() else module_dir / folder), f"{cls.__qualname__}.regression_goldens"
    if cls.__module__ == "zsadbench" or cls.__module__.startswith("zsadbench."):
        return builtin_goldens(), "the goldens shipped with zsadbench"
    return module_dir / "goldens", (f"the default for a plugin: a 'goldens' folder next to {cls.__module__}; set "
                                    f"{cls.__qualname__}.regression_goldens to use another")


def golden_path(folder: Path, method: str, variant: str) -> Path:
    """Returns the golden file of one method variant."""
    return folder / f"{method}.{variant}.json"


def _round(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def summarise_map(anomaly_map: np.ndarray) -> dict[str, Any]:
    """Returns the checksum-like summary of one anomaly map (shape, moments, quantiles, 4 x 4 block means)."""
    amap = np.asarray(anomaly_map, np.float64)
    summary: dict[str, Any] = {"shape": list(amap.shape), "mean": _round(amap.mean()), "std": _round(amap.std()),
                               "min": _round(amap.min()), "max": _round(amap.max())}
    for q, value in zip(QUANTILES, np.quantile(amap, QUANTILES)):
        summary[f"q{round(q * 100)}"] = _round(value)
    rows = np.array_split(np.arange(amap.shape[0]), GRID)
    cols = np.array_split(np.arange(amap.shape[1]), GRID)
    summary["grid"] = [[_round(amap[np.ix_(r, c)].mean()) if len(r) and len(c) else None for c in cols]
                       for r in rows]
    return summary


def _dumps(content: dict[str, Any]) -> str:
    """Returns indented JSON with lists of numbers kept on one line (a golden stays readable and diffs well)."""
    text = json.dumps(content, indent=1)
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"


def _json_value(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def versions(cls: type | None = None) -> dict[str, str]:
    """Returns the Python, platform and package versions that can change a golden (plus the plugin's own package)."""
    from importlib.metadata import PackageNotFoundError, packages_distributions, version

    names = list(VERSIONED_DISTRIBUTIONS)
    if cls is not None:
        names += [d for d in packages_distributions().get(cls.__module__.split(".")[0], []) if d not in names]
    out = {"python": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}"}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _perturb(transform: Any, relative: float) -> Any:
    """Returns ``transform`` followed by a scaling of every value by ``1 + relative`` (the conditioning probe).

    A uniform scale moves every activation of a network by about ``relative`` but keeps exact ties of equal inputs
    (equal pixel values of quantised images stay equal, as they do on every machine), so it flags only outputs that
    hinge on float noise.
    """

    def perturbed(image: Any) -> Any:
        tensor = transform(image)
        return tensor * (1 + relative)

    return perturbed


def observe(method: str, overrides: dict[str, Any], benchmark: dict[str, Any] | None = None,
            seed: int = SEED, perturbation: float = 0.0) -> dict[str, Any]:
    """Returns what a golden holds for one configuration: per-category metrics, class means, per-image summaries.

    The detector is built through the registry like everywhere else (:func:`zsadbench.load_method`). A non-zero
    ``perturbation`` moves every preprocessed input value by up to that relative amount (the conditioning probe).
    """
    import torch

    import zsadbench
    from zsadbench.datasets.synthetic import load_synthetic
    from zsadbench.evaluation import EvalOptions, evaluate

    benchmark = dict(BENCHMARK if benchmark is None else benchmark)
    dataset = load_synthetic(None, **benchmark)
    random.seed(seed)  # as a run seeds itself (the check stays independent of the job layer)
    np.random.seed(seed)
    torch.manual_seed(seed)
    detector = zsadbench.load_method(method, seed=seed, **overrides)
    if perturbation:
        detector.transform = _perturb(detector.transform, perturbation)  # type: ignore[method-assign]
    images: dict[str, dict[str, Any]] = {}

    def record(samples: list, scores: np.ndarray, maps: torch.Tensor) -> None:
        for sample, score, amap in zip(samples, scores, maps.numpy()):
            key = Path(sample.image_path).relative_to(dataset.root).as_posix()
            images.setdefault(sample.category, {})[key] = {
                "label": int(sample.label), "score": _round(score), "map": summarise_map(amap)}

    result = evaluate(detector, dataset, options=EvalOptions(overlays=0), progress=False, on_batch=record)
    table = result.table()
    metrics = {category: {name: _round(value) for name, value in row.items()}
               for category, row in table.to_dict(orient="index").items()}
    return {"metrics": metrics, "images": images}


@dataclass
class Mismatch:
    """One quantity outside its tolerance."""

    where: str
    golden: Any
    observed: Any
    tolerance: str

    def __str__(self) -> str:
        return f"{self.where}: golden {self.golden}, got {self.observed} ({self.tolerance})"


def _close(golden: Any, observed: Any, tol: dict[str, float]) -> bool:
    if golden is None or observed is None:
        return golden is None and observed is None
    return abs(float(observed) - float(golden)) <= tol["atol"] + tol["rtol"] * abs(float(golden))


def _tol_text(tol: dict[str, float]) -> str:
    return f"atol {tol['atol']:g}" + (f" + rtol {tol['rtol']:g}" if tol["rtol"] else "")


def compare(golden: dict[str, Any], observed: dict[str, Any]) -> tuple[list[Mismatch], int]:
    """Returns the quantities of ``observed`` outside the golden's tolerances, and how many were compared."""
    tolerances = golden["tolerances"]
    mismatches: list[Mismatch] = []
    compared = 0
    categories = sorted(set(golden["metrics"]) | set(observed["metrics"]))
    for category in categories:
        want, got = golden["metrics"].get(category), observed["metrics"].get(category)
        if want is None or got is None:
            mismatches.append(Mismatch(f"metrics of {category}", "present" if want else "absent",
                                       "present" if got else "absent", "category set"))
            continue
        for name in sorted(set(want) | set(got)):
            compared += 1
            tol = tolerances.get(name, {"atol": 1e-4, "rtol": 0.0})
            if not _close(want.get(name), got.get(name), tol):
                mismatches.append(Mismatch(f"{category}/{name}", want.get(name), got.get(name), _tol_text(tol)))
    for category in sorted(set(golden["images"]) | set(observed["images"])):
        want_images, got_images = golden["images"].get(category, {}), observed["images"].get(category, {})
        if set(want_images) != set(got_images):
            mismatches.append(Mismatch(f"images of {category}", sorted(want_images), sorted(got_images), "image set"))
            continue
        for key in sorted(want_images):
            want, got = want_images[key], got_images[key]
            compared += 2
            if want["label"] != got["label"]:
                mismatches.append(Mismatch(f"{key} label", want["label"], got["label"], "exact"))
            if not _close(want["score"], got["score"], tolerances["image_score"]):
                mismatches.append(Mismatch(f"{key} image score", want["score"], got["score"],
                                           _tol_text(tolerances["image_score"])))
            if want["map"]["shape"] != got["map"]["shape"]:
                mismatches.append(Mismatch(f"{key} map shape", want["map"]["shape"], got["map"]["shape"], "exact"))
                continue
            for stat in want["map"]:
                if stat == "shape":
                    continue
                pairs = ([(f"{stat}[{i}][{j}]", w, g) for i, (wr, gr) in enumerate(zip(want["map"][stat],
                                                                                         got["map"][stat]))
                          for j, (w, g) in enumerate(zip(wr, gr))] if stat == "grid"
                         else [(stat, want["map"][stat], got["map"].get(stat))])
                for name, w, g in pairs:
                    compared += 1
                    if not _close(w, g, tolerances["map"]):
                        mismatches.append(Mismatch(f"{key} map {name}", w, g, _tol_text(tolerances["map"])))
    return mismatches, compared


@dataclass
class VariantResult:
    """The outcome of checking (or updating) one method variant."""

    method: str
    variant: str
    status: str  # ok | failed | updated
    message: str = ""
    mismatches: list[Mismatch] = field(default_factory=list)
    compared: int = 0
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        """Returns whether this variant makes the check fail."""
        return self.status == "failed"


def _example_overrides(cls: type) -> str:
    import dataclasses

    config = getattr(cls, "Config", None)
    names = {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else set()
    example = {"model": "tiny-ViT-B-16-plus-240", "pretrained": "random", "image_size": 64}
    chosen = {k: v for k, v in example.items() if k in names} or {"image_size": 64}
    return "{\"zero-shot\": {" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in chosen.items()) + "}}"


def undeclared_message(name: str, cls: type) -> str:
    """Returns what a method without a regression configuration must add, and how to create its goldens."""
    return (f"method {name!r} ({cls.__module__}.{cls.__qualname__}) declares no regression configuration. Add a class "
            f"attribute to {cls.__qualname__}, for example\n\n"
            f"    regression_variants = {_example_overrides(cls)}\n\n"
            "with, per variant to guard (e.g. \"zero-shot\", \"1-shot\"), the config overrides that select the tiny "
            "seeded backbone and a small input size (see README, \"Adding a method\"). Then create its goldens with\n\n"
            f"    zsadbench check --method {name} --update\n\n"
            f"and commit results/regression/{name}.<variant>.json.")


def _missing_folder_message(name: str, folder: Path, origin: str) -> str:
    return (f"no goldens for {name}: the folder {folder} does not exist (looked there because it is {origin}). "
            "Goldens ship with the method; a missing folder means an incomplete installation or checkout, or a "
            "wrong --goldens, not goldens to create.")


def _missing_golden_message(name: str, variant: str, path: Path) -> str:
    return (f"no golden for {name}.{variant}: {path} does not exist (its folder does). If the variant is new, its "
            f"golden is made once from the reviewed implementation (`zsadbench check --method {name} --update`, "
            "which refuses ill-conditioned variants) and committed with it; if it existed before, restore that file: "
            "a golden re-created from the code under test passes whatever that code does.")


def _tolerances(cls: type) -> dict[str, dict[str, float]]:
    tolerances = {k: dict(v) for k, v in DEFAULT_TOLERANCES.items()}
    for name, tol in getattr(cls, "regression_tolerances", {}).items():
        if name not in tolerances:
            raise ValueError(f"{cls.__qualname__}.regression_tolerances: unknown quantity {name!r}; "
                             f"known: {', '.join(tolerances)}")
        tolerances[name].update(tol)
    return tolerances


def check_variant(name: str, cls: type, variant: str, overrides: dict[str, Any], folder: Path,
                  update: bool = False, origin: str = "the folder given") -> VariantResult:
    """Returns the outcome of running one variant and comparing it with (or writing) its golden."""
    start = time.perf_counter()
    path = golden_path(folder, name, variant)
    if not _VARIANT_NAME.match(variant):
        return VariantResult(name, variant, "failed", f"variant name {variant!r} of {cls.__qualname__}."
                             "regression_variants must be letters, digits, '-' or '_' (it names the golden file)")
    golden = None
    if not update:
        if not folder.is_dir():
            return VariantResult(name, variant, "failed", _missing_folder_message(name, folder, origin))
        if not path.is_file():
            return VariantResult(name, variant, "failed", _missing_golden_message(name, variant, path))
        golden = json.loads(path.read_text())
        if golden.get("format") != FORMAT:
            return VariantResult(name, variant, "failed", f"{path} has format {golden.get('format')!r}, expected "
                                 f"{FORMAT}; re-create it with `zsadbench check --method {name} --update`")
        setup = {"overrides": _json_value(overrides), "benchmark": BENCHMARK, "seed": SEED}
        changed = [k for k, v in setup.items() if golden.get(k) != v]
        if changed:
            details = "; ".join(f"{k}: golden {golden.get(k)!r}, now {setup[k]!r}" for k in changed)
            return VariantResult(name, variant, "failed", f"the regression setup changed since {path.name} was made "
                                 f"({details}); if that is intended, re-create it with `zsadbench check --method "
                                 f"{name} --update`")
    try:
        tolerances = _tolerances(cls)
        observed = observe(name, overrides)
    except Exception as exc:
        log.debug("regression run failed", exc_info=True)
        last = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        where = f" at {Path(last.filename).name}:{last.lineno}" if last else ""
        return VariantResult(name, variant, "failed", f"running {name}.{variant} with {overrides} raised "
                             f"{type(exc).__name__}{where}: {exc}", seconds=time.perf_counter() - start)
    if update:
        content = {"format": FORMAT, "method": name, "variant": variant, "overrides": _json_value(overrides),
                   "benchmark": BENCHMARK, "seed": SEED, "tolerances": tolerances, **observed}
        try:
            probed = observe(name, overrides, perturbation=PROBE_PERTURBATION)
        except Exception as exc:
            return VariantResult(name, variant, "failed", f"the conditioning probe of {name}.{variant} raised "
                                 f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - start)
        # scores and maps only: the metrics are functions of them, and the probe breaks exact ties of quantised inputs
        # (equal colours) that every machine reproduces, which can move a rank metric by a whole pair
        unstable, compared = compare({**content, "metrics": {}}, {**probed, "metrics": {}})
        if unstable:
            return VariantResult(
                name, variant, "failed",
                f"not written: {name}.{variant} is ill-conditioned. Moving every input value by a relative "
                f"{PROBE_PERTURBATION:g} moved {len(unstable)} of {compared} values beyond tolerance, so a golden "
                "would not reproduce on another machine or thread count. Usual causes at a tiny random model: near-"
                "tied scores or features feeding a top-k / arg-max / rank. Change the variant's overrides (seed, size, "
                "backbone settings) until the probe passes.", unstable, compared, time.perf_counter() - start)
        from zsadbench.tracking import environment

        commit = environment().get("git_commit", "unknown")
        stamp = {**versions(cls), "git_commit": commit}
        content = {**{k: v for k, v in content.items() if k not in observed}, "created_with": stamp,
                   "verified_with": stamp, **observed}
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(_dumps(content))
        return VariantResult(name, variant, "updated", f"wrote {path} (conditioning probe: {compared} values stable)",
                             seconds=time.perf_counter() - start)
    seconds = time.perf_counter() - start
    assert golden is not None
    mismatches, compared = compare(golden, observed)
    status = "failed" if mismatches else "ok"
    message = (f"{len(mismatches)} of {compared} values outside tolerance" if mismatches
               else f"{compared} values within tolerance")
    if mismatches:
        recorded = golden.get("verified_with") or golden.get("created_with") or {}
        current = versions(cls)
        differ = [f"{k} {recorded[k]} -> {current[k]}" for k in current if k in recorded and recorded[k] != current[k]]
        if differ:
            message += f" (versions differ from the golden's: {', '.join(differ)})"
    return VariantResult(name, variant, status, message, mismatches, compared, seconds)


@dataclass
class CheckReport:
    """What ``zsadbench check`` did: one result per method variant, plus notes (orphaned goldens, ...)."""

    results: list[VariantResult]
    notes: list[str] = field(default_factory=list)
    folders: dict[str, Path] = field(default_factory=dict)  # method -> the goldens folder it was checked against

    @property
    def failed(self) -> bool:
        """Returns whether any variant failed."""
        return any(r.failed for r in self.results)


def check(methods: list[str] | None = None, update: bool = False, goldens: str | Path | None = None,
          progress: bool = True) -> CheckReport:
    """Returns the outcome of checking (or, with ``update``, re-creating the goldens of) the given or all methods.

    Each method is compared with the goldens of :func:`goldens_location`, or all with ``goldens`` when given.
    """
    from tqdm.auto import tqdm

    from zsadbench.registry import get_method, list_methods

    override = Path(goldens).expanduser() if goldens is not None else None
    registered = list_methods()
    names = list(dict.fromkeys(methods)) if methods else list(registered)
    classes = {name: get_method(name) for name in names}  # unknown names raise, listing the registered ones

    def location(cls: type) -> tuple[Path, str]:
        return (override, "the folder given with --goldens") if override is not None else goldens_location(cls)

    report = CheckReport([], folders={name: location(cls)[0] for name, cls in classes.items()})
    todo: list[tuple[str, type, str, dict[str, Any]]] = []
    for name, cls in classes.items():
        declared = getattr(cls, "regression_variants", None) or {}
        if not declared:
            report.results.append(VariantResult(name, "-", "failed", undeclared_message(name, cls)))
        todo += [(name, cls, variant, dict(overrides)) for variant, overrides in declared.items()]
    bar = tqdm(todo, desc="regression check", unit="variant", disable=not progress or not todo)
    for name, cls, variant, overrides in bar:
        bar.set_postfix_str(f"{name}.{variant}")
        folder, origin = location(cls)
        report.results.append(check_variant(name, cls, variant, overrides, folder, update, origin))
    if not methods:  # a full check also reports goldens that no registered method declares any more
        for folder in sorted(set(report.folders.values())):
            if not folder.is_dir():
                continue
            declared_files = {golden_path(folder, n, v).name for n, c in registered.items()
                              if override is not None or goldens_location(c)[0] == folder
                              for v in (getattr(c, "regression_variants", None) or {})}
            for orphan in sorted(p.name for p in folder.glob("*.json") if p.name not in declared_files):
                report.notes.append(f"{orphan}: no registered method declares this variant (stale golden? remove it "
                                    f"from {folder})")
    return report


def format_report(report: CheckReport, limit: int = 8) -> str:
    """Returns the check's outcome as text for the terminal."""
    if not report.results:
        return "zsadbench check: no registered methods, nothing was checked"
    lines = []
    for r in report.results:
        label = f"{r.method}.{r.variant}" if r.variant != "-" else r.method
        timing = f" ({r.seconds:.1f} s)" if r.seconds else ""
        lines.append(f"{r.status.upper():8s} {label}{timing}: {r.message}")
        for mismatch in r.mismatches[:limit]:
            lines.append(f"           {mismatch}")
        if len(r.mismatches) > limit:
            lines.append(f"           ... and {len(r.mismatches) - limit} more")
    lines += [f"note: {n}" for n in report.notes]
    failed = [r for r in report.results if r.failed]
    checked = {r.method for r in report.results}
    summary = (f"{len(failed)} of {len(report.results)} variants failed" if failed
               else f"all {len(report.results)} variants of {len(checked)} method{'s' * (len(checked) != 1)} passed"
               if any(r.status == "ok" for r in report.results) else f"{len(report.results)} goldens written")
    folders = ", ".join(str(f) for f in dict.fromkeys(report.folders.values()))
    lines.append(f"zsadbench check: {summary} (goldens: {folders})")
    return "\n".join(lines)
