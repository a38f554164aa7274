"""Loading a CLIP backbone through open_clip: tags, local weight files, seeded random weights, input size.

Every CLIP-based method takes ``model`` (an open_clip architecture name), ``pretrained`` and ``image_size``:

- ``pretrained`` = an open_clip tag (``laion400m_e31``, ``openai``): weights come from open_clip's own cache (downloaded
  there once when online). Offline with an empty cache, :class:`WeightsNotFoundError` says which file to fetch and
  where to put it.
- ``pretrained`` = a path to a local state dict in the open_clip / OpenAI key layout (``.pt``, ``.pth``, ``.bin``,
  ``.safetensors``, or an OpenAI TorchScript archive): works with no network.
- ``pretrained="random"``: open_clip's own initialisation under a fixed seed (tests, offline smoke runs, parity).

The model is always built at its native size and the weights load strictly; a different ``image_size`` then resizes
the positional-embedding grid with an explicit mode (``bilinear`` as AnomalyCLIP/AdaptCLIP, ``bicubic`` without
antialias as MuSc), never with open_clip's antialiased bicubic resize.

QuickGELU: the OpenAI weights were trained with QuickGELU, but open_clip >= 3 builds ``nn.GELU`` for e.g.
``ViT-L-14-336`` and only warns. ``activation="auto"`` follows the weights (QuickGELU for ``openai`` tags and OpenAI
archives); an explicit ``activation`` that disagrees with known weights is honoured with a loud warning (MuSc at 518
px runs OpenAI weights with exact GELU on purpose). A method does not use ``"auto"`` as is: its reference decides the
activation by its own rule (:func:`reference_activation`), for every input size and weights source.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from torch import Tensor, nn

from zsadbench.checkpoints import CheckpointError, check_torch_file

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")

# open_clip's towers and blocks are plain nn.Modules whose sub-modules type checkers cannot see; these aliases say
# which object a function expects (open_clip.CLIP, its VisionTransformer, one ResidualAttentionBlock).
ClipModel = Any
VisionTower = Any
ResidualBlock = Any

PosEmbedMode = Literal["bilinear", "bicubic", "bicubic-antialias"]
Activation = Literal["auto", "gelu", "quick_gelu"]
# how a reference implementation picks the MLP activation (see reference_activation)
ActivationRule = Literal["openai_clip", "open_clip", "musc"]


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are neither cached nor downloadable; the message says what to fetch and where."""


class WeightsMismatchError(ValueError):
    """A weight file does not fit the requested architecture; the message names the file and the keys."""


def register_model_configs() -> None:
    """Registers zsadbench's own open_clip configs (tiny test models) with ``open_clip.add_model_config``."""
    if MODEL_CONFIG_DIR not in getattr(open_clip.factory, "_MODEL_CONFIG_PATHS", []):
        open_clip.add_model_config(MODEL_CONFIG_DIR)


register_model_configs()


@dataclass
class ClipBackbone:
    """A loaded open_clip CLIP model (eval mode, fp32) and what was loaded into it."""

    model: ClipModel  # open_clip.CLIP
    name: str  # architecture as requested
    pretrained: str  # tag, file path or "random"
    weights_source: str  # "tag", "file" or "random"
    weights_file: str | None  # resolved file the weights came from (None for random)
    quick_gelu: bool  # activation actually used in both towers
    image_size: int
    pos_embed_mode: str
    seed: int

    @property
    def visual(self) -> VisionTower:
        """Returns the vision tower (open_clip ``VisionTransformer``)."""
        return self.model.visual

    @property
    def grid_size(self) -> tuple[int, int]:
        """Returns the patch grid (rows, columns) at the loaded image size."""
        height, width = self.model.visual.grid_size
        return int(height), int(width)

    def describe(self) -> dict[str, str | int | bool]:
        """Returns the backbone facts tracking records besides the weights id (activation, pos-embed resize)."""
        return {"backbone": self.name, "weights_source": self.weights_source, "quick_gelu": self.quick_gelu,
                "pos_embed_mode": self.pos_embed_mode}


def load_clip(model: str, pretrained: str, *, image_size: int | None = None, pos_embed_mode: PosEmbedMode = "bicubic",
              activation: Activation = "auto", seed: int = 0, cache_dir: str | None = None,
              device: str | torch.device = "cpu") -> ClipBackbone:
    """Returns the CLIP ``model`` with weights ``pretrained`` (tag, file or ``random``) at ``image_size``, eval, fp32.

    ``pos_embed_mode`` applies only when ``image_size`` differs from the architecture's native size.
    """
    config = open_clip.get_model_config(model)
    if config is None:
        raise ValueError(f"unknown CLIP architecture {model!r}; {closest_models(model, open_clip.list_models())}")
    native_quick_gelu = bool(config.get("quick_gelu", False))

    source, weights_file, state_dict, weights_quick_gelu = _resolve_weights(model, pretrained, cache_dir)
    quick_gelu = _choose_activation(model, pretrained, native_quick_gelu, weights_quick_gelu, activation)

    with torch.random.fork_rng(devices=[]), quiet_open_clip():
        torch.manual_seed(seed)  # only matters for "random"; the loaded weights overwrite everything otherwise
        clip = open_clip.create_model(model, pretrained=None, precision="fp32", device="cpu",
                                      force_quick_gelu=quick_gelu and not native_quick_gelu)
    if not quick_gelu and native_quick_gelu:
        _set_activation(clip, nn.GELU)
    if state_dict is not None:
        _load_state_dict(clip, state_dict, weights_file or pretrained, model)

    native = int(clip.visual.image_size[0])
    size = int(image_size or native)
    if size != native:
        set_image_size(clip.visual, size, pos_embed_mode)
    clip = clip.to(device).eval()
    clip.requires_grad_(False)
    return ClipBackbone(clip, model, pretrained, source, weights_file, quick_gelu, size,
                        pos_embed_mode if size != native else "native", seed)


def closest_models(name: str, known: list[str]) -> str:
    """Returns "did you mean ..." with the closest known names, the tiny test models (``tiny-...``) first."""
    import difflib

    close = difflib.get_close_matches(name, known, n=4, cutoff=0.5)
    tiny = sorted(m for m in known if m.startswith("tiny-"))
    if not close:
        return f"known: {', '.join(tiny + [m for m in known if m not in tiny][:20])}, ... (open_clip.list_models())"
    return f"did you mean {', '.join(sorted(close, key=lambda m: not m.startswith('tiny-')))}?"


class _OpenClipChatter(logging.Filter):
    """Drops open_clip's INFO records and its "initialized randomly" warning (zsadbench loads the weights itself)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}open_clip{os.sep}" not in record.pathname:
            return True
        return record.levelno >= logging.WARNING and "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def quiet_open_clip() -> Iterator[None]:
    """Silences open_clip's root-logger chatter (model building, tokenizer lookup) for the duration of the block."""
    chatter = _OpenClipChatter()
    root = logging.getLogger()
    root.addFilter(chatter)
    try:
        yield
    finally:
        root.removeFilter(chatter)


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.startswith(("~", ".")) or pretrained.endswith(WEIGHT_FILE_SUFFIXES)


def _resolve_weights(model: str, pretrained: str, cache_dir: str | None
                     ) -> tuple[str, str | None, dict[str, Tensor] | None, bool | None]:
    """Returns (source, file, state dict or None, whether the weights were trained with QuickGELU or None)."""
    if pretrained in ("random", "none", ""):
        return "random", None, None, None
    path = Path(pretrained).expanduser()
    if path.is_file():
        state_dict, is_openai = read_state_dict(path)
        return "file", str(path), state_dict, (True if is_openai else None)
    if _looks_like_path(pretrained):
        raise WeightsNotFoundError(f"weights file not found: {path} (pretrained={pretrained!r} for {model})")
    tags = open_clip.list_pretrained_tags_by_model(model)
    tag_cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not tag_cfg:
        known = ", ".join(tags) if tags else "none (use a local weights file or 'random')"
        raise ValueError(f"{pretrained!r} is neither a weights file nor an open_clip tag of {model}; "
                         f"tags of {model}: {known}")
    file = _download(model, pretrained, tag_cfg, cache_dir)
    state_dict, _ = read_state_dict(Path(file))
    return "tag", file, state_dict, bool(tag_cfg.get("quick_gelu", False))


def _download(model: str, tag: str, tag_cfg: dict, cache_dir: str | None) -> str:
    """Returns the cached weights file of ``model``/``tag``, downloading it when there is a network.

    A file the user placed in open_clip's URL cache (``~/.cache/clip`` or ``cache_dir``) is used first: open_clip
    itself prefers the Hugging Face hub cache when ``huggingface_hub`` is installed and would not look there.
    """
    url = tag_cfg.get("url", "")
    if url:
        placed = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if placed.is_file():
            return str(placed)
    try:
        file = open_clip.download_pretrained(tag_cfg, cache_dir=cache_dir)
    except Exception as exc:  # huggingface_hub / urllib raise many types; all mean "not cached and not reachable"
        raise WeightsNotFoundError(_missing_weights_message(model, tag, tag_cfg, cache_dir, exc)) from exc
    if not file:
        raise WeightsNotFoundError(_missing_weights_message(model, tag, tag_cfg, cache_dir, None))
    return file


def _missing_weights_message(model: str, tag: str, tag_cfg: dict, cache_dir: str | None,
                             exc: BaseException | None) -> str:
    """Returns the error text for weights that are neither cached nor downloadable: what to fetch, where to put it."""
    reason = f" ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})" if exc else ""
    lines = [f"pretrained weights {model} / {tag} are not in the local cache and could not be downloaded{reason}.",
             "Fix it in one of these ways:"]
    url = tag_cfg.get("url", "")
    if url:
        url_cache = Path(cache_dir or os.path.expanduser("~/.cache/clip"))
        lines.append(f"  1. download {url}\n     and save it as {url_cache / os.path.basename(url)}")
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        repo_id = hub.rstrip("/") if hub.endswith("/") else os.path.dirname(hub)
        try:
            from huggingface_hub import constants

            hub_cache = cache_dir or constants.HF_HUB_CACHE
        except ImportError:  # pragma: no cover - huggingface_hub ships with open_clip's usual installs
            hub_cache = cache_dir or "~/.cache/huggingface/hub"
        lines.append(f"  {2 if url else 1}. or, on a machine with network, fill the Hugging Face cache: "
                     f"`huggingface-cli download {repo_id}` (cache: {hub_cache}; copy it to this machine)")
    example = os.path.basename(url) if url else f"{model}-{tag}.safetensors"
    lines.append(f"  {1 + bool(url) + bool(hub)}. or pass any local copy of the file, which needs no network: "
                 f"--pretrained /path/to/{example}")
    return "\n".join(lines)


def read_state_dict(path: Path) -> tuple[dict[str, Tensor], bool]:
    """Returns (state dict in open_clip key layout, whether it is an OpenAI archive) read from a weights file.

    Accepts plain state dicts, ``{"state_dict": ...}`` wrappers, ``module.``-prefixed keys, safetensors and OpenAI
    TorchScript archives; the three OpenAI metadata scalars (input resolution, context length, vocabulary size) are
    dropped. Their presence marks an OpenAI checkpoint (trained with QuickGELU).
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path), device="cpu")
        else:
            check_torch_file(path, "weights file")
            obj = _torch_load(path)
    except CheckpointError as exc:
        raise WeightsMismatchError(str(exc)) from None
    except WeightsMismatchError:
        raise
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise WeightsMismatchError(f"cannot read weights file {path}: {type(exc).__name__}: {first_line}") from None
    if isinstance(obj, torch.jit.ScriptModule):
        obj = obj.state_dict()
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsMismatchError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}
    is_openai = any(k in state for k in OPENAI_METADATA_KEYS)
    for key in OPENAI_METADATA_KEYS:
        state.pop(key, None)
    return state, is_openai


def _torch_load(path: Path) -> object:
    """Returns the object in a torch file; TorchScript archives (OpenAI releases) go through ``torch.jit.load``."""
    import zipfile

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith("/code/__torch__.py") or "/code/" in name for name in archive.namelist()):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
                    return torch.jit.load(str(path), map_location="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_state_dict(clip: ClipModel, state: dict[str, Tensor], source: str, model: str) -> None:
    """Loads ``state`` strictly into ``clip``; mismatches raise an error naming the file and the keys."""
    if "logit_scale" in state and state["logit_scale"].ndim != clip.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(clip.logit_scale.shape)
    own = clip.state_dict()
    for name, _ in clip.named_buffers():  # non-persistent buffers (attn_mask) that a TorchScript archive carries
        if name not in own:
            state.pop(name, None)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        def few(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

        parts = [f"weights {source} do not fit architecture {model}:"]
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        if wrong:
            parts.append(f"shape mismatches (file vs model): {few(wrong)}")
        parts.append("check that `model` names the architecture these weights were trained with")
        raise WeightsMismatchError("\n".join(parts))
    clip.load_state_dict(state, strict=True)


def _choose_activation(model: str, pretrained: str, native_quick_gelu: bool, weights_quick_gelu: bool | None,
                       activation: Activation) -> bool:
    """Returns whether to build QuickGELU; warns loudly when the choice disagrees with the weights."""
    if activation == "auto":
        if weights_quick_gelu is None or weights_quick_gelu == native_quick_gelu:
            return native_quick_gelu
        log.info("%s with %s: using %s to match the weights", model, pretrained,
                 "QuickGELU" if weights_quick_gelu else "GELU")
        return weights_quick_gelu
    if activation not in ("gelu", "quick_gelu"):
        raise ValueError(f"activation must be 'auto', 'gelu' or 'quick_gelu', got {activation!r}")
    chosen = activation == "quick_gelu"
    if weights_quick_gelu is not None and chosen != weights_quick_gelu:
        warnings.warn(
            f"ACTIVATION MISMATCH: {model} is built with {'QuickGELU' if chosen else 'exact GELU'} but the weights "
            f"{pretrained!r} were trained with {'QuickGELU' if weights_quick_gelu else 'GELU'} "
            f"(requested explicitly: activation={activation!r}; features differ from the trained model's)",
            UserWarning, stacklevel=3)
    return chosen


def weights_kind(pretrained: str) -> Literal["random", "file", "tag"]:
    """Returns how ``pretrained`` is read: seeded ``random`` weights, a local ``file``, or an open_clip ``tag``."""
    if pretrained in ("random", "none", ""):
        return "random"
    if Path(pretrained).expanduser().is_file() or _looks_like_path(pretrained):
        return "file"
    return "tag"


def reference_activation(rule: ActivationRule, model: str, pretrained: str, image_size: int | None
                         ) -> Literal["gelu", "quick_gelu"]:
    """Returns the MLP activation a reference implementation runs for these arguments (``rule`` names the reference).

    - ``openai_clip``: a copy of OpenAI's CLIP code (zqhang/AnomalyCLIP, gaobb/AdaptCLIP): its residual blocks
      hard-code QuickGELU, whatever the weights and the input size.
    - ``open_clip``: ``open_clip.create_model(model, pretrained=...)`` (anomalib's WinCLIP): the architecture config's
      activation; open_clip >= 3 only warns when a tag was trained with the other one.
    - ``musc``: xrli-U/MuSc's open_clip fork. OpenAI weights (the ``openai`` tag, or a weights file, which the
      reference can only read as its OpenAI download) at the architecture's native size go through
      ``load_openai_model``, QuickGELU; at any other size it builds ``CLIP(**config)`` and loads their state dict,
      the config's activation (exact GELU for the OpenAI architectures); other tags always get the config's.

    ``random`` weights have no reference; they get what the rule gives a weights file, except under ``musc`` where
    they keep the config's activation (the seeded tiny models of the tests and goldens).
    """
    config = open_clip.get_model_config(model)
    if config is None:
        raise ValueError(f"unknown CLIP architecture {model!r}; {closest_models(model, open_clip.list_models())}")
    configured: Literal["gelu", "quick_gelu"] = "quick_gelu" if config.get("quick_gelu", False) else "gelu"
    if rule == "openai_clip":
        return "quick_gelu"
    if rule == "open_clip":
        return configured
    if rule == "musc":
        native = int(config["vision_cfg"]["image_size"])
        openai_weights = weights_kind(pretrained) == "file" or pretrained == "openai"
        return "quick_gelu" if openai_weights and int(image_size or native) == native else configured
    raise ValueError(f"unknown activation rule {rule!r}: expected 'openai_clip', 'open_clip' or 'musc'")


def _set_activation(clip: ClipModel, act: type[nn.Module]) -> None:
    """Replaces the MLP activation of every residual block in both towers."""
    for module in clip.modules():
        mlp = getattr(module, "mlp", None)
        if isinstance(mlp, nn.Sequential) and "gelu" in mlp._modules:
            mlp._modules["gelu"] = act()


def uses_quick_gelu(clip: ClipModel) -> bool:
    """Returns True when the vision tower's residual blocks use QuickGELU."""
    return isinstance(clip.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)


def resize_pos_embed(pos_embed: Tensor, grid: tuple[int, int], mode: PosEmbedMode = "bicubic") -> Tensor:
    """Returns the (1 + h*w, D) positional embedding resized to ``grid``; the CLS row is kept as is.

    ``bilinear`` and ``bicubic`` interpolate with ``align_corners=False`` and no antialias (AnomalyCLIP / AdaptCLIP use
    bilinear, MuSc bicubic); ``bicubic-antialias`` is what open_clip's own ``resize_pos_embed`` does.
    """
    cls_row, table = pos_embed[:1], pos_embed[1:]
    side = int(math.isqrt(table.shape[0]))
    if side * side != table.shape[0]:
        raise ValueError(f"positional embedding of {table.shape[0]} patches is not a square grid")
    if (side, side) == tuple(grid):
        return pos_embed.clone()
    interpolation = {"bilinear": ("bilinear", False), "bicubic": ("bicubic", False),
                     "bicubic-antialias": ("bicubic", True)}
    if mode not in interpolation:
        raise ValueError(f"pos_embed_mode must be one of {sorted(interpolation)}, got {mode!r}")
    interp, antialias = interpolation[mode]
    image = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    image = F.interpolate(image.float(), size=tuple(grid), mode=interp, align_corners=False, antialias=antialias)
    table = image.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos_embed.dtype)
    return torch.cat([cls_row, table], dim=0)


def set_image_size(visual: VisionTower, image_size: int | tuple[int, int], mode: PosEmbedMode = "bicubic") -> None:
    """Resizes the vision tower's positional embedding (in place) so it runs at ``image_size``."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    patch_h, patch_w = visual.patch_size
    if height % patch_h or width % patch_w:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {patch_h}x{patch_w}")
    grid = (height // patch_h, width // patch_w)
    with torch.no_grad():
        new = resize_pos_embed(visual.positional_embedding.detach(), grid, mode)
    visual.positional_embedding = nn.Parameter(new, requires_grad=visual.positional_embedding.requires_grad)
    visual.image_size = (height, width)
    visual.grid_size = grid
