"""nox sessions: tests, lint, typecheck, regression, docs, bench, parity.

Sessions run in the active environment (``pip install -e ".[dev]"`` first): a fresh virtualenv per session would
reinstall torch (several GB) each time. CI creates one environment and runs the sessions in it.
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests", "regression"]
nox.options.default_venv_backend = "none"

ROOT = Path(__file__).parent


@nox.session
def tests(session: nox.Session) -> None:
    """Runs the test suite."""
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Runs ruff on the project."""
    session.run("python", "-m", "ruff", "check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """Runs mypy on the package."""
    session.run("python", "-m", "mypy", "zsadbench", "methods", "datasets")


@nox.session
def regression(session: nox.Session) -> None:
    """Runs every method on the fixed synthetic benchmark and compares against the committed goldens."""
    session.run("zsadbench", "check", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Builds the documentation site (mkdocs.yml) into the git-ignored site/, warnings as errors, offline."""
    session.run("mkdocs", "build", "--strict", "--site-dir", "site", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Runs every benchmark script (benchmarks/bench_*.py); pass a name fragment to run only matching ones."""
    wanted = session.posargs
    for script in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        if not wanted or any(w in script.stem for w in wanted):
            session.run("python", str(script))


@nox.session
def parity(session: nox.Session) -> None:
    """Runs the parity tests against reference implementations that are installed (others are skipped)."""
    session.run("python", "-m", "pytest", "-q", "-m", "parity", "-rs", *session.posargs)
