"""Typed config overrides from the command line."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from zsadbench.config import ConfigError, apply_overrides, flatten, from_dict, parse_assignments, to_dict


@dataclass
class Inner:
    mode: Literal["static", "conditioned"] = "static"
    layers: tuple[int, ...] = (6, 12)


@dataclass
class Outer:
    alpha: float = 0.5
    enabled: bool = True
    name: str = "x"
    count: int | None = None
    inner: Inner = field(default_factory=Inner)


def test_overrides_are_typed_and_nested() -> None:
    config = apply_overrides(Outer(), parse_assignments(
        ["alpha=0.25", "enabled=false", "count=3", "inner.mode=conditioned", "inner.layers=1,2,3"]))
    assert config == Outer(0.25, False, "x", 3, Inner("conditioned", (1, 2, 3)))
    assert apply_overrides(Outer(count=2), {"count": "none"}).count is None
    assert flatten(config)["inner.layers"] == [1, 2, 3]
    assert from_dict(Outer, to_dict(config)) == config


@pytest.mark.parametrize(("assignment", "message"), [
    ("alhpa=1", "no option 'alhpa'"), ("alpha=high", "expected float"), ("enabled=maybe", "boolean"),
    ("inner.mode=dynamic", "not one of"), ("count=1.5", "fits none"),
])
def test_bad_overrides_name_the_option(assignment: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Outer(), parse_assignments([assignment]))


def test_assignment_syntax() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        parse_assignments(["alpha"])
