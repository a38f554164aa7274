"""`zsadbench download` against a real HTTP server on 127.0.0.1 serving small archives the tests build.

The server answers ``Range: bytes=N-`` requests with 206 (so a transfer can resume) and can be told to cut a
transfer short, to ignore ranges, or to serve other bytes than were published.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
import threading
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import box_mask, noise_image, write_image
from zsadbench.datasets.mvtec import load_mvtec

from zsadbench import fingerprint, registry
from zsadbench.cli import main
from zsadbench.download import MANIFEST, DownloadError, check_members, download, verify
from zsadbench.registry import Archive, DatasetInfo


class ArchiveServer:
    """Serves ``files`` (URL path -> bytes); records each request's path, Range header and status."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None, int]] = []
        self.cut_after: int | None = None  # send only this many body bytes of the next full or partial response
        self.ignore_range = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                body = server.files.get(self.path)
                range_header = self.headers.get("Range")
                if body is None:
                    server.requests.append((self.path, range_header, 404))
                    self.send_error(404)
                    return
                start = 0
                if range_header and not server.ignore_range:
                    start = int(range_header.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        server.requests.append((self.path, range_header, 416))
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                server.requests.append((self.path, range_header, 206 if start or (range_header and not
                                                                                  server.ignore_range) else 200))
                payload = body[start:]
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if server.cut_after is not None:
                    payload = payload[:server.cut_after]
                    server.cut_after = None
                    self.wfile.write(payload)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        """Returns the full URL of ``path``."""
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        """Stops the server."""
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    """A running archive server for one test."""
    instance = ArchiveServer()
    yield instance
    instance.close()


def make_tree(root: Path, size: int = 24) -> Path:
    """A small MVTec AD tree: one category, 2 train, 1 test normal, 2 anomalous with masks."""
    for i in range(2):
        write_image(root / "widget" / "train" / "good" / f"{i:03d}.png", noise_image(size, size, i))
    write_image(root / "widget" / "test" / "good" / "000.png", noise_image(size, size, 7))
    for i in range(2):
        write_image(root / "widget" / "test" / "dent" / f"{i:03d}.png", noise_image(size, size, 20 + i))
        write_image(root / "widget" / "ground_truth" / "dent" / f"{i:03d}_mask.png", box_mask(size, size))
    (root / "license.txt").write_text("test license\n")
    return root


def tar_bytes(folder: Path, mode: str = "w:gz") -> bytes:
    """Returns a tar archive of ``folder``'s contents (members relative to it)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for path in sorted(folder.rglob("*")):
            archive.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
    return buffer.getvalue()


@pytest.fixture
def published(tmp_path: Path, server: ArchiveServer):
    """Registers dataset 'test-archive' whose archive the server publishes; yields (name, archive bytes)."""
    data = tar_bytes(make_tree(tmp_path / "source"))
    server.files["/files/widgets.tar.gz"] = data
    registry._discover()
    info = DatasetInfo("test-archive", load_mvtec, description="test archive", layout="{root}/{category}/...",
                       license="CC0 (test)", archives=(Archive(server.url("/files/widgets.tar.gz"),
                                                               hashlib.sha256(data).hexdigest(),
                                                               "computed by the test"),),
                       counts={"total": {"train": 2, "test_normal": 1, "test_anomalous": 2}})
    registry._datasets["test-archive"] = info
    yield "test-archive", data
    registry._datasets.pop("test-archive", None)


def gets(server: ArchiveServer) -> list[tuple[str, str | None, int]]:
    return [r for r in server.requests if r[0].startswith("/files/")]


def test_download_verifies_unpacks_and_records(tmp_path: Path, published, server: ArchiveServer,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    name, data = published
    root = tmp_path / "data" / "widgets"
    lines: list[str] = []
    result = download(name, root, progress=False, echo=lines.append)
    assert result.status == "downloaded"
    assert any("license: CC0 (test)" in line for line in lines)
    dataset = load_mvtec(root)
    assert len(dataset.test("widget")) == 3 and len(dataset.train("widget")) == 2
    manifest = json.loads((root / MANIFEST).read_text())
    assert manifest["license"] == "CC0 (test)"
    assert manifest["archives"][0]["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["archives"][0]["sha256_source"] == "computed by the test" and manifest["archives"][0]["verified"]
    # the archive is removed after unpacking, the staging folder is gone, and verify agrees on the fingerprint
    assert [p.name for p in root.parent.iterdir()] == ["widgets"]
    hashed: list[str] = []
    monkeypatch.setattr(fingerprint, "file_sha256", lambda p, *a: hashed.append(p))
    report = verify(name, root, progress=False)
    assert report.ok, report.format()
    assert report.fingerprint == manifest["fingerprint"]
    assert hashed == []  # the hashes computed while unpacking were cached under the final paths


def test_checksum_mismatch_leaves_nothing(tmp_path: Path, published, server: ArchiveServer) -> None:
    name, data = published
    server.files["/files/widgets.tar.gz"] = data[:-1] + bytes([data[-1] ^ 1])  # one flipped bit
    root = tmp_path / "widgets"
    with pytest.raises(DownloadError, match="checksum mismatch.*computed by the test"):
        download(name, root, progress=False, echo=lambda _: None)
    assert not root.exists()
    cache = tmp_path / ".widgets.downloads"
    assert not list(cache.iterdir())  # neither the bad archive nor a partial file is kept


def test_truncated_transfer_resumes_with_a_range_request(tmp_path: Path, published, server: ArchiveServer) -> None:
    name, data = published
    server.cut_after = len(data) // 3
    root = tmp_path / "widgets"
    with pytest.raises(DownloadError, match="run the same command again to resume"):
        download(name, root, progress=False, echo=lambda _: None)
    assert not root.exists()
    partial = tmp_path / ".widgets.downloads" / "widgets.tar.gz.part"
    assert partial.stat().st_size == len(data) // 3
    result = download(name, root, progress=False, echo=lambda _: None)
    assert result.status == "downloaded"
    first, second = gets(server)
    assert first[1] is None and second == ("/files/widgets.tar.gz", f"bytes={len(data) // 3}-", 206)
    assert len(load_mvtec(root).test("widget")) == 3


def test_resume_restarts_when_the_server_ignores_ranges(tmp_path: Path, published, server: ArchiveServer) -> None:
    name, data = published
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "widgets.tar.gz.part").write_bytes(b"garbage from an interrupted run")
    server.ignore_range = True
    download(name, tmp_path / "widgets", cache=cache, progress=False, echo=lambda _: None)
    assert gets(server)[0][2] == 200  # full body; appending it to the stale part would have broken the hash


def test_redownload_skipped_when_hash_matches(tmp_path: Path, published, server: ArchiveServer) -> None:
    name, _ = published
    cache = tmp_path / "cache"
    download(name, tmp_path / "a", cache=cache, keep_archives=True, progress=False, echo=lambda _: None)
    assert len(gets(server)) == 1
    # an archive with the published hash in the cache is not fetched again
    download(name, tmp_path / "b", cache=cache, progress=False, echo=lambda _: None)
    assert len(gets(server)) == 1 and len(load_mvtec(tmp_path / "b").test("widget")) == 3
    # an unpacked copy whose manifest has the same hashes is left as it is
    result = download(name, tmp_path / "a", progress=False, echo=lambda _: None)
    assert result.status == "present" and len(gets(server)) == 1


def test_stale_staging_of_a_killed_attempt_is_removed(tmp_path: Path, published) -> None:
    name, _ = published
    stale = tmp_path / "data" / ".widgets.unpacking-killed"
    (stale / "widget" / "test").mkdir(parents=True)
    download(name, tmp_path / "data" / "widgets", progress=False, echo=lambda _: None)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["widgets"]


def test_refuses_a_non_empty_root(tmp_path: Path, published) -> None:
    name, _ = published
    root = tmp_path / "widgets"
    root.mkdir()
    (root / "mine.txt").write_text("x")
    with pytest.raises(DownloadError, match="not empty"):
        download(name, root, progress=False, echo=lambda _: None)


def _tar_with(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            archive.addfile(info)
    return buffer.getvalue()


@pytest.mark.parametrize("members, links, reason", [
    ({"ok/a.txt": b"a", "/tmp/zsadbench-evil.txt": b"x"}, None, "absolute path"),
    ({"ok/a.txt": b"a", "ok/../../zsadbench-evil.txt": b"x"}, None, "'..' component"),
    ({"ok/a.txt": b"a"}, {"ok/link": "../../outside"}, "points outside"),
    ({"ok/a.txt": b"a"}, {"ok/link": "/etc/passwd"}, "absolute path"),
])
def test_unsafe_tar_members_are_refused(tmp_path: Path, published, server: ArchiveServer, members, links,
                                        reason: str) -> None:
    name, _ = published
    data = _tar_with(members, links)
    server.files["/files/widgets.tar.gz"] = data
    registry._datasets[name] = replace(
        registry._datasets[name],
        archives=(Archive(server.url("/files/widgets.tar.gz"), hashlib.sha256(data).hexdigest(), "test"),))
    root = tmp_path / "deep" / "widgets"
    with pytest.raises(DownloadError, match=f"unsafe member.*{reason}"):
        download(name, root, progress=False, echo=lambda _: None)
    assert not root.exists() and not Path("/tmp/zsadbench-evil.txt").exists()
    assert not (tmp_path / "zsadbench-evil.txt").exists()
    assert [p.name for p in (tmp_path / "deep").iterdir()] == [".widgets.downloads"]  # no staging folder left


def test_unsafe_zip_members_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("fine/a.txt", "a")
        archive.writestr("../evil.txt", "x")
    with pytest.raises(DownloadError, match="'..' component"):
        check_members(path)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("fine/a.txt", "a")
    assert check_members(path) == ["fine/a.txt"]


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    """A 256 KiB tmpfs mounted under tmp_path (needs mount rights: root or CAP_SYS_ADMIN)."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to simulate a full disk: {done.stderr.strip() or done.returncode}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_disk_full_while_unpacking_leaves_no_half_dataset(tmp_path: Path, server: ArchiveServer,
                                                          tiny_tmpfs: Path) -> None:
    big = make_tree(tmp_path / "big", size=200)  # ~120 KB per image, well over 256 KiB in total
    data = tar_bytes(big, mode="w")
    server.files["/files/big.tar"] = data
    registry._discover()
    registry._datasets["test-big"] = DatasetInfo(
        "test-big", load_mvtec, archives=(Archive(server.url("/files/big.tar"), hashlib.sha256(data).hexdigest(),
                                                  "test"),))
    try:
        root = tiny_tmpfs / "widgets"
        with pytest.raises(DownloadError, match="no space left on device"):
            download("test-big", root, cache=tmp_path / "cache", progress=False, echo=lambda _: None)
        assert list(tiny_tmpfs.iterdir()) == []  # neither the target nor a staging folder
        # a download cache on the full disk fails the same way, keeping what arrived for a resume
        with pytest.raises(DownloadError, match="no space left on device"):
            download("test-big", tmp_path / "elsewhere", cache=tiny_tmpfs / "cache", progress=False,
                     echo=lambda _: None)
        assert not (tmp_path / "elsewhere").exists()
    finally:
        registry._datasets.pop("test-big", None)


def test_manual_dataset_prints_steps_then_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry._discover()
    registry._datasets["test-manual"] = DatasetInfo(
        "test-manual", load_mvtec, layout="  {root}/{category}/test/...", license="gated (test)",
        obtain="1. Ask the authors for access.\n2. Unpack the zip into the root.")
    try:
        root = tmp_path / "manual"
        assert main(["download", "test-manual", "--root", str(root)]) == 1
        out = capsys.readouterr().out
        assert "1. Ask the authors for access." in out and f"{root}/{{category}}/test/..." in out
        assert "license: gated (test)" in out and "does not hold it yet" in out
        make_tree(root)
        assert main(["download", "test-manual", "--root", str(root)]) == 0
        out = capsys.readouterr().out
        assert "fingerprint: sha256:" in out and out.rstrip().endswith("OK")
    finally:
        registry._datasets.pop("test-manual", None)


def test_cli_download_then_verify(tmp_path: Path, published, capsys: pytest.CaptureFixture[str]) -> None:
    name, _ = published
    root = tmp_path / "widgets"
    assert main(["download", name, "--root", str(root)]) == 0
    assert "license: CC0 (test)" in capsys.readouterr().out
    assert main(["verify", name, "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "widget" in out and "fingerprint: sha256:" in out
    # a copy that no longer matches the published counts fails verification
    (root / "widget" / "train" / "good" / "001.png").unlink()
    assert main(["verify", name, "--root", str(root)]) == 1
    assert "train in total: 1 images, the published count is 2" in capsys.readouterr().out


def test_datasets_lists_license_counts_and_how_to_obtain(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["datasets"]) == 0
    blocks = {b.split()[0]: b for b in capsys.readouterr().out.split("\n") if b and not b.startswith(" ")}
    assert {"mvtec", "visa", "btad", "mvtec_loco", "mvtec_ad2", "ksdd2", "realiad", "bmad_his"} <= set(blocks)
    assert main(["datasets", "mvtec"]) == 0
    mvtec = capsys.readouterr().out
    assert "train 3629 · test 1725 (467 normal, 1258 anomalous)" in mvtec and "CC BY-NC-SA 4.0" in mvtec
    assert "zsadbench download mvtec --root DIR" in mvtec and "mvtecad.py DOWNLOAD_INFO" in mvtec
    assert main(["datasets", "realiad"]) == 0
    realiad = capsys.readouterr().out
    assert "huggingface-cli download REAL-IAD/Real-IAD --repo-type dataset" in realiad
    assert "realiad_jsons/{realiad_jsons|realiad_jsons_sv" in realiad
    every = registry.list_datasets()
    downloadable = {name for name, info in every.items() if info.downloadable}
    assert downloadable == {"mvtec", "visa", "btad", "mvtec_loco", "mvtec_ad2", "ksdd2"}
    assert all(info.obtain for name, info in every.items() if name not in downloadable | {"synthetic", "meta"})
    assert all(a.sha256_source for info in every.values() for a in info.archives)


def test_zip_archive_with_a_top_folder(tmp_path: Path, server: ArchiveServer) -> None:
    """A zip (as KSDD2 and BTAD ship) whose members sit under one top folder, read by the KSDD2 loader."""
    from zsadbench.datasets.ksdd2 import load_ksdd2

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for split in ("train", "test"):
            for i, defective in enumerate((False, True)):
                image = write_image(tmp_path / "src" / f"{split}{i}.png", noise_image(20, 36, i))
                gt = write_image(tmp_path / "src" / f"{split}{i}_GT.png",
                                 box_mask(20, 36) if defective else np.zeros((20, 36), np.uint8))
                archive.write(image, f"KolektorSDD2/{split}/{10000 + i}.png")
                archive.write(gt, f"KolektorSDD2/{split}/{10000 + i}_GT.png")
    data = buffer.getvalue()
    server.files["/kolektorsdd2"] = data
    registry._discover()
    registry._datasets["test-zip"] = DatasetInfo(
        "test-zip", load_ksdd2, archives=(Archive(server.url("/kolektorsdd2"), hashlib.sha256(data).hexdigest(),
                                                  "test", filename="KolektorSDD2.zip"),))
    try:
        download("test-zip", tmp_path / "ksdd2", progress=False, echo=lambda _: None)
    finally:
        registry._datasets.pop("test-zip", None)
    dataset = load_ksdd2(tmp_path / "ksdd2")
    assert [s.label for s in dataset.test("ksdd2")] == [0, 1]
