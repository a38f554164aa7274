"""Bad input: each problem gives a clear error naming the file, category or option; nothing is silently dropped."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
from conftest import box_mask, noise_image, write_image
from test_datasets import make_mvtec

import zsadbench
from zsadbench.cli import main
from zsadbench.data import DataError, DatasetLayoutError, DataWarning, check_files
from zsadbench.evaluation import EvalOptions, evaluate
from zsadbench.metrics import MetricWarning


def test_wrong_root_names_expected_layout(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"(?s)not a mvtec root.*ground_truth/\{defect\}"):
        zsadbench.load_dataset("mvtec", tmp_path / "empty")
    with pytest.raises(DatasetLayoutError, match=r"(?s)does not exist.*train/good"):
        zsadbench.load_dataset("mvtec", tmp_path / "nowhere")
    with pytest.raises(DatasetLayoutError, match=r"split_csv/1cls.csv"):
        zsadbench.load_dataset("visa", tmp_path / "empty")


def test_cli_wrong_root_is_a_short_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], test_methods) -> None:
    status = main(["run", "--method", "test-colour", "--dataset", "mvtec", "--data-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 2
    assert "not a mvtec root" in err and "Traceback" not in err


def test_unreadable_image_names_file(tmp_path: Path, test_methods) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    broken = root / "bottle" / "test" / "good" / "001.png"
    broken.write_bytes(b"this is not a png")
    dataset = zsadbench.load_dataset("mvtec", root)
    detector = zsadbench.load_method("test-colour")
    with pytest.raises(DataError, match=r"cannot read image .*bottle/test/good/001\.png"):
        evaluate(detector, dataset, progress=False)


def test_missing_image_names_file(tmp_path: Path, test_methods) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    dataset = zsadbench.load_dataset("mvtec", root)
    (root / "grid" / "test" / "crack" / "000.png").unlink()  # vanishes after loading
    with pytest.raises(DataError, match=r"image not found: .*grid/test/crack/000\.png"):
        evaluate(zsadbench.load_method("test-colour"), dataset, ["grid"], progress=False)


def test_mask_size_mismatch_names_both_files(tmp_path: Path, test_methods) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    write_image(root / "bottle" / "ground_truth" / "broken" / "000_mask.png", box_mask(20, 24))
    dataset = zsadbench.load_dataset("mvtec", root)
    with pytest.raises(DataError, match=r"mask .*broken/000_mask\.png is 24x20 .* image .*broken/000\.png is 24x24"):
        evaluate(zsadbench.load_method("test-colour"), dataset, ["bottle"], progress=False)


def test_skip_bad_counts_and_records(tmp_path: Path, test_methods) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    (root / "bottle" / "test" / "good" / "001.png").write_bytes(b"garbage")
    dataset = zsadbench.load_dataset("mvtec", root)
    kept, bad = check_files(dataset.test("bottle"), skip_bad=True)
    assert len(kept) == len(dataset.test("bottle")) - 1 and len(bad) == 1
    result = evaluate(zsadbench.load_method("test-colour"), dataset, ["bottle"], EvalOptions(skip_bad=True),
                      progress=False)
    skipped = result.categories["bottle"].skipped
    assert len(skipped) == 1 and skipped[0][0].endswith("001.png") and "cannot read" in skipped[0][1]
    assert len(result.categories["bottle"].image_scores) == len(kept)


def test_empty_category_names_category(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    (root / "hollow" / "test" / "good").mkdir(parents=True)
    with pytest.warns(DataWarning, match="category 'hollow' of mvtec has no test images.*left out"):
        dataset = zsadbench.load_dataset("mvtec", root)
    assert dataset.categories() == ["bottle", "grid"]
    with pytest.raises(ValueError, match=r"no category \['hollow'\]"):
        dataset.subset(["hollow"])


def test_unknown_category_and_option_are_named(tmp_path: Path, capsys, test_methods) -> None:
    with pytest.raises(ValueError, match=r"no categor.*\['nope'\]"):
        zsadbench.load_dataset("mvtec", make_mvtec(tmp_path / "mvtec")).subset(["nope"])
    status = main(["run", "--method", "test-colour", "--dataset", "synthetic", "--set", "smothing=3"])
    assert status == 2 and "no option 'smothing'" in capsys.readouterr().err


def test_category_without_anomalies_gives_nan_and_warning(tmp_path: Path, test_methods) -> None:
    root = tmp_path / "mvtec"
    for i in range(3):
        write_image(root / "plain" / "test" / "good" / f"{i:03d}.png", noise_image(16, 16, i))
    make_mvtec(root)
    dataset = zsadbench.load_dataset("mvtec", root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate(zsadbench.load_method("test-colour"), dataset, progress=False)
    plain = result.categories["plain"].metrics
    assert all(math.isnan(plain[m]) for m in ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro", "mad_all7"))
    assert any(issubclass(w.category, MetricWarning) for w in caught)
    with pytest.warns(MetricWarning, match=r"image metrics: mean over 2 of 3 categories \(undefined for: plain\)"):
        mean = result.mean()
    assert not math.isnan(mean["image_auroc"])  # the mean is over the categories where the metric is defined
