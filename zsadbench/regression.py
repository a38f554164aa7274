"""``zsadbench check``: every registered method against committed goldens, to catch silent drift in CI.

Each method declares, on its detector class, the variants to guard and the config overrides that make them small
(a tiny seeded random backbone, a small input size)::

    class WinCLIP(Detector):
        regression_variants = {"zero-shot": {"model": "tiny-ViT-B-16-plus-240", "pretrained": "random",
                                             "image_size": 80}}

The check runs each variant, seeded, on a fixed small synthetic benchmark (:data:`BENCHMARK`) through the normal
evaluator and compares with ``results/regression/<method>.<variant>.json``:

- every metric of every category and the class means;
- every image's score and a summary of its anomaly map (shape, mean, std, min, max, three quantiles, and the means of
  a 4 x 4 grid of blocks, so that a moved or flipped map is caught too) — a checksum that, unlike a hash, tolerates
  the ~1e-6 float noise between BLAS builds.

Each quantity has a tolerance (:data:`DEFAULT_TOLERANCES`, overridable per method with ``regression_tolerances``);
``|observed - golden| <= atol + rtol * |golden|``. The tolerances are written into the golden file, so a reviewer
sees them next to the numbers. ``--update`` (re)writes goldens; without goldens, or without a declared configuration,
a method fails with a message that says what to do.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zsadbench.paths import results_dir

log = logging.getLogger(__name__)

FORMAT = 1
SEED = 0
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


def default_goldens() -> Path:
    """Returns the goldens folder: ``results/regression`` of the results folder (the checkout's when run there)."""
    return results_dir() / "regression"


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


def observe(method: str, overrides: dict[str, Any], benchmark: dict[str, Any] | None = None,
            seed: int = SEED) -> dict[str, Any]:
    """Returns what a golden holds for one configuration: per-category metrics, class means, per-image summaries."""
    import torch

    from zsadbench.datasets.synthetic import load_synthetic
    from zsadbench.evaluation import EvalOptions, evaluate
    from zsadbench.registry import get_method
    from zsadbench.seeding import seed_everything

    benchmark = dict(BENCHMARK if benchmark is None else benchmark)
    dataset = load_synthetic(None, **benchmark)
    seed_everything(seed)
    detector = get_method(method)(seed=seed, **overrides)
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


def _missing_golden_message(name: str, variant: str, path: Path) -> str:
    return (f"no golden for {name}.{variant} ({path}). Create it with `zsadbench check --method {name} --update`, "
            "look at the numbers, and commit the file.")


def _tolerances(cls: type) -> dict[str, dict[str, float]]:
    tolerances = {k: dict(v) for k, v in DEFAULT_TOLERANCES.items()}
    for name, tol in getattr(cls, "regression_tolerances", {}).items():
        if name not in tolerances:
            raise ValueError(f"{cls.__qualname__}.regression_tolerances: unknown quantity {name!r}; "
                             f"known: {', '.join(tolerances)}")
        tolerances[name].update(tol)
    return tolerances


def check_variant(name: str, cls: type, variant: str, overrides: dict[str, Any], folder: Path,
                  update: bool = False) -> VariantResult:
    """Returns the outcome of running one variant and comparing it with (or writing) its golden."""
    start = time.perf_counter()
    path = golden_path(folder, name, variant)
    if not _VARIANT_NAME.match(variant):
        return VariantResult(name, variant, "failed", f"variant name {variant!r} of {cls.__qualname__}."
                             "regression_variants must be letters, digits, '-' or '_' (it names the golden file)")
    golden = None
    if not update:
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
    seconds = time.perf_counter() - start
    if update:
        from zsadbench.tracking import environment

        env = environment()
        content = {"format": FORMAT, "method": name, "variant": variant, "overrides": _json_value(overrides),
                   "benchmark": BENCHMARK, "seed": SEED, "tolerances": tolerances,
                   "created_with": {k: env[k] for k in ("version.zsadbench", "version.torch", "version.numpy",
                                                         "git_commit") if k in env},
                   **observed}
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(_dumps(content))
        return VariantResult(name, variant, "updated", f"wrote {path}", seconds=seconds)
    assert golden is not None
    mismatches, compared = compare(golden, observed)
    status = "failed" if mismatches else "ok"
    message = (f"{len(mismatches)} of {compared} values outside tolerance" if mismatches
               else f"{compared} values within tolerance")
    return VariantResult(name, variant, status, message, mismatches, compared, seconds)


@dataclass
class CheckReport:
    """What ``zsadbench check`` did: one result per method variant, plus notes (orphaned goldens, ...)."""

    results: list[VariantResult]
    notes: list[str] = field(default_factory=list)
    folder: Path = field(default_factory=default_goldens)

    @property
    def failed(self) -> bool:
        """Returns whether any variant failed."""
        return any(r.failed for r in self.results)


def check(methods: list[str] | None = None, update: bool = False, goldens: str | Path | None = None,
          progress: bool = True) -> CheckReport:
    """Returns the outcome of checking (or, with ``update``, re-creating the goldens of) the given or all methods."""
    from tqdm.auto import tqdm

    from zsadbench.registry import get_method, list_methods

    folder = Path(goldens) if goldens is not None else default_goldens()
    registered = list_methods()
    names = list(dict.fromkeys(methods)) if methods else list(registered)
    classes = {name: get_method(name) for name in names}  # unknown names raise, listing the registered ones
    report = CheckReport([], folder=folder)
    todo: list[tuple[str, type, str, dict[str, Any]]] = []
    for name, cls in classes.items():
        declared = getattr(cls, "regression_variants", None) or {}
        if not declared:
            report.results.append(VariantResult(name, "-", "failed", undeclared_message(name, cls)))
        todo += [(name, cls, variant, dict(overrides)) for variant, overrides in declared.items()]
    bar = tqdm(todo, desc="regression check", unit="variant", disable=not progress or not todo)
    for name, cls, variant, overrides in bar:
        bar.set_postfix_str(f"{name}.{variant}")
        report.results.append(check_variant(name, cls, variant, overrides, folder, update))
    if not methods and folder.is_dir():
        declared_files = {golden_path(folder, n, v).name for n, c in classes.items()
                          for v in (getattr(c, "regression_variants", None) or {})}
        for orphan in sorted(p.name for p in folder.glob("*.json") if p.name not in declared_files):
            report.notes.append(f"{orphan}: no registered method declares this variant (stale golden? remove it)")
    return report


def format_report(report: CheckReport, limit: int = 8) -> str:
    """Returns the check's outcome as text for the terminal."""
    if not report.results:
        return ("zsadbench check: no registered methods, nothing was checked "
                f"(goldens folder: {report.folder})")
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
               else f"all {len(report.results)} variants of {len(checked)} methods passed"
               if any(r.status == "ok" for r in report.results) else f"{len(report.results)} goldens written")
    lines.append(f"zsadbench check: {summary} (goldens: {report.folder})")
    return "\n".join(lines)
