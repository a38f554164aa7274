"""The first ten minutes: presets, config files, predict on any images, readable output and method-aware errors."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import SMALL_SYNTHETIC, noise_image, write_image

import zsadbench
from zsadbench.cli import main


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        status = main(args)
    except SystemExit as exc:
        status = int(exc.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


def test_smoke_preset_run_says_what_the_numbers_mean(capsys) -> None:
    status, out, err = cli(["run", "--method", "winclip", "--preset", "smoke", "--dataset", "synthetic",
                            *SMALL_SYNTHETIC], capsys)
    assert status == 0, err
    assert out.startswith("WinCLIP on synthetic (values in percent)")
    assert "random weights" in out and "not how well WinCLIP detects anomalies" in out
    assert "zsadbench run --method winclip --dataset mvtec --data-root" in out
    assert "\x1b[A" not in out + err and "\r" not in out  # no cursor control characters when not on a terminal


def test_print_config_round_trips_through_config_file(tmp_path: Path, capsys, test_methods,
                                                       isolated_results: Path) -> None:
    status, out, _ = cli(["run", "--method", "winclip", "--preset", "smoke", "--set", "temperature=0.05",
                          "--print-config"], capsys)
    assert status == 0
    parsed = tomllib.loads(out)
    assert parsed["method"] == "winclip" and parsed["config"]["temperature"] == 0.05
    assert parsed["config"]["model"] == "tiny-ViT-B-16-plus-240" and parsed["config"]["scales"] == [2, 3]
    file = tmp_path / "run.toml"
    file.write_text('dataset = "synthetic"\ndataset_option = ["image_size=48", "n_train=3", "n_test_normal=4", '
                    '"n_test_anomalous=4", "categories=carpet"]\n' + out)  # top-level keys before [config]
    status, _, err = cli(["run", "--config", str(file), "--set", "scales=[2]"], capsys)  # command line wins
    assert status == 0, err
    config = json.loads(next((isolated_results / "runs").glob("*/config.json")).read_text())
    assert config["temperature"] == 0.05 and config["scales"] == [2] and config["image_size"] == 80
    status, _, err = cli(["run", "--config", str(file), "--no-such"], capsys)
    assert status == 2
    file.write_text('method = "winclip"\nbogus = 1\n')
    status, _, err = cli(["run", "--config", str(file)], capsys)
    assert status == 2 and "unknown option bogus" in err


def test_predict_scores_any_images(tmp_path: Path, capsys) -> None:
    images = tmp_path / "photos"
    for i in range(3):
        write_image(images / f"part_{i}.jpg", noise_image(40, 50, i))
    write_image(tmp_path / "other" / "part_0.png", noise_image(30, 30, 9))  # same stem, another folder
    out = tmp_path / "out"
    status, printed, err = cli(["predict", "--method", "winclip", "--preset", "smoke", "--images", str(images),
                                str(tmp_path / "other" / "part_0.png"), "--out", str(out)], capsys)
    assert status == 0, err
    scores = pd.read_csv(out / "scores.csv")
    assert len(scores) == 4 and np.isfinite(scores.score).all()
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["part_0.tiff", "part_0_2.tiff", "part_1.tiff",
                                                                 "part_2.tiff"]
    assert tifffile.imread(out / "maps" / "part_1.tiff").shape == (80, 80)
    assert len(list((out / "overlays").glob("*.png"))) == 4 and "4 images scored" in printed
    # few-shot with a folder of normal references, and a transductive method on the same images
    status, _, err = cli(["predict", "--method", "winclip", "--preset", "smoke", "--images", str(images),
                          "--shots-dir", str(images), "--out", str(tmp_path / "fewshot")], capsys)
    assert status == 0, err
    status, _, err = cli(["predict", "--method", "musc", "--preset", "smoke", "--images", str(images),
                          str(tmp_path / "other"), "--out", str(tmp_path / "musc"), "--set", "topmin_rounding=ceil"],
                         capsys)
    assert status == 0, err
    # a folder of the user's that is not an earlier output is never written into
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    status, _, err = cli(["predict", "--method", "winclip", "--preset", "smoke", "--images", str(images),
                          "--out", str(tmp_path / "mine")], capsys)
    assert status == 2 and "not empty" in err and sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_method_aware_errors(tmp_path: Path, capsys) -> None:
    status, _, err = cli(["predict", "--method", "winclip", "--images", str(tmp_path), "--out", str(tmp_path / "o"),
                          "--checkpoint", "x.pt"], capsys)
    assert status == 2 and "winclip has no learned parts" in err
    status, _, err = cli(["predict", "--method", "musc", "--images", str(tmp_path), "--out", str(tmp_path / "o"),
                          "--shots", "2"], capsys)
    assert status == 2 and "musc is not a few-shot method" in err
    text = tmp_path / "weights.pt"
    text.write_text("this is not a checkpoint")
    write_image(tmp_path / "img" / "a.png", noise_image(20, 20))
    status, _, err = cli(["predict", "--method", "anomalyclip", "--preset", "smoke", "--checkpoint", str(text),
                          "--images", str(tmp_path / "img"), "--out", str(tmp_path / "o")], capsys)
    assert status == 2 and "is not a PyTorch file" in err and "KeyError" not in err
    status, _, err = cli(["predict", "--method", "winclip", "--set", "model=ViT-B-16-plus-24", "--pretrained", "random",
                          "--images", str(tmp_path / "img"), "--out", str(tmp_path / "o")], capsys)
    assert status == 2 and "did you mean" in err and "ViT-B-16-plus-240" in err


def test_python_api_takes_the_cli_evaluation_options(synthetic_root: Path, test_methods) -> None:
    dataset = zsadbench.load_dataset("synthetic", synthetic_root, image_size=48, n_train=3, n_test_normal=4,
                                     n_test_anomalous=4, categories="carpet,tile,brain")
    assert "\n" not in repr(dataset) and "3 categories" in repr(dataset) and "24 test" in repr(dataset)
    detector = zsadbench.load_method("test-colour", image_size=32)
    exact = zsadbench.evaluate(detector, dataset, batch_size=3, progress=False)
    step = zsadbench.evaluate(detector, dataset, batch_size=5, aupro="step200", progress=False)
    assert list(exact.index) == ["brain", "carpet", "tile", "mean"]
    assert 0 <= exact.loc["mean", "image_auroc"] <= 1  # fractions, not percent
    assert exact.loc["mean", "image_auroc"] == step.loc["mean", "image_auroc"]
    assert exact.loc["mean", "pixel_aupro"] != step.loc["mean", "pixel_aupro"]


def test_headclip_loads_zsadbench_anomalyclip_checkpoints(tmp_path: Path) -> None:
    import torch

    from zsadbench.training import checkpoint_payload

    smoke = {"model": "tiny-ViT-L-14-336-quickgelu", "pretrained": "random", "image_size": 56}
    anomalyclip = zsadbench.load_method("anomalyclip", seed=3, **smoke)
    with torch.no_grad():
        for p in anomalyclip.trainable_parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "anomalyclip.pth"
    torch.save(checkpoint_payload(anomalyclip, 1), path)
    headclip = zsadbench.load_method("headclip", checkpoint=str(path), **smoke)
    prompts = {k: v for k, v in headclip.state_dict().items() if k.startswith("prompt_learner.")}
    assert prompts and all(torch.equal(v, anomalyclip.state_dict()[k]) for k, v in prompts.items())
    assert all((v == 1).all() for k, v in headclip.state_dict().items() if k.startswith("head_weights."))
