"""The documentation site and the license notices stay complete (the build itself: `nox -s docs`, `.ci/run`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from zsadbench.cli import main
from zsadbench.registry import list_methods

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
# The reference implementations' code licenses, checked against their LICENSE files (THIRD_PARTY_NOTICES.md).
CODE_LICENSES = {"winclip": "Apache-2.0", "anomalyclip": "MIT", "headclip": "none (no official code)", "musc": "MIT",
                 "adaptclip": "GPL-2.0", "adaclip": "MIT", "promptad": "The Unlicense",
                 "aprilgan": "MIT", "anomalydino": "Apache-2.0", "anomalydino-batched": "Apache-2.0",
                 "bayes_pfl": "MIT (README; no LICENSE file)", "vcpclip": "MIT (README; no LICENSE file)"}


def nav_pages(entries: Any) -> list[str]:
    """Returns every page path listed in an mkdocs ``nav`` (nested sections included)."""
    if isinstance(entries, str):
        return [entries]
    if isinstance(entries, list):
        return [page for entry in entries for page in nav_pages(entry)]
    if isinstance(entries, dict):
        return [page for value in entries.values() for page in nav_pages(value)]
    raise TypeError(f"unexpected nav entry {entries!r}")


def built_in_methods() -> dict[str, type]:
    return {name: cls for name, cls in list_methods().items() if cls.__module__.startswith("zsadbench.methods.")}


def test_every_page_is_in_the_nav() -> None:
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    listed = nav_pages(config["nav"])
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    missing = [p for p in pages if p not in listed]
    assert not missing, f"pages in docs/ missing from the nav of mkdocs.yml: {missing}"
    dangling = [p for p in listed if not (DOCS / p).is_file()]
    assert not dangling, f"nav entries of mkdocs.yml without a page in docs/: {dangling}"
    assert len(listed) == len(set(listed)), "a page is listed twice in the nav"


def test_every_built_in_method_has_a_page() -> None:
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    listed = nav_pages(config["nav"])
    assert set(built_in_methods()) == set(CODE_LICENSES)
    for name in CODE_LICENSES:
        page = f"methods/{name.removesuffix('-batched')}.md"  # a method's variants share its page
        assert page in listed, f"docs/{page} is not in the nav"


@pytest.mark.parametrize("path", ["docs", "THIRD_PARTY_NOTICES.md", "mkdocs.yml"])
def test_docs_refer_to_nothing_outside_the_repository(path: str) -> None:
    files = sorted((REPO / path).rglob("*.*")) if (REPO / path).is_dir() else [REPO / path]
    for file in files:
        text = file.read_text()
        for outside in ("shared/", "/work/", "specs/"):
            assert outside not in text, f"{file.relative_to(REPO)} refers to {outside!r}, outside the repository"


def test_methods_command_shows_each_built_in_method_license(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    notices = (REPO / "THIRD_PARTY_NOTICES.md").read_text()
    for name, cls in built_in_methods().items():
        assert cls.code_license == CODE_LICENSES[name], name
        assert cls.paper.startswith("arXiv:") and cls.weights_license, name
        row = lines[name]
        assert cls.code_license in row and cls.weights_license in row, row
        if cls.reference:
            assert cls.reference in row, row
            repository = cls.reference.split("@")[0]
            assert repository in notices, f"THIRD_PARTY_NOTICES.md does not name {repository}"
        else:
            assert "none released" in row, row
