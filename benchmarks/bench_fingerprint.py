"""Dataset hashing cost against reading the data once.

    python benchmarks/bench_fingerprint.py [--files 200] [--size-kb 256] [--repeats 3] [--workers N]

Writes ``files`` random files of ``size-kb`` KiB (an image folder's worth) to a temporary folder, then times, in
alternation so that load from other processes hits all alike:

- read: one sequential pass reading every file into a buffer (the cost of reading the data once);
- hash: :func:`zsadbench.fingerprint.hash_files` without a cache (streamed SHA-256 on a thread pool);
- cached: the same with a warm :class:`~zsadbench.fingerprint.HashCache` (what every run after the first pays).

Target: hash / read <= 1 on a machine with free cores and cold data (disk-bound). With the files in the page cache
(as here, just written) reading is a memory copy, so the ratio shows the SHA-256 cost per core; medians are printed
with the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    """Runs the benchmark and prints medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--size-kb", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()

    from zsadbench.fingerprint import HashCache, hash_files

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = []
        for i in range(args.files):
            path = folder / f"{i:05d}.png"
            path.write_bytes(os.urandom(args.size_kb * 1024))
            files.append(path)
        total_mb = args.files * args.size_kb / 1024
        cache = HashCache(folder / "cache.sqlite")
        hash_files(files, cache=cache, workers=args.workers)  # warm the cache for the "cached" timing

        def read_once() -> None:
            buffer = bytearray(1 << 22)
            for path in files:
                with open(path, "rb", buffering=0) as handle:
                    while handle.readinto(buffer):
                        pass

        timings: dict[str, list[float]] = {"read": [], "hash": [], "cached": []}
        for _ in range(args.repeats):
            for name, fn in (("read", read_once), ("hash", lambda: hash_files(files, workers=args.workers)),
                             ("cached", lambda: hash_files(files, cache=cache, workers=args.workers))):
                start = time.perf_counter()
                fn()
                timings[name].append(time.perf_counter() - start)
        cache.close()
    medians = {k: statistics.median(v) for k, v in timings.items()}
    print(f"{args.files} files x {args.size_kb} KiB = {total_mb:.0f} MiB; load average {os.getloadavg()[0]:.1f}; "
          f"{os.cpu_count()} CPUs")
    for name, seconds in medians.items():
        print(f"  {name:7s} {seconds * 1000:8.1f} ms  ({total_mb / seconds:8.1f} MiB/s)")
    print(f"  hash / read   = {medians['hash'] / medians['read']:.2f}")
    print(f"  cached / read = {medians['cached'] / medians['read']:.3f}")


if __name__ == "__main__":
    main()
