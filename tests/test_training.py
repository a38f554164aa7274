"""`zsadbench train` end to end: MLflow training run, checkpoints, resume after an interruption, then `run`."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from zsadbench.methods.anomalyclip import AnomalyCLIP

from zsadbench.cli import main
from zsadbench.training import last_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:anomalyclip. no checkpoint")

TINY = ["--set", "model=tiny-ViT-L-14-336-quickgelu", "--pretrained", "random", "--set", "image_size=56"]
DATA = ["--dataset", "synthetic", "--dataset-option", "image_size=48", "--dataset-option", "n_train=1",
        "--dataset-option", "n_test_normal=2", "--dataset-option", "n_test_anomalous=3"]


def training_runs(results: Path):
    mlflow.set_tracking_uri(f"sqlite:///{results / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["zsadbench"])


def test_train_then_run(isolated_results: Path, mlflow_store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["train", "--method", "anomalyclip", *DATA, "--categories", "carpet,tile", *TINY,
                   "--epochs", "2", "--batch-size", "4"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "epoch 1:" in printed and "epoch 2:" in printed and "evaluate with: zsadbench run" in printed
    hint = printed.split("evaluate with: ")[1].splitlines()[0]  # repeats the model options, not the training ones
    assert "--pretrained random" in hint and "--set model=tiny-ViT-L-14-336-quickgelu" in hint
    assert "--set image_size=56" in hint and "train." not in hint

    runs = training_runs(isolated_results)
    assert len(runs) == 1
    row = runs.iloc[0]
    assert row["tags.zsadbench.kind"] == "training" and row["tags.zsadbench.status"] == "complete"
    assert row["params.config.train.epochs"] == "2" and row["params.config.train.lr"] == "0.001"
    assert row["params.config.train.betas"] == "[0.5, 0.999]" and row["params.config.train.seed"] == "111"
    assert row["params.categories"] == "carpet,tile" and row["params.images"] == "10"
    history = mlflow.tracking.MlflowClient().get_metric_history(row.run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, 7))  # 10 images, batch 4: 3 steps per epoch
    for name in ("train/image_loss", "train/focal", "train/dice_abnormal", "train/dice_normal", "epoch/loss"):
        assert f"metrics.{name}" in row
    artifacts = [a.path for a in mlflow.artifacts.list_artifacts(run_id=row.run_id, artifact_path="checkpoints")]
    assert artifacts == ["checkpoints/epoch_1.pth", "checkpoints/epoch_2.pth"]

    checkpoint = isolated_results / "training" / row.run_id / "epoch_2.pth"
    assert row["tags.zsadbench.checkpoint"] == str(checkpoint)
    stored = torch.load(checkpoint, weights_only=True)
    assert stored["method"] == "anomalyclip" and stored["epoch"] == 2
    assert json.loads(stored["config"])["train"]["epochs"] == 2

    status = main(["run", "--method", "anomalyclip", "--checkpoint", str(checkpoint), *DATA,
                   "--categories", "bottle", *TINY])
    assert status == 0
    assert "bottle" in capsys.readouterr().out
    evaluation = training_runs(isolated_results).query("`tags.zsadbench.kind` == 'evaluation'").iloc[0]
    assert evaluation["params.detector.prompts"].startswith("sha256:")


def test_interrupted_training_resumes_from_its_last_checkpoint(isolated_results: Path, mlflow_store: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI side of resuming (the bit-exactness of a resumed training is tested in test_anomalyclip.py)."""
    calls = {"n": 0}
    original = AnomalyCLIP.training_step

    def interrupting_step(self, images, masks, labels, samples=()):
        calls["n"] += 1
        if calls["n"] == 5:  # second step of epoch 2
            raise KeyboardInterrupt
        return original(self, images, masks, labels, samples)

    monkeypatch.setattr(AnomalyCLIP, "training_step", interrupting_step)
    assert main(["train", "--method", "anomalyclip", *DATA, "--categories", "carpet,tile", *TINY,
                 "--epochs", "2", "--batch-size", "4"]) == 130
    row = training_runs(isolated_results).iloc[0]
    assert row["tags.zsadbench.status"] == "interrupted"
    folder = isolated_results / "training" / row.run_id
    assert last_checkpoint(folder) == folder / "epoch_1.pth"

    monkeypatch.setattr(AnomalyCLIP, "training_step", original)
    assert main(["train", "--resume", row.run_id]) == 0
    row = training_runs(isolated_results).iloc[0]
    assert row["tags.zsadbench.status"] == "complete"
    resumed = torch.load(folder / "epoch_2.pth", weights_only=True)
    assert resumed["training"]["step"] == 6
    client = mlflow.tracking.MlflowClient()
    # steps 1-4 before the interruption, then epoch 2 again from its first step (4), not from epoch 1
    assert sorted(m.step for m in client.get_metric_history(row.run_id, "train/loss")) == [1, 2, 3, 4, 4, 5, 6]
    assert sorted(m.step for m in client.get_metric_history(row.run_id, "epoch/loss")) == [1, 2]
    # the job folder's log keeps each step once: the repeated step 4 replaces the interrupted run's line
    logged = [json.loads(line)["step"] for line in (folder / "losses.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]


def test_train_errors(capsys: pytest.CaptureFixture[str], isolated_results: Path, mlflow_store: Path) -> None:
    assert main(["train", "--method", "winclip", *DATA]) == 2
    assert "winclip' has no learned parts to train" in capsys.readouterr().err
    assert main(["train", "--resume", "nope"]) == 2
    assert "cannot resume training 'nope'" in capsys.readouterr().err
    assert main(["train", "--method", "anomalyclip", *DATA, *TINY, "--set", "train.split=train",
                 "--dataset-option", "n_train=0"]) == 2
    assert "no 'train' images" in capsys.readouterr().err
