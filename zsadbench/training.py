"""Training of trainable methods on auxiliary data: the generic loop, its checkpoints and exact resumption.

The CLIP-based ZSAD methods (AnomalyCLIP, AdaptCLIP, HeadCLIP) train small learnable parts on the **test split of
another dataset** (images, labels and masks; normal images get all-zero masks) and are then evaluated zero-shot on
the target datasets. One loop serves all of them; a method supplies its loss through
:meth:`zsadbench.detector.Trainable.training_step` and its hyper-parameters through a ``train`` group
(:class:`TrainConfig`) in its config.

The loop: seeded shuffling (a dedicated generator, so the order does not depend on what else drew random numbers),
a progress bar with the running loss, one checkpoint per epoch written atomically (``epoch_{k}.pth``: the method's
learnable state plus optimiser state, RNG states and the step counter), and exact resumption from the last
checkpoint: the resumed run draws the same batches and ends with the same parameters as an uninterrupted one.
It knows no job and no tracker: ``zsadbench train`` (:func:`zsadbench.jobs.train`) records it through the
``on_step`` / ``on_epoch`` callbacks.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from zsadbench.checkpoints import CHECKPOINT_FORMAT, CheckpointError, read_checkpoint, write_checkpoint
from zsadbench.config import apply_overrides, to_dict
from zsadbench.data import SampleLoader, collate
from zsadbench.types import Dataset, Sample

if TYPE_CHECKING:
    from zsadbench.detector import Detector, Trainable

log = logging.getLogger(__name__)

LOSS_KEY = "loss"  # the entry of a training step's losses that is minimised; the others are logged


@dataclass
class TrainConfig:
    """Training hyper-parameters of a trainable method (the ``train`` group of its config: ``--set train.lr=...``).

    Defaults are AnomalyCLIP's (train.py / train.sh), which AdaptCLIP and HeadCLIP share except for the seed.
    """

    epochs: int = 15
    batch_size: int = 8
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)  # Adam; 0.5: the references' beta1, not PyTorch's 0.9
    weight_decay: float = 0.0
    seed: int = 111  # shuffling and the initialisation of the learnable parts
    split: str = "test"  # the auxiliary dataset's split to train on (the references use its test split)
    num_workers: int = 0  # image-decoding worker processes


@dataclass
class TrainingResult:
    """What a training produced: per-epoch mean losses, the checkpoint files, the number of optimiser steps."""

    method: str = ""
    first_epoch: int = 1  # 1-based number of the first epoch this call ran (later than 1 after a resume)
    epoch_losses: list[dict[str, float]] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0

    @property
    def last_checkpoint(self) -> Path | None:
        """Returns the checkpoint of the last finished epoch (None when no checkpoint folder was given)."""
        return self.checkpoints[-1] if self.checkpoints else None


def training_samples(dataset: Dataset, split: str = "test") -> list[Sample]:
    """Returns every sample of ``split`` over all categories (category order, then loader order)."""
    samples = [s for c in dataset.categories(split) for s in dataset.split(c, split)]
    if not samples:
        raise ValueError(f"dataset {dataset.name!r} has no {split!r} images to train on "
                         f"(categories with {split!r} images: none; splits present: "
                         f"{sorted({s.split for s in dataset.samples}) or 'none'})")
    anomalous_without_mask = [s for s in samples if s.label == 1 and s.mask_path is None]
    if anomalous_without_mask:
        raise ValueError(f"dataset {dataset.name!r}: {len(anomalous_without_mask)} anomalous {split!r} images have no "
                         f"pixel annotation (e.g. {anomalous_without_mask[0].image_path}); training needs masks")
    return samples


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Returns every random state a resumed training needs, as tensors and plain values (``weights_only`` safe)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    return {"shuffle": generator.get_state(), "torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)}}


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(state["shuffle"])
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))


def checkpoint_payload(detector: Detector, epoch: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Returns the dict a zsadbench checkpoint file holds: format, method, epoch, config and learnable state."""
    return {"format": CHECKPOINT_FORMAT, "method": detector.name, "epoch": epoch,
            "config": json.dumps(to_dict(detector.config)), "state_dict": detector.state_dict(),  # type: ignore[attr-defined]
            **(extra or {})}


def fit(detector: Trainable, train_data: Dataset, *, checkpoint_dir: str | Path | None = None,
        resume_from: str | Path | None = None, progress: bool = True,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
        on_epoch: Callable[[int, dict[str, float], Path | None], None] | None = None,
        **overrides: Any) -> TrainingResult:
    """Trains ``detector``'s learnable parts on ``train_data`` and returns the losses and checkpoint files.

    ``overrides`` change fields of the method's ``train`` config for this call (``epochs=2``). With
    ``checkpoint_dir`` every epoch writes ``epoch_{k}.pth`` there; ``resume_from`` continues from such a file
    (learnable state, optimiser, RNG states), skipping the epochs it already holds. ``on_step(step, losses)`` is
    called after every optimiser step, ``on_epoch(epoch, mean_losses, checkpoint_or_None)`` after every epoch.
    """
    config = detector.config  # type: ignore[attr-defined]
    if overrides:
        config = detector.config = replace(config, train=apply_overrides(config.train, overrides))  # type: ignore[attr-defined]
    options: TrainConfig = config.train
    if options.epochs < 1 or options.batch_size < 1:
        raise ValueError(f"train.epochs and train.batch_size must be >= 1, got {options.epochs} and "
                         f"{options.batch_size}")
    samples = training_samples(train_data, options.split)
    detector.prepare_training(train_data)
    device = detector.device  # type: ignore[attr-defined]
    optimizer = detector.make_optimizer()
    generator = torch.Generator().manual_seed(options.seed)
    torch.manual_seed(options.seed)
    random.seed(options.seed)
    np.random.seed(options.seed)
    start_epoch, step = 0, 0
    if resume_from is not None:
        start_epoch, step = _resume(detector, optimizer, generator, Path(resume_from))
        log.info("resuming from %s (epoch %d of %d done)", resume_from, start_epoch, options.epochs)
    result = TrainingResult(method=detector.name, first_epoch=start_epoch + 1)  # type: ignore[attr-defined]

    loader_dataset = SampleLoader(samples, detector.transform, tuple(detector.input_size),  # type: ignore[attr-defined]
                                  "bilinear", with_masks=True)
    labels_all = torch.tensor([s.label for s in samples])
    steps_per_epoch = math.ceil(len(samples) / options.batch_size)
    checkpoint_folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    started = time.perf_counter()
    detector.set_train_mode(True)
    try:
        for epoch in range(start_epoch, options.epochs):
            order = torch.randperm(len(samples), generator=generator).tolist()
            loader = torch.utils.data.DataLoader(
                torch.utils.data.Subset(loader_dataset, order), batch_size=options.batch_size, shuffle=False,
                num_workers=options.num_workers, collate_fn=collate,
                pin_memory=torch.device(device).type == "cuda")  # page-locked batches copy to the GPU faster
            sums: dict[str, float] = {}
            bar = tqdm(loader, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{options.epochs}", unit="batch",
                       leave=False, disable=None if progress else True)
            for images, masks, indices in bar:
                mask = torch.from_numpy(np.stack(masks)).to(device=device, dtype=torch.float32)
                losses = detector.training_step(images.to(device), mask, labels_all[indices].to(device),
                                                [samples[i] for i in indices])
                if LOSS_KEY not in losses:
                    raise KeyError(f"{type(detector).__name__}.training_step must return a {LOSS_KEY!r} entry")
                optimizer.zero_grad(set_to_none=True)
                losses[LOSS_KEY].backward()
                optimizer.step()
                step += 1
                values = {k: float(v.detach()) for k, v in losses.items()}
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                bar.set_postfix({LOSS_KEY: f"{values[LOSS_KEY]:.4f}"})
                if on_step is not None:
                    on_step(step, values)
            bar.close()
            means = {k: v / steps_per_epoch for k, v in sums.items()}
            result.epoch_losses.append(means)
            path = None
            if checkpoint_folder is not None:
                path = write_checkpoint(checkpoint_payload(cast("Detector", detector), epoch + 1, {"training": {
                    "optimizer": optimizer.state_dict(), "step": step, "rng": _rng_state(generator),
                    "epoch_loss": means}}), checkpoint_folder / f"epoch_{epoch + 1}.pth")
                result.checkpoints.append(path)
            if on_epoch is not None:
                on_epoch(epoch + 1, means, path)
    finally:
        detector.set_train_mode(False)
    result.steps = step
    result.seconds = time.perf_counter() - started
    return result


def _resume(detector: Trainable, optimizer: torch.optim.Optimizer, generator: torch.Generator,
            path: Path) -> tuple[int, int]:
    """Restores a checkpoint's learnable state, optimiser and RNG states; returns (epochs done, steps done)."""
    state = read_checkpoint(path)
    training = state.get("training")
    if state.get("format") != CHECKPOINT_FORMAT or not isinstance(training, dict):
        raise CheckpointError(f"cannot resume from {path}: it is not a zsadbench training checkpoint (no optimiser "
                              "and RNG state); load it with --checkpoint to start a new training from it instead")
    if state.get("method") != detector.name:  # type: ignore[attr-defined]
        raise CheckpointError(f"cannot resume from {path}: it was written by method {state.get('method')!r}, "
                              f"not {detector.name!r}")  # type: ignore[attr-defined]
    detector.load_state_dict(state["state_dict"])
    optimizer.load_state_dict(training["optimizer"])
    _set_rng_state(training["rng"], generator)
    return int(state["epoch"]), int(training["step"])


def last_checkpoint(folder: str | Path) -> Path | None:
    """Returns the ``epoch_{k}.pth`` with the highest k in ``folder`` (None when there is none)."""
    found = []
    for path in Path(folder).glob("epoch_*.pth"):
        suffix = path.stem.removeprefix("epoch_")
        if suffix.isdigit():
            found.append((int(suffix), path))
    return max(found)[1] if found else None
