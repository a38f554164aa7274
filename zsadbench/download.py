"""``zsadbench download`` and ``zsadbench verify``: fetch a benchmark's published archives, check them, unpack them
atomically, and check an unpacked copy (counts, masks, sizes, fingerprint).

Fetching, hash checking and unpacking go through pooch (``pooch.retrieve``, ``pooch.Untar`` / ``pooch.Unzip``). Two
things pooch does not do are added here: resuming an interrupted transfer (a downloader that keeps a ``.part`` file
and asks the server for the rest with an HTTP ``Range`` request) and refusing archives whose members would land
outside the target folder (absolute paths, ``..``, links pointing out, device files) before anything is extracted.

Atomicity: archives are unpacked into a hidden staging folder next to the target, read back with the dataset's own
loader, and only then renamed to the target folder, so a failed, interrupted or corrupt download never leaves a half
dataset under the path a run would read. The target folder gets ``.zsadbench-download.json``: the license, each
archive's URL, SHA-256 and where that hash was published, and the dataset fingerprint.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from zsadbench.data import MASK_EXTENSIONS, DataError, image_size
from zsadbench.fingerprint import dataset_fingerprint, fingerprint_and_hashes, remember_moved, short
from zsadbench.registry import Archive, DatasetInfo, get_dataset
from zsadbench.types import Dataset

log = logging.getLogger(__name__)

MANIFEST = ".zsadbench-download.json"
Echo = Callable[[str], None]


class DownloadError(DataError):
    """A download, its checksum or its unpacking failed; the message says what to do next."""


# ----------------------------------------------------------------------------------------------------------- fetching


class ResumableDownloader:
    """A pooch downloader that resumes: bytes already received stay in ``partial`` and the rest is requested with
    ``Range: bytes=N-``. A server that ignores the range (status 200) restarts the file from zero."""

    def __init__(self, partial: Path, *, progress: bool = True, timeout: float = 60.0, chunk: int = 1 << 20) -> None:
        self.partial = partial
        self.progress = progress
        self.timeout = timeout
        self.chunk = chunk

    def __call__(self, url: str, output_file: Any, pooch: Any = None, check_only: bool = False) -> Any:
        import requests
        import urllib3

        if check_only:
            return requests.head(url, allow_redirects=True, timeout=self.timeout).ok
        offset = self.partial.stat().st_size if self.partial.exists() else 0
        # identity: the bytes on disk must be the published ones (Content-Length and ranges count them)
        headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={offset}-"} if offset else {})}
        try:
            with requests.get(url, headers=headers, stream=True, timeout=self.timeout) as response:
                if offset and response.status_code == 416:  # the partial file is already complete (or corrupt)
                    self.partial.unlink()
                    return self(url, output_file, pooch)
                response.raise_for_status()
                if offset and response.status_code == 206:
                    mode, start = "ab", offset
                else:
                    mode, start = "wb", 0
                length = response.headers.get("Content-Length")
                total = start + int(length) if length is not None else None
                bar = self._bar(total, start, url)
                try:
                    with open(self.partial, mode) as handle:
                        # read1 hands over whatever has arrived, so a dropped connection loses no received byte
                        while block := response.raw.read1(self.chunk, decode_content=False):
                            handle.write(block)
                            if bar is not None:
                                bar.update(len(block))
                finally:
                    if bar is not None:
                        bar.close()
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError) as exc:
            have = self.partial.stat().st_size if self.partial.exists() else 0
            raise DownloadError(f"transfer of {url} interrupted after {have} bytes ({exc.__class__.__name__}: "
                                f"{exc}); run the same command again to resume") from None
        except OSError as exc:
            raise _disk_error(exc, f"writing {self.partial}") from None
        size = self.partial.stat().st_size
        if total is not None and size != total:
            raise DownloadError(f"transfer of {url} truncated: got {size} of {total} bytes; run the same command "
                                "again to resume")
        os.replace(self.partial, str(output_file))
        return None

    def _bar(self, total: int | None, start: int, url: str) -> Any:
        if not self.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=url.rsplit("/", 1)[-1][:40], leave=False, disable=None)


def _disk_error(exc: OSError, doing: str) -> DownloadError:
    if exc.errno == errno.ENOSPC:
        return DownloadError(f"no space left on device while {doing}; free space (or choose another --root / "
                             "--cache) and run the same command again")
    return DownloadError(f"{doing} failed: {exc}")


def fetch_archive(archive: Archive, cache: Path, *, progress: bool = True) -> tuple[Path, str]:
    """Returns (the archive's path in ``cache``, its SHA-256), downloading or resuming it unless a file with the
    published hash is already there. A hash mismatch deletes the download and raises."""
    import pooch

    cache.mkdir(parents=True, exist_ok=True)
    target = cache / archive.name
    partial = cache / (archive.name + ".part")
    known = f"sha256:{archive.sha256}" if archive.sha256 else None
    errors = []
    for url in (archive.url, *archive.mirrors):
        try:
            pooch.retrieve(url, known_hash=known, fname=archive.name, path=cache,
                           downloader=ResumableDownloader(partial, progress=progress))
            break
        except DownloadError as exc:  # interrupted or truncated: the .part file stays for the next try or mirror
            errors.append(str(exc))
        except ValueError as exc:  # pooch: the hash does not match
            raise DownloadError(
                f"checksum mismatch for {archive.name} from {url}: expected SHA-256 {archive.sha256} "
                f"(published in {archive.sha256_source}); the file was deleted. The server may serve a different "
                f"version, or the transfer was corrupted. Details: {exc}") from None
    else:
        raise DownloadError("; ".join(errors))
    from zsadbench.fingerprint import file_sha256

    digest = archive.sha256 or file_sha256(target)
    return target, digest


# ---------------------------------------------------------------------------------------------------------- unpacking


def _unsafe_name(name: str) -> str | None:
    """Returns why an archive member name is unsafe, or None."""
    if not name:
        return "empty name"
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or name.startswith(("/", "\\")):
        return "absolute path"
    if ".." in posix.parts or ".." in windows.parts:
        return "'..' component"
    return None


def check_members(path: Path) -> list[str]:
    """Returns the member names of a tar or zip archive; raises DownloadError on any member that could write outside
    the extraction folder (absolute path, ``..``, a link pointing outside, a device or FIFO)."""
    problems: list[str] = []
    names: list[str] = []
    if tarfile.is_tarfile(path):
        with tarfile.open(path) as archive:
            for member in archive.getmembers():
                names.append(member.name)
                reason = _unsafe_name(member.name)
                if reason is None and (member.issym() or member.islnk()):
                    target = member.linkname
                    joined = (PurePosixPath(member.name).parent / target) if member.issym() else PurePosixPath(target)
                    reason = _unsafe_name(target) if PurePosixPath(target).is_absolute() else None
                    depth = 0
                    for part in joined.parts:
                        depth += -1 if part == ".." else (0 if part == "." else 1)
                        if depth < 0:
                            reason = f"link to {target!r} points outside"
                            break
                if reason is None and (member.ischr() or member.isblk() or member.isfifo()):
                    reason = "device or FIFO"
                if reason:
                    problems.append(f"{member.name!r} ({reason})")
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                names.append(info.filename)
                reason = _unsafe_name(info.filename)
                if reason is None and stat.S_ISLNK(info.external_attr >> 16):
                    reason = "symbolic link"
                if reason:
                    problems.append(f"{info.filename!r} ({reason})")
    else:
        raise DownloadError(f"{path} is neither a tar nor a zip archive")
    if problems:
        raise DownloadError(f"refusing to unpack {path.name}: unsafe member path{'s' if len(problems) > 1 else ''} "
                            f"{', '.join(problems[:5])}" + (f" and {len(problems) - 5} more" if len(problems) > 5
                                                             else ""))
    return names


def unpack(path: Path, destination: Path) -> None:
    """Unpacks a checked tar or zip archive into ``destination`` with pooch."""
    import pooch

    check_members(path)
    destination.mkdir(parents=True, exist_ok=True)
    processor = pooch.Untar(extract_dir=str(destination)) if tarfile.is_tarfile(path) else \
        pooch.Unzip(extract_dir=str(destination))
    try:
        processor(str(path), "download", None)
    except OSError as exc:
        raise _disk_error(exc, f"unpacking {path.name}") from None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise DownloadError(f"{path.name} is damaged ({exc}); delete it and download again") from None


# ------------------------------------------------------------------------------------------------------ verification


@dataclass
class VerifyReport:
    """What `zsadbench verify` found: counts per category and split, problems, and the fingerprint."""

    dataset: str
    root: Path
    counts: dict[tuple[str, str], Counter] = field(default_factory=dict)  # (category, split) -> label/mask counts
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fingerprint: str = ""
    files: int = 0

    @property
    def ok(self) -> bool:
        """Returns whether nothing is wrong."""
        return not self.problems

    def format(self) -> str:
        """Returns the report as text: a table of counts, then notes, problems and the fingerprint."""
        lines = [f"{self.dataset} at {self.root}",
                 f"{'category':24s} {'split':14s} {'normal':>7s} {'anomalous':>9s} {'with mask':>9s}"]
        for (category, split), counter in sorted(self.counts.items()):
            lines.append(f"{category:24s} {split:14s} {counter['normal']:7d} {counter['anomalous']:9d} "
                         f"{counter['masked']:9d}")
        totals: Counter = Counter()
        for counter in self.counts.values():
            totals.update(counter)
        lines.append(f"{'total':24s} {'':14s} {totals['normal']:7d} {totals['anomalous']:9d} {totals['masked']:9d}")
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"PROBLEM: {p}" for p in self.problems]
        if self.fingerprint:
            lines.append(f"fingerprint: {self.fingerprint} ({self.files} files)")
        lines.append("OK" if self.ok else f"{len(self.problems)} problem(s)")
        return "\n".join(lines)


def _header_sizes(paths: list[Path], workers: int | None) -> dict[Path, tuple[int, int] | str]:
    """Returns path -> (H, W) read from the file header, or the error text, for every path (in parallel)."""

    def one(path: Path) -> tuple[Path, tuple[int, int] | str]:
        try:
            return path, image_size(path)
        except DataError as exc:
            return path, str(exc)

    with ThreadPoolExecutor(max(1, workers or min(16, (os.cpu_count() or 1) * 2))) as pool:
        return dict(pool.map(one, paths))


def _compare_known(info: DatasetInfo, report: VerifyReport) -> None:
    """Adds a problem for every known count (category x kind) the copy does not match."""
    measured: dict[str, Counter] = {}
    for (category, split), counter in report.counts.items():
        for scope in (category, "total"):
            target = measured.setdefault(scope, Counter())
            if split == "test":
                target["test_normal"] += counter["normal"]
                target["test_anomalous"] += counter["anomalous"]
                target["test"] += counter["normal"] + counter["anomalous"]
            else:
                target[split] += counter["normal"] + counter["anomalous"]
    for scope, known in info.counts.items():
        for kind, expected in known.items():
            got = measured.get(scope, Counter())[kind]
            if got != expected:
                where = "in total" if scope == "total" else f"in {scope!r}"
                report.problems.append(f"{kind} {where}: {got} images, the published count is {expected}"
                                       + (f" ({info.counts_source})" if info.counts_source else ""))


def verify_dataset(dataset: Dataset, info: DatasetInfo | None = None, *, workers: int | None = None,
                   fingerprint: bool = True, progress: bool = True) -> VerifyReport:
    """Returns the verification report of a loaded dataset: counts, masks, image/mask sizes, fingerprint."""
    report = VerifyReport(dataset.name, Path(dataset.root) if dataset.root else Path("."))
    image_level: Counter = Counter()
    masked_categories: set[str] = set()
    for sample in dataset.samples:
        counter = report.counts.setdefault((sample.category, sample.split), Counter())
        counter["anomalous" if sample.label else "normal"] += 1
        if sample.mask_path is not None and sample.label:
            counter["masked"] += 1
            masked_categories.add(sample.category)
        elif sample.label:
            image_level[sample.category] += 1
    for category, missing in sorted(image_level.items()):
        if category in masked_categories:
            report.problems.append(f"{missing} anomalous image(s) of {category!r} have no mask while others do")
        else:
            report.notes.append(f"{category!r} is image-level only ({missing} anomalous images, no masks)")
    # sizes: every mask (each file of a mask folder) must match its image
    pairs: list[tuple[Path, Path]] = []
    for sample in dataset.samples:
        if sample.mask_path is None:
            continue
        mask = Path(sample.mask_path)
        if mask.is_dir():
            files = sorted(p for p in mask.iterdir() if p.suffix.lower() in MASK_EXTENSIONS)
            if not files:
                report.problems.append(f"mask folder {mask} (for {sample.image_path}) holds no masks")
            pairs += [(Path(sample.image_path), f) for f in files]
        else:
            pairs.append((Path(sample.image_path), mask))
    headers = _header_sizes(sorted({Path(s.image_path) for s in dataset.samples} | {m for _, m in pairs}), workers)
    for value in headers.values():
        if isinstance(value, str):
            report.problems.append(value)
    for image, mask in pairs:
        image_hw, mask_hw = headers[image], headers[mask]
        if isinstance(image_hw, tuple) and isinstance(mask_hw, tuple) and image_hw != mask_hw:
            report.problems.append(f"mask {mask} is {mask_hw[1]}x{mask_hw[0]} (WxH) but its image {image} is "
                                   f"{image_hw[1]}x{image_hw[0]}")
    if info is not None:
        _compare_known(info, report)
    if fingerprint:
        from zsadbench.fingerprint import dataset_files

        report.files = len(dataset_files(dataset))
        report.fingerprint = dataset_fingerprint(dataset, workers=workers, progress=progress)
    return report


def verify(name: str, root: str | Path | None, *, workers: int | None = None, fingerprint: bool = True,
           progress: bool = True, options: dict[str, Any] | None = None) -> VerifyReport:
    """Returns the verification report of registered dataset ``name`` read from ``root`` (``options``: loader
    options, as ``--dataset-option`` gives them)."""
    info = get_dataset(name)
    dataset = info.load(root, **(options or {}))
    # published counts describe the full dataset as distributed, not a variant chosen by loader options
    return verify_dataset(dataset, info if not options else None, workers=workers, fingerprint=fingerprint,
                          progress=progress)


# ----------------------------------------------------------------------------------------------------------- download


def obtain_text(info: DatasetInfo, root: Path | None = None) -> str:
    """Returns how to obtain a dataset by hand: the steps, then the folder layout the loader expects."""
    where = str(root) if root is not None else "<root>"
    if info.downloadable:
        steps = f"zsadbench download {info.name} --root {where} fetches and unpacks it" + \
            (f" (or download it by hand from {info.homepage})" if info.homepage else "")
    else:
        steps = info.obtain or (f"Download it from {info.homepage}" if info.homepage else "No source recorded.")
    layout = info.layout.replace("{root}", where)
    return f"{steps}\n\nThen arrange the files as:\n{layout}\n\nand check the result with: " \
           f"zsadbench verify {info.name} --root {where}"


@dataclass
class DownloadResult:
    """What `zsadbench download` did."""

    dataset: str
    root: Path
    status: str  # downloaded | present | manual-ok | manual-missing
    manifest: dict[str, Any] = field(default_factory=dict)
    report: VerifyReport | None = None


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _manifest_matches(manifest: dict[str, Any] | None, info: DatasetInfo) -> bool:
    if not manifest or manifest.get("dataset") != info.name:
        return False
    recorded = {a.get("name"): a.get("sha256") for a in manifest.get("archives", [])}
    return all(a.sha256 is None and a.name in recorded or recorded.get(a.name) == a.sha256 for a in info.archives)


def download(name: str, root: str | Path, *, cache: str | Path | None = None, keep_archives: bool = False,
             progress: bool = True, echo: Echo = print) -> DownloadResult:
    """Downloads, verifies and unpacks dataset ``name`` into ``root`` (or, for a manual dataset, prints the steps
    and checks ``root``); returns what happened."""
    info = get_dataset(name)
    root = Path(root).expanduser().absolute()
    echo(f"{info.name}: {info.description}")
    echo(f"license: {info.license}" + (f"  ({info.homepage})" if info.homepage else ""))
    if not info.downloadable:
        echo(f"{info.name} has no public direct download.\n\n{obtain_text(info, root)}")
        if not root.exists() or not any(root.iterdir()):
            echo(f"\n{root} does not hold it yet.")
            return DownloadResult(info.name, root, "manual-missing")
        echo(f"\nchecking {root} ...")
        report = verify(name, root, progress=progress)
        echo(report.format())
        return DownloadResult(info.name, root, "manual-ok" if report.ok else "manual-problems", report=report)

    manifest = _read_manifest(root)
    if manifest is not None and _manifest_matches(manifest, info):
        echo(f"{root} already holds {info.name} from archives with the same SHA-256 "
             f"({manifest.get('downloaded_at', '?')}); nothing to download. Check it with: "
             f"zsadbench verify {info.name} --root {root}")
        return DownloadResult(info.name, root, "present", manifest)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DownloadError(f"{root} exists and is not empty; download into a new or empty folder (an unpacked "
                            f"dataset is only ever moved into place whole)")
    cache_dir = Path(cache).expanduser().absolute() if cache else root.parent / f".{root.name}.downloads"
    fetched = []
    for archive in info.archives:
        if archive.sha256 is None:
            echo(f"WARNING: no SHA-256 is published for {archive.name}; the hash computed now is recorded "
                 "(trust on first use), compare it with other copies")
        path, digest = fetch_archive(archive, cache_dir, progress=progress)
        echo(f"{archive.name}: SHA-256 {digest} "
             + (f"verified (published in {archive.sha256_source})" if archive.sha256 else "(computed, unverified)"))
        fetched.append((archive, path, digest))

    root.parent.mkdir(parents=True, exist_ok=True)
    for stale in root.parent.glob(f".{root.name}.unpacking-*"):  # left by a killed earlier attempt
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.unpacking-", dir=root.parent))
    try:
        for archive, path, _ in fetched:
            echo(f"unpacking {archive.name} ...")
            unpack(path, staging / archive.extract_to if archive.extract_to else staging)
        try:
            dataset = info.load(staging)
        except DataError as exc:
            raise DownloadError(f"the unpacked archives do not read as {info.name}: {exc}") from None
        manifest = {
            "dataset": info.name, "license": info.license, "homepage": info.homepage,
            "downloaded_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "archives": [{"name": a.name, "url": a.url, "sha256": digest, "sha256_source": a.sha256_source,
                          "verified": a.sha256 is not None} for a, _, digest in fetched],
            "images": len(dataset),
        }
        staged_fingerprint, hashes = fingerprint_and_hashes(dataset, cache=False, progress=progress)
        manifest["fingerprint"] = staged_fingerprint
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if root.is_dir():
            root.rmdir()  # empty (checked above)
        os.replace(staging, root)
        remember_moved(hashes, staging, root)
    except OSError as exc:
        raise _disk_error(exc, f"unpacking into {staging}") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    if not keep_archives:
        for _, path, _ in fetched:
            path.unlink(missing_ok=True)
        if cache is None and cache_dir.is_dir() and not any(cache_dir.iterdir()):
            cache_dir.rmdir()
    echo(f"{info.name} is in {root}: {manifest['images']} images, fingerprint {short(staged_fingerprint)} "
         f"(license {info.license}; recorded in {root / MANIFEST})")
    return DownloadResult(info.name, root, "downloaded", manifest)


def counts_text(info: DatasetInfo) -> str:
    """Returns the known totals per split, e.g. "train 3629 · test 1725 (467 normal, 1258 anomalous)"."""
    total = info.counts.get("total")
    if not total:
        return "not recorded"
    parts = [f"{k} {v}" for k, v in total.items() if not k.startswith("test")]
    normal, anomalous = total.get("test_normal"), total.get("test_anomalous")
    if normal is not None and anomalous is not None:
        parts.append(f"test {normal + anomalous} ({normal} normal, {anomalous} anomalous)")
    elif "test" in total:
        parts.append(f"test {total['test']}")
    return " · ".join(parts)


def describe_dataset(info: DatasetInfo, full: bool = False) -> str:
    """Returns what `zsadbench datasets` shows for one dataset (``full``: with the layout and manual steps)."""
    how = (f"zsadbench download {info.name} --root DIR" if info.downloadable
           else "manual: " + (info.obtain.strip().splitlines()[0] if info.obtain else "see the homepage")
           if info.needs_root else "generated on first use")
    lines = [f"{info.name}  [{info.domain}]  {info.description}",
             f"    categories: {', '.join(info.categories) if info.categories else 'read from the folder'}",
             f"    counts:     {counts_text(info)}" + (f"  ({info.counts_source})" if info.counts_source and full
                                                       else ""),
             f"    license:    {info.license}",
             f"    obtain:     {how}"]
    if full:
        if info.homepage:
            lines.append(f"    homepage:   {info.homepage}")
        for archive in info.archives:
            lines.append(f"    archive:    {archive.url}\n                sha256 {archive.sha256 or '(none published)'}"
                         f" — {archive.sha256_source}")
        lines.append("")
        lines.append(obtain_text(info) if info.needs_root else info.layout)
    return "\n".join(lines)
