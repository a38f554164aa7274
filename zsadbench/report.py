"""``zsadbench leaderboard``: recorded runs turned into the leaderboard people read.

:func:`build_leaderboard` reads the evaluation runs of an MLflow experiment (the embedded store or a server), keeps
the newest complete run of every setup (:mod:`zsadbench.runs`), adds bootstrap intervals and paired tests from each
run's per-image scores (:mod:`zsadbench.uncertainty`) and the paper-reported numbers that describe the same method,
dataset and shots (:mod:`zsadbench.reported`). :func:`write_leaderboard` writes ``leaderboard.md``, a self-contained
``leaderboard.html``, ``leaderboard.csv`` (long format, for notebooks) and the figures under ``plots/``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from zsadbench import plots
from zsadbench.metrics import IMAGE_METRICS, MAD_RECIPES, METRIC_TITLES, MetricWarning
from zsadbench.paths import results_dir
from zsadbench.render import Block, Details, Figure, Heading, Table, Text, anchor, to_html, to_markdown
from zsadbench.reported import COMPARABLE, METHOD_NOTES, default_path, load_reported, matching, measured_variant
from zsadbench.reported import comparability as compare_variants
from zsadbench.runs import RunRecord, Selection, fetch_artifact, load_runs, select_runs
from zsadbench.tracking import redact, tracking_uri
from zsadbench.uncertainty import DEFAULT_REPLICATES, Interval, PairedTest, bootstrap_intervals, paired_test

log = logging.getLogger(__name__)

METRICS = tuple(METRIC_TITLES)
TITLES = METRIC_TITLES
HEATMAP_METRICS = ("image_auroc", "pixel_aupro")
PAIRED_METRIC = "image_auroc"
SOURCE_ORDER = {"code-release": 0, "reproduction": 1, "paper": 2, "secondary": 3}  # the reference code's first
STEP200_MARK = "†"


@dataclass
class Row:
    """One leaderboard row of a dataset: the run a setup uses, with its uncertainty and reported numbers."""

    selection: Selection
    label: str = ""
    intervals: dict[str, Interval] = field(default_factory=dict)
    scores: pd.DataFrame | None = None
    implementation_tags: dict[str, str] = field(default_factory=dict)
    reported: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def record(self) -> RunRecord:
        """Returns the run this row shows."""
        return self.selection.record

    def value(self, metric: str, category: str | None = None) -> float:
        """Returns the class mean (or one category's value) of ``metric``; NaN when the run has none."""
        return self.record.metric(metric, category)

    def variant(self, metric: str) -> str:
        """Returns the implementation variant of one of this row's metrics (e.g. ``aupro.exact``)."""
        return measured_variant(metric, self.record.aupro_variant, self.implementation_tags)


@dataclass
class PairedEntry:
    """A paired test between rows ``a`` and ``b`` of a dataset, or why it could not be made."""

    a: int
    b: int
    result: PairedTest | None
    reason: str = ""


@dataclass
class DatasetBoard:
    """The leaderboard of one dataset (name plus loader options)."""

    key: str
    dataset: str
    options: dict[str, str]
    rows: list[Row]
    categories: list[str]
    paired: list[PairedEntry] = field(default_factory=list)

    @property
    def slug(self) -> str:
        """Returns a file-name-safe identifier of the dataset key."""
        base = re.sub(r"[^A-Za-z0-9_]+", "-", self.dataset).strip("-") or "dataset"
        return base if not self.options else f"{base}-{hashlib.sha1(self.key.encode()).hexdigest()[:6]}"

    def metrics(self) -> list[str]:
        """Returns the metrics that at least one row has a value for, in the standard order."""
        return [m for m in METRICS if any(not math.isnan(r.value(m)) for r in self.rows)]


@dataclass
class Leaderboard:
    """Everything a leaderboard shows, before it is written out."""

    experiment: str
    uri: str
    datasets: list[DatasetBoard]
    runs_read: int
    replicates: int
    seed: int
    level: float
    reported_source: str
    reported_rows: int
    random_runs: int = 0  # runs with random weights, left out unless include_random
    generated: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))

    def table(self) -> pd.DataFrame:
        """Returns the long table: one line per dataset, row, category (and "mean") and metric."""
        lines: list[dict[str, Any]] = []
        for board in self.datasets:
            for row in board.rows:
                r = row.record
                base = {"dataset": board.dataset, "dataset_key": board.key, "method": r.method,
                        "method_label": r.method_label, "row": row.label, "backbone": r.backbone,
                        "image_size": r.image_size, "weights": r.weights, "checkpoint": r.checkpoint, "shots": r.shots,
                        "aupro_variant": r.aupro_variant, "resolution": r.resolution, "run_id": r.run_id,
                        "dataset_fingerprint": r.params.get("dataset_fingerprint", ""),
                        "started": r.start_time.isoformat()}
                for category in [*board.categories, "mean"]:
                    for metric in METRICS:
                        value = row.value(metric, None if category == "mean" else category)
                        if math.isnan(value) and category != "mean" and category not in r.categories:
                            continue
                        interval = row.intervals.get(metric) if category == "mean" else None
                        lines.append({**base, "category": category, "metric": metric, "value": value,
                                      "ci_low": interval.low if interval else math.nan,
                                      "ci_high": interval.high if interval else math.nan})
        return pd.DataFrame(lines)


def _size(record: RunRecord) -> str:
    height, _, width = record.image_size.partition("x")
    return height if height == width or not width else record.image_size


def setup_text(record: RunRecord, all_categories: list[str] | None = None) -> str:
    """Returns a short description of a run's setup: backbone @ size, weights, checkpoint, shots, protocol."""
    size = _size(record)
    parts = [f"{record.backbone} @{size}" if record.backbone else (f"@{size}" if size else "")]
    weights = record.weights
    if weights.startswith("sha256:"):
        weights = weights[:15]
    parts += [weights, record.checkpoint]
    if record.shots:
        parts.append(f"{record.shots}-shot")
    if record.aupro_variant != "exact":
        parts.append(f"AUPRO {record.aupro_variant}")
    if record.resolution != "input":
        parts.append(f"{record.resolution} resolution")
    if all_categories and set(record.categories) != set(all_categories):
        parts.append(f"{len(record.categories)}/{len(all_categories)} categories")
    return " · ".join(p for p in parts if p)


def _is_default_backbone(record: RunRecord) -> bool:
    """Returns whether a run used its method's default backbone and input size (True if the method is unknown)."""
    from zsadbench.config import flatten
    from zsadbench.registry import get_method

    try:
        defaults = flatten(get_method(record.method).Config())  # type: ignore[attr-defined]
    except (KeyError, TypeError):
        return True
    if "model" in defaults and str(defaults["model"]) != record.backbone:
        return False
    return not ("image_size" in defaults and str(defaults["image_size"]) != _size(record))


def _read_scores(record: RunRecord, folder: Path, uri: str) -> pd.DataFrame | None:
    path = fetch_artifact(record, "scores.csv", folder, uri)
    return None if path is None else pd.read_csv(path, dtype={"category": str, "image": str})


def build_leaderboard(experiment: str = "zsadbench", uri: str | None = None, datasets: list[str] | None = None,
                      reported: str | Path | None = None, replicates: int = DEFAULT_REPLICATES, seed: int = 0,
                      level: float = 0.95, progress: bool = True, include_random: bool = False) -> Leaderboard:
    """Returns the leaderboard of an MLflow experiment's evaluation runs (``replicates=0`` skips the bootstrap).

    Runs with random weights measure nothing about a method: they are left out unless ``include_random``, and then
    marked in their row's label.
    """
    resolved = tracking_uri(uri)
    records = load_runs(experiment, resolved)
    if not records:
        raise ValueError(f"MLflow experiment {experiment!r} at {resolved} has no evaluation runs")
    random_runs = sum(r.random_weights for r in records)
    if not include_random:
        records = [r for r in records if not r.random_weights]
        if not records:
            raise ValueError(f"MLflow experiment {experiment!r} at {resolved} has only runs with random weights "
                             f"({random_runs}); --include-random ranks them")
    selected = select_runs(records, datasets)
    table = load_reported(reported)
    source = str(reported) if reported is not None else str(default_path() or "none found")
    boards: list[DatasetBoard] = []
    total = sum(len(s) for s in selected.values())
    bar = tqdm(total=total, desc="runs", unit="run", disable=None if progress else True)
    with tempfile.TemporaryDirectory(prefix="zsadbench-leaderboard-") as tmp:
        for key, selections in selected.items():
            categories = sorted({c for s in selections for c in s.record.categories})
            rows = []
            for selection in selections:
                record = selection.record
                bar.set_postfix_str(f"{record.dataset}: {record.method}")
                row = Row(selection)
                row.scores = _read_scores(record, Path(tmp), resolved)
                row.implementation_tags = record.metric_tags
                if row.scores is not None and replicates > 0:
                    try:
                        row.intervals = bootstrap_intervals(row.scores, IMAGE_METRICS, replicates, level, seed)
                    except ValueError as exc:  # one unusable scores.csv must not take the whole report down
                        log.warning("run %s: no bootstrap intervals (%s)", record.run_id, exc)
                        row.scores = None
                row.reported = matching(table, record.method, record.dataset, record.shots, record.backbone,
                                        record.image_size, _is_default_backbone(record))
                rows.append(row)
                bar.update()
            labels = [f"{r.record.method_label}{' (random weights)' if r.record.random_weights else ''} · "
                      f"{setup_text(r.record, categories)}".rstrip(" ·") for r in rows]
            seen: dict[str, int] = {}
            for row, label in zip(rows, labels):
                seen[label] = seen.get(label, 0) + 1
                row.label = label if seen[label] == 1 else f"{label} #{seen[label]}"
            first = selections[0].record
            board = DatasetBoard(key, first.dataset, first.dataset_options, rows, categories)
            if replicates > 0:
                board.paired = _paired(rows, replicates, level, seed)
            boards.append(board)
    bar.close()
    return Leaderboard(experiment, redact(resolved), boards, len(records), replicates, seed, level, source, len(table),
                       0 if include_random else random_runs)


def _paired(rows: list[Row], replicates: int, level: float, seed: int) -> list[PairedEntry]:
    out = []
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            a, b = rows[i], rows[j]
            if a.scores is None or b.scores is None:
                out.append(PairedEntry(i, j, None, "per-image scores not available"))
                continue
            try:
                out.append(PairedEntry(i, j, paired_test(a.scores, b.scores, PAIRED_METRIC, replicates, level, seed)))
            except ValueError as exc:
                out.append(PairedEntry(i, j, None, str(exc)))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------

def _pct(value: float, digits: int = 1) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.{digits}f}"


def _signed(value: float) -> str:
    return "–" if math.isnan(value) else f"{100 * value:+.1f}"


def _best_flags(values: list[float]) -> list[bool]:
    finite = [v for v in values if not math.isnan(v)]
    if len(finite) < 2:
        return [False] * len(values)
    best = max(finite)
    return [not math.isnan(v) and abs(v - best) < 5e-7 for v in values]


def _class_mean_table(board: DatasetBoard) -> Table:
    metrics = board.metrics()
    header = ["#", "Method", "Setup", *[TITLES[m] for m in metrics]]
    columns = {m: [r.value(m) for r in board.rows] for m in metrics}
    best = {m: _best_flags(v) for m, v in columns.items()}
    rows, bold = [], []
    for i, row in enumerate(board.rows):
        cells = [str(i + 1), row.record.method_label, setup_text(row.record, board.categories)]
        for m in metrics:
            text = _pct(columns[m][i])
            if m in ("pixel_aupro", "mad_pixel", "mad_all7") and row.record.aupro_variant != "exact" and text != "–":
                text += STEP200_MARK
            cells.append(text)
        rows.append(cells)
        bold.append([False, False, False, *[best[m][i] for m in metrics]])
    notes = ["Values in percent; each cell is the class mean (unweighted mean over categories). Best per column "
             "in bold."]
    if any(r.record.aupro_variant != "exact" for r in board.rows):
        notes.append(f"{STEP200_MARK} computed with the 200-step AUPRO of AnomalyCLIP/MuSc (`--aupro step200`), not "
                     "the exact AUPRO@0.3: not comparable with unmarked cells.")
    return Table(header, rows, bold, [False, False, False, *[True] * len(metrics)], " ".join(notes))


def _interval_table(board: DatasetBoard, level: float) -> Table | None:
    rows = [r for r in board.rows if r.intervals]
    if not rows:
        return None
    metrics = [m for m in IMAGE_METRICS if any(not math.isnan(r.intervals[m].estimate) for r in rows)]
    body = []
    for i, row in enumerate(board.rows):
        if not row.intervals:
            body.append([str(i + 1), row.label, *["scores not available"] * len(metrics)])
            continue
        body.append([str(i + 1), row.label, *[
            f"{_pct(row.intervals[m].estimate)} [{_pct(row.intervals[m].low)}, {_pct(row.intervals[m].high)}]"
            for m in metrics]])
    caption = (f"Class mean [{level:.0%} interval]: stratified bootstrap over test images (normal and anomalous "
               f"images resampled separately within each category), {rows[0].intervals[metrics[0]].replicates} "
               "replicates.") if metrics else ""
    return Table(["#", "Row", *[TITLES[m] for m in metrics]], body, numeric=[False, False, *[True] * len(metrics)],
                 caption=caption)


def _paired_table(board: DatasetBoard, level: float, replicates: int) -> Table | None:
    if not board.paired:
        return None
    body = []
    for entry in board.paired:
        a, b = board.rows[entry.a], board.rows[entry.b]
        if entry.result is None:
            body.append([f"{entry.a + 1}. {a.label}", f"{entry.b + 1}. {b.label}", "–", "–", "–",
                         f"not tested: {entry.reason}"])
            continue
        t = entry.result
        if t.significant():
            verdict = f"**#{entry.a + 1 if t.difference > 0 else entry.b + 1} is better** (p < 0.05)"
        else:
            verdict = "no significant difference"
        body.append([f"{entry.a + 1}. {a.label}", f"{entry.b + 1}. {b.label}", _signed(t.difference),
                     f"[{_signed(t.low)}, {_signed(t.high)}]", f"{t.p_value:.3f}", verdict])
    caption = (f"Paired bootstrap on the class-mean {TITLES[PAIRED_METRIC]} over the same test images "
               f"({replicates} replicates, each resampling the images once for both rows); Δ = A − B in points, "
               f"{level:.0%} interval of Δ; two-sided p-value from the replicates "
               f"(resolution {2 / (replicates + 1):.3f}).")
    return Table(["A", "B", f"Δ {TITLES[PAIRED_METRIC]}", f"{level:.0%} interval", "p", "Verdict"], body,
                 numeric=[False, False, True, True, True, False], caption=caption)


def _source_text(reported: pd.Series) -> str:
    extra = [reported.source_kind]
    if reported.training_set:
        extra.append(f"trained on {reported.training_set}")
    if reported.backbone:
        extra.append(reported.backbone)
    return f"{reported.source} ({', '.join(extra)})"


def _variant_text(measured: str, reported: str) -> str:
    status = compare_variants(measured, reported)
    if status == COMPARABLE:
        return "comparable"
    return f"{status}: ours `{measured}`, reported `{reported}`"


def _reported_table(board: DatasetBoard) -> Table | None:
    body, bold = [], []
    for i, row in enumerate(board.rows):
        means = row.reported[row.reported["category"] == "mean"] if not row.reported.empty else row.reported
        if not means.empty:
            means = means.assign(_m=means["metric"].map(METRICS.index),
                                 _s=means["source_kind"].map(SOURCE_ORDER)).sort_values(["_m", "_s"], kind="stable")
        for _, rep in means.iterrows():
            measured = row.value(rep.metric)
            ours = row.variant(rep.metric)
            comparable = compare_variants(ours, rep.metric_variant) == COMPARABLE
            body.append([f"{i + 1}. {row.label}", TITLES[rep.metric], _pct(measured), f"{100 * rep.value:.1f}",
                         _signed(measured - rep.value) if comparable else f"({_signed(measured - rep.value)})",
                         _variant_text(ours, rep.metric_variant), _source_text(rep)])
            bold.append([False] * 7)
    if not body:
        return None
    return Table(["Row", "Metric", "Measured", "Reported", "Δ", "Metric variants", "Source"], body, bold,
                 [False, False, True, True, True, False, False],
                 "Δ = measured − reported, in points; in parentheses where the two numbers come from different metric "
                 "implementations (not comparable) or the reported implementation is not stated.")


def _reported_category_tables(board: DatasetBoard) -> list[Block]:
    blocks: list[Block] = []
    for i, row in enumerate(board.rows):
        if row.reported.empty:
            continue
        per_category = row.reported[row.reported["category"] != "mean"]
        for _, group in per_category.groupby("source", sort=False):
            metrics = [m for m in METRICS if m in set(group["metric"])]
            categories = [c for c in board.categories if c in set(group["category"])] + sorted(
                set(group["category"]) - set(board.categories))
            body = []
            for category in categories:
                cells = [category]
                for metric in metrics:
                    match = group[(group["category"] == category) & (group["metric"] == metric)]
                    if match.empty:
                        cells.append("–")
                        continue
                    rep = match.iloc[0]
                    measured = row.value(metric, category)
                    delta = _signed(measured - rep.value)
                    if compare_variants(row.variant(metric), rep.metric_variant) != COMPARABLE:
                        delta += "*"
                    cells.append(f"{_pct(measured)} / {100 * rep.value:.1f} ({delta})" if not math.isnan(measured)
                                 else f"– / {100 * rep.value:.1f}")
                body.append(cells)
            variants = ", ".join(f"{TITLES[m]} `{group[group['metric'] == m].metric_variant.iloc[0]}`"
                                 for m in metrics)
            blocks.append(Text(f"**{i + 1}. {row.label}** against {_source_text(group.iloc[0])}; reported variants: "
                               f"{variants}."))
            blocks.append(Table(["Category", *[f"{TITLES[m]} measured / reported (Δ)" for m in metrics]], body,
                                numeric=[False, *[True] * len(metrics)],
                                caption="* the two numbers come from different (or unconfirmed) metric "
                                        "implementations: not comparable."))
    return blocks


def _category_table(board: DatasetBoard, metric: str) -> Table:
    header = ["Category", *[f"{i + 1}. {r.label}" for i, r in enumerate(board.rows)]]
    body, bold = [], []
    for category in [*board.categories, "mean"]:
        values = [r.value(metric, None if category == "mean" else category) for r in board.rows]
        body.append([f"**{category}**" if category == "mean" else category, *[_pct(v) for v in values]])
        bold.append([False, *_best_flags(values)])
    return Table(header, body, bold, [False, *[True] * len(board.rows)])


def _data_fingerprint(record: RunRecord) -> str:
    return record.params.get("dataset_fingerprint", "").removeprefix("sha256:")[:12] or "not recorded"


def _runs_table(board: DatasetBoard) -> Table:
    body = []
    for i, row in enumerate(board.rows):
        r = row.record
        body.append([f"{i + 1}. {row.label}", f"`{r.run_id}`", r.run_name, r.start_time.strftime("%Y-%m-%d %H:%M"),
                     r.params.get("git_commit", "")[:12], f"`{_data_fingerprint(r)}`", row.selection.describe_choice()])
    return Table(["Row", "Run", "Name", "Started (UTC)", "Commit", "Data", "Choice"], body,
                 caption="Each row uses the newest complete run of its setup (method, backbone, size, weights, "
                         "checkpoint, shots, evaluation protocol, categories). Data: the dataset fingerprint (SHA-256 "
                         "over the files and splits read; `zsadbench verify` prints it for a copy).")


def _mixed_copies_warning(board: DatasetBoard) -> Text | None:
    """Returns a warning when the rows of one table were measured on different copies of the dataset."""
    by_copy: dict[str, list[str]] = {}
    for i, row in enumerate(board.rows):
        by_copy.setdefault(_data_fingerprint(row.record), []).append(str(i + 1))
    if len(by_copy) < 2:
        return None
    groups = "; ".join(f"`{fp}`: rows {', '.join(rows)}" for fp, rows in by_copy.items())
    return Text(f"**Warning: these rows were measured on different copies of {board.dataset}** (dataset fingerprints "
                f"{groups}); their numbers are not directly comparable. See *Runs used*.")


def _figures(board: DatasetBoard, out: Path) -> dict[str, str]:
    """Writes the dataset's figures under ``out/plots`` and returns name -> path relative to ``out``."""
    metrics = board.metrics()
    labels = [f"{i + 1}. {r.label}" for i, r in enumerate(board.rows)]
    values = np.array([[r.value(m) for m in metrics] for r in board.rows], dtype=np.float64)
    intervals = np.full((*values.shape, 2), np.nan)
    reported = np.full(values.shape, np.nan)
    comparable = np.zeros(values.shape, bool)
    for i, row in enumerate(board.rows):
        for j, metric in enumerate(metrics):
            if metric in row.intervals:
                intervals[i, j] = (row.intervals[metric].low, row.intervals[metric].high)
            if not row.reported.empty:
                match = row.reported[(row.reported["category"] == "mean") & (row.reported["metric"] == metric)]
                if not match.empty:  # prefer a number of the same metric variant, then the reference code's
                    match = match.assign(same=match["metric_variant"] == row.variant(metric),
                                         order=match["source_kind"].map(SOURCE_ORDER))
                    best = match.sort_values(["same", "order"], ascending=[False, True]).iloc[0]
                    reported[i, j] = best.value
                    comparable[i, j] = bool(best.same)
    written = {}
    name = f"plots/{board.slug}_class_means.png"
    plots.metric_bars(labels, [TITLES[m] for m in metrics], values, out / name, intervals=intervals,
                      reported=reported, reported_comparable=comparable,
                      title=f"{board.dataset}: class means per metric")
    written["bars"] = name
    for metric in HEATMAP_METRICS:
        if metric not in metrics:
            continue
        grid = np.array([[r.value(metric, c) for c in board.categories] + [r.value(metric)] for r in board.rows])
        name = f"plots/{board.slug}_{metric}_by_category.png"
        plots.category_heatmap(labels, [*board.categories, "mean"], grid, out / name,
                               title=f"{board.dataset}: {TITLES[metric]} per category")
        written[metric] = name
    return written


def _dataset_title(board: DatasetBoard) -> str:
    options = ", ".join(f"{k}={v}" for k, v in board.options.items())
    return f"{board.dataset} ({options})" if options else board.dataset


def _dataset_blocks(board: DatasetBoard, figures: dict[str, str], board_all: Leaderboard) -> list[Block]:
    blocks: list[Block] = []
    blocks.append(Heading(2, _dataset_title(board), anchor(board.key)))
    counts = ""
    scored = next((r.scores for r in board.rows if r.scores is not None), None)
    if scored is not None:
        counts = (f" · {len(scored)} test images ({int((scored['label'] == 0).sum())} normal, "
                  f"{int((scored['label'] == 1).sum())} anomalous)")
    blocks.append(Text(f"{len(board.categories)} categories: {', '.join(board.categories)}{counts} · "
                       f"{len(board.rows)} rows."))
    warning = _mixed_copies_warning(board)
    if warning is not None:
        blocks.append(warning)
    blocks.append(Heading(3, "Class means", f"{anchor(board.key)}-class-means"))
    blocks.append(_class_mean_table(board))
    keys = []
    if any(r.intervals for r in board.rows):
        keys.append(f"error bars: {board_all.level:.0%} bootstrap intervals")
    if any(not r.reported.empty and (r.reported["category"] == "mean").any() for r in board.rows):
        keys.append("diamonds: paper-reported (filled: same metric variant)")
    blocks.append(Figure(figures["bars"], f"{board.dataset}: class means per metric"
                         + (f" ({'; '.join(keys)})" if keys else "")))
    interval_table = _interval_table(board, board_all.level)
    paired_table = _paired_table(board, board_all.level, board_all.replicates)
    if interval_table or paired_table:
        blocks.append(Heading(3, "Uncertainty", f"{anchor(board.key)}-uncertainty"))
        blocks += [t for t in (interval_table, paired_table) if t is not None]
    reported_table = _reported_table(board)
    notes = [METHOD_NOTES[m] for m in dict.fromkeys(r.record.method for r in board.rows) if m in METHOD_NOTES]
    if reported_table is not None or notes:
        blocks.append(Heading(3, "Compared with paper-reported numbers", f"{anchor(board.key)}-reported"))
        blocks += [t for t in (reported_table,) if t is not None] + [Text(n, small=True) for n in notes]
        per_category = _reported_category_tables(board) if reported_table is not None else []
        if per_category:
            blocks.append(Details("Per-category comparison with reported numbers", per_category))
    blocks.append(Heading(3, "Per category", f"{anchor(board.key)}-per-category"))
    for metric in HEATMAP_METRICS:
        if metric in figures:
            blocks.append(Figure(figures[metric], f"{board.dataset}: {TITLES[metric]} per category (last column: "
                                                  "class mean)"))
    for metric in board.metrics():
        blocks.append(Details(f"{TITLES[metric]} per category", [_category_table(board, metric)]))
    blocks.append(Heading(3, "Runs used", f"{anchor(board.key)}-runs"))
    blocks.append(_runs_table(board))
    return blocks


def _front_matter(board: Leaderboard) -> list[Block]:
    used = sum(len(d.rows) for d in board.datasets)
    recipes = "; ".join(f"mAD-{'img' if r == 'image' else 'px' if r == 'pixel' else r} = mean("
                        f"{', '.join(TITLES[m] for m in members)})" for r, members in MAD_RECIPES.items())
    bullets = [
        "Values are percentages. A cell of a class-mean table is the metric computed per category, then the "
        "unweighted mean over categories (the papers' convention).",
        f"mAD recipes: {recipes}.",
        "AUPRO is the official MVTec AD AU-PRO integrated to FPR 0.3 and divided by 0.3 (exact); "
        f"{STEP200_MARK} marks runs evaluated with the 200-step variant of AnomalyCLIP/MuSc (`--aupro step200`).",
        "Each row is the newest complete run of its setup; *Runs used* under each dataset says which run and what "
        "it passed over.",
    ]
    if board.replicates > 0:
        bullets.append(f"Uncertainty: {board.level:.0%} stratified bootstrap intervals over test images for the "
                       f"image-level metrics and paired bootstrap tests on {TITLES[PAIRED_METRIC]} "
                       f"({board.replicates} replicates, seed {board.seed}).")
    bullets.append(f"Paper-reported numbers: `{board.reported_source}` ({board.reported_rows} rows, each with its "
                   "citation); Δ = measured − reported, and numbers of different metric implementations are marked "
                   "as not comparable.")
    return [
        Heading(1, "zsadbench leaderboard", "zsadbench-leaderboard"),
        Text(f"Experiment `{board.experiment}` at `{board.uri}` · {board.runs_read} evaluation runs read, {used} "
             f"used · generated {board.generated.strftime('%Y-%m-%d %H:%M UTC')}."),
        Text(bullets=bullets, small=True),
        Heading(2, "Datasets", "datasets"),
        Text(bullets=[f"[{_dataset_title(d)}](#{anchor(d.key)}): {len(d.rows)} rows, {len(d.categories)} categories"
                      for d in board.datasets]),
    ]


def write_leaderboard(board: Leaderboard, out: str | Path | None = None) -> dict[str, Path]:
    """Writes leaderboard.md, leaderboard.html, leaderboard.csv and plots/*.png under ``out``; returns their paths."""
    out = Path(out) if out is not None else results_dir() / "leaderboard"
    (out / "plots").mkdir(parents=True, exist_ok=True)
    for stale in (out / "plots").glob("*.png"):  # figures of datasets no longer on the board
        stale.unlink()
    blocks = _front_matter(board)
    written: dict[str, Path] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        for dataset in board.datasets:
            figures = _figures(dataset, out)
            written.update({f"{dataset.slug}/{k}": out / v for k, v in figures.items()})
            blocks += _dataset_blocks(dataset, figures, board)
    markdown = out / "leaderboard.md"
    markdown.write_text(to_markdown(blocks))
    page = out / "leaderboard.html"
    page.write_text(to_html(blocks, out, "zsadbench leaderboard"))
    csv = out / "leaderboard.csv"
    board.table().to_csv(csv, index=False)
    return {"markdown": markdown, "html": page, "csv": csv, **written}


def leaderboard(experiment: str = "zsadbench", uri: str | None = None, datasets: list[str] | None = None,
                out: str | Path | None = None, **options: Any) -> tuple[Leaderboard, dict[str, Path]]:
    """Builds the leaderboard and writes it; returns it with the written paths (options: see build_leaderboard)."""
    board = build_leaderboard(experiment, uri, datasets, **options)
    return board, write_leaderboard(board, out)


__all__ = ["DatasetBoard", "Leaderboard", "Row", "build_leaderboard", "leaderboard", "setup_text",
           "write_leaderboard"]
