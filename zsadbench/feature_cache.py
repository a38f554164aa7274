"""A disk cache of what the frozen part of a method computes, keyed so that it can never be stale.

Most of a CLIP-based method's cost is the frozen vision tower, and most of it is repeated: AnomalyCLIP and AdaptCLIP
train for 15 epochs over the same images through a tower that never changes, a sweep evaluates several checkpoints
on one dataset. A method declares the frozen stage of its forward pass once, with :func:`frozen_stage` on the
detector method that computes it (``images -> tensors``, batch first); when the detector has a cache
(:func:`use_feature_cache`), each image's result is computed once and read back afterwards.

Key of one image's entry: SHA-256 over

- the stage's own description (which layers and which attention path are tapped, what is projected),
- the backbone: architecture, the weights (the SHA-256 of a local weights file, through the file-hash cache; for an
  open_clip tag or random weights the SHA-256 of the frozen module's state dict as loaded), activation,
  positional-embedding resize, input size,
- the preprocessing (size, interpolation, mean and std),
- the dtype and device kind of the computation, the versions of zsadbench and torch,
- the SHA-256 of the preprocessed input image itself (its exact float32 pixels: the image's content after decoding,
  resizing and normalisation).

Storage: one safetensors file per image and stage, ``<root>/<stage>/<key[:2]>/<key>.safetensors``, written to a
temporary file and renamed into place (readers see a whole entry or none; writers of the same key write the same
bytes), holding the tensors, the key's description and a SHA-256 of the tensor bytes. An entry that fails to load
or to verify is deleted and recomputed, with a warning. The total size is bounded: when it exceeds the bound the
least recently used entries (file modification time, refreshed on every hit) are deleted. Root:
``$ZSADBENCH_FEATURE_CACHE`` or ``<results>/cache/features``; bound: ``$ZSADBENCH_FEATURE_CACHE_SIZE`` (``20G``,
``500M``, bytes) or 20 GiB.

Results are bit-identical with and without the cache when the frozen stage computes each image independently of the
others in its batch (zsadbench's dual-path forward does; tests/test_feature_cache.py checks maps, scores and a
training run's parameters).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

ENV_ROOT = "ZSADBENCH_FEATURE_CACHE"
ENV_SIZE = "ZSADBENCH_FEATURE_CACHE_SIZE"
DEFAULT_MAX_BYTES = 20 * 2**30
FORMAT = 1  # bump when an entry's layout or the key's description changes
SUFFIX = ".safetensors"
STALE_TEMPORARY_SECONDS = 3600  # a temporary file this old was left by a writer that died
RESCAN_EVERY = 32  # writes between two scans of the folder's size (other processes write too)


# ------------------------------------------------------------------------------------------------------- settings

def default_root() -> Path:
    """Returns the cache folder: ``$ZSADBENCH_FEATURE_CACHE`` or ``<results folder>/cache/features``."""
    from zsadbench.paths import results_dir

    env = os.environ.get(ENV_ROOT)
    return Path(env).expanduser().resolve() if env else results_dir() / "cache" / "features"


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """Returns the number of bytes of a size such as ``20G``, ``500MiB``, ``1.5GB`` or ``1048576`` (binary units)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"feature cache size {text!r}: expected a number with an optional unit K, M, G or T "
                         "(e.g. 20G)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def default_max_bytes() -> int:
    """Returns the size bound: ``$ZSADBENCH_FEATURE_CACHE_SIZE`` or 20 GiB."""
    env = os.environ.get(ENV_SIZE)
    if not env:
        return DEFAULT_MAX_BYTES
    try:
        return parse_size(env)
    except ValueError as exc:
        raise ValueError(f"${ENV_SIZE}: {exc}") from None


def format_size(size: float) -> str:
    """Returns a size in bytes as ``12.3 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------------------------- the store

class CorruptEntry(Exception):
    """A cache entry that cannot be read back as it was written."""


@dataclass(frozen=True)
class CachedEntry:
    """One image's tensors of a stage as read back: leaves ``"0"``, ``"1"``, ... and how they nest."""

    tensors: dict[str, Tensor]
    structure: Any


@dataclass
class CacheStats:
    """What one :class:`FeatureCache` object did: entries read, computed, written, found corrupt, evicted."""

    hits: int = 0
    misses: int = 0
    writes: int = 0
    corrupt: int = 0
    evicted: int = 0


@dataclass(frozen=True)
class Entry:
    """One entry on disk: its file, stage, size and last use (modification time)."""

    path: Path
    stage: str
    size: int
    last_used: float


@dataclass
class StageSummary:
    """The entries of one stage: how many, their total size, and the most recent use."""

    stage: str
    entries: int = 0
    size: int = 0
    last_used: float = 0.0


@dataclass
class CacheInfo:
    """What ``zsadbench cache info`` shows: the folder, the bound, and the entries per stage."""

    root: Path
    max_bytes: int
    stages: list[StageSummary] = field(default_factory=list)

    @property
    def entries(self) -> int:
        """Returns the number of entries over all stages."""
        return sum(s.entries for s in self.stages)

    @property
    def size(self) -> int:
        """Returns the total size of the entries in bytes."""
        return sum(s.size for s in self.stages)

    def format(self) -> str:
        """Returns a readable table: one row per stage, then the total against the bound."""
        def when(stamp: float) -> str:
            return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp)) if stamp else "-"

        rows = [(s.stage, str(s.entries), format_size(s.size), when(s.last_used)) for s in self.stages]
        share = f"{100 * self.size / self.max_bytes:.1f}% of the bound" if self.max_bytes else "-"
        rows.append(("total", str(self.entries), format_size(self.size), share))
        header = ("stage", "entries", "size", "last used")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
        lines = [f"feature cache {self.root}", f"bound {format_size(self.max_bytes)} (least recently used entries "
                 f"are evicted beyond it; ${ENV_SIZE})", ""]
        for n, row in enumerate([header, *rows]):
            if n == len(rows):  # the total
                lines.append("  ".join("-" * w for w in widths))
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        return "\n".join(lines)


class FeatureCache:
    """Per-image tensors of frozen stages on disk: atomic writes, checked reads, LRU eviction beyond a size bound."""

    def __init__(self, root: str | Path | None = None, max_bytes: int | str | None = None) -> None:
        self.root = Path(root).expanduser().resolve() if root is not None else default_root()
        self.max_bytes = parse_size(max_bytes) if max_bytes is not None else default_max_bytes()
        if self.max_bytes < 0:
            raise ValueError(f"feature cache size bound must be >= 0 bytes, got {self.max_bytes}")
        self.stats = CacheStats()
        self._writes_since_scan = RESCAN_EVERY  # scan on the first write
        self._size_estimate = 0
        self._warned_too_large = False

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.root)!r}, max_bytes={self.max_bytes})"

    # ---- entries -----------------------------------------------------------------------------------------------------
    def path_of(self, stage: str, key: str) -> Path:
        """Returns the file of entry ``key`` of ``stage``."""
        return self.root / stage / key[:2] / f"{key}{SUFFIX}"

    def read(self, stage: str, key: str, description: str) -> CachedEntry | None:
        """Returns the entry, or None when there is none; a corrupt entry is deleted (with a warning): None."""
        path = self.path_of(stage, key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            entry = _decode(data, description)
        except CorruptEntry as exc:
            self.stats.corrupt += 1
            warnings.warn(f"feature cache: corrupt entry {path} ({exc}); deleted, recomputing", UserWarning,
                          stacklevel=3)
            _unlink(path)
            return None
        with _ignore_missing():
            os.utime(path)  # last use, for the eviction order
        return entry

    def write(self, stage: str, key: str, tensors: dict[str, Tensor], description: str,
              metadata: dict[str, str] | None = None) -> None:
        """Writes one entry atomically (a temporary file renamed into place)."""
        data = _encode(tensors, description, metadata or {})
        if len(data) > self.max_bytes:
            if not self._warned_too_large:
                self._warned_too_large = True
                warnings.warn(f"feature cache: one entry of {stage} ({format_size(len(data))}) exceeds the bound "
                              f"{format_size(self.max_bytes)} (${ENV_SIZE}); nothing is cached", UserWarning,
                              stacklevel=3)
            return
        path = self.path_of(stage, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(temporary, "wb") as handle:
                handle.write(data)
            os.replace(temporary, path)
        finally:
            _unlink(temporary)
        self.stats.writes += 1
        self._size_estimate += len(data)
        self._writes_since_scan += 1

    def entries(self) -> Iterator[Entry]:
        """Yields every entry on disk (in no particular order); temporary files are not entries."""
        if not self.root.is_dir():
            return
        for stage_dir in _scandir(self.root):
            if not stage_dir.is_dir():
                continue
            for bucket in _scandir(Path(stage_dir.path)):
                if not bucket.is_dir():
                    continue
                for item in _scandir(Path(bucket.path)):
                    if item.name.startswith(".") or not item.name.endswith(SUFFIX):
                        continue
                    try:
                        stat = item.stat()
                    except FileNotFoundError:  # evicted by another process meanwhile
                        continue
                    yield Entry(Path(item.path), stage_dir.name, stat.st_size, stat.st_mtime)

    def info(self) -> CacheInfo:
        """Returns the entries per stage, their size and the bound."""
        stages: dict[str, StageSummary] = {}
        for entry in self.entries():
            summary = stages.setdefault(entry.stage, StageSummary(entry.stage))
            summary.entries += 1
            summary.size += entry.size
            summary.last_used = max(summary.last_used, entry.last_used)
        return CacheInfo(self.root, self.max_bytes, [stages[k] for k in sorted(stages)])

    def clear(self, stage: str | None = None) -> tuple[int, int]:
        """Deletes every entry (of ``stage`` only, if given) and leftover temporary files; returns (entries, bytes)."""
        count = size = 0
        for entry in list(self.entries()):
            if (stage is None or entry.stage == stage) and _unlink(entry.path):
                count += 1
                size += entry.size
        self._remove_temporaries(0.0, stage)
        self._writes_since_scan = RESCAN_EVERY
        return count, size

    def evict(self) -> int:
        """Deletes the least recently used entries until the total size is within the bound; returns how many."""
        entries = sorted(self.entries(), key=lambda e: e.last_used)
        total = sum(e.size for e in entries)
        removed = 0
        for entry in entries:
            if total <= self.max_bytes:
                break
            if _unlink(entry.path):
                removed += 1
            total -= entry.size  # gone, whoever deleted it
        self._size_estimate = total
        self._writes_since_scan = 0
        self.stats.evicted += removed
        self._remove_temporaries(STALE_TEMPORARY_SECONDS)
        return removed

    def maybe_evict(self) -> None:
        """Evicts when this process's estimate of the size exceeds the bound, or after every few writes."""
        if self._size_estimate > self.max_bytes or self._writes_since_scan >= RESCAN_EVERY:
            self.evict()

    def _remove_temporaries(self, older_than: float, stage: str | None = None) -> None:
        if not self.root.is_dir():
            return
        now = time.time()
        pattern = f"{stage}/*/.*.tmp" if stage else "*/*/.*.tmp"
        for temporary in self.root.glob(pattern):
            with _ignore_missing():
                if now - temporary.stat().st_mtime >= older_than:
                    temporary.unlink()

    # ---- a frozen stage through the cache ----------------------------------------------------------------------------
    def run_stage(self, stage: str, description: dict[str, Any], images: Tensor,
                  compute: Callable[[Tensor], Any]) -> Any:
        """Returns ``compute(images)``, reading each image's part from the cache and computing only the misses.

        ``compute`` maps a (B, ...) batch to a tensor or a (nested) tuple/list of tensors whose first dimension is the
        batch; ``description`` is everything besides the image that determines the result.
        """
        text = json.dumps({"format": FORMAT, "stage": stage, **description}, sort_keys=True, default=str)
        namespace = hashlib.sha256(text.encode()).hexdigest()
        keys = [hashlib.sha256(f"{namespace}:{image_sha256(image)}".encode()).hexdigest() for image in images]
        found = [self.read(stage, key, text) for key in keys]
        missing = [i for i, hit in enumerate(found) if hit is None]
        self.stats.hits += len(keys) - len(missing)
        self.stats.misses += len(missing)
        if len(missing) == len(keys):  # nothing cached: the batch as it came, then each image's part stored
            result = compute(images)
            leaves, structure = _flatten(result)
            for i, key in enumerate(keys):
                self.write(stage, key, {str(n): leaf[i] for n, leaf in enumerate(leaves)}, text,
                           {"structure": json.dumps(structure)})
            self.maybe_evict()
            return result
        computed: list[Tensor] = []
        structure = next(hit.structure for hit in found if hit is not None)
        if missing:
            result = compute(images[missing])
            computed, structure = _flatten(result)
            for j, i in enumerate(missing):
                self.write(stage, keys[i], {str(n): leaf[j] for n, leaf in enumerate(computed)}, text,
                           {"structure": json.dumps(structure)})
            self.maybe_evict()
        device = computed[0].device if computed else images.device
        position = {i: j for j, i in enumerate(missing)}
        leaves = []
        for n in range(_count_leaves(structure)):
            parts = [computed[n][position[i]] if hit is None else _to(hit.tensors[str(n)], device)
                     for i, hit in enumerate(found)]
            leaves.append(torch.stack(parts))
        return _unflatten(leaves, structure)


# ------------------------------------------------------------------------------------------- declaring a frozen stage

F = TypeVar("F", bound=Callable[..., Any])


def frozen_stage(stage: str, describe: Callable[[Any], dict[str, Any]]) -> Callable[[F], F]:
    """Marks a detector method ``(self, images) -> tensors`` as frozen: its results go through the detector's cache.

    ``describe(self)`` returns everything besides the image that determines the result (backbone, weights, layers,
    preprocessing; see :func:`clip_backbone_description`); the dtype and device kind of the images and the versions
    of zsadbench and torch are added here. Without a cache (``self.feature_cache`` None) the method runs as written.
    """
    def decorate(method: F) -> F:
        @functools.wraps(method)
        def through_cache(self: Any, images: Tensor) -> Any:
            cache: FeatureCache | None = getattr(self, "feature_cache", None)
            if cache is None:
                return method(self, images)
            from zsadbench import __version__

            device = getattr(self, "device", images.device)
            description = {**describe(self), "dtype": str(images.dtype), "device": torch.device(device).type,
                           "zsadbench": __version__, "torch": torch.__version__}
            owner = getattr(self, "name", "") or type(self).__name__.lower()
            return cache.run_stage(f"{owner}.{stage}", description, images,
                                   lambda batch: method(self, batch))

        through_cache.frozen_stage = stage  # type: ignore[attr-defined]
        return through_cache  # type: ignore[return-value]

    return decorate


def use_feature_cache(detector: Any, cache: FeatureCache | None) -> bool:
    """Gives ``detector`` a cache (None: none); returns whether the detector declares any frozen stage to cache."""
    detector.feature_cache = cache
    return has_frozen_stages(type(detector))


def has_frozen_stages(cls: type) -> bool:
    """Returns whether a detector class declares a frozen stage (:func:`frozen_stage`) that its forward uses.

    A subclass whose forward bypasses an inherited stage sets ``uses_frozen_stages = False`` (HeadCLIP: its head
    weights act inside the tower).
    """
    if not getattr(cls, "uses_frozen_stages", True):
        return False
    return any(getattr(getattr(cls, name, None), "frozen_stage", None) for name in dir(cls))


# ------------------------------------------------------------------------------------------------- key components

_STATE_HASHES: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def state_dict_sha256(module: nn.Module) -> str:
    """Returns the SHA-256 of a module's state dict as loaded (names, dtypes, shapes, bytes); memoised per module."""
    known = _STATE_HASHES.get(module)
    if known is None:
        digest = hashlib.sha256()
        for name, tensor in sorted(module.state_dict().items()):
            value = tensor.detach().to("cpu").contiguous()
            digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
            digest.update(_raw_bytes(value))
        known = _STATE_HASHES[module] = digest.hexdigest()
    return known


def weights_sha256(weights_file: str | None, module: nn.Module) -> str:
    """Returns ``file:<sha256>`` of a local weights file (cached by path, size, mtime), else ``state:<sha256>``."""
    if weights_file and Path(weights_file).is_file():
        from zsadbench.fingerprint import HashCache, hash_files

        cache = HashCache()
        try:
            path = Path(weights_file).resolve()
            return f"file:{hash_files([path], cache=cache)[path]}"
        finally:
            cache.close()
    return f"state:{state_dict_sha256(module)}"


def clip_backbone_description(backbone: Any, module: nn.Module) -> dict[str, Any]:
    """Returns the backbone part of a key: architecture, weights hash, activation, position-embedding resize, size.

    ``backbone`` is a :class:`zsadbench.clip.backbone.ClipBackbone`; ``module`` the frozen part the stage runs (its
    state dict is hashed when the weights are not a local file: an open_clip tag, or random weights).
    """
    return {"model": backbone.name, "weights": weights_sha256(backbone.weights_file, module),
            "quick_gelu": backbone.quick_gelu, "pos_embed_mode": backbone.pos_embed_mode,
            "image_size": backbone.image_size}


def transform_description(transform: Any) -> dict[str, Any]:
    """Returns the preprocessing part of a key: size, interpolation, mean and std (or the transform's repr)."""
    if all(hasattr(transform, a) for a in ("size", "interpolation", "mean", "std")):
        return {"size": list(transform.size), "interpolation": transform.interpolation,
                "mean": [float(v) for v in torch.as_tensor(transform.mean).flatten()],
                "std": [float(v) for v in torch.as_tensor(transform.std).flatten()]}
    return {"transform": repr(transform)}


def image_sha256(image: Tensor) -> str:
    """Returns the SHA-256 of one preprocessed image's float32 values (with its shape)."""
    value = image.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(f"{tuple(value.shape)};".encode())
    digest.update(_raw_bytes(value))
    return digest.hexdigest()


# -------------------------------------------------------------------------------------------------- entry format

def _raw_bytes(value: Tensor) -> memoryview | bytes:
    """Returns the bytes of a contiguous CPU tensor without copying them."""
    return value.reshape(-1).view(torch.uint8).numpy().data if value.numel() else b""


def _tensor_sha256(tensors: dict[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(_raw_bytes(value))
    return digest.hexdigest()


def _encode(tensors: dict[str, Tensor], description: str, metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    stored = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    return save(stored, {**metadata, "key": description, "sha256": _tensor_sha256(stored)})


def _decode(data: bytes, description: str) -> CachedEntry:
    from safetensors.torch import load

    try:
        tensors = load(data)
        metadata = _metadata(data)
    except Exception as exc:  # safetensors raises its own error types for a truncated or garbled file
        raise CorruptEntry(f"unreadable: {type(exc).__name__}: {exc}") from None
    if metadata.get("key") != description:
        raise CorruptEntry("its key description differs from the one asked for")
    if metadata.get("sha256") != _tensor_sha256(tensors):
        raise CorruptEntry("checksum mismatch")
    try:
        structure = json.loads(metadata["structure"])
        count = _count_leaves(structure)
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise CorruptEntry(f"no valid structure ({exc})") from None
    if sorted(tensors) != sorted(map(str, range(count))):
        raise CorruptEntry("tensors missing")
    return CachedEntry(tensors, structure)


def _metadata(data: bytes) -> dict[str, str]:
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    return dict(header.get("__metadata__") or {})


def _to(tensor: Tensor, device: torch.device) -> Tensor:
    """Returns ``tensor`` on ``device``; CPU to CUDA goes through pinned memory without blocking."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _flatten(value: Any) -> tuple[list[Tensor], Any]:
    """Returns (leaf tensors in order, structure) of a tensor or a nested tuple/list of tensors."""
    if isinstance(value, Tensor):
        return [value], "tensor"
    if isinstance(value, (tuple, list)):
        leaves: list[Tensor] = []
        parts = []
        for item in value:
            sub, structure = _flatten(item)
            leaves += sub
            parts.append(structure)
        return leaves, {type(value).__name__: parts}
    raise TypeError(f"a frozen stage returns tensors or tuples/lists of them, not {type(value).__name__}")


def _count_leaves(structure: Any) -> int:
    if structure == "tensor":
        return 1
    (kind, parts), = structure.items()
    if kind not in ("tuple", "list"):
        raise ValueError(f"unknown container {kind!r}")
    return sum(_count_leaves(p) for p in parts)


def _unflatten(leaves: list[Tensor], structure: Any) -> Any:
    iterator = iter(leaves)

    def build(node: Any) -> Any:
        if node == "tensor":
            return next(iterator)
        (kind, parts), = node.items()
        items = [build(p) for p in parts]
        return tuple(items) if kind == "tuple" else items

    return build(structure)


# ---------------------------------------------------------------------------------------------------- file helpers

def _scandir(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as items:
            return list(items)
    except FileNotFoundError:
        return []


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False


class _ignore_missing:
    """Context manager: a file that another process deleted meanwhile is not an error."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is not None and issubclass(kind, FileNotFoundError)
