"""CLIP loading: tiny configs, seeded random weights, local files, activation checks, offline errors, pos-embed."""

from __future__ import annotations

import warnings

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from torch import nn

from zsadbench.clip.backbone import (
    WeightsMismatchError,
    WeightsNotFoundError,
    _download,
    load_clip,
    resize_pos_embed,
    set_image_size,
    uses_quick_gelu,
)

TINY_L = "tiny-ViT-L-14-336"


def test_tiny_configs_mirror_real_depths() -> None:
    model = open_clip.create_model(TINY_L)
    assert len(model.visual.transformer.resblocks) == 24  # ViT-L/14: layer numbers 6..24 stay the papers'
    assert len(model.transformer.resblocks) == 12
    assert model.visual.patch_size == (14, 14)
    assert len(open_clip.create_model("tiny-ViT-B-16-plus-240").visual.transformer.resblocks) == 12
    assert isinstance(open_clip.create_model(TINY_L + "-quickgelu").visual.transformer.resblocks[0].mlp.gelu,
                      QuickGELU)
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, nn.GELU)


def test_random_weights_are_seeded() -> None:
    a = load_clip(TINY_L, "random", seed=3).model.state_dict()
    b = load_clip(TINY_L, "random", seed=3).model.state_dict()
    c = load_clip(TINY_L, "random", seed=4).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["visual.conv1.weight"], c["visual.conv1.weight"])


def test_random_init_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_clip(TINY_L, "random", seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_local_file_loads_offline_with_openai_metadata(tmp_path) -> None:
    source = load_clip(TINY_L, "random", seed=1)
    state = dict(source.model.state_dict())
    plain = tmp_path / "plain.pt"
    torch.save(state, plain)
    loaded = load_clip(TINY_L, str(plain))
    assert loaded.weights_source == "file" and not loaded.quick_gelu
    assert torch.equal(loaded.model.visual.proj, source.model.visual.proj)

    # an OpenAI-style file: JIT metadata scalars and "module." prefixes; it marks QuickGELU weights
    openai = {f"module.{k}": v for k, v in state.items()}
    openai.update(input_resolution=torch.tensor(56), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    path = tmp_path / "openai.pt"
    torch.save({"state_dict": openai}, path)
    auto = load_clip(TINY_L, str(path))
    assert auto.quick_gelu and uses_quick_gelu(auto.model)
    assert torch.equal(auto.model.visual.proj, source.model.visual.proj)
    with pytest.warns(UserWarning, match="ACTIVATION MISMATCH"):
        gelu = load_clip(TINY_L, str(path), activation="gelu")
    assert not uses_quick_gelu(gelu.model)


def test_torchscript_archive_loads(tmp_path) -> None:
    source = load_clip("tiny-ViT-B-16-plus-240", "random", seed=2).model
    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.save is deprecated; OpenAI's releases use it
        torch.jit.save(torch.jit.script(source), str(path))
    loaded = load_clip("tiny-ViT-B-16-plus-240", str(path)).model  # carries the attn_mask buffer: ignored
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_quickgelu_architecture_can_be_forced_to_gelu_without_warning_for_unknown_weights() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backbone = load_clip(TINY_L + "-quickgelu", "random", activation="gelu")
    assert not backbone.quick_gelu
    assert all(isinstance(b.mlp.gelu, nn.GELU) for b in backbone.model.transformer.resblocks)
    assert uses_quick_gelu(load_clip(TINY_L + "-quickgelu", "random").model)


def test_bad_weight_files_name_the_file(tmp_path) -> None:
    other = tmp_path / "b16.pt"
    torch.save(load_clip("tiny-ViT-B-16-plus-240", "random").model.state_dict(), other)
    with pytest.raises(WeightsMismatchError, match="b16.pt"):
        load_clip(TINY_L, str(other))
    with pytest.raises(WeightsNotFoundError, match="missing.pt"):
        load_clip(TINY_L, str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(WeightsMismatchError, match="junk.pt"):
        load_clip(TINY_L, str(junk))
    with pytest.raises(ValueError, match="neither a weights file nor an open_clip tag"):
        load_clip(TINY_L, "laion2b")
    with pytest.raises(ValueError, match="unknown CLIP architecture"):
        load_clip("ViT-Q-99", "random")


def test_missing_weights_offline_say_what_to_download_and_where(tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsNotFoundError) as error:
        load_clip("ViT-B-16-plus-240", "laion400m_e31", cache_dir=str(tmp_path))
    message = str(error.value)
    assert "vit_b_16_plus_240-laion400m_e31-8fb26589.pt" in message  # the file to download
    assert str(tmp_path) in message  # where open_clip's cache expects it
    assert "timm/vit_base_patch16_plus_clip_240.laion400m_e31" in message  # the Hugging Face repo
    assert "--pretrained /path/to/" in message  # the no-network alternative


def test_weights_placed_in_the_url_cache_are_found(tmp_path) -> None:
    cfg = open_clip.get_pretrained_cfg("ViT-B-16-plus-240", "laion400m_e31")
    placed = tmp_path / "vit_b_16_plus_240-laion400m_e31-8fb26589.pt"
    placed.write_bytes(b"")
    assert _download("ViT-B-16-plus-240", "laion400m_e31", cfg, str(tmp_path)) == str(placed)


def test_resize_pos_embed_modes_keep_cls() -> None:
    pos = torch.randn(1 + 24 * 24, 8)
    for mode, interp, antialias in (("bilinear", "bilinear", False), ("bicubic", "bicubic", False),
                                    ("bicubic-antialias", "bicubic", True)):
        out = resize_pos_embed(pos, (37, 37), mode)  # type: ignore[arg-type]
        assert out.shape == (1 + 37 * 37, 8)
        assert torch.equal(out[0], pos[0])
        grid = pos[1:].reshape(1, 24, 24, 8).permute(0, 3, 1, 2)
        expected = F.interpolate(grid, size=(37, 37), mode=interp, align_corners=False, antialias=antialias)
        assert torch.allclose(out[1:], expected.permute(0, 2, 3, 1).reshape(-1, 8))
    no_aa = resize_pos_embed(pos, (37, 37), "bicubic")
    aa = resize_pos_embed(pos, (37, 37), "bicubic-antialias")
    assert (no_aa - aa).abs().max() > 1e-3  # MuSc's non-antialiased resize is a different table
    with pytest.raises(ValueError, match="pos_embed_mode"):
        resize_pos_embed(pos, (37, 37), "nearest")  # type: ignore[arg-type]


def test_image_size_resizes_the_grid_and_forward_runs() -> None:
    native = load_clip(TINY_L, "random", seed=0)
    bigger = load_clip(TINY_L, "random", seed=0, image_size=70, pos_embed_mode="bilinear")
    assert bigger.grid_size == (5, 5) and bigger.image_size == 70
    expected = resize_pos_embed(native.visual.positional_embedding, (5, 5), "bilinear")
    assert torch.equal(bigger.visual.positional_embedding, expected)
    with torch.no_grad():
        assert bigger.model.encode_image(torch.randn(2, 3, 70, 70)).shape == (2, 32)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        set_image_size(bigger.visual, 71)
