"""`zsadbench leaderboard` from runs recorded in a temporary MLflow store (SQLite, and a real `mlflow server`)."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from detectors import ColourDistance
from PIL import Image

from zsadbench.cli import main
from zsadbench.evaluation import EvalOptions
from zsadbench.jobs import RunSpec, run
from zsadbench.report import build_leaderboard, write_leaderboard
from zsadbench.reported import COLUMNS

SMALL = {"image_size": "48", "n_train": "3", "n_test_normal": "4", "n_test_anomalous": "4",
         "categories": "carpet,tile,brain"}  # the same benchmark as conftest.SMALL_SYNTHETIC
REPORTED = ",".join(COLUMNS) + """
test-colour,synthetic,mean,image_auroc,90.0,auroc,0,,,paper,Imaginary et al. 2026 Table 1,
test-colour,synthetic,mean,pixel_aupro,85.0,aupro.step200,0,,,paper,Imaginary et al. 2026 Table 1,
test-colour,synthetic,tile,image_auroc,98.0,auroc,0,,,code-release,someone/repo:README.md@abc1234,
test-colour,synthetic,mean,image_auroc,95.0,auroc,1,,,paper,Imaginary et al. 2026 Table 2,
"""


def record(method: str, uri: str | None = None, experiment: str = "zsadbench", **overrides: str) -> str:
    spec = RunSpec(method=method, dataset="synthetic", dataset_options=dict(SMALL), overrides=overrides,
                   experiment=experiment, eval=EvalOptions(overlays=0))  # overlay PNGs only cost time here
    run_id = run(spec, tracking_uri=uri, progress=False).run_id
    return run_id


def results_of(results: Path, run_id: str) -> dict:
    return json.loads((results / "runs" / run_id / "results.json").read_text())


def test_leaderboard_from_the_embedded_store(isolated_results: Path, mlflow_store: Path, test_methods,
                                               tmp_path: Path) -> None:
    older = record("test-colour", smoothing="5")
    newer = record("test-colour")
    mutual = record("test-mutual")
    ColourDistance.fail_once = {"tile"}
    with pytest.raises(RuntimeError, match="simulated failure"):
        record("test-colour")  # the newest run of the setup, but failed: not used
    expected = {newer: results_of(isolated_results, newer), mutual: results_of(isolated_results, mutual)}
    (tmp_path / "reported.csv").write_text(REPORTED)
    out = tmp_path / "board"

    assert main(["leaderboard", "--out", str(out), "--bootstrap", "200",
                 "--reported", str(tmp_path / "reported.csv")]) == 0

    table = pd.read_csv(out / "leaderboard.csv", dtype={"category": str})
    assert set(table.run_id) == {newer, mutual}
    for run_id, results in expected.items():
        mine = table[table.run_id == run_id]
        for metric, value in results["mean"].items():
            got = mine[(mine.category == "mean") & (mine.metric == metric)].value.item()
            assert got == pytest.approx(value), (run_id, metric)
        for category, metrics in results["categories"].items():
            for metric, value in metrics.items():
                got = mine[(mine.category == category) & (mine.metric == metric)].value.item()
                assert got == pytest.approx(value), (run_id, category, metric)
        image = mine[(mine.category == "mean") & mine.metric.str.startswith("image_")]
        assert (image.ci_low <= image.value + 1e-12).all() and (image.value <= image.ci_high + 1e-12).all()
        assert (image.ci_high - image.ci_low > 0).any()

    markdown = (out / "leaderboard.md").read_text()
    colour = expected[newer]["mean"]
    row = next(line for line in markdown.splitlines() if line.startswith("| 1 | Colour distance (test) |"))
    cells = [c.strip().strip("*") for c in row.strip("|").split("|")]
    assert cells[3] == f"{100 * colour['image_auroc']:.1f}" and cells[9] == f"{100 * colour['pixel_aupro']:.1f}"
    assert cells[12] == f"{100 * colour['mad_all7']:.1f}"
    assert any(line.startswith("| 2 | MutualColour |") for line in markdown.splitlines())
    assert f"newest of 2 complete runs (older: {older[:8]}); ignored 1 failed" in markdown
    # uncertainty and the paired test
    assert re.search(r"\| 1 \| Colour distance \(test\) · @64 \| \d+\.\d \[\d+\.\d, \d+\.\d\] \|", markdown)
    assert re.search(r"\| 1\. Colour distance \(test\) · @64 \| 2\. MutualColour · @64 \| [+-]\d+\.\d \| "
                     r"\[[+-]\d+\.\d, [+-]\d+\.\d\] \| \d\.\d{3} \|", markdown)
    # paper-reported numbers beside the measured ones, with comparability
    delta = f"{100 * (colour['image_auroc'] - 0.90):+.1f}"
    assert (f"| 1. Colour distance (test) · @64 | I-AUROC | {100 * colour['image_auroc']:.1f} | 90.0 | {delta} | "
            "comparable | Imaginary et al. 2026 Table 1 (paper) |") in markdown
    assert "not comparable: ours `aupro.exact`, reported `aupro.step200`" in markdown
    assert "95.0" not in markdown.split("### Compared with")[1].split("### Per category")[0]  # the 1-shot number
    assert "someone/repo:README.md@abc1234" in markdown  # per-category comparison

    # the figures exist, are real PNGs, and the HTML page carries them inside itself
    figures = re.findall(r"!\[[^\]]*\]\((plots/[^)]+\.png)\)", markdown)
    assert len(figures) == 3 and all((out / f).is_file() for f in figures)
    for figure in figures:
        with Image.open(out / figure) as image:
            assert image.format == "PNG" and image.width > 500 and image.height > 150
    page = (out / "leaderboard.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == len(figures)
    assert base64.b64decode(embedded[0]) == (out / figures[0]).read_bytes()
    assert not re.search(r'(src|href)="(?!data:|#)', page)  # nothing outside the page
    assert page.count("<table") >= 8 and "</html>" in page


def test_leaderboard_reads_a_real_mlflow_server(mlflow_server: str, isolated_results: Path, test_methods,
                                               tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    ids = [record("test-colour", uri=mlflow_server, experiment="leaderboard-server"),
           record("test-mutual", uri=mlflow_server, experiment="leaderboard-server")]
    shutil.rmtree(isolated_results / "runs")  # the per-image scores must come from the server's artifacts
    board = build_leaderboard("leaderboard-server", mlflow_server, replicates=100, progress=False)
    (dataset,) = board.datasets
    assert dataset.dataset == "synthetic" and dataset.categories == ["brain", "carpet", "tile"]
    assert [r.record.run_id for r in dataset.rows] == ids
    client = MlflowClient(tracking_uri=mlflow_server)
    for row in dataset.rows:
        logged = client.get_run(row.record.run_id).data.metrics
        assert row.value("image_auroc") == pytest.approx(logged["image_auroc"])
        assert row.value("pixel_aupro", "tile") == pytest.approx(logged["tile/pixel_aupro"])
        assert row.intervals["image_auroc"].estimate == pytest.approx(logged["image_auroc"])
        assert len(row.scores) == 24
    (paired,) = dataset.paired
    assert paired.result is not None and paired.result.images == 24
    written = write_leaderboard(board, tmp_path / "server-board")
    assert written["html"].is_file() and "leaderboard-server" in written["markdown"].read_text()


def test_leaderboard_errors_name_what_exists(mlflow_store: Path, test_methods, capsys) -> None:
    record("test-colour")
    assert main(["leaderboard", "--datasets", "mvtec", "--bootstrap", "0"]) == 2
    assert "no recorded runs on dataset ['mvtec']; recorded: synthetic" in capsys.readouterr().err
    assert main(["leaderboard", "--experiment", "nope"]) == 2
    error = capsys.readouterr().err
    assert "no MLflow experiment 'nope'" in error and "experiments there: Default, zsadbench" in error
