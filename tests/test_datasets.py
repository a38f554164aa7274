"""Loaders on small fake trees that reproduce each layout quirk of the real benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import box_mask, noise_image, write_image
from PIL import Image

import zsadbench
from zsadbench.data import DataError, read_image, read_mask


def make_mvtec(root: Path, grayscale_category: bool = True) -> Path:
    """Two categories: RGB ``bottle`` and grayscale ``grid``; 3-digit names, ``_mask`` masks."""
    for category, channels in (("bottle", 3), ("grid", 1 if grayscale_category else 3)):
        for i in range(3):
            write_image(root / category / "train" / "good" / f"{i:03d}.png", noise_image(24, 24, i, channels))
        for i in range(2):
            write_image(root / category / "test" / "good" / f"{i:03d}.png", noise_image(24, 24, 10 + i, channels))
        for defect in ("broken", "crack"):
            for i in range(2):
                write_image(root / category / "test" / defect / f"{i:03d}.png", noise_image(24, 24, 20 + i, channels))
                write_image(root / category / "ground_truth" / defect / f"{i:03d}_mask.png", box_mask(24, 24))
    return root


def test_mvtec_tree(tmp_path: Path) -> None:
    dataset = zsadbench.load_dataset("mvtec", make_mvtec(tmp_path / "mvtec"))
    assert dataset.categories() == ["bottle", "grid"]
    test = dataset.test("grid")
    assert len(test) == 6 and len(dataset.train("grid")) == 3
    anomalous = [s for s in test if s.label == 1]
    assert {s.defect_type for s in anomalous} == {"broken", "crack"}
    for sample in anomalous:
        assert sample.mask_path.name == sample.image_path.stem + "_mask.png"
        assert sample.mask_path.parent.name == sample.defect_type
    assert all(s.mask_path is None for s in test if s.label == 0)
    # grayscale images are expanded to RGB; masks are boolean at the image's size
    assert read_image(test[0].image_path).mode == "RGB"
    mask = read_mask(anomalous[0])
    assert mask.dtype == bool and mask.shape == (24, 24) and mask.sum() == (12 - 1) * (12 - 2)


def test_mask_pairing_is_by_stem_not_index(tmp_path: Path) -> None:
    """Images 000, 002, 005 with masks 005, 000, 002: sorted-index pairing would be right by luck only for 000."""
    root = tmp_path / "mvtec"
    for stem in ("000", "002", "005"):
        write_image(root / "cat" / "test" / "good" / f"{stem}.png", noise_image(16, 16, 1))
        image = noise_image(16, 16, int(stem))
        write_image(root / "cat" / "test" / "hole" / f"{stem}.png", image)
        mask = np.zeros((16, 16), np.uint8)
        mask[int(stem), :] = 255  # the row index encodes which image the mask belongs to
        write_image(root / "cat" / "ground_truth" / "hole" / f"{stem}_mask.png", mask)
    dataset = zsadbench.load_dataset("mvtec", root)
    for sample in (s for s in dataset.test("cat") if s.label):
        assert np.flatnonzero(read_mask(sample).any(axis=1)).tolist() == [int(sample.image_path.stem)]


def test_btad_ok_ko_same_stem_bmp(tmp_path: Path) -> None:
    root = tmp_path / "BTech_Dataset_transformed"
    write_image(root / "01" / "train" / "ok" / "0000.bmp", noise_image(20, 30, 0))
    write_image(root / "01" / "test" / "ok" / "0000.bmp", noise_image(20, 30, 1))
    write_image(root / "01" / "test" / "ko" / "0001.bmp", noise_image(20, 30, 2))
    write_image(root / "01" / "ground_truth" / "ko" / "0001.png", box_mask(20, 30))
    dataset = zsadbench.load_dataset("btad", tmp_path)  # the zip's parent folder works too
    labels = {s.image_path.name: (s.label, s.mask_path and s.mask_path.name) for s in dataset.test("01")}
    assert labels == {"0000.bmp": (0, None), "0001.bmp": (1, "0001.png")}
    assert read_mask(dataset.test("01")[0]).shape == (20, 30)


def make_visa_raw(root: Path) -> Path:
    """Raw VisA: CRLF csv, 4-digit normal vs 3-digit anomalous JPGs, class-id masks (values 1..3), non-square."""
    rows = ["object,split,label,image,mask"]
    for i in range(3):
        name = f"candle/Data/Images/Normal/{i:04d}.JPG"
        write_image(root / name, noise_image(30, 40, i), quality=95)
        rows.append(f"candle,{'train' if i < 2 else 'test'},normal,{name},")
    for i in range(2):
        name = f"candle/Data/Images/Anomaly/{i:03d}.JPG"
        write_image(root / name, noise_image(30, 40, 10 + i), quality=95)
        mask = np.zeros((30, 40), np.uint8)
        mask[2:8, 3:9] = 1  # class 1
        mask[20:25, 30:38] = 3  # class 3
        write_image(root / f"candle/Data/Masks/Anomaly/{i:03d}.png", mask)
        rows.append(f"candle,test,anomaly,{name},candle/Data/Masks/Anomaly/{i:03d}.png")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_bytes(("\r\n".join(rows) + "\r\n").encode())
    return root


def test_visa_raw_crlf_split(tmp_path: Path) -> None:
    dataset = zsadbench.load_dataset("visa", make_visa_raw(tmp_path / "visa"))
    assert dataset.categories() == ["candle"]
    test = dataset.test("candle")
    assert [s.label for s in test] == [0, 1, 1] and len(dataset.train("candle")) == 2
    anomalous = test[1]
    assert anomalous.mask_path.name == "000.png"  # no trailing "\r" from the CRLF line end
    mask = read_mask(anomalous)
    assert mask.shape == (30, 40)  # (H, W), not the PIL (W, H)
    assert mask.sum() == 6 * 6 + 5 * 8  # every non-zero class id is a defect
    assert read_mask(test[0]).shape == (30, 40) and not read_mask(test[0]).any()


def test_visa_converted_three_channel_masks(tmp_path: Path) -> None:
    root = tmp_path / "visa" / "visa_pytorch"
    write_image(root / "pcb1" / "train" / "good" / "0000.JPG", noise_image(18, 26, 0))
    write_image(root / "pcb1" / "test" / "good" / "0001.JPG", noise_image(18, 26, 1))
    write_image(root / "pcb1" / "test" / "bad" / "000.JPG", noise_image(18, 26, 2))
    rgb_mask = np.repeat(box_mask(18, 26)[..., None], 3, axis=2)
    write_image(root / "pcb1" / "ground_truth" / "bad" / "000.png", rgb_mask)
    dataset = zsadbench.load_dataset("visa", tmp_path / "visa")
    sample = next(s for s in dataset.test("pcb1") if s.label)
    assert read_mask(sample).sum() == box_mask(18, 26).astype(bool).sum()


def test_jpeg_masks_need_threshold_127(tmp_path: Path) -> None:
    """JPEG compression noise around a mask's edges must not count as defect (TN3K / Kvasir-SEG)."""
    root = tmp_path / "kvasir"
    yy, xx = np.mgrid[0:32, 0:32]
    mask = np.where(np.hypot(yy - 15.3, xx - 17.1) < 9, 255, 0).astype(np.uint8)  # not aligned to JPEG blocks
    write_image(root / "colon" / "test" / "polyp" / "a.jpg", noise_image(32, 32, 0))
    write_image(root / "colon" / "ground_truth" / "polyp" / "a.jpg", mask, quality=30)
    noisy = np.asarray(Image.open(root / "colon/ground_truth/polyp/a.jpg").convert("L"))
    assert ((noisy > 0) != (mask > 0)).sum() > 0  # the fixture really has compression noise
    sample = zsadbench.load_dataset("kvasir", root).test("colon")[0]
    assert sample.mask_threshold == 127
    assert (read_mask(sample) != (mask > 0)).sum() <= 4  # with > 0 instead: ~190 wrong pixels


def write_meta(path: Path, meta: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta, indent=4))
    return path


def test_meta_json_relative_absolute_and_capitalised_keys(tmp_path: Path) -> None:
    root = tmp_path / "prepared"
    write_image(root / "brain" / "no" / "n1.png", noise_image(20, 16, 0))
    write_image(root / "brain" / "yes" / "y1.jpg", noise_image(20, 16, 1))
    write_image(root / "brain" / "masks" / "y1.png", box_mask(20, 16))
    records = [
        {"img_path": "brain/no/n1.png", "mask_path": "", "cls_name": "brain", "specie_name": "no", "anomaly": 0},
        {"img_path": str(root / "brain/yes/y1.jpg"), "mask_path": str(root / "brain/masks/y1.png"),
         "cls_name": "brain", "specie_name": "yes", "anomaly": 1},
    ]
    write_meta(root / "meta.json", {"Train": {}, "Test": {"brain": records}})  # DAGM-style keys
    dataset = zsadbench.load_dataset("brainmri", root)
    test = dataset.test("brain")
    assert [(s.label, s.defect_type, s.domain) for s in test] == [(0, "no", "medical"), (1, "yes", "medical")]
    assert test[0].mask_path is None and test[1].mask_path == root / "brain/masks/y1.png"
    assert read_mask(test[0]).shape == (20, 16)  # normal mask built with (H, W), never the transposed PIL size


def test_meta_json_directory_mask_means_no_mask(tmp_path: Path) -> None:
    root = tmp_path / "prepared"
    write_image(root / "a" / "x.png", noise_image(8, 8, 0))
    (root / "a" / "maskdir").mkdir()
    record = {"img_path": "a/x.png", "mask_path": "a/maskdir", "cls_name": "a", "specie_name": "", "anomaly": 1}
    write_meta(root / "meta.json", {"train": {}, "test": {"a": [record]}})
    sample = zsadbench.load_dataset("meta", root).test("a")[0]
    assert sample.mask_path is None and sample.defect_type == "anomaly"


def test_meta_json_missing_file_names_entry(tmp_path: Path) -> None:
    record = {"img_path": "gone.png", "mask_path": "", "cls_name": "a", "specie_name": "", "anomaly": 0}
    write_meta(tmp_path / "meta.json", {"train": {}, "test": {"a": [record]}})
    with pytest.raises(DataError, match=r"\[test\]\['a'\]\[0\].*gone\.png"):
        zsadbench.load_dataset("meta", tmp_path)


def test_unmatched_mask_is_an_error(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    write_image(root / "bottle" / "ground_truth" / "crack" / "007_mask.png", box_mask(24, 24))
    with pytest.raises(DataError, match="007_mask.png matches no image"):
        zsadbench.load_dataset("mvtec", root)


def test_anomalous_image_without_mask_is_an_error(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    (root / "bottle" / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DataError, match=r"bottle/test/crack/001\.png has no mask"):
        zsadbench.load_dataset("mvtec", root)


def test_mask_resize_modes_nest() -> None:
    """MuSc's strict (MVTec/BTAD) rule erodes, its any (VisA) rule dilates, the default sits between them."""
    from zsadbench.data import resize_mask

    yy, xx = np.mgrid[0:90, 0:90]
    mask = np.hypot(yy - 41.3, xx - 47.8) < 20
    modes = ("bilinear-strict", "bilinear", "bilinear-any")
    strict, default, anything = (resize_mask(mask, (37, 37), m) for m in modes)
    assert (strict <= default).all() and (default <= anything).all()
    assert strict.sum() < default.sum() < anything.sum()
    assert abs(int(default.sum()) - mask.sum() * (37 / 90) ** 2) < 0.1 * default.sum()
    nearest = resize_mask(mask, (37, 37), "nearest")
    assert set(np.unique(nearest)) == {False, True}
    with pytest.raises(ValueError, match="bilinear-strict"):
        resize_mask(mask, (37, 37), "bicubic")
