"""Fault matrix, regression goldens: `zsadbench check` as a user runs it, outside the checkout and on 1 or 2 threads.

Each case drives the installed command line in a subprocess (its own working directory, its own thread count).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_check(args: list[str], cwd: Path, threads: int) -> subprocess.CompletedProcess:
    """Runs `zsadbench check ARGS` in ``cwd`` with torch limited to ``threads`` threads (asserted in the child)."""
    code = ("import sys, torch; from zsadbench.cli import main; "
            f"assert torch.get_num_threads() == {threads}, torch.get_num_threads(); "
            f"sys.exit(main(['check', *{args!r}]))")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "ZSADBENCH_RESULTS": str(cwd / "results")}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_check_outside_the_checkout_finds_the_goldens_and_passes(tmp_path: Path, threads: int) -> None:
    # MuSc's two variants: musc.dinov2 is the one that once depended on the machine (RsCIN top-k over tied features)
    done = run_check(["--method", "musc"], tmp_path, threads)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "all 2 variants of 1 method passed" in done.stdout
    assert f"(goldens: {REPO / 'results' / 'regression'})" in done.stdout
    assert not (tmp_path / "results" / "regression").exists()  # nothing was looked up (or written) in the cwd


@pytest.mark.slow
def test_missing_goldens_folder_names_it_and_does_not_invite_update(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    done = run_check(["--method", "winclip", "--goldens", str(missing)], tmp_path, 1)
    assert done.returncode == 1
    assert f"no goldens for winclip: the folder {missing} does not exist" in done.stdout
    assert "--update" not in done.stdout and not missing.exists()
