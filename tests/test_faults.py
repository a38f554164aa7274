"""The fault matrix: bad inputs and faults driven through the CLI as a user meets them.

Each case says what went wrong before (the user audit) and checks what happens now: a one-line error naming the
folder, file, category, option or URI, in seconds, with nothing of the user's touched; or, when the tracking server
goes away mid-run, a run that finishes in its results folder and is synced later.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL_SYNTHETIC, free_port
from detectors import ColourDistance
from test_datasets import make_mvtec

from zsadbench import registry
from zsadbench.cli import main
from zsadbench.data import DataWarning
from zsadbench.types import Prediction

TEST_COLOUR = ["run", "--method", "test-colour"]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Runs the CLI in-process as a user would; returns (exit status, stdout, stderr)."""
    try:
        status = main(args)
    except SystemExit as exc:  # argparse usage errors
        status = int(exc.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


# ------------------------------------------------------------------------- 1. never touch a user's files

def test_synthetic_refuses_a_folder_that_holds_other_files(tmp_path: Path, capsys, test_methods) -> None:
    folder = tmp_path / "mine"
    (folder / "thesis").mkdir(parents=True)
    (folder / "thesis" / "draft.tex").write_text("years of work")
    status, _, err = run_cli([*TEST_COLOUR, "--dataset", "synthetic", "--data-root", str(folder), *SMALL_SYNTHETIC],
                             capsys)
    assert status == 2 and "not empty and not a synthetic benchmark" in err and str(folder) in err
    assert (folder / "thesis" / "draft.tex").read_text() == "years of work"
    assert sorted(p.name for p in folder.iterdir()) == ["thesis"]


@pytest.mark.parametrize("bad_option", [["--set", "no_such_key=1"], ["--dataset-option", "no_such_option=1"],
                                        ["--device", "cuda:99" if torch.cuda.is_available() else "cuda"]])
def test_every_option_is_checked_before_anything_is_written(tmp_path: Path, capsys, test_methods,
                                                            isolated_results: Path, bad_option: list[str]) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    status, _, err = run_cli([*TEST_COLOUR, "--dataset", "synthetic", "--data-root", str(folder), *bad_option],
                             capsys)
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert bad_option[1].split("=")[0].split(":")[0] in err
    assert not any(folder.iterdir()), "the data root was written before the options were checked"
    assert not (isolated_results / "runs").exists() and not (isolated_results / "mlflow.db").exists()


def test_empty_or_synthetic_folders_are_generated_into(tmp_path: Path, capsys, test_methods) -> None:
    folder = tmp_path / "bench"
    folder.mkdir()
    assert run_cli([*TEST_COLOUR, "--dataset", "synthetic", "--data-root", str(folder), *SMALL_SYNTHETIC],
                   capsys)[0] == 0
    assert (folder / "synthetic.json").is_file()
    # a synthetic benchmark of other options is replaced (it is ours)
    options = [o.replace("n_test_normal=4", "n_test_normal=3") for o in SMALL_SYNTHETIC]
    assert run_cli([*TEST_COLOUR, "--dataset", "synthetic", "--data-root", str(folder), *options], capsys)[0] == 0
    assert json.loads((folder / "synthetic.json").read_text())["n_test_normal"] == 3


# ---------------------------------------------------------------------------------------- 3. fail fast

def test_unreachable_tracking_server_fails_in_seconds(capsys, test_methods, isolated_results: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.perf_counter()
    status, _, err = run_cli([*TEST_COLOUR, "--dataset", "synthetic", *SMALL_SYNTHETIC, "--tracking-uri", uri],
                             capsys)
    assert time.perf_counter() - started < 30
    assert status == 2 and uri in err and "unreachable" in err and err.count("\n") == 1
    assert not (isolated_results / "runs").exists() and not ColourDistance.calls


def test_read_only_results_folder_fails_in_seconds(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    env = {**os.environ, "ZSADBENCH_RESULTS": str(results), "HOME": str(tmp_path), "MLFLOW_TRACKING_URI": ""}
    command = [sys.executable, "-m", "zsadbench.cli", "run", "--method", "winclip", "--preset", "smoke",
               "--dataset", "synthetic"]
    if os.geteuid() == 0:  # root writes anywhere: run as nobody, for whom the folder is read-only
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a folder read-only")
        tmp_path.chmod(0o755)
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    else:
        results.chmod(0o555)
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"results folder {results} is not writable" in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1
    assert not any(results.iterdir()), "work was done (data generated, a run recorded) before the check"


def test_usage_errors_exit_2(capsys, test_methods) -> None:
    status, _, err = run_cli([*TEST_COLOUR, "--dataset", "synthetic", "--batch-size", "0"], capsys)
    assert status == 2 and "--batch-size" in err
    status, _, err = run_cli(["run", "--dataset", "synthetic"], capsys)
    assert status == 2 and "--method and --dataset are required" in err
    status, _, err = run_cli(["run", "--method", "winclip", "--dataset", "synthetic", "--checkpoint", "x.pt"], capsys)
    assert status == 2 and "winclip has no learned parts" in err


def _server(folder: Path, port: int) -> subprocess.Popen:
    import urllib.request

    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--backend-store-uri",
         f"sqlite:///{folder / 'server.db'}", "--artifacts-destination", str(folder / "artifacts"), "--workers", "1"],
        cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return process
        except OSError:
            time.sleep(0.5)
    _stop(process)
    pytest.fail("mlflow server did not start")


def _stop(process: subprocess.Popen) -> None:
    """Kills the server with its worker processes (they hold the listening socket too)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


class ServerKiller(ColourDistance):
    """Kills the tracking server when it starts on its second category (the server goes away mid-run)."""

    server: subprocess.Popen | None = None

    def predict(self, images: torch.Tensor, category: str) -> Prediction:
        if category == "tile" and self.server is not None:
            _stop(self.server)
            type(self).server = None
        return super().predict(images, category)


@pytest.mark.slow
def test_server_gone_mid_run_finishes_in_folder_then_syncs(tmp_path: Path, capsys, caplog, test_methods,
                                                           isolated_results: Path) -> None:
    from mlflow.tracking import MlflowClient

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ServerKiller.server = _server(tmp_path, port)
    registry._methods["test-killer"] = ServerKiller
    ServerKiller.name = "test-killer"
    try:
        started = time.perf_counter()
        status, out, err = run_cli(["run", "--method", "test-killer", "--dataset", "synthetic", *SMALL_SYNTHETIC,
                                    "--tracking-uri", url], capsys)
        assert time.perf_counter() - started < 120, "MLflow retries must be bounded"
        assert status == 0, err
        assert "unreachable during the job" in out and "zsadbench sync" in out
        said = [r.getMessage() for r in caplog.records if r.name == "zsadbench.tracking"]
        assert sum("stopped answering" in m for m in said) == 1  # said once, not per metric
        folder = next((isolated_results / "runs").iterdir())
        assert json.loads((folder / "state.json").read_text())["status"] == "complete"
        assert set(json.loads((folder / "results.json").read_text())["categories"]) == {"brain", "carpet", "tile"}

        server = _server(tmp_path, port)
        try:
            status, out, _ = run_cli(["sync", str(folder)], capsys)
            assert status == 0 and "synced" in out
            run = MlflowClient(tracking_uri=url).get_run(folder.name)
            assert run.data.tags["zsadbench.status"] == "complete" and run.info.status == "FINISHED"
            assert {f"{c}/image_auroc" for c in ("brain", "carpet", "tile")} <= set(run.data.metrics)
            assert "image_auroc" in run.data.metrics
        finally:
            _stop(server)
    finally:
        if ServerKiller.server is not None:
            _stop(ServerKiller.server)
        registry._methods.pop("test-killer", None)


# -------------------------------------------------------------------------------- 4. numbers that mean something

def _mvtec_without_test_normals(root: Path) -> Path:
    make_mvtec(root)
    shutil.rmtree(root / "grid" / "test" / "good")
    return root


def test_category_without_normals_reports_undefined_not_perfect(tmp_path: Path, capsys, test_methods,
                                                                isolated_results: Path) -> None:
    root = _mvtec_without_test_normals(tmp_path / "mvtec")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status, out, err = run_cli([*TEST_COLOUR, "--dataset", "mvtec", "--data-root", str(root),
                                    "--set", "image_size=24"], capsys)
    assert status == 0, err
    said = [str(w.message) for w in caught]
    assert any("image AP undefined: no negative samples" in m for m in said)
    assert any("image F1-max undefined" in m for m in said)
    results = json.loads(next((isolated_results / "runs").glob("*/results.json")).read_text())
    grid = results["categories"]["grid"]
    assert grid["image_ap"] is None and grid["image_f1max"] is None and grid["image_auroc"] is None
    # the mean row: image metrics over the one category that defines them, said in the table, JSON and MLflow
    assert results["mean_categories"]["image"] == ["bottle"]
    assert results["mean"]["image_ap"] == results["categories"]["bottle"]["image_ap"]
    assert results["mean_categories"]["pixel"] == ["bottle", "grid"]
    assert "mean of image metrics over 1 of 2 categories (undefined for: grid)" in out
    params = json.loads(next((isolated_results / "runs").glob("*/params.json")).read_text())
    assert params["mean_categories.image"] == "1 of 2 categories (undefined for: grid)"


def test_all_positive_pixels_give_undefined_pixel_ap() -> None:
    from zsadbench.metrics import CategoryMetrics

    metrics = CategoryMetrics(pixel=True, category="flooded")
    maps = [np.random.default_rng(0).random((8, 8), dtype=np.float32)]
    with pytest.warns(UserWarning, match="pixel AP undefined: no negative samples"):
        metrics.update(np.array([0.5, 0.1]), np.array([1, 0]), maps * 2, [np.ones((8, 8), bool)] * 2)
        values = metrics.compute()
    assert math.isnan(values["pixel_ap"]) and math.isnan(values["pixel_f1max"])


@dataclass
class InfConfig:
    image_size: int = 24
    smoothing: int = 1
    shots: int = 0
    reference_seed: int = 10


class InfiniteSpot(ColourDistance):
    """Returns +inf in the map of its second image of every batch."""

    Config = InfConfig

    def predict(self, images: torch.Tensor, category: str) -> Prediction:
        scores, maps = super().predict(images, category)
        if len(maps) > 1:
            maps[1, 0, 0] = math.inf
        return Prediction(scores, maps)


def test_infinite_map_is_an_error_naming_the_image(tmp_path: Path, capsys, test_methods) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    registry._methods["test-inf"] = InfiniteSpot
    InfiniteSpot.name = "test-inf"
    try:
        status, _, err = run_cli(["run", "--method", "test-inf", "--dataset", "mvtec", "--data-root", str(root),
                                  "--categories", "bottle"], capsys)
    finally:
        registry._methods.pop("test-inf", None)
    assert status != 0
    assert "non-finite anomaly map (inf)" in err and str(root / "bottle" / "test") in err


def test_too_many_shots_is_an_error_naming_the_category(capsys, test_methods) -> None:
    status, _, err = run_cli([*TEST_COLOUR, "--dataset", "synthetic", *SMALL_SYNTHETIC, "--shots", "99"], capsys)
    assert status == 2
    assert "category 'brain' has 3 normal training images: too few for 99 shots" in err
    assert not ColourDistance.calls


@dataclass
class RandomConfig(InfConfig):
    pretrained: str = "random"


class RandomWeights(ColourDistance):
    """A detector that records random weights, as a real method with --pretrained random does."""

    Config = RandomConfig


def test_leaderboard_leaves_random_weights_out_unless_asked(tmp_path: Path, capsys, test_methods,
                                                            isolated_results: Path) -> None:
    registry._methods["test-random"] = RandomWeights
    RandomWeights.name = "test-random"
    try:
        base = ["--dataset", "synthetic", *SMALL_SYNTHETIC, "--set", "image_size=24"]
        assert run_cli(["run", "--method", "test-random", *base], capsys)[0] == 0
        assert run_cli(["run", "--method", "test-colour", *base], capsys)[0] == 0
        out_dir = tmp_path / "board"
        status, out, err = run_cli(["leaderboard", "--bootstrap", "0", "--out", str(out_dir)], capsys)
        assert status == 0, err
        assert "1 runs with random weights left out" in out
        board = (out_dir / "leaderboard.md").read_text()
        assert "Colour distance (test)" in board and "random weights" not in board
        status, out, _ = run_cli(["leaderboard", "--bootstrap", "0", "--out", str(out_dir), "--include-random"],
                                 capsys)
        assert status == 0 and "(random weights)" in (out_dir / "leaderboard.md").read_text()
    finally:
        registry._methods.pop("test-random", None)


# ------------------------------------------------------------------------------------- 5. check before computing

def test_broken_file_in_a_later_category_stops_before_any_compute(tmp_path: Path, capsys, test_methods,
                                                                  isolated_results: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    (root / "grid" / "test" / "crack" / "001.png").write_bytes(b"not a png")  # grid comes after bottle
    status, _, err = run_cli([*TEST_COLOUR, "--dataset", "mvtec", "--data-root", str(root)], capsys)
    assert status == 2 and "grid/test/crack/001.png" in err
    assert ColourDistance.calls == [], "the model ran before every file was checked"
    assert not (isolated_results / "runs").exists()


def test_empty_category_not_requested_does_not_block(tmp_path: Path, capsys, test_methods) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    (root / "zipper" / "test" / "good").mkdir(parents=True)  # a category with no images
    with pytest.warns(DataWarning, match="category 'zipper' of mvtec has no test images"):
        status, out, err = run_cli([*TEST_COLOUR, "--dataset", "mvtec", "--data-root", str(root)], capsys)
    assert status == 0, err
    assert "bottle" in out and "zipper" not in out
    status, _, err = run_cli([*TEST_COLOUR, "--dataset", "mvtec", "--data-root", str(root), "--categories", "zipper"],
                             capsys)
    assert status == 2 and "zipper" in err


# ------------------------------------------------------------------------------ 6. resume from another directory

def test_resume_from_another_directory(tmp_path: Path, capsys, test_methods, monkeypatch,
                                       isolated_results: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    make_mvtec(first / "data")
    second.mkdir()
    monkeypatch.chdir(first)
    ColourDistance.fail_once.add("grid")
    with pytest.raises(RuntimeError, match="simulated failure in grid"):  # relative root
        run_cli([*TEST_COLOUR, "--dataset", "mvtec", "--data-root", "data"], capsys)
    folder = next((isolated_results / "runs").iterdir())
    state = json.loads((folder / "state.json").read_text())
    assert state["spec"]["data_root"] == str(first / "data") and state["status"] == "failed"
    monkeypatch.chdir(second)
    ColourDistance.calls.clear()
    status, out, err = run_cli(["run", "--resume", str(folder)], capsys)  # by folder, from elsewhere
    assert status == 0, err
    assert set(ColourDistance.calls) == {"grid"}  # bottle was finished and is not recomputed
    assert "bottle" in out and "grid" in out


def test_help_and_usage_errors_do_not_import_torch() -> None:
    probe = ("import sys\nfrom zsadbench.cli import main\n"
             "for argv in (['--help'], ['run', '--help'], ['--version'], ['run', '--batch-size', 'x'], ['nope']):\n"
             "    try:\n        main(argv)\n"
             "    except SystemExit as exc:\n        assert exc.code in (0, 2), exc.code\n"
             "heavy = [m for m in ('torch', 'open_clip', 'mlflow', 'timm') if m in sys.modules]\n"
             "import zsadbench.metrics\n"
             "print(heavy, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[] False"

