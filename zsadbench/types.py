"""Core records: what a dataset loader yields and what a detector returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from torch import Tensor

DOMAINS = ("industrial", "medical")


@dataclass(frozen=True)
class Sample:
    """One image of a benchmark, with its label and (optional) pixel annotation.

    ``mask_path`` is None when the image has no pixel annotation. For a normal image (label 0) the evaluator then
    uses an all-zero mask; for an anomalous image it means the category is image-level only. A directory as
    ``mask_path`` holds several masks whose union is the annotation (MVTec LOCO).
    """

    image_path: Path
    category: str
    label: int  # 0 normal, 1 anomalous
    mask_path: Path | None
    defect_type: str
    dataset: str
    domain: str = "industrial"
    split: str = "test"
    mask_threshold: int = 0  # a mask pixel is anomalous when its grey value is > threshold (127 for JPEG masks)

    def __post_init__(self) -> None:
        if self.label not in (0, 1):
            raise ValueError(f"{self.image_path}: label must be 0 or 1, got {self.label!r}")
        if self.domain not in DOMAINS:
            raise ValueError(f"{self.image_path}: domain must be one of {DOMAINS}, got {self.domain!r}")


class Prediction(NamedTuple):
    """A detector's output for a batch: image scores (B,) and anomaly maps (B, H, W), higher = more anomalous."""

    image_scores: Tensor
    anomaly_maps: Tensor


@dataclass
class Dataset:
    """A benchmark loaded from disk: its samples, grouped by category and split."""

    name: str
    root: Path | None
    samples: list[Sample]
    domain: str = "industrial"
    description: str = ""
    _by_key: dict[tuple[str, str], list[Sample]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for sample in self.samples:
            self._by_key.setdefault((sample.category, sample.split), []).append(sample)

    def categories(self, split: str = "test") -> list[str]:
        """Returns the sorted category names that have samples in ``split``."""
        return sorted({c for c, s in self._by_key if s == split})

    def split(self, category: str, split: str = "test") -> list[Sample]:
        """Returns the samples of one category and split, in loader order (empty list when none)."""
        return list(self._by_key.get((category, split), []))

    def test(self, category: str) -> list[Sample]:
        """Returns the test samples of ``category``."""
        return self.split(category, "test")

    def train(self, category: str) -> list[Sample]:
        """Returns the training samples of ``category`` (normal images in most benchmarks)."""
        return self.split(category, "train")

    def subset(self, categories: list[str]) -> Dataset:
        """Returns a dataset restricted to ``categories`` (each must exist)."""
        known = set(self.categories("test")) | set(self.categories("train"))
        missing = [c for c in categories if c not in known]
        if missing:
            raise ValueError(
                f"dataset {self.name!r} has no categor{'y' if len(missing) == 1 else 'ies'} {missing}; "
                f"known: {sorted(known)}"
            )
        keep = set(categories)
        return Dataset(self.name, self.root, [s for s in self.samples if s.category in keep], self.domain,
                       self.description)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, {len(self.categories('test'))} categories, {len(self.split_samples('test'))} "
                f"test / {len(self.split_samples('train'))} train images, root={str(self.root)!r})")

    def split_samples(self, split: str) -> list[Sample]:
        """Returns every sample of ``split`` over all categories."""
        return [s for s in self.samples if s.split == split]
