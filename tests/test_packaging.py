"""`pip install .` and `pip install -e .` both work; methods/ and datasets/ install inside the zsadbench namespace."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECK = ("import importlib.util as u, zsadbench, zsadbench.methods, zsadbench.datasets;"
         "assert u.find_spec('methods') is None and u.find_spec('datasets') is None, 'top-level name installed';"
         "print(zsadbench.datasets.__file__);"
         "print(sorted(zsadbench.list_datasets())[:3])")


def fresh_venv(path: Path) -> Path:
    """Returns the python of a new venv that sees this environment's dependencies but not its zsadbench."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    site = next(path.glob("lib/python*/site-packages"))
    parents = [p for p in sys.path if p.endswith("site-packages")]
    (site / "_parent_environment.pth").write_text("\n".join(parents) + "\n")
    return path / "bin" / "python"


def pip_install(python: Path, *args: str) -> None:
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", *args],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_wheel_contents(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           str(REPO), "-w", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("zsadbench-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "zsadbench/methods/__init__.py" in names and "zsadbench/datasets/synthetic.py" in names
    assert all(n.startswith(("zsadbench/", "zsadbench-")) for n in names), sorted(names)


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["regular", "editable"])
def test_install_in_fresh_venv(tmp_path: Path, editable: bool) -> None:
    python = fresh_venv(tmp_path / "venv")
    pip_install(python, *(["-e"] if editable else []), str(REPO))
    site = next((tmp_path / "venv").glob("lib/python*/site-packages"))
    assert not (site / "methods").exists() and not (site / "datasets").exists()
    elsewhere = tmp_path / "elsewhere"  # not the repository, whose folders would be importable from the cwd
    elsewhere.mkdir()
    done = subprocess.run([str(python), "-c", CHECK], cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    location = Path(done.stdout.splitlines()[0])
    assert (location.parent == REPO / "datasets") == editable
    assert (tmp_path / "venv" / "bin" / "zsadbench").exists()
