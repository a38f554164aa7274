"""The conformance suite (zsadbench.testing) and `zsadbench new-method`: a skeleton that passes both."""

from __future__ import annotations

from pathlib import Path

import pytest

from zsadbench import registry
from zsadbench.cli import main
from zsadbench.regression import check, format_report
from zsadbench.testing import ConformanceError, check_method, run_checks


def test_new_method_writes_a_plugin_that_passes_conformance_and_its_check(tmp_path: Path, capsys) -> None:
    try:
        assert main(["new-method", "demo-method", "--out", str(tmp_path)]) == 0
        root = tmp_path / "zsadbench-demo-method"
        out = capsys.readouterr().out
        assert "wrote zsadbench-demo-method/zsadbench_demo_method/goldens/demo-method.zero-shot.json" in out
        pyproject = (root / "pyproject.toml").read_text()
        assert '[project.entry-points."zsadbench.methods"]' in pyproject
        assert 'demo-method = "zsadbench_demo_method.detector:DemoMethod"' in pyproject
        assert (root / "tests" / "test_zsadbench_demo_method.py").is_file()
        report = check_method("demo-method")  # registered by new-method from the written file
        assert report.passed == ["interface", "determinism", "batch_size", "device", "bad_input"]
        assert "checkpoint" in report.skipped
        checked = check(["demo-method"], progress=False)
        assert not checked.failed, format_report(checked)
        assert checked.folders["demo-method"] == root / "zsadbench_demo_method" / "goldens"
        # never writes into a folder that holds something
        assert main(["new-method", "other", "--out", str(tmp_path)]) == 0
        assert main(["new-method", "demo-method", "--out", str(tmp_path)]) == 2  # registered now
        (tmp_path / "zsadbench-third").mkdir()
        (tmp_path / "zsadbench-third" / "notes.txt").write_text("mine")
        assert main(["new-method", "third", "--out", str(tmp_path)]) == 2
        assert "exists and is not empty" in capsys.readouterr().err
    finally:
        for name in ("demo-method", "other", "third"):
            registry._methods.pop(name, None)


def test_conformance_catches_a_detector_that_accepts_bad_input(test_methods) -> None:
    # the tests' colour-distance detector takes a one-channel batch and a NaN pixel without complaint
    report = run_checks("test-colour")
    assert "bad_input" in report.failed and "interface" in report.passed and "determinism" in report.passed
    with pytest.raises(ConformanceError, match="bad_input"):
        check_method("test-colour")


BUILT_IN = [("winclip", "zero-shot"), ("winclip", "1-shot"), ("anomalyclip", "zero-shot"),
            ("headclip", "zero-shot"), ("adaptclip", "zero-shot"), ("adaptclip", "1-shot"), ("musc", "zero-shot"),
            ("musc", "dinov2")]


@pytest.mark.slow
@pytest.mark.parametrize("method, variant", BUILT_IN)
def test_built_in_methods_conform(method: str, variant: str) -> None:
    cls = registry.get_method(method)
    check_method(method, cls.regression_variants[variant])
