"""A run lands in a real `mlflow server` on 127.0.0.1 when --tracking-uri points at it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import SMALL_SYNTHETIC

from zsadbench.cli import main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """Starts `mlflow server` with its own SQLite store and artifact folder; yields its URL."""
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"mlflow server did not start:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield url
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


def test_run_lands_on_server(mlflow_server: str, isolated_results: Path, test_methods) -> None:
    from mlflow.tracking import MlflowClient

    status = main(["run", "--method", "test-colour", "--dataset", "synthetic", *SMALL_SYNTHETIC,
                   "--tracking-uri", mlflow_server, "--experiment", "server-test"])
    assert status == 0
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("server-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["zsadbench.status"] == "complete"
    assert 0.5 < run.data.metrics["image_auroc"] <= 1.0
    assert {"carpet/pixel_aupro", "tile/image_ap", "brain/mad_all7"} <= set(run.data.metrics)
    assert not (isolated_results / "mlflow.db").exists()  # nothing went to the embedded store
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "results.json" in names
