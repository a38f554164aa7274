"""Shared fixtures: an isolated results folder per test, a small synthetic benchmark, test-only detectors."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zsadbench import registry


@pytest.fixture(autouse=True)
def isolated_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Points the results folder (runs, embedded MLflow store, generated data) at a fresh temporary folder."""
    folder = tmp_path / "results"
    monkeypatch.setenv("ZSADBENCH_RESULTS", str(folder))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return folder


@pytest.fixture(scope="session")
def empty_store_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store, created once per session (creating and migrating one takes seconds)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_store(isolated_results: Path, empty_store_template: Path) -> Path:
    """Puts a copy of the empty, already migrated store where the embedded store goes; returns its path."""
    isolated_results.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(empty_store_template, isolated_results / "mlflow.db"))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic benchmark (3 categories, 48 px), generated once per session."""
    from zsadbench.datasets.synthetic import load_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    load_synthetic(root, image_size=48, n_train=3, n_test_normal=4, n_test_anomalous=4,
                   categories=("carpet", "tile", "brain"))
    return root


SMALL_SYNTHETIC = ["--dataset-option", "image_size=48", "--dataset-option", "n_train=3",
                   "--dataset-option", "n_test_normal=4", "--dataset-option", "n_test_anomalous=4",
                   "--dataset-option", "categories=carpet,tile,brain"]


@pytest.fixture
def test_methods():
    """Registers the test-only detectors for the duration of a test."""
    from detectors import ColourDistance, MutualColour

    registry._discover()
    added = {"test-colour": ColourDistance, "test-mutual": MutualColour}
    for name, cls in added.items():
        registry._methods[name] = cls
        cls.name = name
    ColourDistance.calls.clear()
    MutualColour.seen_sets.clear()
    yield added
    for name in added:
        registry._methods.pop(name, None)


def write_image(path: Path, array: np.ndarray, **save_options) -> Path:
    """Writes a uint8 array as an image file (format from the suffix) and returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **save_options)
    return path


def noise_image(height: int, width: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """Returns a random uint8 image of the given size."""
    rng = np.random.default_rng(seed)
    shape = (height, width, channels) if channels > 1 else (height, width)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def box_mask(height: int, width: int, value: int = 255) -> np.ndarray:
    """Returns a uint8 mask with one rectangle of ``value`` in the upper-left quadrant."""
    mask = np.zeros((height, width), np.uint8)
    mask[1:height // 2, 2:width // 2] = value
    return mask


def free_port() -> int:
    """Returns a free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """Starts one `mlflow server` (own SQLite store and artifact folder) for the session; yields its URL.

    Tests share it, so each uses its own experiment name.
    """
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = (folder / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
         "--artifacts-destination", str(folder / "server-artifacts"), "--workers", "1"],
        cwd=folder, stdout=log, stderr=subprocess.STDOUT,
        # the server's background job runner (several huey worker processes) is not needed to record runs
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300  # starting a server takes seconds, minutes on a loaded machine
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"mlflow server did not start:\n{(folder / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield url
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()
