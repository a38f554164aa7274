"""``zsadbench evaluate``: maps of another tool, in the MVTec AD evaluation layout, scored by the same engine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from zsadbench.cli import main
from zsadbench.data import DataError
from zsadbench.evaluate_maps import evaluate_anomaly_maps
from zsadbench.types import Dataset, Sample

# category -> (image size (H, W), defects, maps stored at half size?)
CATEGORIES = {"widget": ((24, 40), ("crack", "hole"), False), "gadget": ((30, 20), ("scratch",), True)}


def write_tree(root: Path, seed: int = 0) -> tuple[Path, dict[Path, tuple[np.ndarray, np.ndarray]]]:
    """Writes an MVTec-layout dataset under root/data and maps under root/maps; returns (data root, truth)."""
    rng = np.random.default_rng(seed)
    data, maps = root / "data", root / "maps"
    truth: dict[Path, tuple[np.ndarray, np.ndarray]] = {}  # image path -> (map as stored, mask)
    for category, ((h, w), defects, half) in CATEGORIES.items():
        for defect in ("good", *defects):
            for k in range(3):
                image = data / category / "test" / defect / f"{k:03d}.png"
                image.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(image)
                mask = np.zeros((h, w), bool)
                if defect != "good":
                    y, x = rng.integers(0, h - 6), rng.integers(0, w - 6)
                    mask[y:y + 5, x:x + 6] = True
                    mask[rng.random((h, w)) < 0.03] = True
                    mask_file = data / category / "ground_truth" / defect / f"{k:03d}_mask.png"
                    mask_file.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(mask.astype(np.uint8) * 255).save(mask_file)
                size = (h // 2, w // 2) if half else (h, w)
                amap = rng.random(size).astype(np.float32)
                amap += 0.8 * np.asarray(Image.fromarray(mask).resize(size[::-1]), dtype=np.float32)
                amap_file = maps / category / "test" / defect / f"{k:03d}.tiff"
                amap_file.parent.mkdir(parents=True, exist_ok=True)
                tifffile.imwrite(amap_file, amap)
                truth[image] = (amap, mask)
    return data, truth


def load(data: Path) -> Dataset:
    samples = []
    for image in sorted(data.glob("*/test/*/*.png")):
        category, defect = image.parts[-4], image.parts[-2]
        mask = data / category / "ground_truth" / defect / f"{image.stem}_mask.png"
        samples.append(Sample(image, category, int(defect != "good"), mask if mask.exists() else None, defect, "toy"))
    return Dataset("toy", data, samples)


def expected(truth, dataset: Dataset, category: str, image_scores=None) -> dict[str, float]:
    samples = dataset.test(category)
    maps, masks = [], []
    for s in samples:
        amap, mask = truth[s.image_path]
        if amap.shape != mask.shape:  # independent of the module: torch bilinear, align_corners=False
            amap = F.interpolate(torch.from_numpy(amap)[None, None], size=mask.shape, mode="bilinear",
                                 align_corners=False)[0, 0].numpy()
        maps.append(amap.ravel())
        masks.append(mask.ravel())
    labels = [s.label for s in samples]
    scores = image_scores or [float(truth[s.image_path][0].max()) for s in samples]
    return {"image_auroc": roc_auc_score(labels, scores), "image_ap": average_precision_score(labels, scores),
            "pixel_auroc": roc_auc_score(np.concatenate(masks), np.concatenate(maps)),
            "pixel_ap": average_precision_score(np.concatenate(masks), np.concatenate(maps))}


def test_maps_are_paired_with_their_images_resized_and_scored(tmp_path):
    data, truth = write_tree(tmp_path)
    dataset = load(data)
    result = evaluate_anomaly_maps(tmp_path / "maps", dataset, progress=False)
    assert list(result.categories) == ["gadget", "widget"]
    for category in ("gadget", "widget"):
        got = result.categories[category].metrics
        for name, value in expected(truth, dataset, category).items():
            assert got[name] == pytest.approx(value, abs=1e-12), (category, name)
        assert 0 < got["pixel_aupro"] <= 1
    assert result.tags["pixel_aupro"] == "aupro.exact@0.3"
    mean = result.mean()
    assert mean["pixel_auroc"] == pytest.approx(np.mean([result.categories[c].metrics["pixel_auroc"]
                                                         for c in ("gadget", "widget")]))


def test_scores_csv_overrides_the_map_max(tmp_path):
    data, truth = write_tree(tmp_path)
    dataset = load(data)
    samples = dataset.test("widget")
    inverted = [1.0 - s.label + 0.01 * i for i, s in enumerate(samples)]  # normal images score highest
    lines = ["image,score"] + [f"test/{s.defect_type}/{s.image_path.name},{v}" for s, v in zip(samples, inverted)]
    (tmp_path / "maps" / "widget" / "scores.csv").write_text("\n".join(lines) + "\n")
    result = evaluate_anomaly_maps(tmp_path / "maps", dataset, ["widget"], progress=False)
    got = result.categories["widget"]
    assert got.image_scores == inverted
    assert got.metrics["image_auroc"] == 0.0
    assert got.metrics["pixel_auroc"] == pytest.approx(expected(truth, dataset, "widget")["pixel_auroc"], abs=1e-12)


def test_step200_and_image_level_categories(tmp_path):
    data, truth = write_tree(tmp_path)
    dataset = load(data)
    step = evaluate_anomaly_maps(tmp_path / "maps", dataset, ["widget"], aupro="step200", progress=False)
    assert step.tags["pixel_aupro"] == "aupro.step200@0.3"
    # Without masks for its anomalous images, a category is scored at image level only.
    image_level = Dataset("toy", data, [Sample(s.image_path, s.category, s.label, None, s.defect_type, "toy")
                                        for s in dataset.samples])
    result = evaluate_anomaly_maps(tmp_path / "maps", image_level, ["widget"], progress=False)
    metrics = result.categories["widget"].metrics
    assert metrics["image_auroc"] == pytest.approx(expected(truth, dataset, "widget")["image_auroc"])
    assert math.isnan(metrics["pixel_auroc"]) and math.isnan(metrics["mad_all7"])
    # ... and with a scores.csv it needs no maps at all.
    samples = image_level.test("widget")
    lines = ["image,score"] + [f"{s.defect_type}/{s.image_path.stem},{s.label}" for s in samples]
    (tmp_path / "maps" / "widget" / "scores.csv").write_text("\n".join(lines))
    for tiff in (tmp_path / "maps" / "widget").rglob("*.tiff"):
        tiff.unlink()
    result = evaluate_anomaly_maps(tmp_path / "maps", image_level, ["widget"], progress=False)
    assert result.categories["widget"].metrics["image_auroc"] == 1.0


def test_bad_inputs_name_the_file(tmp_path):
    data, _ = write_tree(tmp_path)
    dataset = load(data)
    missing = tmp_path / "maps" / "widget" / "test" / "crack" / "001.tiff"
    missing.unlink()
    with pytest.raises(DataError, match="anomaly map not found: .*widget/test/crack/001.tiff"):
        evaluate_anomaly_maps(tmp_path / "maps", dataset, ["widget"], progress=False)
    tifffile.imwrite(missing, np.full((24, 40), np.nan, np.float32))
    with pytest.raises(DataError, match="001.tiff contains NaN"):
        evaluate_anomaly_maps(tmp_path / "maps", dataset, ["widget"], progress=False)
    tifffile.imwrite(missing, np.zeros((3, 24, 40), np.float32), photometric="minisblack")
    with pytest.raises(DataError, match=r"001.tiff has shape \(3, 24, 40\)"):
        evaluate_anomaly_maps(tmp_path / "maps", dataset, ["widget"], progress=False)
    tifffile.imwrite(missing, np.zeros((24, 40), np.float32))
    csv = tmp_path / "maps" / "widget" / "scores.csv"
    csv.write_text("image,score\ncrack/000,0.5\n")
    with pytest.raises(DataError, match="scores.csv has no score for 8 test image"):
        evaluate_anomaly_maps(tmp_path / "maps", dataset, ["widget"], progress=False)
    csv.write_text("name,value\n")
    with pytest.raises(DataError, match="columns 'image' and 'score'"):
        evaluate_anomaly_maps(tmp_path / "maps", dataset, ["widget"], progress=False)
    csv.write_text("image,score\nbent/000,0.5\n")
    with pytest.raises(DataError, match="'bent/000' is not a test image of category 'widget'"):
        evaluate_anomaly_maps(tmp_path / "maps", dataset, ["widget"], progress=False)
    with pytest.raises(DataError, match="no test images for \\['nope'\\]"):
        evaluate_anomaly_maps(tmp_path / "maps", dataset, ["nope"], progress=False)


def test_cli_writes_the_json_format(tmp_path, capsys):
    data, truth = write_tree(tmp_path)
    out = tmp_path / "out" / "metrics.json"
    assert main(["evaluate", "--anomaly-maps", str(tmp_path / "maps"), "--dataset", "mvtec", "--data-root", str(data),
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "widget" in printed and "gadget" in printed
    written = json.loads(out.read_text())
    names = {"image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro",
             "mad_image", "mad_pixel", "mad_all7"}
    assert set(written["categories"]) == {"gadget", "widget"}
    for category, metrics in written["categories"].items():
        assert set(metrics) == names
        want = expected(truth, load(data), category)
        assert metrics["pixel_auroc"] == pytest.approx(want["pixel_auroc"], abs=1e-12)
    assert set(written["mean"]) == names
    assert written["tags"]["pixel_aupro"] == "aupro.exact@0.3"
    assert main(["evaluate", "--anomaly-maps", str(tmp_path / "nowhere"), "--dataset", "mvtec", "--data-root",
                 str(data)]) == 2
    assert "anomaly-map folder not found" in capsys.readouterr().err
