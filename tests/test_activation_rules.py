"""Each method's MLP activation follows its reference for every input size and weights source (issue 13 item 7).

- MuSc (xrli-U/MuSc's open_clip fork): OpenAI weights at the native size go through ``load_openai_model``, QuickGELU;
  at any other size a fresh ``CLIP(**config)``, exact GELU for the OpenAI architectures. A weights file is always
  read as the OpenAI download there, whether a plain state dict, an OpenAI-marked one or a TorchScript archive.
- AnomalyCLIP, HeadCLIP, AdaptCLIP: copies of OpenAI's CLIP code, QuickGELU hard-coded, whatever the architecture
  name, weights and size.
- WinCLIP (anomalib): ``open_clip.create_model``, the architecture config's activation whatever the weights.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from zsadbench.clip.backbone import load_clip, reference_activation, uses_quick_gelu
from zsadbench.clip.testing import clip_like_state_dict

TINY_L = "tiny-ViT-L-14-336"  # GELU config (as open_clip's ViT-L-14-336), native 56 px
TINY_B = "tiny-ViT-B-16-plus-240"  # GELU config, native 80 px


def weights_file(tmp_path, model: str, kind: str):  # noqa: ANN201 - a Path
    """Writes tiny weights as a plain state dict, an OpenAI-marked state dict or a TorchScript archive."""
    path = tmp_path / f"{model}-{kind}.pt"
    if kind == "torchscript":
        source = load_clip(model, "random", seed=1).model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.save is deprecated; OpenAI's releases use it
            torch.jit.save(torch.jit.script(source), str(path))
        return path
    state = clip_like_state_dict(model, seed=1)
    if kind == "openai":
        state.update(input_resolution=torch.tensor(56), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    torch.save(state, path)
    return path


@pytest.mark.parametrize("kind", ["plain", "openai", "torchscript"])
def test_musc_runs_quickgelu_on_a_weights_file_at_the_native_size_and_gelu_elsewhere(tmp_path, kind) -> None:
    from zsadbench.methods.musc import MuSc

    path = str(weights_file(tmp_path, TINY_L, kind))
    native = MuSc(model=TINY_L, pretrained=path, image_size=56)
    assert uses_quick_gelu(native.features.backbone.model), kind  # the reference's load_openai_model
    assert native.describe()["quick_gelu"] is True
    larger = MuSc(model=TINY_L, pretrained=path, image_size=84)
    assert not uses_quick_gelu(larger.features.backbone.model), kind  # the reference's fresh CLIP(**config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # OpenAI-marked weights: the explicit GELU is honoured with a loud warning
        forced = MuSc(model=TINY_L, pretrained=path, image_size=56, activation="gelu")  # an explicit choice wins
    assert not uses_quick_gelu(forced.features.backbone.model)


def test_musc_native_size_plain_file_matches_forced_quickgelu(tmp_path) -> None:
    from zsadbench.methods.musc import MuSc

    path = str(weights_file(tmp_path, TINY_L, "plain"))
    auto = MuSc(model=TINY_L, pretrained=path, image_size=56)
    forced = MuSc(model=TINY_L, pretrained=path, image_size=56, activation="quick_gelu")
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (taps_auto, emb_auto), (taps_forced, emb_forced) = auto.features(x, [23]), forced.features(x, [23])
    assert torch.equal(taps_auto[0], taps_forced[0]) and torch.equal(emb_auto, emb_forced)


def test_musc_random_weights_keep_the_config_activation() -> None:
    from zsadbench.methods.musc import MuSc

    assert not uses_quick_gelu(MuSc(model=TINY_L, pretrained="random", image_size=56).features.backbone.model)


@pytest.mark.parametrize("rule, model, pretrained, size, expected", [
    ("musc", "ViT-L-14-336", "openai", 336, "quick_gelu"),  # load_openai_model at the native size
    ("musc", "ViT-L-14-336", "openai", 518, "gelu"),  # CLIP(**config) at 518: exact GELU (the paper's setting)
    ("musc", "ViT-L-14-336", "openai", None, "quick_gelu"),
    ("musc", "ViT-L-14", "laion400m_e32", 224, "gelu"),  # other tags: the config's activation
    ("musc", "ViT-L-14", "laion400m_e32", 518, "gelu"),
    ("openai_clip", "ViT-L-14-336", "laion400m_e32", 518, "quick_gelu"),
    ("openai_clip", "ViT-L-14-336-quickgelu", "openai", 336, "quick_gelu"),
    ("open_clip", "ViT-B-16-plus-240", "laion400m_e31", 240, "gelu"),
    ("open_clip", "ViT-B-16", "openai", 224, "gelu"),  # open_clip >= 3 builds GELU here (and only warns)
    ("open_clip", "ViT-B-16-quickgelu", "openai", 224, "quick_gelu"),
])
def test_reference_activation_rules(rule, model, pretrained, size, expected) -> None:
    assert reference_activation(rule, model, pretrained, size) == expected


def test_reference_activation_rejects_unknown_rules_and_architectures() -> None:
    with pytest.raises(ValueError, match="unknown activation rule"):
        reference_activation("timm", "ViT-L-14-336", "openai", 336)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown CLIP architecture"):
        reference_activation("musc", "ViT-Q-99", "openai", 336)


@pytest.mark.parametrize("method", ["anomalyclip", "headclip", "adaptclip"])
def test_learned_parts_methods_run_quickgelu_whatever_the_architecture_name(tmp_path, method) -> None:
    from zsadbench import load_method

    path = str(weights_file(tmp_path, TINY_L, "plain"))  # a GELU architecture name, unmarked weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained-parts warnings
        detector = load_method(method, model=TINY_L, pretrained=path, image_size=70)  # not the native 56
    assert uses_quick_gelu(detector.clip)
    assert all(type(b.mlp.gelu).__name__ == "QuickGELU" for b in detector.clip.transformer.resblocks)  # text too


def test_winclip_keeps_the_config_activation_on_openai_weights_and_says_so(tmp_path) -> None:
    from zsadbench.methods.winclip import WinClip

    path = str(weights_file(tmp_path, TINY_B, "openai"))
    with pytest.warns(UserWarning, match="ACTIVATION MISMATCH"):
        detector = WinClip(model=TINY_B, pretrained=path, image_size=80)
    assert not uses_quick_gelu(detector.clip)  # anomalib: open_clip.create_model(arch) + these weights
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = WinClip(model=TINY_B, pretrained=str(weights_file(tmp_path, TINY_B, "plain")), image_size=80)
    assert not uses_quick_gelu(plain.clip)
