"""Helpers shared by the reference-side parity drivers in this folder (no reference code, no zsadbench code).

The drivers run a reference implementation from a work tree named on the command line, on a weights file and on
deterministic synthetic images, and save what zsadbench's parity tests compare. This module gives them:

- :func:`reference_on_path`: the work tree first on ``sys.path`` (nothing copied, nothing edited on disk);
- :func:`install_import_shims`: stand-ins for modules the references import at module level but never use on the
  inference path (``pkg_resources`` is gone from recent setuptools; ``thop``, ``tabulate``), installed only when the
  real module is missing and recorded in the output's ``meta``;
- :func:`rewinding_jit_load`: the OpenAI-style loaders try ``torch.jit.load`` on an open file and fall back to
  ``torch.load`` on the same file object; current torch leaves the position moved after the failed JIT attempt;
- :func:`synthetic_sample`: deterministic textured RGB images, with an elliptic defect and its mask on request;
- :class:`Recorder`: forward hooks that clone what a module returns (or receives), in call order;
- :func:`run_metadata` and :func:`save_output`: versions, hashes and a plain ``torch.save`` dict.

Everything runs on the CPU in float32; the drivers only need torch, numpy, Pillow and what the reference imports.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import os
import platform
import sys
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

# (width, height) of the synthetic images, cycled: square and non-square, up- and down-sampled by the references
IMAGE_SIZES = ((560, 560), (640, 448), (400, 600), (518, 518), (720, 540), (300, 300))


def common_arguments(description: str, work_tree: bool = True) -> argparse.ArgumentParser:
    """Returns a parser with the options every driver takes (reference work tree, weights, inputs, output)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if work_tree:  # not for a reference installed as a package (anomalib)
        parser.add_argument("--ref-root", required=True, help="work tree of the reference implementation")
    parser.add_argument("--weights", required=True, help="CLIP state-dict file (tests/parity/make_weights.py)")
    parser.add_argument("--out", required=True, help="output file (torch.save dict)")
    parser.add_argument("--images", type=int, default=2, help="number of synthetic query images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic images (and of learned parts)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser


def setup_torch(threads: int) -> None:
    """Fixes the thread count and keeps every computation in deterministic float32."""
    torch.set_num_threads(int(threads))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_default_dtype(torch.float32)


@contextlib.contextmanager
def reference_on_path(root: str | Path, modules: Sequence[str] = ()) -> Iterator[Path]:
    """Puts the reference work tree first on ``sys.path`` (and drops cached ``modules`` of the same names)."""
    path = Path(root).resolve()
    if not path.is_dir():
        raise SystemExit(f"--ref-root {path} is not a directory")
    for name in modules:  # e.g. a Hugging Face ``datasets`` package would shadow MuSc's ``datasets`` folder
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[loaded]
    sys.path.insert(0, str(path))
    try:
        yield path
    finally:
        if str(path) in sys.path:
            sys.path.remove(str(path))


class NeverCalled:
    """Stands in for a reference helper that the inference path never calls; calling it is an error."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.name} is a parity-driver stand-in and must not be called")


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any failure means "install the stand-in"
        return False
    return True


def stand_in_module(name: str) -> types.ModuleType:
    """Returns an empty module registered as ``name`` (with a spec, which ``importlib.util.find_spec`` needs)."""
    import importlib.machinery

    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    sys.modules[name] = module
    return module


def install_import_shims(stubs: dict[str, Sequence[str]] | None = None) -> list[str]:
    """Installs stand-ins for missing modules the references import but never use; returns what was installed.

    ``pkg_resources`` becomes a module whose ``packaging`` is the standalone ``packaging`` (the references only call
    ``packaging.version.parse``); ``tabulate`` (test scripts' result tables; torch's own debugging helpers also call
    it) formats rows as plain text; ``thop`` and the ``stubs`` (module -> attribute names) get attributes that raise
    when called.
    """
    installed = []
    if not _importable("pkg_resources"):
        import packaging.version

        stand_in_module("pkg_resources").packaging = packaging  # type: ignore[attr-defined]
        installed.append("pkg_resources -> packaging")
    if not _importable("tabulate"):
        module = stand_in_module("tabulate")
        module.tabulate = lambda rows, *args, **kwargs: "\n".join(map(str, rows))  # type: ignore[attr-defined]
        installed.append("tabulate (plain text)")
    wanted = {"thop": ("profile",), **(stubs or {})}
    for name, attributes in wanted.items():
        if _importable(name):
            continue
        module = stand_in_module(name)
        for attribute in attributes:
            setattr(module, attribute, NeverCalled(f"{name}.{attribute}"))
        installed.append(f"{name} (stand-in)")
    return installed


@contextlib.contextmanager
def rewinding_jit_load() -> Iterator[None]:
    """Makes a failed ``torch.jit.load(file object)`` rewind the file before it raises ``RuntimeError``."""
    original = torch.jit.load

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        position = f.tell() if hasattr(f, "tell") else None
        try:
            return original(f, *args, **kwargs)
        except Exception as exc:
            if position is not None:
                f.seek(position)
            if isinstance(exc, RuntimeError):
                raise
            raise RuntimeError(str(exc)) from exc

    torch.jit.load = load
    try:
        yield
    finally:
        torch.jit.load = original


@contextlib.contextmanager
def cuda_is_identity() -> Iterator[None]:
    """On a machine without CUDA, makes ``Tensor.cuda()`` return the tensor itself (a reference hard-codes it)."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


def _field(rng: np.random.RandomState, height: int, width: int, cells: int) -> np.ndarray:
    """Returns a smooth (H, W, 3) field in [0, 1]: random colours on a coarse grid, bicubic upsampled."""
    coarse = (rng.rand(cells, cells, 3) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32) / 255.0


def synthetic_sample(index: int, seed: int, defect: bool) -> tuple[np.ndarray, np.ndarray]:
    """Returns one deterministic (H, W, 3) uint8 image and its (H, W) uint8 mask (0 / 255).

    A smooth colour field, a finer texture and pixel noise; with ``defect`` an ellipse of another colour and
    texture, marked in the mask. numpy's legacy ``RandomState`` keeps the draws stable across numpy versions, and
    every driver stores the arrays it used, so the zsadbench side never regenerates them.
    """
    width, height = IMAGE_SIZES[index % len(IMAGE_SIZES)]
    rng = np.random.RandomState((1_000_003 * int(seed) + 7_919 * int(index) + 11) % 2**32)
    image = 0.55 * _field(rng, height, width, 3) + 0.35 * _field(rng, height, width, 24)
    image += rng.normal(0.0, 0.04, size=(height, width, 3)).astype(np.float32) + 0.05
    mask = np.zeros((height, width), dtype=np.uint8)
    if defect:
        cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
        ry, rx = rng.uniform(0.07, 0.15) * height, rng.uniform(0.07, 0.15) * width
        yy, xx = np.mgrid[0:height, 0:width]
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        stain = 0.6 * rng.rand(3).astype(np.float32) + 0.4 * rng.rand(height, width, 1).astype(np.float32)
        image = np.where(inside[..., None], stain, image)
        mask[inside] = 255
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), mask


def query_images(count: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """Returns (images, masks, labels): even indices carry a defect, odd ones are normal."""
    samples = [synthetic_sample(i, seed, defect=i % 2 == 0) for i in range(count)]
    return [s[0] for s in samples], [s[1] for s in samples], [int(i % 2 == 0) for i in range(count)]


def normal_images(count: int, seed: int, first: int = 1000) -> list[np.ndarray]:
    """Returns ``count`` normal images (generator indices ``first``...), e.g. few-shot prompts."""
    return [synthetic_sample(first + j, seed, defect=False)[0] for j in range(count)]


def transformed(transform: Any, arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """Returns the stacked ``transform`` outputs of uint8 arrays turned into PIL images."""
    return torch.stack([transform(Image.fromarray(a)) for a in arrays])


def binarised_masks(target_transform: Any, masks: Sequence[np.ndarray]) -> torch.Tensor:
    """Returns (N, 1, S, S) masks through a reference's target transform, thresholded at 0.5 as its test.py does."""
    out = []
    for mask in masks:
        t = target_transform(Image.fromarray((mask > 0).astype(np.uint8) * 255))
        out.append((t > 0.5).to(t.dtype))
    return torch.stack(out)


def _clone(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


class Recorder:
    """Clones every output (or, with ``inputs=True``, every positional input) of a module, in call order."""

    def __init__(self, module: torch.nn.Module, inputs: bool = False) -> None:
        self.calls: list[Any] = []
        if inputs:
            self.handle = module.register_forward_pre_hook(lambda m, args: self.calls.append(_clone(args)))
        else:
            self.handle = module.register_forward_hook(lambda m, args, out: self.calls.append(_clone(out)))

    def take(self) -> list[Any]:
        """Returns the recorded calls and forgets them."""
        calls, self.calls = self.calls, []
        return calls

    def remove(self) -> None:
        """Removes the hook."""
        self.handle.remove()


def sha256(path: str | Path) -> str:
    """Returns the SHA-256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def run_metadata(args: argparse.Namespace, reference: str, files: Sequence[str], **extra: Any) -> dict[str, Any]:
    """Returns what an output records about its run: reference, hashes of the reference files used, versions."""
    import PIL

    root = Path(getattr(args, "ref_root", None) or ".").resolve()
    versions = {"python": platform.python_version(), "torch": str(torch.__version__), "numpy": np.__version__,
                "pillow": PIL.__version__, "threads": torch.get_num_threads()}  # plain str: weights_only loading
    for name in ("open_clip", "scipy", "torchvision", "anomalib"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = str(getattr(module, "__version__", "?"))
    return {"reference": reference, "seed": args.seed, "images": args.images,
            "weights": os.path.basename(args.weights), "weights_sha256": sha256(args.weights),
            "reference_files_sha256": {f: sha256(root / f) if (root / f).is_file() else "missing" for f in files},
            "reference_root": str(root) if getattr(args, "ref_root", None) else None,
            "versions": versions, **extra}


def save_output(out: dict[str, Any], path: str | Path) -> None:
    """Writes ``out`` (tensors contiguous, so ``torch.load(weights_only=True)`` reads it) and says where."""
    def contiguous(value: Any) -> Any:
        if torch.is_tensor(value):
            return value.detach().contiguous()
        if isinstance(value, dict):
            return {k: contiguous(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(contiguous(v) for v in value)
        return value

    Path(path).resolve().parent.mkdir(parents=True, exist_ok=True)
    torch.save(contiguous(out), path)
    print(f"wrote {path}", file=sys.stderr)


def sibling(path: str | Path, suffix: str) -> Path:
    """Returns ``<path without extension><suffix>`` (e.g. ``OUT_prompt_learner.pth`` next to ``OUT.pt``)."""
    p = Path(path)
    return p.with_name(p.stem + suffix)
