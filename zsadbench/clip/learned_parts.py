"""Base class of the methods that train small parts over a frozen CLIP: AnomalyCLIP, HeadCLIP, AdaptCLIP, APRIL-GAN.

What they share, written once: the frozen backbone (open_clip, resized positional embedding, taps in
``feature_layers``: of the dual V-V path from ``vv_start_layer``, or of the plain tower), the 518 px squash
preprocessing, the learned parts as named modules (their parameters, train/eval switch, device, checkpoint state
``<part>.<key>``), checkpoints in zsadbench's format or in the authors' released layout, and the warning when a real
backbone runs with untrained parts.

A method's config provides ``model``, ``pretrained``, ``image_size``, ``pos_embed_mode``, ``activation``,
``vv_start_layer`` (only methods on the V-V path), ``feature_layers``, ``checkpoint`` and a ``train`` group; the
method implements :meth:`LearnedPartsDetector.build_learnable_parts`, :meth:`~LearnedPartsDetector.learnable_modules`,
``predict`` and ``training_step``, and for the authors' files :meth:`~LearnedPartsDetector.is_reference_checkpoint`
and :meth:`~LearnedPartsDetector.load_reference_checkpoint`; :meth:`~LearnedPartsDetector.load_backbone` may resolve
the activation differently.
"""

from __future__ import annotations

import abc
import warnings
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import Tensor, nn

from zsadbench.checkpoints import CheckpointError, check_keys, read_checkpoint, unwrap_checkpoint
from zsadbench.clip.backbone import ClipBackbone, load_clip
from zsadbench.detector import Detector, Trainable
from zsadbench.tracking import file_sha256
from zsadbench.transforms import ClipTransform


class LearnedPartsDetector(Detector, Trainable):
    """A detector over a frozen dual-path CLIP whose learned parts (prompts, adapters, head weights) are trained."""

    learned_parts: ClassVar[str] = "prompts"  # what the parts are called in warnings and in the run's parameters

    def __init__(self, config: Any = None, *, seed: int = 0, **overrides: Any) -> None:
        super().__init__(config, seed=seed, **overrides)
        cfg = self.config
        self.backbone = self.load_backbone(seed)
        self.clip = self.backbone.model
        depth = len(self.clip.visual.transformer.resblocks)
        first = getattr(cfg, "vv_start_layer", 1)  # methods without the V-V path may tap any block
        bad = [layer for layer in cfg.feature_layers if not first <= layer <= depth]
        if not cfg.feature_layers or bad:
            kind = "V-V layers" if hasattr(cfg, "vv_start_layer") else "blocks"
            raise ValueError(f"{self.name}: feature_layers {list(cfg.feature_layers)} must be {kind} {first}..{depth}")
        self._transform = ClipTransform(cfg.image_size)
        self.checkpoint_source: str | None = None  # sha256 of the loaded checkpoint
        self._fitted = False  # trained in this session (no checkpoint needed to score meaningfully)
        self._warned_untrained = False
        self.build_learnable_parts()
        self.set_train_mode(False)
        if cfg.checkpoint:
            self.load_checkpoint(cfg.checkpoint)

    def load_backbone(self, seed: int) -> ClipBackbone:
        """Returns the frozen CLIP of the config (model, weights, image size, resize mode, activation)."""
        cfg = self.config
        return load_clip(cfg.model, cfg.pretrained, image_size=cfg.image_size, pos_embed_mode=cfg.pos_embed_mode,
                         activation=cfg.activation, seed=seed)

    # ---- preprocessing and bookkeeping -------------------------------------------------------------------------------
    @property
    def input_size(self) -> tuple[int, int]:
        """Returns (height, width) of the preprocessed images and of the anomaly maps."""
        return (self.config.image_size, self.config.image_size)

    def transform(self, image: Image.Image) -> Tensor:
        """Returns the (3, S, S) tensor: PIL bicubic squash to S×S, OpenAI mean/std."""
        return self._transform(image)

    @abc.abstractmethod
    def build_learnable_parts(self) -> None:
        """Creates the learned parts (called once the backbone is loaded, before a checkpoint is)."""

    @abc.abstractmethod
    def learnable_modules(self) -> dict[str, nn.Module]:
        """Returns the learned parts by checkpoint key prefix."""

    def clear_caches(self) -> None:
        """Drops what was computed from the learned parts (e.g. text features); called whenever they change."""

    def to(self, device: str | torch.device) -> LearnedPartsDetector:
        """Moves the backbone and the learned parts to ``device``."""
        super().to(device)
        self.clip.to(self.device)
        for module in self.learnable_modules().values():
            module.to(self.device)
        self.clear_caches()
        return self

    def describe(self) -> dict[str, object]:
        """Returns the backbone facts, where the learned parts came from (sha256 or ``untrained``) and their size."""
        return {**self.backbone.describe(), self.learned_parts: self.checkpoint_source or "untrained (random init)",
                "trainable_parameters": sum(p.numel() for p in self.trainable_parameters())}

    def warn_if_untrained(self) -> None:
        """Warns once when a real backbone runs with learned parts that were neither loaded nor trained."""
        untrained = self.checkpoint_source is None and not self._fitted and self.backbone.weights_source != "random"
        if untrained and not self._warned_untrained:
            self._warned_untrained = True
            warnings.warn(f"{self.name}: no checkpoint loaded, the {self.learned_parts} are untrained (random "
                          "initialisation); pass --checkpoint (a zsadbench training or the authors' epoch_15.pth)",
                          UserWarning, stacklevel=4)

    # ---- training ----------------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Returns the parameters of every learned part."""
        return [p for module in self.learnable_modules().values() for p in module.parameters()]

    def set_train_mode(self, training: bool) -> None:
        """Switches the learned parts between training and evaluation behaviour (BatchNorm, cached features)."""
        for module in self.learnable_modules().values():
            module.train(training)
        self.clear_caches()

    # ---- checkpoints -------------------------------------------------------------------------------------------------
    def state_description(self) -> str:
        """Returns what the learned state holds, for error messages."""
        return f"{self.display_name()} state"

    def state_dict(self) -> dict[str, Tensor]:
        """Returns the learned parts as ``<part>.<key>`` tensors (CPU copies; BatchNorm statistics included)."""
        return {f"{name}.{k}": v.detach().cpu().clone() for name, module in self.learnable_modules().items()
                for k, v in module.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restores the learned parts from :meth:`state_dict` output; a mismatch names the missing/unexpected keys."""
        check_keys(state, {k: tuple(v.shape) for k, v in self.state_dict().items()}, self.state_description())
        for name, module in self.learnable_modules().items():
            prefix = f"{name}."
            module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
        self.clear_caches()

    def is_reference_checkpoint(self, checkpoint: dict[str, Any]) -> bool:
        """Returns whether ``checkpoint`` is in the authors' released layout rather than zsadbench's."""
        del checkpoint
        return False

    def load_reference_checkpoint(self, checkpoint: dict[str, Any], path: str | Path) -> None:
        """Loads a checkpoint in the authors' released layout."""
        raise CheckpointError(f"checkpoint {path}: {self.name} reads no layout of the authors'")

    def load_checkpoint(self, path: str | Path) -> None:
        """Loads a zsadbench checkpoint or one in the authors' released layout; errors name the file and the keys."""
        checkpoint = read_checkpoint(path)
        try:
            if self.is_reference_checkpoint(checkpoint):
                self.load_reference_checkpoint(checkpoint, path)
            else:
                self.load_state_dict(unwrap_checkpoint(checkpoint, self.name, path))
        except CheckpointError as exc:
            message = str(exc)
            raise CheckpointError(message if str(path) in message else f"checkpoint {path}: {message}") from None
        self.clear_caches()
        self.checkpoint_source = f"sha256:{file_sha256(path)}"
