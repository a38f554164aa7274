"""Fidelity faults driven through the CLI as a user would (issue 13 item 7).

- ``zsadbench run --method musc --pretrained <plain state-dict file>`` at the architecture's native size runs
  QuickGELU, as the reference does (it loads any file as the OpenAI model there), and records it with the run.
- An AdaptCLIP checkpoint in the authors' layout with an extra top-level entry loads with a warning naming the entry
  (nothing read from a checkpoint is dropped silently); the released layout itself loads without one.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from zsadbench.cli import main
from zsadbench.clip.testing import clip_like_state_dict

DATA = ["--dataset", "synthetic", "--dataset-option", "image_size=48", "--dataset-option", "n_train=2",
        "--dataset-option", "n_test_normal=3", "--dataset-option", "n_test_anomalous=3", "--categories", "bottle"]


def test_musc_run_on_a_plain_weights_file_at_the_native_size_uses_quickgelu(tmp_path, isolated_results,
                                                                           mlflow_store) -> None:
    import mlflow

    weights = tmp_path / "plain.pt"
    torch.save(clip_like_state_dict("tiny-ViT-L-14-336", seed=1), weights)
    options = ["--set", "model=tiny-ViT-L-14-336", "--pretrained", str(weights)]
    assert main(["run", "--method", "musc", *DATA, *options, "--set", "image_size=56"]) == 0  # native: QuickGELU
    assert main(["run", "--method", "musc", *DATA, *options, "--set", "image_size=84"]) == 0  # fresh CLIP: GELU
    mlflow.set_tracking_uri(f"sqlite:///{isolated_results / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["zsadbench"])
    by_size = dict(zip(runs["params.config.image_size"], runs["params.detector.quick_gelu"]))
    assert by_size == {"56": "True", "84": "False"}, by_size


def test_adaptclip_checkpoint_with_an_unknown_entry_warns_naming_it(tmp_path, isolated_results) -> None:
    from zsadbench.methods.adaptclip import AdaptCLIP

    model = "tiny-ViT-L-14-336-quickgelu"
    released = AdaptCLIP(model=model, pretrained="random", image_size=56).reference_state_dict()
    clean, extra = tmp_path / "epoch_15.pth", tmp_path / "epoch_15_extra.pth"
    torch.save(released, clean)
    torch.save({**released, "optimizer": {"lr": 1e-3}}, extra)
    options = ["--set", f"model={model}", "--pretrained", "random", "--set", "image_size=56"]
    with pytest.warns(UserWarning, match=r"epoch_15_extra\.pth: ignoring unknown top-level entry 'optimizer'"):
        assert main(["run", "--method", "adaptclip", "--checkpoint", str(extra), *DATA, *options]) == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["run", "--method", "adaptclip", "--checkpoint", str(clean), *DATA, *options]) == 0
    assert not [w for w in caught if "unknown top-level" in str(w.message)]
