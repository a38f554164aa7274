"""`zsadbench check`: goldens are created, pass unchanged, and catch a deliberately perturbed method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from detectors import ColourDistance, MutualColour

from zsadbench import registry
from zsadbench.cli import main
from zsadbench.regression import BENCHMARK, check, summarise_map
from zsadbench.types import Prediction


def perturbed(change) -> type:
    """Returns ColourDistance with its prediction passed through ``change(scores, maps)``."""

    class Perturbed(ColourDistance):
        def predict(self, images, category):
            scores, maps = super().predict(images, category)
            return Prediction(*change(scores, maps))

    return Perturbed


@pytest.fixture
def goldens(tmp_path: Path, test_methods) -> Path:
    """Goldens of the test detectors, created through the command line."""
    folder = tmp_path / "goldens"
    assert main(["check", "--method", "test-colour,test-mutual", "--update", "--goldens", str(folder)]) == 0
    return folder


def use(name: str, cls: type, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry._methods, name, cls)
    monkeypatch.setattr(cls, "name", name)


def test_no_methods_passes_and_says_so(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    registry._discover()
    monkeypatch.setattr(registry, "_methods", {})
    assert main(["check"]) == 0
    assert "no registered methods, nothing was checked" in capsys.readouterr().out


def test_goldens_are_created_and_pass(goldens: Path, capsys) -> None:
    assert sorted(p.name for p in goldens.glob("*.json")) == [
        "test-colour.1-shot.json", "test-colour.zero-shot.json", "test-mutual.zero-shot.json"]
    golden = json.loads((goldens / "test-colour.1-shot.json").read_text())
    assert golden["overrides"] == {"image_size": 32, "shots": 1} and golden["benchmark"] == BENCHMARK
    assert set(golden["metrics"]) == {"bottle", "brain", "carpet", "mean"}
    assert golden["tolerances"]["pixel_aupro"] == {"atol": 1e-4, "rtol": 0.0}
    image = golden["images"]["carpet"]["carpet/test/good/000.png"]
    assert image["map"]["shape"] == [32, 32] and len(image["map"]["grid"]) == 4
    assert len(golden["images"]["brain"]) == 8
    capsys.readouterr()
    assert main(["check", "--method", "test-colour,test-mutual", "--goldens", str(goldens)]) == 0  # not built-ins
    out = capsys.readouterr().out
    assert "OK       test-colour.zero-shot" in out and "OK       test-mutual.zero-shot" in out
    assert "all 3 variants of 2 methods passed" in out


def test_scaled_maps_fail(goldens: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    # scores and ranks unchanged, so every metric is identical: only the map summaries can catch it
    use("test-colour", perturbed(lambda s, m: (s, m * 1.01)), monkeypatch)
    assert main(["check", "--method", "test-colour", "--goldens", str(goldens)]) == 1
    out = capsys.readouterr().out
    assert "FAILED   test-colour.zero-shot" in out and "values outside tolerance" in out
    assert "map mean: golden" in out and "image_auroc" not in out


def test_flipped_maps_fail(goldens: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the same pixel values in other places: histogram statistics agree, the block grid does not
    use("test-colour", perturbed(lambda s, m: (s, torch.flip(m, dims=[-1]))), monkeypatch)
    report = check(["test-colour"], goldens=goldens, progress=False)
    assert report.failed
    where = {m.where.split(" map ")[-1] for r in report.results for m in r.mismatches}
    assert any(w.startswith("grid[") for w in where)
    assert not {"mean", "std", "min", "max", "q50"} & where


def test_changed_ranking_fails_on_metrics(goldens: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use("test-colour", perturbed(lambda s, m: (-s, m)), monkeypatch)
    report = check(["test-colour"], goldens=goldens, progress=False)
    names = {m.where for r in report.results for m in r.mismatches}
    assert "mean/image_auroc" in names and any(n.endswith("image score") for n in names)


def test_float_noise_within_tolerance_passes(goldens: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use("test-colour", perturbed(lambda s, m: (s * (1 + 3e-7), m * (1 + 3e-7))), monkeypatch)
    report = check(["test-colour"], goldens=goldens, progress=False)
    assert not report.failed, [str(m) for r in report.results for m in r.mismatches]


def test_method_without_configuration_or_golden_fails_with_instructions(tmp_path: Path, goldens: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        capsys) -> None:
    monkeypatch.setattr(MutualColour, "regression_variants", {})
    capsys.readouterr()
    assert main(["check", "--goldens", str(goldens)]) == 1
    out = capsys.readouterr().out
    assert "method 'test-mutual' (detectors.MutualColour) declares no regression configuration" in out
    assert 'regression_variants = {"zero-shot": {"image_size": 64}}' in out
    assert "zsadbench check --method test-mutual --update" in out
    assert "note: test-mutual.zero-shot.json: no registered method declares this variant" in out
    assert main(["check", "--method", "test-colour", "--goldens", str(tmp_path / "empty")]) == 1
    assert ("no golden for test-colour.zero-shot" in (out := capsys.readouterr().out)
            and "Create it with `zsadbench check --method test-colour --update`" in out)


def test_changed_regression_setup_asks_for_an_update(goldens: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ColourDistance, "regression_variants", {"zero-shot": {"image_size": 40}})
    (result,) = check(["test-colour"], goldens=goldens, progress=False).results
    assert result.failed and "regression setup changed" in result.message and "--update" in result.message


def test_a_crashing_method_is_reported(goldens: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ColourDistance, "fail_once", {"bottle"})
    results = check(["test-colour"], goldens=goldens, progress=False).results
    assert results[0].failed and "raised RuntimeError" in results[0].message and "simulated failure" in \
        results[0].message
    assert results[1].status == "ok"  # the next variant still runs


def test_unknown_method_is_an_error(capsys) -> None:
    assert main(["check", "--method", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_map_summary() -> None:
    amap = torch.arange(64, dtype=torch.float32).reshape(8, 8).numpy()
    summary = summarise_map(amap)
    assert summary["shape"] == [8, 8] and summary["min"] == 0 and summary["max"] == 63 and summary["mean"] == 31.5
    assert summary["grid"][0][0] == 4.5 and summary["grid"][3][3] == 58.5 and summary["q50"] == 31.5
