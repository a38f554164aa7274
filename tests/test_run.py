"""`zsadbench run` end to end: table, result files, MLflow run read back, resume, few-shot and transductive paths."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from conftest import SMALL_SYNTHETIC
from detectors import ColourDistance, MutualColour

import zsadbench
from zsadbench.cli import main
from zsadbench.evaluation import EvalOptions, evaluate


def runs(results: Path) -> pd.DataFrame:
    mlflow.set_tracking_uri(f"sqlite:///{results / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["zsadbench"])


def test_run_end_to_end(isolated_results: Path, capsys: pytest.CaptureFixture[str], test_methods) -> None:
    out_json = isolated_results.parent / "out.json"
    status = main(["run", "--method", "test-colour", "--dataset", "synthetic", *SMALL_SYNTHETIC,
                   "--set", "smoothing=5", "--seed", "3", "--json", str(out_json)])
    assert status == 0
    printed = capsys.readouterr().out
    assert "I-AUROC" in printed and "AUPRO" in printed and "mean" in printed
    for category in ("brain", "carpet", "tile"):
        assert category in printed

    df = runs(isolated_results)
    assert len(df) == 1
    row = df.iloc[0]
    run_dir = isolated_results / "runs" / row.run_id
    assert row["tags.zsadbench.status"] == "complete" and row.status == "FINISHED"
    assert row["params.config.smoothing"] == "5" and row["params.seed"] == "3"
    assert row["params.dataset"] == "synthetic" and row["params.method"] == "test-colour"
    assert row["params.categories"] == "brain,carpet,tile" and row["params.image_size"] == "64x64"
    assert row["params.version.torch"] and row["params.git_commit"]

    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["categories"]) == {"brain", "carpet", "tile"}
    assert json.loads(out_json.read_text())["mean"] == results["mean"]
    for category, metrics in results["categories"].items():
        for name in ("image_auroc", "pixel_aupro", "mad_image", "mad_pixel", "mad_all7"):
            assert row[f"metrics.{category}/{name}"] == pytest.approx(metrics[name])
    assert row["metrics.image_auroc"] == pytest.approx(results["mean"]["image_auroc"])
    # the colour-distance detector finds the synthetic defects well above chance
    assert results["mean"]["image_auroc"] > 0.8 and results["mean"]["pixel_auroc"] > 0.8

    scores = pd.read_csv(run_dir / "scores.csv")
    assert len(scores) == 3 * 8 and set(scores.label) == {0, 1}
    assert sorted(p.name for p in (run_dir / "overlays").glob("*.png")) == [
        f"{c}_{i}.png" for c in ("brain", "carpet", "tile") for i in range(2)]
    assert (run_dir / "config.json").is_file() and (run_dir / "metrics.csv").is_file()
    artifacts = mlflow.artifacts.list_artifacts(run_id=row.run_id)
    assert {"results.json", "metrics.csv", "overlays"} <= {Path(a.path).name for a in artifacts}


def test_interrupted_run_resumes_without_recomputing(isolated_results: Path, test_methods) -> None:
    ColourDistance.fail_once = {"tile"}
    with pytest.raises(RuntimeError, match="simulated failure in tile"):
        main(["run", "--method", "test-colour", "--dataset", "synthetic", *SMALL_SYNTHETIC])
    df = runs(isolated_results)
    run_id = df.iloc[0].run_id
    assert df.iloc[0]["tags.zsadbench.status"] == "failed"
    assert sorted(p.stem for p in (isolated_results / "runs" / run_id / "categories").glob("*.json")) == [
        "brain", "carpet"]
    ColourDistance.calls.clear()
    assert main(["run", "--resume", run_id]) == 0
    assert set(ColourDistance.calls) == {"tile"}  # finished categories were not recomputed
    row = runs(isolated_results).set_index("run_id").loc[run_id]
    assert row["tags.zsadbench.status"] == "complete"
    assert not math.isnan(row["metrics.brain/image_auroc"]) and not math.isnan(row["metrics.tile/image_auroc"])
    results = json.loads((isolated_results / "runs" / run_id / "results.json").read_text())
    assert set(results["categories"]) == {"brain", "carpet", "tile"}


def test_resume_of_unknown_run_is_an_error(capsys) -> None:
    assert main(["run", "--resume", "0123abc"]) == 2
    assert "cannot resume run '0123abc'" in capsys.readouterr().err


def test_few_shot_references_are_drawn_and_used(synthetic_root: Path, test_methods) -> None:
    dataset = zsadbench.load_dataset("mvtec", synthetic_root)
    detector = zsadbench.load_method("test-colour", shots=2)
    result = evaluate(detector, dataset, ["carpet"], progress=False)
    refs = result.categories["carpet"].references
    assert len(refs) == 2 and all("/train/good/" in r for r in refs)
    again = evaluate(zsadbench.load_method("test-colour", shots=2), dataset, ["carpet"], progress=False)
    assert again.categories["carpet"].references == refs  # seeded per category
    zero = evaluate(zsadbench.load_method("test-colour"), dataset, ["carpet"], progress=False)
    assert zero.categories["carpet"].references == []
    assert zero.categories["carpet"].image_scores != result.categories["carpet"].image_scores


def test_transductive_method_gets_the_whole_category(synthetic_root: Path, test_methods) -> None:
    dataset = zsadbench.load_dataset("mvtec", synthetic_root)
    result = evaluate(zsadbench.load_method("test-mutual"), dataset, options=EvalOptions(batch_size=3),
                      progress=False)
    assert MutualColour.seen_sets == [8, 8, 8]  # one joint set per category, not one per batch of 3
    assert all(len(r.image_scores) == 8 for r in result.categories.values())


def test_list_commands(capsys, test_methods) -> None:
    assert main(["datasets"]) == 0
    listed = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in listed]
    assert {"mvtec", "visa", "meta", "synthetic", "btad", "mpdd"} <= set(names)
    assert main(["methods"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert "transductive" in lines["test-mutual"] and "few-shot" in lines["test-colour"]
    assert "smoke" in lines["musc"] and "smoke" in lines["winclip"]  # the presets are listed
    assert main(["methods", "winclip"]) == 0
    described = capsys.readouterr().out
    assert "temperature" in described and "0.07" in described and "reference temperature" in described
    assert "preset smoke: model=tiny-ViT-B-16-plus-240" in described
    assert main(["methods", "bayes_pfl"]) == 0  # its own training recipe, not the shared TrainConfig's defaults
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.startswith("train.")}
    assert (rows["train.epochs"], rows["train.batch_size"], rows["train.lr"], rows["train.seed"]) == (
        "30", "32", "0.0001", "333")
