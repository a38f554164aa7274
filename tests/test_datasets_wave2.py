"""Loaders of MVTec LOCO, MVTec AD 2, Real-IAD, KSDD2 and BMAD on small trees in each official layout, quirks included
(non-square images, mask folders with several masks and values 238..255, all-zero GTs, null mask paths, ``Ungood``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import box_mask, noise_image, write_image
from PIL import Image
from zsadbench.datasets.mvtec_ad2 import private_images, server_map_paths, write_server_maps

import zsadbench
from zsadbench.data import DataError, DatasetLayoutError, read_mask
from zsadbench.download import verify

H, W = 20, 36  # non-square on purpose: a transposed (W, H) mask would not fit


# --------------------------------------------------------------------------------------------------------- MVTec LOCO


def make_loco(root: Path) -> Path:
    """breakfast_box: train/validation/test good; one logical image with two masks (values 238 and 255), one
    structural image with one mask; all in mvtec_loco_anomaly_detection/ (the archive's top folder)."""
    cat = root / "mvtec_loco_anomaly_detection" / "breakfast_box"
    write_image(cat / "train" / "good" / "000.png", noise_image(H, W, 0))
    write_image(cat / "validation" / "good" / "000.png", noise_image(H, W, 1))
    write_image(cat / "test" / "good" / "000.png", noise_image(H, W, 2))
    write_image(cat / "test" / "logical_anomalies" / "000.png", noise_image(H, W, 3))
    left, right = np.zeros((H, W), np.uint8), np.zeros((H, W), np.uint8)
    left[2:6, 1:4] = 238
    right[10:15, 30:34] = 255
    write_image(cat / "ground_truth" / "logical_anomalies" / "000" / "000.png", left)
    write_image(cat / "ground_truth" / "logical_anomalies" / "000" / "001.png", right)
    write_image(cat / "test" / "structural_anomalies" / "000.png", noise_image(H, W, 4))
    write_image(cat / "ground_truth" / "structural_anomalies" / "000" / "000.png", box_mask(H, W, 250))
    (cat / "defects_config.json").write_text("[]")
    return root


def test_mvtec_loco_merges_mask_folders_and_splits_kinds(tmp_path: Path) -> None:
    root = make_loco(tmp_path / "loco")
    dataset = zsadbench.load_dataset("mvtec_loco", root)
    assert dataset.categories() == ["breakfast_box"]
    assert {s.split for s in dataset.samples} == {"train", "validation", "test"}
    test = {s.defect_type: s for s in dataset.test("breakfast_box")}
    assert set(test) == {"good", "logical_anomalies", "structural_anomalies"}
    logical = test["logical_anomalies"]
    assert logical.mask_path.is_dir()
    mask = read_mask(logical)
    assert mask.shape == (H, W) and mask.sum() == 4 * 3 + 5 * 4  # both masks, value 238 counts as defect
    only_logical = zsadbench.load_dataset("mvtec_loco", root, anomalies="logical")
    assert sorted(s.defect_type for s in only_logical.test("breakfast_box")) == ["good", "logical_anomalies"]
    only_structural = zsadbench.load_dataset("mvtec_loco", root, anomalies="structural")
    assert sorted(s.defect_type for s in only_structural.test("breakfast_box")) == ["good", "structural_anomalies"]
    with pytest.raises(ValueError, match="anomalies='both'"):
        zsadbench.load_dataset("mvtec_loco", root, anomalies="both")


def test_mvtec_loco_missing_mask_folder_names_the_image(tmp_path: Path) -> None:
    root = make_loco(tmp_path / "loco")
    cat = root / "mvtec_loco_anomaly_detection" / "breakfast_box"
    for file in (cat / "ground_truth" / "structural_anomalies" / "000").iterdir():
        file.unlink()
    (cat / "ground_truth" / "structural_anomalies" / "000").rmdir()
    with pytest.raises(DataError, match="structural_anomalies/000.png has no mask folder"):
        zsadbench.load_dataset("mvtec_loco", root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="(?s)no category folder with a test/ subfolder.*validation/good"):
        zsadbench.load_dataset("mvtec_loco", tmp_path / "empty")


# ----------------------------------------------------------------------------------------------------------- MVTec AD 2


def make_ad2(root: Path) -> Path:
    cat = root / "vial"
    write_image(cat / "train" / "good" / "000_regular.png", noise_image(H, W, 0))
    write_image(cat / "validation" / "good" / "000_regular.png", noise_image(H, W, 1))
    write_image(cat / "test_public" / "good" / "000_regular.png", noise_image(H, W, 2))
    for i in range(2):
        write_image(cat / "test_public" / "bad" / f"00{i}_regular.png", noise_image(H, W, 3 + i))
        write_image(cat / "test_public" / "ground_truth" / "bad" / f"00{i}_regular_mask.png", box_mask(H, W))
    for split in ("test_private", "test_private_mixed"):
        for i in range(2):
            write_image(cat / split / f"00{i}.png", noise_image(H, W, 10 + i))
    return root


def test_mvtec_ad2_public_split(tmp_path: Path) -> None:
    dataset = zsadbench.load_dataset("mvtec_ad2", make_ad2(tmp_path / "ad2"))
    test = dataset.test("vial")
    assert [(s.label, s.mask_path and s.mask_path.name) for s in test] == [
        (0, None), (1, "000_regular_mask.png"), (1, "001_regular_mask.png")]
    assert len(dataset.train("vial")) == 1 and len(dataset.split("vial", "validation")) == 1
    assert all("private" not in str(s.image_path) for s in dataset.samples)  # unlabelled images are never scored


def test_mvtec_ad2_writes_private_maps_in_server_layout(tmp_path: Path) -> None:
    root = make_ad2(tmp_path / "ad2")
    images = private_images(root, "test_private_mixed")
    assert list(images) == ["vial"] and [p.name for p in images["vial"]] == ["000.png", "001.png"]
    out = tmp_path / "submission"
    anomaly_map = np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W)
    continuous, thresholded = write_server_maps(out, "vial", "test_private_mixed", images["vial"][1], anomaly_map, 0.5)
    assert continuous == out / "anomaly_images" / "vial" / "test_private_mixed" / "001.tiff"
    assert thresholded == out / "anomaly_images_thresholded" / "vial" / "test_private_mixed" / "001.png"
    assert server_map_paths(out, "vial", "test_private_mixed", images["vial"][1]) == (continuous, thresholded)
    stored = tifffile.imread(continuous)
    assert stored.dtype == np.float16 and stored.shape == (H, W)
    assert np.allclose(stored, anomaly_map, atol=1e-3)
    binary = np.asarray(Image.open(thresholded))
    assert binary.dtype == np.uint8 and set(np.unique(binary)) == {0, 255}
    assert (binary == 255).sum() == (anomaly_map > 0.5).sum()
    with pytest.raises(ValueError, match="native image size"):
        write_server_maps(out, "vial", "test_private", images["vial"][0], anomaly_map.T, 0.5)


# ------------------------------------------------------------------------------------------------------------- Real-IAD


def make_realiad(root: Path, category_prefixed_paths: bool = False) -> Path:
    """One category, two parts (one OK, one NG) x 5 views at realiad_256; the NG part shows its defect in C1 and C2
    only (the other views are labelled OK although they sit under NG/); a 'meta' key as in the official files."""
    category = "audiojack"
    images = root / "realiad_256" / category
    entries: dict[str, list[dict]] = {"train": [], "test": []}
    for view in range(1, 6):
        ok = f"OK/S0001/{category}_0001_OK_C{view}_20230922093247.jpg"
        write_image(images / ok, noise_image(H, W, view), quality=95)
        entries["train" if view < 3 else "test"].append(
            {"category": category, "anomaly_class": "OK", "image_path": ok, "mask_path": None})
        ng = f"NG/AK/S0002/{category}_0002_NG_C{view}_20230922093300.jpg"
        write_image(images / ng, noise_image(H, W, 10 + view), quality=95)
        visible = view <= 2
        mask = None
        if visible:
            mask = ng.replace(".jpg", "_mask.png")
            write_image(images / mask, box_mask(H, W))
        entries["test"].append({"category": category, "anomaly_class": "AK" if visible else "OK", "image_path": ng,
                                "mask_path": mask})
    if category_prefixed_paths:
        for split in entries.values():
            for entry in split:
                entry["image_path"] = f"{category}/{entry['image_path']}"
                if entry["mask_path"]:
                    entry["mask_path"] = f"{category}/{entry['mask_path']}"
    folder = root / "realiad_jsons" / "realiad_jsons"
    folder.mkdir(parents=True)
    (folder / f"{category}.json").write_text(json.dumps({"meta": {"prefix": "", "normal_class": "OK"}, **entries}))
    return root


@pytest.mark.parametrize("prefixed", [False, True])
def test_realiad_json_splits_views_and_labels(tmp_path: Path, prefixed: bool) -> None:
    root = make_realiad(tmp_path / "realiad", prefixed)
    dataset = zsadbench.load_dataset("realiad", root)
    test = dataset.test("audiojack")
    assert len(test) == 3 + 5 and len(dataset.train("audiojack")) == 2
    anomalous = [s for s in test if s.label]
    assert [s.image_path.name.split("_")[3] for s in anomalous] == ["C1", "C2"]
    assert all(s.defect_type == "AK" and s.mask_path.name.endswith("_mask.png") for s in anomalous)
    assert all(s.mask_path is None for s in test if not s.label)
    assert read_mask(anomalous[0]).shape == (H, W)
    side = zsadbench.load_dataset("realiad", root, views="C2,C4")
    assert sorted(s.image_path.name.split("_")[3] for s in side.samples) == ["C2", "C2", "C4", "C4"]


def test_realiad_layout_errors(tmp_path: Path) -> None:
    root = make_realiad(tmp_path / "realiad")
    with pytest.raises(DatasetLayoutError, match="no realiad_1024/ folder"):
        zsadbench.load_dataset("realiad", root, resolution=1024)
    with pytest.raises(DatasetLayoutError, match="realiad_jsons/realiad_jsons_sv"):
        zsadbench.load_dataset("realiad", root, split_files="realiad_jsons_sv")
    (root / "realiad_512").mkdir()
    with pytest.raises(ValueError, match="several resolutions"):
        zsadbench.load_dataset("realiad", root)
    assert len(zsadbench.load_dataset("realiad", root, resolution="256")) == 10
    next(root.rglob("*_NG_C1_*_mask.png")).unlink()
    with pytest.raises(DataError, match=r"audiojack.json \[test\]\[\d+\]: mask not found"):
        zsadbench.load_dataset("realiad", root, resolution="256")


# ---------------------------------------------------------------------------------------------------------------- KSDD2


def make_ksdd2(root: Path) -> Path:
    """train: 2 normal + 1 defective; test: 2 normal + 2 defective; every image has a _GT.png (zeros for normal)."""
    for split, normal, defective in (("train", 2, 1), ("test", 2, 2)):
        for i in range(normal + defective):
            stem = f"{10000 + i:05d}"
            write_image(root / split / f"{stem}.png", noise_image(H, W, i))
            write_image(root / split / f"{stem}_GT.png", box_mask(H, W) if i >= normal else np.zeros((H, W), np.uint8))
    return root


def test_ksdd2_labels_from_ground_truth(tmp_path: Path) -> None:
    dataset = zsadbench.load_dataset("ksdd2", make_ksdd2(tmp_path / "KolektorSDD2"))
    test = dataset.test("ksdd2")
    assert [s.label for s in test] == [0, 0, 1, 1]
    assert [s.mask_path.name for s in test if s.label] == ["10002_GT.png", "10003_GT.png"]
    assert [s.label for s in dataset.train("ksdd2")] == [0, 0, 1]
    assert read_mask(test[0]).shape == (H, W) and read_mask(test[2]).any()
    assert len(zsadbench.load_dataset("ksdd2", tmp_path)) == 7  # the archive's parent folder works too
    (tmp_path / "KolektorSDD2" / "test" / "10001_GT.png").unlink()
    with pytest.raises(DataError, match="10001.png has no ground truth"):
        zsadbench.load_dataset("ksdd2", tmp_path / "KolektorSDD2")


# ----------------------------------------------------------------------------------------------------------------- BMAD


def make_bmad_pixel(root: Path) -> Path:
    for split, kinds in (("train", ("good",)), ("valid", ("good", "Ungood")), ("test", ("good", "Ungood"))):
        for kind in kinds:
            for i in range(2):
                name = f"{i:05d}_60.png"
                write_image(root / split / kind / "img" / name, noise_image(H, W, i, channels=1))
                if kind == "Ungood":
                    write_image(root / split / kind / "label" / name, box_mask(H, W))
                elif split == "test":
                    write_image(root / split / kind / "label" / name, np.zeros((H, W), np.uint8))
    return root


def make_bmad_image(root: Path) -> Path:
    for split, kinds in (("train", ("good",)), ("valid", ("good", "Ungood")), ("test", ("good", "Ungood"))):
        for kind in kinds:
            for i in range(3):
                write_image(root / split / kind / f"{1000 + i}.png", noise_image(H, W, i))
    return root


def test_bmad_pixel_level_subset(tmp_path: Path) -> None:
    make_bmad_pixel(tmp_path / "BMAD" / "Brain")
    dataset = zsadbench.load_dataset("bmad_brainmri", tmp_path / "BMAD")  # the parent folder works
    assert dataset.domain == "medical" and dataset.categories() == ["brain"]
    test = dataset.test("brain")
    assert [(s.label, s.defect_type) for s in test] == [(0, "good")] * 2 + [(1, "Ungood")] * 2
    assert all(s.mask_path.parent.name == "label" and s.mask_path.name == s.image_path.name for s in test if s.label)
    assert all(s.mask_path is None for s in test if not s.label)  # the all-zero labels of normal images are ignored
    assert len(dataset.split("brain", "validation")) == 4 and len(dataset.train("brain")) == 2
    assert read_mask(test[-1]).shape == (H, W)
    (tmp_path / "BMAD" / "Brain" / "test" / "Ungood" / "label" / "00001_60.png").unlink()
    with pytest.raises(DataError, match="00001_60.png has no mask"):
        zsadbench.load_dataset("bmad_brainmri", tmp_path / "BMAD" / "Brain")


def test_bmad_image_level_subset_and_wrong_layout(tmp_path: Path) -> None:
    root = make_bmad_image(tmp_path / "Histopathology")
    dataset = zsadbench.load_dataset("bmad_his", root)
    assert [s.label for s in dataset.test("histopathology")] == [0, 0, 0, 1, 1, 1]
    assert all(s.mask_path is None for s in dataset.samples)
    report = verify("bmad_his", root, progress=False)
    assert report.ok and any("image-level only" in n for n in report.notes)
    with pytest.raises(DataError, match="img/"):
        zsadbench.load_dataset("bmad_resc", root)  # an image-level tree is not RESC's pixel-level layout
    with pytest.raises(DatasetLayoutError, match="holds no BMAD subset"):
        zsadbench.load_dataset("bmad_oct17", tmp_path)


# ------------------------------------------------------------------------------------------------------------- verify


def test_verify_counts_sizes_and_fingerprint(tmp_path: Path) -> None:
    root = make_loco(tmp_path / "loco")
    report = verify("mvtec_loco", root, progress=False)
    assert report.ok, report.format()
    counts = report.counts[("breakfast_box", "test")]
    assert (counts["normal"], counts["anomalous"], counts["masked"]) == (1, 2, 2)
    assert report.files == 5 + 3  # images + the masks inside the two mask folders
    # a mask of the wrong size is reported with both files named
    cat = root / "mvtec_loco_anomaly_detection" / "breakfast_box"
    write_image(cat / "ground_truth" / "logical_anomalies" / "000" / "001.png", np.zeros((W, H), np.uint8))
    bad = verify("mvtec_loco", root, progress=False)
    assert not bad.ok and any("001.png is 20x36 (WxH) but its image" in p for p in bad.problems)
    assert bad.fingerprint != report.fingerprint
