"""`zsadbench check`: goldens are created, pass unchanged, and catch a deliberately perturbed method."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from detectors import ColourDistance, MutualColour

import zsadbench
from zsadbench import registry
from zsadbench.cli import main
from zsadbench.regression import (
    BENCHMARK,
    VERSIONED_DISTRIBUTIONS,
    builtin_goldens,
    check,
    goldens_location,
    summarise_map,
)
from zsadbench.types import Prediction


def perturbed(change) -> type:
    """Returns ColourDistance with its prediction passed through ``change(scores, maps)``."""

    class Perturbed(ColourDistance):
        def predict(self, images, category):
            scores, maps = super().predict(images, category)
            return Prediction(*change(scores, maps))

    return Perturbed


@pytest.fixture(scope="module")
def golden_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Goldens of the test detectors, created once through the command line (with its conditioning probe)."""
    folder = tmp_path_factory.mktemp("golden-template") / "goldens"
    registry._discover()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ZSADBENCH_RESULTS", str(folder.parent / "results"))
        for name, cls in {"test-colour": ColourDistance, "test-mutual": MutualColour}.items():
            patch.setitem(registry._methods, name, cls)
            patch.setattr(cls, "name", name)
        assert main(["check", "--method", "test-colour,test-mutual", "--update", "--goldens", str(folder)]) == 0
    return folder


@pytest.fixture
def goldens(tmp_path: Path, test_methods, golden_template: Path) -> Path:
    """A fresh copy of the test detectors' goldens."""
    return Path(shutil.copytree(golden_template, tmp_path / "goldens"))


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
    # a folder without the file: says which file, and asks to restore rather than re-create an existing golden
    (tmp_path / "empty").mkdir()
    assert main(["check", "--method", "test-colour", "--goldens", str(tmp_path / "empty")]) == 1
    out = capsys.readouterr().out
    assert f"no golden for test-colour.zero-shot: {tmp_path / 'empty' / 'test-colour.zero-shot.json'} does not " \
           "exist (its folder does)" in out
    assert "restore that file" in out and "passes whatever that code does" in out


def test_missing_goldens_folder_says_where_it_looked_and_never_suggests_update(tmp_path: Path, test_methods,
                                                                              capsys) -> None:
    missing = tmp_path / "nowhere"
    assert main(["check", "--method", "test-colour", "--goldens", str(missing)]) == 1
    out = capsys.readouterr().out
    assert f"no goldens for test-colour: the folder {missing} does not exist" in out
    assert "the folder given with --goldens" in out and "--update" not in out
    assert not missing.exists()
    # a plugin's default folder (next to its module; tests/goldens does not exist) is named the same way
    assert main(["check", "--method", "test-colour"]) == 1
    out = capsys.readouterr().out
    assert f"the folder {Path(__file__).parent / 'goldens'} does not exist" in out
    assert "a 'goldens' folder next to detectors" in out and "--update" not in out


def test_goldens_location() -> None:
    from zsadbench.registry import get_method

    repo = Path(__file__).resolve().parents[1]
    for name in ("winclip", "musc"):
        folder, origin = goldens_location(get_method(name))
        assert folder == builtin_goldens() == repo / "results" / "regression" and "shipped with zsadbench" in origin
    assert goldens_location(ColourDistance)[0] == Path(__file__).parent / "goldens"

    class Declared(ColourDistance):
        regression_goldens = "my_goldens"

    folder, origin = goldens_location(Declared)
    assert folder == Path(__file__).parent / "my_goldens" and origin.endswith("Declared.regression_goldens")


def test_committed_goldens_record_every_version_that_affects_them() -> None:
    files = sorted(builtin_goldens().glob("*.json"))
    variants = [f"{name}.{variant}" for name, cls in zsadbench.list_methods().items()
                if cls.__module__.startswith("zsadbench.methods.") for variant in cls.regression_variants]
    assert sorted(p.stem for p in files) == sorted(variants)
    for path in files:
        recorded = json.loads(path.read_text())["verified_with"]
        assert set(VERSIONED_DISTRIBUTIONS) | {"python", "platform"} <= set(recorded), path.name
        assert all(recorded[name] != "not installed" for name in ("torch", "numpy", "timm", "open_clip_torch"))


def test_updated_golden_records_versions(goldens: Path) -> None:
    golden = json.loads((goldens / "test-colour.zero-shot.json").read_text())
    assert golden["created_with"] == golden["verified_with"]
    assert {"torch", "numpy", "timm", "open_clip_torch", "pillow", "scipy"} <= set(golden["verified_with"])


def test_update_refuses_an_ill_conditioned_variant(tmp_path: Path, test_methods, monkeypatch: pytest.MonkeyPatch,
                                                  capsys) -> None:
    # image scores that swing with the 8th digit of the input: a golden of them would not reproduce elsewhere
    use("test-colour", perturbed(lambda s, m: (torch.sin(s.double() * 1e9), m)), monkeypatch)
    folder = tmp_path / "goldens"
    assert main(["check", "--method", "test-colour", "--update", "--goldens", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "not written: test-colour.zero-shot is ill-conditioned" in out and "image score" in out
    assert not list(folder.glob("*.json"))


def test_check_builds_detectors_through_the_registry(goldens: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import zsadbench

    built = []
    original = zsadbench.load_method

    def recording(name, **config):
        built.append((name, config))
        return original(name, **config)

    monkeypatch.setattr(zsadbench, "load_method", recording)
    assert not check(["test-colour"], goldens=goldens, progress=False).failed
    assert built == [("test-colour", {"seed": 0, "image_size": 32}),
                     ("test-colour", {"seed": 0, "image_size": 32, "shots": 1})]


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
