"""A run lands in a real `mlflow server` on 127.0.0.1 when --tracking-uri points at it."""

from __future__ import annotations

from pathlib import Path

from conftest import SMALL_SYNTHETIC

from zsadbench.cli import main


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
