"""Base class of the methods that train small parts over a frozen CLIP: AnomalyCLIP, HeadCLIP, AdaptCLIP, APRIL-GAN.

What they share, written once: the frozen backbone (open_clip, resized positional embedding, taps in
``feature_layers``: of the dual V-V path from ``vv_start_layer``, or of the plain tower), the 518 px squash
preprocessing, the learned parts as named modules (their parameters, train/eval switch, device, checkpoint state
``<part>.<key>``), checkpoints in zsadbench's format or in the authors' released layout, and the warning when a real
backbone runs with untrained parts.

A method's config provides ``model``, ``pretrained``, ``image_size``, ``pos_embed_mode``, ``activation``,
``feature_layers``, ``checkpoint``, a ``train`` group and, for the dual-path methods, ``vv_start_layer`` (AdaCLIP and
APRIL-GAN have none: their feature layers may be any vision block); the method implements
:meth:`LearnedPartsDetector.build_learnable_parts`, :meth:`~LearnedPartsDetector.learnable_modules`, ``predict`` and
``training_step``, and for the authors' files :meth:`~LearnedPartsDetector.is_reference_checkpoint` and
:meth:`~LearnedPartsDetector.load_reference_checkpoint`; :meth:`~LearnedPartsDetector.load_backbone` may resolve the
activation differently from :attr:`~LearnedPartsDetector.activation_rule`.
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import Tensor, nn

from zsadbench.checkpoints import CHECKPOINT_FORMAT, CheckpointError, check_keys, read_checkpoint, unwrap_checkpoint
from zsadbench.clip.backbone import ActivationRule, ClipBackbone, load_clip, reference_activation
from zsadbench.clip.dual_path import HeadWeightsFn, forward_dual_path
from zsadbench.detector import Detector, Trainable
from zsadbench.feature_cache import FeatureCache, clip_backbone_description, frozen_stage, transform_description
from zsadbench.hashing import file_sha256
from zsadbench.transforms import ClipTransform


class LearnedPartsDetector(Detector, Trainable):
    """A detector over a frozen dual-path CLIP whose learned parts (prompts, adapters, head weights) are trained."""

    learned_parts: ClassVar[str] = "prompts"  # what the parts are called in warnings and in the run's parameters
    loads_checkpoints_of: ClassVar[tuple[str, ...]] = ()  # other methods whose zsadbench checkpoints hold our parts
    # ``activation="auto"`` runs what the reference runs: AnomalyCLIP's and AdaptCLIP's copies of OpenAI's CLIP code
    # hard-code QuickGELU, whatever the weights (tag, TorchScript archive, plain file) and the input size
    activation_rule: ClassVar[ActivationRule] = "openai_clip"
    # top-level entries of a checkpoint in the authors' released layout; any other entry is named in a warning
    reference_checkpoint_entries: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any = None, *, seed: int = 0, **overrides: Any) -> None:
        super().__init__(config, seed=seed, **overrides)
        cfg = self.config
        self.backbone = self.load_backbone(seed)
        self.clip = self.backbone.model
        depth = len(self.clip.visual.transformer.resblocks)
        first = getattr(cfg, "vv_start_layer", None) or 1  # methods without the V-V path tap any block
        bad = [layer for layer in cfg.feature_layers if not first <= layer <= depth]
        if not cfg.feature_layers or bad:
            kind = "V-V layers" if hasattr(cfg, "vv_start_layer") else "vision blocks"
            raise ValueError(f"{self.name}: feature_layers {list(cfg.feature_layers)} must be {kind} {first}..{depth}")
        self._transform = ClipTransform(cfg.image_size)
        self.checkpoint_source: str | None = None  # sha256 of the loaded checkpoint
        self._fitted = False  # trained in this session (no checkpoint needed to score meaningfully)
        self._warned_untrained = False
        self.feature_cache: FeatureCache | None = None  # frozen image features kept on disk (zsadbench.feature_cache)
        self.build_learnable_parts()
        self.set_train_mode(False)
        if cfg.checkpoint:
            self.load_checkpoint(cfg.checkpoint)

    def load_backbone(self, seed: int) -> ClipBackbone:
        """Returns the frozen CLIP of the config; ``activation="auto"`` follows :attr:`activation_rule`.

        A reference that builds exact GELU around QuickGELU-trained weights (AdaCLIP, Bayes-PFL, VCP-CLIP) does so on
        purpose: the activation warning is kept for a user who changes the method's default.
        """
        cfg = self.config
        activation = cfg.activation if cfg.activation != "auto" else reference_activation(
            self.activation_rule, cfg.model, cfg.pretrained, cfg.image_size)
        with warnings.catch_warnings():
            if cfg.activation == type(cfg)().activation:
                warnings.filterwarnings("ignore", message="ACTIVATION MISMATCH")
            return load_clip(cfg.model, cfg.pretrained, image_size=cfg.image_size,
                             pos_embed_mode=cfg.pos_embed_mode, activation=activation, seed=seed)

    # ---- preprocessing and bookkeeping -------------------------------------------------------------------------------
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

    # ---- visual features ---------------------------------------------------------------------------------------------
    def encode_images(self, images: Tensor, head_weights: HeadWeightsFn | None = None) -> tuple[Tensor, list[Tensor]]:
        """Returns global features (B, E) and patch features (B, 1 + P, E) per ``feature_layers`` layer, not normalised.

        The dual-path (DPAM) tower from ``vv_start_layer`` on. It is frozen, so autograd records nothing here unless
        ``head_weights`` (HeadCLIP) carry gradients; without them it is the frozen stage the feature cache keeps.
        """
        if head_weights is None:
            return self.frozen_image_features(images)
        return self.dual_path_features(images, head_weights)

    @frozen_stage("dual_path", lambda self: {
        "backbone": clip_backbone_description(self.backbone, self.clip.visual),
        "preprocessing": transform_description(self._transform), "vv_start_layer": self.config.vv_start_layer,
        "feature_layers": list(self.config.feature_layers),
        "outputs": "global o_L[CLS] @ proj (no ln_post); patches ln_post(v_l) @ proj per feature layer"})
    def frozen_image_features(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Returns :meth:`encode_images` without head weights: the frozen stage, read from the feature cache if any."""
        return self.dual_path_features(images, None)

    def dual_path_features(self, images: Tensor, head_weights: HeadWeightsFn | None) -> tuple[Tensor, list[Tensor]]:
        """Returns :meth:`encode_images`'s global and patch features, computed (never cached)."""
        visual, layers = self.clip.visual, tuple(self.config.feature_layers)
        out = forward_dual_path(visual, images.to(self.device, torch.float32), start_layer=self.config.vv_start_layer,
                                vv_taps=layers, head_weights=head_weights)
        return out.global_feature, out.patch_features(visual, layers)

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

    def load_state_dict(self, state: dict[str, Tensor], parts: Iterable[str] | None = None) -> None:
        """Restores the learned parts from :meth:`state_dict` output; a mismatch names the missing/unexpected keys.

        ``parts`` restricts the load to those learned parts (the others keep their values).
        """
        modules = self.learnable_modules()
        if parts is not None:
            modules = {name: modules[name] for name in parts if name in modules}
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items() if k.split(".", 1)[0] in modules}
        check_keys(state, expected, self.state_description())
        for name, module in modules.items():
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

    def warn_unknown_entries(self, checkpoint: dict[str, Any], path: str | Path) -> None:
        """Warns, naming them, about top-level entries of an authors'-layout checkpoint that nothing reads."""
        unknown = sorted(map(str, set(checkpoint) - set(self.reference_checkpoint_entries)))
        if self.reference_checkpoint_entries and unknown:
            warnings.warn(f"checkpoint {path}: ignoring unknown top-level entr{'ies' if len(unknown) > 1 else 'y'} "
                          f"{', '.join(map(repr, unknown))} (the authors' {self.name} layout holds "
                          f"{', '.join(map(repr, self.reference_checkpoint_entries))})", UserWarning, stacklevel=4)

    def load_checkpoint(self, path: str | Path) -> None:
        """Loads a zsadbench checkpoint or one in the authors' released layout; errors name the file and the keys."""
        checkpoint = read_checkpoint(path)
        try:
            if self.is_reference_checkpoint(checkpoint):
                self.warn_unknown_entries(checkpoint, path)
                self.load_reference_checkpoint(checkpoint, path)
            elif (checkpoint.get("format") == CHECKPOINT_FORMAT
                  and checkpoint.get("method") in self.loads_checkpoints_of):
                # another method's zsadbench checkpoint (HeadCLIP reads AnomalyCLIP's): the parts it holds
                state = unwrap_checkpoint(checkpoint, self.name, path, self.loads_checkpoints_of)
                self.load_state_dict(state, parts={k.split(".", 1)[0] for k in state})
            else:
                self.load_state_dict(unwrap_checkpoint(checkpoint, self.name, path))
        except CheckpointError as exc:
            message = str(exc)
            raise CheckpointError(message if str(path) in message else f"checkpoint {path}: {message}") from None
        self.clear_caches()
        self.checkpoint_source = f"sha256:{file_sha256(path)}"
