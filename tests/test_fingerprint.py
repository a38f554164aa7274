"""Dataset fingerprints: what they cover, the hash cache, and their way into MLflow runs and the leaderboard."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import box_mask, noise_image, write_image

import zsadbench
from zsadbench import fingerprint
from zsadbench.evaluation import EvalOptions
from zsadbench.fingerprint import HashCache, dataset_fingerprint, file_sha256, hash_files
from zsadbench.jobs import RunSpec, run
from zsadbench.report import build_leaderboard, write_leaderboard

SMALL = {"image_size": "48", "n_train": "2", "n_test_normal": "3", "n_test_anomalous": "3",
         "categories": "carpet,brain"}


def make_tree(root: Path) -> Path:
    for i in range(2):
        write_image(root / "cat" / "test" / "good" / f"{i:03d}.png", noise_image(16, 24, i))
        write_image(root / "cat" / "test" / "hole" / f"{i:03d}.png", noise_image(16, 24, 10 + i))
        write_image(root / "cat" / "ground_truth" / "hole" / f"{i:03d}_mask.png", box_mask(16, 24))
    return root


def test_file_sha256_streams_large_files(tmp_path: Path) -> None:
    data = np.random.default_rng(0).bytes(9 * 1024 * 1024 + 17)  # more than two 4 MiB blocks, not a multiple
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    assert file_sha256(path, chunk=1000) == hashlib.sha256(data).hexdigest()


def test_fingerprint_depends_on_content_not_location(tmp_path: Path) -> None:
    first = make_tree(tmp_path / "a")
    second = Path(shutil.copytree(first, tmp_path / "elsewhere" / "b"))
    fp_first = dataset_fingerprint(zsadbench.load_dataset("mvtec", first))
    assert fp_first.startswith("sha256:") and len(fp_first) == 7 + 64
    assert dataset_fingerprint(zsadbench.load_dataset("mvtec", second)) == fp_first
    # one changed pixel in one mask changes it
    write_image(second / "cat" / "ground_truth" / "hole" / "001_mask.png", box_mask(16, 24, value=254))
    changed = dataset_fingerprint(zsadbench.load_dataset("mvtec", second))
    assert changed != fp_first
    # a renamed file (same bytes) changes it too: paths are part of the fingerprint
    third = Path(shutil.copytree(first, tmp_path / "c"))
    (third / "cat" / "test" / "good" / "001.png").rename(third / "cat" / "test" / "good" / "002.png")
    assert dataset_fingerprint(zsadbench.load_dataset("mvtec", third)) not in (fp_first, changed)


def test_hash_cache_skips_unchanged_files_and_notices_changes(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_tree(tmp_path / "tree")
    dataset = zsadbench.load_dataset("mvtec", root)
    cache = HashCache(tmp_path / "hashes.sqlite")
    hashed: list[Path] = []
    real = fingerprint.file_sha256
    monkeypatch.setattr(fingerprint, "file_sha256", lambda p, *a: hashed.append(Path(p)) or real(p, *a))
    first = dataset_fingerprint(dataset, cache=cache)
    assert len(hashed) == 6
    hashed.clear()
    assert dataset_fingerprint(dataset, cache=cache) == first and hashed == []  # all from the cache
    image = root / "cat" / "test" / "good" / "000.png"
    write_image(image, noise_image(16, 24, 99))
    os.utime(image, ns=(1, 1))  # also a different mtime, whatever the file system's resolution
    assert dataset_fingerprint(dataset, cache=cache) != first
    assert hashed == [image.resolve()]  # only the changed file is read again


def test_parallel_hashing_matches_serial(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    files = sorted(p for p in root.rglob("*.png"))
    serial = hash_files(files, workers=1)
    assert hash_files(files, workers=8) == serial
    assert serial == {p.resolve(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    with pytest.raises(FileNotFoundError, match="nope.png"):
        hash_files([root / "nope.png"])


def test_runs_record_the_fingerprint_and_the_leaderboard_flags_mixed_copies(
        isolated_results: Path, mlflow_store: Path, test_methods, tmp_path: Path) -> None:
    from zsadbench.datasets.synthetic import load_synthetic

    from zsadbench.download import verify

    copy_a = tmp_path / "copy-a"
    load_synthetic(copy_a, **{k: v for k, v in SMALL.items()})
    copy_b = Path(shutil.copytree(copy_a, tmp_path / "copy-b"))
    write_image(copy_b / "carpet" / "test" / "good" / "000.png", noise_image(48, 48, 5))  # a damaged copy

    run_ids = []
    for method, root in (("test-colour", copy_a), ("test-mutual", copy_b)):
        spec = RunSpec(method=method, dataset="synthetic", data_root=str(root), dataset_options=dict(SMALL),
                       eval=EvalOptions(overlays=0))
        outcome = run(spec, progress=False)
        run_ids.append(outcome.run_id)
    mlflow.set_tracking_uri(f"sqlite:///{isolated_results / 'mlflow.db'}")
    recorded = {r: mlflow.get_run(r).data.params["dataset_fingerprint"] for r in run_ids}
    expected_a = verify("synthetic", copy_a, options=dict(SMALL), progress=False).fingerprint
    expected_b = verify("synthetic", copy_b, options=dict(SMALL), progress=False).fingerprint
    assert recorded == {run_ids[0]: expected_a, run_ids[1]: expected_b} and expected_a != expected_b

    board = build_leaderboard(replicates=0)
    markdown = write_leaderboard(board, tmp_path / "board")["markdown"].read_text()
    assert "Warning: these rows were measured on different copies of synthetic" in markdown
    for fp in (expected_a, expected_b):
        assert f"`{fp.removeprefix('sha256:')[:12]}`" in markdown
