"""The detector interface every method plugin implements.

A method is a :class:`Detector` subclass with a typed ``Config`` dataclass whose defaults are the paper/reference
settings. Four capabilities, declared by the base classes a method inherits:

- inductive (:class:`Detector`): ``predict(images, category)`` scores a batch on its own;
- transductive (:class:`TransductiveDetector`): ``predict_set(images, category)`` receives a whole category (or a
  division of it) at once, e.g. MuSc's mutual scoring;
- trainable (:class:`Trainable`): ``fit`` on auxiliary data, ``state_dict`` / ``load_state_dict`` for checkpoints;
- few-shot (:class:`FewShot`): ``set_reference`` receives k normal reference images of the category.

``predict`` takes a float batch already preprocessed by the method's own :meth:`Detector.transform` and returns image
scores and anomaly maps at the method's input resolution. The evaluator never special-cases a method.
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import Tensor

from zsadbench.config import apply_overrides, flatten
from zsadbench.types import Dataset, Prediction, Sample

# How FewShot.reference_indices draws the k reference images (the config's ``reference_protocol``).
REFERENCE_PROTOCOLS = ("seeded", "sorted-block", "list")


class Detector(abc.ABC):
    """Base class of all methods: configuration, preprocessing and inductive prediction."""

    name: ClassVar[str] = ""  # registry name, set by @register_method
    label: ClassVar[str] = ""  # display name in tables and reports; defaults to the class name
    # Provenance, listed by `zsadbench methods` (the built-ins' are detailed in THIRD_PARTY_NOTICES.md).
    paper: ClassVar[str] = ""  # the paper, e.g. "arXiv:2310.18961"
    reference: ClassVar[str] = ""  # the reference implementation followed, "owner/repo@commit"; "" = none released
    code_license: ClassVar[str] = ""  # the license of the reference implementation's code (SPDX id where one exists)
    weights_license: ClassVar[str] = ""  # the licenses of the default weights and of any released learned parts
    Config: ClassVar[type]  # the method's config dataclass
    transductive: ClassVar[bool] = False
    # `zsadbench check` (zsadbench/regression.py): per variant to guard ("zero-shot", "1-shot", ...), the config
    # overrides that select a tiny seeded backbone and a small input size. Goldens: <method>.<variant>.json in the
    # method's goldens folder, created with `zsadbench check --method NAME --update`. Empty: check fails and says so.
    regression_variants: ClassVar[dict[str, dict[str, Any]]] = {}
    # Named configurations (`--preset NAME`): config overrides, e.g. "smoke", a tiny seeded random backbone at a small
    # input size that runs in seconds on a CPU (listed by `zsadbench methods`).
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    # The goldens folder of a plugin (relative to its module's folder; ship it as package data). None: built-in
    # methods use zsadbench's own goldens (results/regression/), a plugin a `goldens` folder next to its module.
    regression_goldens: ClassVar[str | None] = None
    # Per-metric tolerances that replace the defaults of zsadbench.regression.DEFAULT_TOLERANCES for this method.
    regression_tolerances: ClassVar[dict[str, dict[str, float]]] = {}

    def __init__(self, config: Any = None, *, seed: int = 0, **overrides: Any) -> None:
        base = config if config is not None else self.Config()
        self.config = apply_overrides(base, overrides) if overrides else base
        self.seed = seed
        self.device = torch.device("cpu")

    @property
    def input_size(self) -> tuple[int, int]:
        """Returns (height, width) of the preprocessed images and of the returned anomaly maps.

        By default square ``config.image_size`` inputs, every built-in method's convention; override otherwise.
        """
        size = getattr(self.config, "image_size", None)
        if not isinstance(size, int):
            raise NotImplementedError(f"{type(self).__name__} must define input_size (its config has no int "
                                      f"image_size)")
        return (size, size)

    @abc.abstractmethod
    def transform(self, image: Image.Image) -> Tensor:
        """Returns the preprocessed (3, H, W) float tensor for one RGB PIL image."""

    @abc.abstractmethod
    def predict(self, images: Tensor, category: str) -> Prediction:
        """Returns image scores (B,) and anomaly maps (B, H, W) for a preprocessed batch."""

    def to(self, device: str | torch.device) -> Detector:
        """Moves the detector's modules to ``device`` and returns it; subclasses move their modules."""
        self.device = torch.device(device)
        return self

    def describe(self) -> dict[str, Any]:
        """Returns what tracking records about this detector besides its config (weights tag or file hash, ...)."""
        return {}

    def resolved_config(self) -> dict[str, Any]:
        """Returns the full flattened config, ``{"a.b": value}``."""
        return flatten(self.config)

    @classmethod
    def display_name(cls) -> str:
        """Returns the label shown in tables (``label`` or the class name)."""
        return cls.label or cls.__name__


class ImageSet:
    """The preprocessed images of one category (or a division of it), read from disk lazily in batches.

    Transductive methods receive one; ``samples`` gives each image's metadata (MuSc stratifies its divisions by
    defect type). Build one from tensors with :meth:`from_tensor` when calling a method directly.
    """

    def __init__(self, samples: Sequence[Sample], transform: Any, batch_size: int = 8, num_workers: int = 0,
                 tensor: Tensor | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._tensor = tensor

    @classmethod
    def from_tensor(cls, images: Tensor, batch_size: int = 8) -> ImageSet:
        """Returns an image set over an already preprocessed (N, 3, H, W) tensor (samples are placeholders)."""
        samples = [Sample(Path(f"<tensor:{i}>"), "tensor", 0, None, "unknown", "tensor") for i in range(len(images))]
        return cls(samples, None, batch_size, tensor=images)

    def __len__(self) -> int:
        return len(self.samples)

    def batches(self, indices: Sequence[int] | None = None) -> Iterator[Tensor]:
        """Yields preprocessed batches of the images at ``indices`` (all, in order, by default)."""
        order = list(range(len(self))) if indices is None else list(indices)
        if self._tensor is not None:
            for start in range(0, len(order), self.batch_size):
                yield self._tensor[order[start:start + self.batch_size]]
            return
        from zsadbench.data import load_images

        for start in range(0, len(order), self.batch_size):
            chunk = [self.samples[i] for i in order[start:start + self.batch_size]]
            yield load_images(chunk, self.transform, self.num_workers)


class TransductiveDetector(Detector):
    """A method that scores a set of unlabeled images jointly (the whole category, or one division of it)."""

    transductive: ClassVar[bool] = True

    @abc.abstractmethod
    def predict_set(self, images: ImageSet, category: str) -> Prediction:
        """Returns image scores (N,) and anomaly maps (N, H, W) for every image of the set, in set order."""

    def predict(self, images: Tensor, category: str) -> Prediction:
        """Scores one tensor batch as a set of its own (the batch is the whole unlabeled set)."""
        return self.predict_set(ImageSet.from_tensor(images, batch_size=max(1, len(images))), category)


class Trainable(abc.ABC):
    """A method with learnable parts trained on auxiliary data, saved and restored as checkpoints.

    The method's config carries a ``train`` group (:class:`zsadbench.training.TrainConfig`: epochs, batch size,
    Adam hyper-parameters, seed, split) whose defaults are the reference's. The generic loop
    (:func:`zsadbench.training.fit`) shuffles, batches images with their masks at the method's input size, calls
    :meth:`training_step`, steps the optimiser from :meth:`make_optimizer`, checkpoints each epoch and resumes.
    """

    def fit(self, train_data: Dataset, **options: Any) -> Any:
        """Trains the learnable parts on ``train_data`` and returns a :class:`zsadbench.training.TrainingResult`.

        ``options`` are those of :func:`zsadbench.training.fit` (``checkpoint_dir``, ``resume_from``, ``tracker``,
        ``progress``, ``on_step``) plus overrides of the ``train`` config (``epochs=2``).
        """
        from zsadbench.training import fit

        return fit(self, train_data, **options)

    @abc.abstractmethod
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Returns the parameters the optimiser updates (everything else stays frozen)."""

    def prepare_training(self, dataset: Dataset) -> None:
        """Sees the whole auxiliary dataset once before the first step; by default nothing.

        AdaptCLIP collects each category's normal training images here: the prompt images of its training queries.
        """
        del dataset  # most methods learn from the batches alone

    @abc.abstractmethod
    def training_step(self, images: Tensor, masks: Tensor, labels: Tensor,
                      samples: Sequence[Sample] = ()) -> dict[str, Tensor]:
        """Returns the losses of one batch: ``"loss"`` (minimised, with grad) and any components to log.

        ``images`` (B, 3, H, W) are preprocessed by :meth:`Detector.transform`, ``masks`` (B, H, W) are float {0, 1}
        at the input size (all zero for normal images), ``labels`` (B,) are 0 normal / 1 anomalous, ``samples`` the
        batch's :class:`Sample` records (category, path) in batch order.
        """

    def make_optimizer(self) -> torch.optim.Optimizer:
        """Returns Adam over :meth:`trainable_parameters` with the ``train`` config's lr, betas and weight decay."""
        options = self.config.train  # type: ignore[attr-defined]
        return torch.optim.Adam(self.trainable_parameters(), lr=options.lr, betas=tuple(options.betas),
                                weight_decay=options.weight_decay)

    def set_train_mode(self, training: bool) -> None:
        """Switches learnable modules between training and evaluation behaviour (BatchNorm, dropout); default none."""
        del training  # methods without such modules have nothing to switch

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Returns the learnable state (what a checkpoint holds), never the frozen backbone."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the learnable state; raises a clear error naming missing or unexpected keys."""

    def load_checkpoint(self, path: str | Path) -> None:
        """Loads a checkpoint file written by zsadbench (methods extend this to the authors' released layouts)."""
        from zsadbench.checkpoints import read_checkpoint, unwrap_checkpoint

        self.load_state_dict(unwrap_checkpoint(read_checkpoint(path), self.name, path))  # type: ignore[attr-defined]


class FewShot(abc.ABC):
    """A method that can use k normal reference images per category (``shots`` > 0 in its config)."""

    @property
    def shots(self) -> int:
        """Returns k, the number of normal reference images per category (0 = zero-shot)."""
        return int(getattr(self.config, "shots", 0))  # type: ignore[attr-defined]

    @abc.abstractmethod
    def set_reference(self, images: Tensor, category: str) -> None:
        """Stores the k preprocessed normal reference images of ``category`` for the following predictions."""

    def set_reference_images(self, images: Sequence[Image.Image], category: str) -> None:
        """Stores the k normal reference images given as RGB PIL images (before any preprocessing).

        Default: :meth:`Detector.transform` each image, then :meth:`set_reference`. A method whose reference
        augments the raw images before resizing them (AnomalyDINO's rotations) overrides this.
        """
        batch = torch.stack([self.transform(image) for image in images])  # type: ignore[attr-defined]
        self.set_reference(batch.to(self.device), category)  # type: ignore[attr-defined]

    def reference_indices(self, num_available: int, category: str) -> list[int]:
        """Returns the indices of the reference images among the category's normal training images (name order).

        The config's ``reference_protocol`` selects the draw (:data:`REFERENCE_PROTOCOLS`):

        - ``"seeded"`` (default; AdaptCLIP's): ``torch.manual_seed(reference_seed)`` then ``randint`` draws k indices
          with replacement, so duplicates are possible and the draw is reproducible per category;
        - ``"sorted-block"`` (AnomalyDINO's): the k images at positions [seed k, (seed + 1) k) of the file-name
          order, no randomness (fewer, with a warning, where the block runs past the last image, as the reference);
        - ``"list"``: fixed per-category index lists read from the folder ``reference_list`` (WinCLIP/PromptAD's
          ``seeds_<dataset>/<category>/selected_samples_per_run.txt``, see :func:`listed_reference_indices`).

        A category with fewer than k normal images is an error naming it (never a silent repeat or a smaller k).
        """
        if self.shots > num_available:  # a draw with replacement would repeat images and call it k-shot
            raise ValueError(f"category {category!r} has {num_available} normal training image"
                             f"{'' if num_available == 1 else 's'}: too few for {self.shots} shots (--shots)")
        protocol = str(getattr(self.config, "reference_protocol", "seeded"))  # type: ignore[attr-defined]
        if protocol not in REFERENCE_PROTOCOLS:
            raise ValueError(f"reference_protocol {protocol!r}: choose one of {REFERENCE_PROTOCOLS}")
        seed = int(getattr(self.config, "reference_seed", 10))  # type: ignore[attr-defined]
        if protocol == "list":
            folder = getattr(self.config, "reference_list", None)  # type: ignore[attr-defined]
            if not folder:
                raise ValueError("reference_protocol=list needs reference_list, the folder of per-category index "
                                 "files (--set reference_list=PATH)")
            return listed_reference_indices(Path(folder), category, self.shots, num_available)
        if protocol == "sorted-block":
            start = seed * self.shots
            indices = list(range(start, min(num_available, start + self.shots)))
            if not indices:
                raise ValueError(f"category {category!r}: reference_seed={seed} with {self.shots} shots starts at "
                                 f"image {start}, but only {num_available} normal training images exist")
            if len(indices) < self.shots:
                warnings.warn(f"category {category!r}: only {len(indices)} of {self.shots} reference images "
                              f"available at reference_seed={seed} (sorted-block protocol)", stacklevel=2)
            return indices
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(num_available, (self.shots,), generator=generator).tolist()


def listed_reference_indices(folder: Path, category: str, shots: int, num_available: int) -> list[int]:
    """Returns the k indices listed for ``category`` in ``folder/<category>/selected_samples_per_run.txt``.

    The file has one line per k, ``#k: i_1 i_2 ...`` (the seed files of WinCLIP's and PromptAD's code). Indices are
    positions in the category's normal training images as the dataset lists them (sorted by file name; for MVTec AD
    and VisA the position equals the file number).
    """
    path = folder / category / "selected_samples_per_run.txt"
    if not path.is_file():
        raise FileNotFoundError(f"no reference list for category {category!r}: {path} does not exist")
    for line in path.read_text().splitlines():
        head, _, rest = line.partition(":")
        if head.strip() == f"#{shots}":
            try:
                indices = [int(token) for token in rest.split()]
            except ValueError:
                raise ValueError(f"{path}: line {line!r} holds something other than integer indices") from None
            if len(indices) != shots or any(not 0 <= i < num_available for i in indices):
                raise ValueError(f"{path}: line {line!r} does not give {shots} indices in 0..{num_available - 1} "
                                 f"(category {category!r} has {num_available} normal training images)")
            return indices
    raise ValueError(f"{path} has no line for {shots} shots ('#{shots}: ...')")
