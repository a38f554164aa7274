"""Patchstats passes zsadbench's conformance suite and its regression goldens."""

from __future__ import annotations

from zsadbench_patchstats.detector import Patchstats

import zsadbench
import zsadbench.testing
from zsadbench.regression import check, format_report


def registered() -> str:
    """Returns the method's registry name, registering the class when the package is not installed."""
    if "patchstats" not in zsadbench.list_methods():
        zsadbench.register_method("patchstats")(Patchstats)
    return "patchstats"


def test_conformance() -> None:
    zsadbench.testing.check_method(registered())


class TestConformance(zsadbench.testing.MethodConformance):
    """The same checks, one test each."""

    method = Patchstats


def test_regression_goldens() -> None:
    report = check([registered()], progress=False)
    assert not report.failed, format_report(report)
