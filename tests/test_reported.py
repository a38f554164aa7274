"""The committed paper-reported numbers: valid, transcribed right, and matched to runs with the right variants."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from zsadbench.reported import (
    COMPARABLE,
    NOT_COMPARABLE,
    UNCONFIRMED,
    comparability,
    load_reported,
    matching,
    measured_variant,
)

CSV = Path(__file__).resolve().parents[1] / "results" / "paper_reported.csv"


@pytest.fixture(scope="module")
def reported() -> pd.DataFrame:
    return load_reported(CSV)


def value(table: pd.DataFrame, **where) -> float:
    rows = table
    for key, wanted in where.items():
        rows = rows[rows[key] == wanted]
    assert len(rows) == 1, (where, rows)
    return float(rows.iloc[0].value_pct)


def test_committed_table_is_valid_and_cites_every_number(reported: pd.DataFrame) -> None:
    assert len(reported) > 500
    assert set(reported.method) == {"winclip", "anomalyclip", "musc", "adaptclip"}  # HeadCLIP: relative gains only
    assert (reported.source.str.len() > 10).all()
    key = ["method", "dataset", "category", "metric", "shots", "training_set", "backbone", "source"]
    assert not reported.duplicated(key).any()
    assert reported.value.between(0, 1).all()
    # per method the class means of the main benchmarks are there
    means = reported[reported.category == "mean"]
    for method in ("winclip", "anomalyclip", "musc", "adaptclip"):
        assert {"mvtec", "visa"} <= set(means[means.method == method].dataset)


def test_spot_checks_against_the_sources(reported: pd.DataFrame) -> None:
    # xrli-U/MuSc README (code release): means and one category
    assert value(reported, method="musc", dataset="mvtec", category="mean", metric="image_auroc",
                 source_kind="code-release", backbone="") == 97.77
    assert value(reported, method="musc", dataset="visa", category="macaroni2", metric="pixel_ap") == 3.91
    # BTAD categories stay strings ("01", not 1)
    assert value(reported, method="musc", dataset="btad", category="02", metric="pixel_aupro") == 68.64
    # zqhang/AnomalyCLIP released checkpoint log, step200 AUPRO
    row = reported[(reported.method == "anomalyclip") & (reported.dataset == "visa") & (reported.category == "candle")
                   & (reported.metric == "pixel_aupro")].iloc[0]
    assert (row.value_pct, row.metric_variant, row.training_set) == ("96.5", "aupro.step200", "mvtec")
    # gaobb/AdaptCLIP README: trapezoid AUPR, VisA-trained checkpoint on MVTec AD
    row = reported[(reported.method == "adaptclip") & (reported.dataset == "mvtec") & (reported.shots == 0)
                   & (reported.metric == "pixel_ap")].iloc[0]
    assert (row.value_pct, row.metric_variant, row.training_set) == ("38.3", "ap.trapz", "visa")
    # zqhang/Accurate-WinCLIP-pytorch README: the reproduction
    assert value(reported, method="winclip", dataset="mvtec", category="mean", metric="pixel_aupro",
                 source_kind="reproduction") == 61.9
    assert value(reported, method="winclip", dataset="visa", category="mean", metric="image_auroc",
                 source_kind="paper") == 78.1
    assert value(reported, method="winclip", dataset="mvtec", category="mean", metric="image_auroc",
                 source_kind="reproduction", shots=4) == 95.3


def test_variants_decide_comparability() -> None:
    assert measured_variant("pixel_aupro") == "aupro.exact"
    assert measured_variant("pixel_aupro", "step200") == "aupro.step200"
    assert measured_variant("pixel_aupro", "exact", {"pixel_aupro": "aupro.step200@0.3"}) == "aupro.step200"
    assert measured_variant("image_ap", tags={"image_ap": "ap.step.exact"}) == "ap.step"
    assert comparability("aupro.exact", "aupro.step200") == NOT_COMPARABLE
    assert comparability("ap.step", "ap.trapz") == NOT_COMPARABLE
    assert comparability("aupro.step200", "aupro.step200") == COMPARABLE
    assert comparability("auroc", "auroc") == COMPARABLE
    assert comparability("ap.step", "ap.unconfirmed") == UNCONFIRMED


def test_matching_by_method_dataset_shots_and_backbone(reported: pd.DataFrame) -> None:
    default = matching(reported, "musc", "mvtec", 0, "ViT-L-14-336", "518x518")
    assert set(default.backbone) == {""} and len(default[default.category == "mean"]) == 14
    small = matching(reported, "musc", "mvtec", 0, "ViT-B-32", "256x256", default_backbone=False)
    assert set(small.backbone) == {"ViT-B-32@256"} and set(small.metric) == {"image_auroc", "pixel_ap", "pixel_aupro"}
    assert matching(reported, "musc", "mvtec", 0, "ViT-B-32", "224x224", default_backbone=False).empty
    few = matching(reported, "adaptclip", "visa", 2, "ViT-L-14-336-quickgelu", "518x518")
    assert set(few.shots) == {2} and len(few) == 2
    assert matching(reported, "winclip", "synthetic", 0).empty


def test_invalid_rows_are_named(tmp_path: Path) -> None:
    bad = pd.read_csv(CSV, dtype=str, keep_default_na=False).head(3)
    bad.loc[0, "metric_variant"] = "aupro.guess"
    bad.loc[1, "value_pct"] = "150"
    bad.loc[2, "source"] = ""
    path = tmp_path / "bad.csv"
    bad.to_csv(path, index=False)
    with pytest.raises(ValueError) as error:
        load_reported(path)
    message = str(error.value)
    assert "3 invalid rows" in message and "line 2: unknown metric_variant 'aupro.guess'" in message
    assert "line 3: value_pct '150'" in message and "line 4: every number needs its source" in message
    with pytest.raises(FileNotFoundError, match="paper-reported numbers not found"):
        load_reported(tmp_path / "missing.csv")
