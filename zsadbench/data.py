"""Image and mask IO with errors that name the file, and batch loading for the evaluator."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from zsadbench.types import Sample

MASK_EXTENSIONS = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".gif")


class DataError(ValueError):
    """A data file is missing, unreadable or inconsistent; the message names the file."""


class DataWarning(UserWarning):
    """Part of a dataset is left out (an empty category); the message names it."""


def _open(path: Path, what: str) -> Image.Image:
    if not path.exists():
        raise DataError(f"{what} not found: {path}")
    if path.is_dir():
        raise DataError(f"{what} is a directory, expected an image file: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
        return image
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"cannot read {what} {path}: {exc}") from None


def read_image(path: str | Path) -> Image.Image:
    """Returns the image at ``path`` as RGB (grayscale benchmarks such as MVTec grid/screw/zipper are expanded)."""
    return _open(Path(path), "image").convert("RGB")


def image_size(path: str | Path) -> tuple[int, int]:
    """Returns (height, width) of an image file without decoding its pixels."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None
    return height, width


def _binarise(path: Path, threshold: int) -> np.ndarray:
    return np.asarray(_open(path, "mask").convert("L")) > threshold


def read_mask(sample: Sample, size: tuple[int, int] | None = None) -> np.ndarray:
    """Returns the sample's boolean (H, W) mask at the image's own size.

    Normal images without a mask file get an all-zero mask of the image's (H, W) (never the transposed PIL size).
    A mask whose size differs from the image is an error naming both files. ``size`` is the image's (H, W) when
    already known (saves opening the image header again).
    """
    height, width = size if size is not None else image_size(sample.image_path)
    if sample.mask_path is None:
        if sample.label == 1:
            raise DataError(f"{sample.image_path} is anomalous but has no pixel annotation (image-level dataset)")
        return np.zeros((height, width), dtype=bool)
    path = Path(sample.mask_path)
    if path.is_dir():  # several masks for one image (MVTec LOCO): their union
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in MASK_EXTENSIONS)
        if not files:
            raise DataError(f"mask directory {path} (for {sample.image_path}) holds no mask images")
        mask = np.zeros((height, width), dtype=bool)
        for file in files:
            part = _binarise(file, sample.mask_threshold)
            _check_size(part, (height, width), file, sample)
            mask |= part
        return mask
    mask = _binarise(path, sample.mask_threshold)
    _check_size(mask, (height, width), path, sample)
    return mask


def _check_size(mask: np.ndarray, size: tuple[int, int], path: Path, sample: Sample) -> None:
    if mask.shape != tuple(size):
        raise DataError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image {sample.image_path} "
                        f"is {size[1]}x{size[0]}")


# How a mask reaches the evaluation size. "bilinear" (PIL bilinear, then > 0.5) is what AnomalyCLIP, AdaptCLIP and the
# WinCLIP reproduction do. MuSc keeps only pixels that stay exactly 1 after the bilinear resize for MVTec AD and BTAD
# ("bilinear-strict": its int cast erodes defect borders) and every non-zero pixel for VisA ("bilinear-any").
MASK_RESIZE_MODES = ("bilinear", "nearest", "bilinear-strict", "bilinear-any")


def resize_mask(mask: np.ndarray, size: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """Returns the boolean mask resized to (H, W) with one of :data:`MASK_RESIZE_MODES`."""
    if mode not in MASK_RESIZE_MODES:
        raise ValueError(f"mask resize mode {mode!r}: choose one of {MASK_RESIZE_MODES}")
    if mask.shape == tuple(size):
        return mask
    resample = Image.Resampling.NEAREST if mode == "nearest" else Image.Resampling.BILINEAR
    resized = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size[1], size[0]), resample))
    if mode == "bilinear-strict":
        return resized == 255
    if mode == "bilinear-any":
        return resized > 0
    return resized > 127.5  # > 0.5 of 255


def load_images(samples: Sequence[Sample], transform: Callable[[Image.Image], Tensor],
                num_workers: int = 0) -> Tensor:
    """Returns the preprocessed images of ``samples`` stacked into one (B, 3, H, W) batch."""
    del num_workers  # decoding happens in the evaluator's loader workers; kept for a uniform signature
    return torch.stack([transform(read_image(s.image_path)) for s in samples])


class SampleLoader(torch.utils.data.Dataset):
    """Map-style torch dataset: (preprocessed image, mask at ``mask_size`` or the native size, index)."""

    def __init__(self, samples: Sequence[Sample], transform: Callable[[Image.Image], Tensor],
                 mask_size: tuple[int, int] | None, mask_resize: str = "bilinear", with_masks: bool = True) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.mask_size = mask_size
        self.mask_resize = mask_resize
        self.with_masks = with_masks

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, np.ndarray | None, int]:
        sample = self.samples[index]
        image = read_image(sample.image_path)
        mask = None
        if self.with_masks:
            mask = read_mask(sample, (image.height, image.width))
            if self.mask_size is not None:
                mask = resize_mask(mask, self.mask_size, self.mask_resize)
        return self.transform(image), mask, index


def collate(batch: list[tuple[Tensor, np.ndarray | None, int]]) -> tuple[Tensor, list[np.ndarray | None], list[int]]:
    """Stacks images; keeps masks as a list (native-resolution masks differ in size)."""
    images, masks, indices = zip(*batch)
    return torch.stack(images), list(masks), list(indices)


class DatasetLayoutError(DataError):
    """A data root does not have the layout its loader expects; the message shows the expected layout."""


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def list_images(folder: Path) -> list[Path]:
    """Returns the image files directly inside ``folder``, sorted by name (extensions matched case-insensitively)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def check_files(samples: Sequence[Sample], skip_bad: bool = False) -> tuple[list[Sample], list[tuple[Sample, str]]]:
    """Returns (usable samples, [(bad sample, reason)]) after checking every image and mask header.

    Headers only: existence, readability and mask size == image size, so a broken file stops a run before hours of
    compute rather than in the middle. Without ``skip_bad`` the first problem raises :class:`DataError`.
    """
    good: list[Sample] = []
    bad: list[tuple[Sample, str]] = []
    for sample in samples:
        try:
            height, width = image_size(sample.image_path)
            if sample.mask_path is not None:
                masks = [Path(sample.mask_path)]
                if masks[0].is_dir():
                    masks = [p for p in masks[0].iterdir() if p.suffix.lower() in MASK_EXTENSIONS]
                    if not masks:
                        raise DataError(f"mask directory {sample.mask_path} (for {sample.image_path}) holds no masks")
                for mask in masks:
                    mh, mw = _mask_header_size(mask)
                    if (mh, mw) != (height, width):
                        raise DataError(f"mask {mask} is {mw}x{mh} (WxH) but its image {sample.image_path} is "
                                        f"{width}x{height}")
        except DataError as exc:
            if not skip_bad:
                raise
            bad.append((sample, str(exc)))
            continue
        good.append(sample)
    return good, bad


def _mask_header_size(path: Path) -> tuple[int, int]:
    try:
        return image_size(path)
    except DataError as exc:
        raise DataError(str(exc).replace("image", "mask", 1)) from None
