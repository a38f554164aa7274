"""File hashes and dataset fingerprints: which exact files a run read, as one short string.

The fingerprint of a loaded dataset is the SHA-256 of a text with one line per file (its path relative to the dataset
root and its SHA-256), sorted by path, followed by one line per sample (split, category, label, defect type, image and
mask paths), sorted. Two copies with identical files and identical splits therefore share a fingerprint, whatever
their location on disk; a changed, missing or extra file, or a changed split file, changes it.

Hashing streams each file in 4 MiB blocks on a thread pool (``hashlib`` and file reads release the GIL), so hashing a
dataset costs about one read of it. File hashes are cached in a small SQLite table keyed by absolute path, size and
modification time (ns), so later runs only ``stat`` the files.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from zsadbench.data import MASK_EXTENSIONS
from zsadbench.paths import results_dir
from zsadbench.types import Dataset

CHUNK = 1 << 22  # 4 MiB reads: large enough for full disk throughput, small enough to stream
FINGERPRINT_VERSION = 1  # bump when the fingerprint text changes


def file_sha256(path: str | Path, chunk: int = CHUNK) -> str:
    """Returns the SHA-256 hex digest of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(chunk)
        view = memoryview(buffer)
        while read := handle.readinto(buffer):
            digest.update(view[:read])
    return digest.hexdigest()


def default_cache_path() -> Path:
    """Returns where file hashes are cached (``$ZSADBENCH_HASH_CACHE`` or results/cache/file_hashes.sqlite)."""
    env = os.environ.get("ZSADBENCH_HASH_CACHE")
    return Path(env) if env else results_dir() / "cache" / "file_hashes.sqlite"


class HashCache:
    """SHA-256 of files keyed by (absolute path, size, mtime in ns): a file that changed in any of them is re-hashed."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_cache_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS file_hash (path TEXT PRIMARY KEY, size INTEGER, "
                         "mtime_ns INTEGER, sha256 TEXT)")
        self._db.commit()

    def get(self, path: Path, size: int, mtime_ns: int) -> str | None:
        """Returns the cached hash of ``path`` if its size and mtime are unchanged, else None."""
        with self._lock:
            row = self._db.execute("SELECT size, mtime_ns, sha256 FROM file_hash WHERE path = ?",
                                   (str(path),)).fetchone()
        return row[2] if row and row[0] == size and row[1] == mtime_ns else None

    def put_many(self, rows: Iterable[tuple[Path, int, int, str]]) -> None:
        """Stores (path, size, mtime_ns, sha256) rows."""
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO file_hash VALUES (?, ?, ?, ?)",
                                 [(str(p), s, m, h) for p, s, m, h in rows])
            self._db.commit()

    def close(self) -> None:
        """Closes the database."""
        self._db.close()


def _workers(workers: int | None) -> int:
    return max(1, workers if workers is not None else min(16, (os.cpu_count() or 1) * 2))


def hash_files(paths: Sequence[Path], *, workers: int | None = None, cache: HashCache | None = None,
               progress: bool = False, desc: str = "hashing") -> dict[Path, str]:
    """Returns path -> SHA-256 for every file, hashing in parallel and skipping files the cache already knows."""
    unique = list(dict.fromkeys(Path(p).resolve() for p in paths))
    result: dict[Path, str] = {}
    todo: list[tuple[Path, int, int]] = []
    for path in unique:
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise FileNotFoundError(f"cannot hash {path}: file not found") from None
        known = cache.get(path, stat.st_size, stat.st_mtime_ns) if cache is not None else None
        if known is not None:
            result[path] = known
        else:
            todo.append((path, stat.st_size, stat.st_mtime_ns))
    if todo:
        bar = _progress_bar(sum(size for _, size, _ in todo), desc) if progress else None
        new_rows = []

        def one(item: tuple[Path, int, int]) -> tuple[Path, int, int, str]:
            digest = file_sha256(item[0])
            if bar is not None:
                bar.update(item[1])
            return (*item, digest)

        try:
            with ThreadPoolExecutor(_workers(workers)) as pool:
                for path, size, mtime, digest in pool.map(one, todo):
                    result[path] = digest
                    new_rows.append((path, size, mtime, digest))
        finally:
            if bar is not None:
                bar.close()
            if cache is not None and new_rows:
                cache.put_many(new_rows)
    return result


def _progress_bar(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False,
                disable=None)  # None: on a terminal only


def dataset_files(dataset: Dataset) -> list[Path]:
    """Returns every file the dataset's samples read (images, masks, the masks inside a mask folder), sorted."""
    files: set[Path] = set()
    for sample in dataset.samples:
        files.add(Path(sample.image_path))
        if sample.mask_path is not None:
            mask = Path(sample.mask_path)
            if mask.is_dir():
                files.update(p for p in mask.iterdir() if p.is_file() and p.suffix.lower() in MASK_EXTENSIONS)
            else:
                files.add(mask)
    return sorted(files)


def _relative(path: Path, base: Path | None) -> str:
    if base is None:
        return path.as_posix()
    return Path(os.path.relpath(path, base)).as_posix()


def fingerprint_text(dataset: Dataset, hashes: dict[Path, str]) -> str:
    """Returns the text whose SHA-256 is the fingerprint (files, then samples; each block sorted)."""
    base = Path(dataset.root).resolve() if dataset.root is not None else None
    file_lines = sorted(f"file\t{_relative(path, base)}\t{digest}" for path, digest in hashes.items())
    sample_lines = sorted(
        "\t".join(("sample", s.split, s.category, str(s.label), s.defect_type,
                   _relative(Path(s.image_path).resolve(), base),
                   "" if s.mask_path is None else _relative(Path(s.mask_path).resolve(), base)))
        for s in dataset.samples)
    return "\n".join([f"zsadbench dataset fingerprint v{FINGERPRINT_VERSION}", *file_lines, *sample_lines]) + "\n"


def dataset_fingerprint(dataset: Dataset, *, workers: int | None = None, cache: HashCache | bool = True,
                        progress: bool = False) -> str:
    """Returns ``sha256:<hex>`` over the dataset's sorted relative paths, file hashes and sample records."""
    return fingerprint_and_hashes(dataset, workers=workers, cache=cache, progress=progress)[0]


def fingerprint_and_hashes(dataset: Dataset, *, workers: int | None = None, cache: HashCache | bool = True,
                           progress: bool = False) -> tuple[str, dict[Path, str]]:
    """Returns (the fingerprint, path -> SHA-256 of every file it covers)."""
    own_cache = cache is True
    store = HashCache() if cache is True else (cache or None)
    try:
        hashes = hash_files(dataset_files(dataset), workers=workers, cache=store, progress=progress,
                            desc=f"fingerprinting {dataset.name}")
    finally:
        if own_cache and store is not None:
            store.close()
    return "sha256:" + hashlib.sha256(fingerprint_text(dataset, hashes).encode()).hexdigest(), hashes


def remember_moved(hashes: dict[Path, str], old_base: Path, new_base: Path) -> None:
    """Stores in the hash cache the hashes of files moved from ``old_base`` to ``new_base`` (a rename keeps their
    size and mtime), so the next fingerprint of the moved copy only stats them."""
    old_base, rows = old_base.resolve(), []
    for path, digest in hashes.items():
        moved = new_base.resolve() / path.relative_to(old_base)
        stat = moved.stat()
        rows.append((moved, stat.st_size, stat.st_mtime_ns, digest))
    store = HashCache()
    try:
        store.put_many(rows)
    finally:
        store.close()


def short(fingerprint: str, length: int = 12) -> str:
    """Returns the first ``length`` hex digits of a fingerprint (for tables)."""
    return fingerprint.removeprefix("sha256:")[:length]


def registered_fingerprint(dataset_name: str, data_root: str | Path | None, options: dict[str, Any] | None = None,
                           load: Callable[..., Dataset] | None = None) -> str:
    """Returns the fingerprint of registered dataset ``dataset_name`` read from ``data_root`` (all categories)."""
    if load is None:
        from zsadbench.registry import get_dataset

        load = get_dataset(dataset_name).load
    return dataset_fingerprint(load(data_root, **(options or {})), progress=True)
