"""The feature cache of frozen stages (zsadbench.feature_cache): exact results, keys that never go stale, corrupt
entries recomputed, concurrent writers, the size bound, and its use by `zsadbench train` / `run` / `cache`."""

from __future__ import annotations

import multiprocessing
import os
import time
import warnings
from pathlib import Path

import mlflow
import pytest
import torch
from zsadbench.methods.anomalyclip import AnomalyCLIP
from zsadbench.methods.aprilgan import AprilGAN

from zsadbench.cli import main
from zsadbench.feature_cache import FeatureCache, has_frozen_stages, parse_size, use_feature_cache
from zsadbench.registry import get_dataset
from zsadbench.training import training_samples

pytestmark = pytest.mark.filterwarnings("ignore:anomalyclip. no checkpoint", "ignore:aprilgan. no checkpoint")

TINY = {"model": "tiny-ViT-L-14-336-quickgelu", "pretrained": "random", "image_size": 56}


def anomalyclip(cache: FeatureCache | None = None, **overrides: object) -> AnomalyCLIP:
    detector = AnomalyCLIP(**{**TINY, **overrides})
    use_feature_cache(detector, cache)
    return detector


def images(count: int = 6, size: int = 56, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def entry_files(cache: FeatureCache) -> list[Path]:
    return sorted(entry.path for entry in cache.entries())


# ------------------------------------------------------------------------------------------------- exact results

def test_maps_and_scores_are_bit_identical_with_and_without_the_cache(tmp_path: Path) -> None:
    batch = images(6)
    plain = anomalyclip().predict(batch, "object")
    cache = FeatureCache(tmp_path / "cache")
    cached = anomalyclip(cache)
    first = cached.predict(batch, "object")  # every image computed and stored
    assert cache.stats.misses == 6 and cache.stats.hits == 0 and len(entry_files(cache)) == 6
    second = cached.predict(batch, "object")  # every image read back
    assert cache.stats.hits == 6
    order = [4, 0, 5]
    mixed_batch = torch.cat([batch[order], images(2, seed=1)])  # hits in another order and batch, plus misses
    mixed = cached.predict(mixed_batch, "object")
    assert cache.stats.hits == 9 and cache.stats.misses == 8
    for prediction in (first, second):
        assert torch.equal(prediction.image_scores, plain.image_scores)
        assert torch.equal(prediction.anomaly_maps, plain.anomaly_maps)
    plain_mixed = anomalyclip().predict(mixed_batch, "object")
    assert torch.equal(mixed.image_scores, plain_mixed.image_scores)
    assert torch.equal(mixed.anomaly_maps, plain_mixed.anomaly_maps)
    assert torch.equal(mixed.image_scores[:3], plain.image_scores[order])


def test_a_training_ends_with_bit_identical_parameters_with_and_without_the_cache(synthetic_root: Path,
                                                                                   tmp_path: Path) -> None:
    dataset = get_dataset("synthetic").load(str(synthetic_root)).subset(["carpet", "tile"])
    count = len(training_samples(dataset))
    plain = anomalyclip()
    plain.fit(dataset, epochs=3, batch_size=5, progress=False)
    cache = FeatureCache(tmp_path / "cache")
    cached = anomalyclip(cache)
    cached.fit(dataset, epochs=3, batch_size=5, progress=False)
    assert cache.stats.misses == count and cache.stats.hits == 2 * count  # the frozen tower ran in epoch 1 only
    plain_state, cached_state = plain.state_dict(), cached.state_dict()
    assert plain_state.keys() == cached_state.keys()
    for key, value in plain_state.items():
        assert torch.equal(value, cached_state[key]), key
    untrained = anomalyclip().state_dict()
    assert any(not torch.equal(value, untrained[key]) for key, value in plain_state.items())  # it did learn


def test_aprilgan_tokens_are_cached_exactly(tmp_path: Path) -> None:
    batch = images(3, size=56)
    options = {"model": "tiny-ViT-L-14-336", "pretrained": "random", "image_size": 56}
    plain = AprilGAN(**options).predict(batch, "object")
    cache = FeatureCache(tmp_path / "cache")
    detector = AprilGAN(**options)
    assert use_feature_cache(detector, cache)
    for _ in range(2):
        prediction = detector.predict(batch, "object")
        assert torch.equal(prediction.image_scores, plain.image_scores)
        assert torch.equal(prediction.anomaly_maps, plain.anomaly_maps)
    assert cache.stats.hits == 3 and cache.stats.misses == 3


# ------------------------------------------------------------------------------------------------------------ keys

def test_every_key_component_changed_is_a_miss(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache")
    batch = images(2)
    anomalyclip(cache).frozen_image_features(batch)
    assert (cache.stats.hits, cache.stats.misses) == (0, 2)

    def misses_of(detector: AnomalyCLIP, inputs: torch.Tensor) -> tuple[int, int]:
        hits, misses = cache.stats.hits, cache.stats.misses
        use_feature_cache(detector, cache)
        detector.frozen_image_features(inputs)
        return cache.stats.hits - hits, cache.stats.misses - misses

    assert misses_of(anomalyclip(), batch) == (2, 0)  # the same everything: hits (the test's control)
    assert misses_of(AnomalyCLIP(**TINY, seed=1), batch) == (0, 2)  # other (random) weights
    changed = batch.clone()
    changed[1, 0, 0, 0] += 1e-3  # one pixel of the second image
    assert misses_of(anomalyclip(), changed) == (1, 1)
    assert misses_of(anomalyclip(image_size=42), images(2, size=42)) == (0, 2)  # other input size
    assert misses_of(anomalyclip(feature_layers=(12, 24)), batch) == (0, 2)  # other layers tapped
    assert misses_of(anomalyclip(vv_start_layer=4), batch) == (0, 2)  # other attention path
    assert misses_of(anomalyclip(activation="gelu"), batch) == (0, 2)  # other activation


def test_a_changed_weights_file_is_a_miss(tmp_path: Path) -> None:
    weights = tmp_path / "weights.pt"
    torch.save(anomalyclip().clip.state_dict(), weights)
    cache = FeatureCache(tmp_path / "cache")
    batch = images(2)
    anomalyclip(cache, pretrained=str(weights)).frozen_image_features(batch)
    anomalyclip(cache, pretrained=str(weights)).frozen_image_features(batch)
    assert (cache.stats.hits, cache.stats.misses) == (2, 2)
    state = anomalyclip().clip.state_dict()
    state["visual.proj"] = state["visual.proj"] * 1.5
    time.sleep(0.01)
    torch.save(state, weights)
    anomalyclip(cache, pretrained=str(weights)).frozen_image_features(batch)
    assert (cache.stats.hits, cache.stats.misses) == (2, 4)


# ------------------------------------------------------------------------------------------------ corrupt entries

@pytest.mark.parametrize("damage", ["flip a data byte", "truncate", "empty", "garble the header"])
def test_a_corrupt_entry_is_detected_discarded_and_recomputed_with_a_warning(tmp_path: Path, damage: str) -> None:
    cache = FeatureCache(tmp_path / "cache")
    detector = anomalyclip(cache)
    batch = images(2)
    expected = detector.predict(batch, "object")
    victim = entry_files(cache)[0]
    data = bytearray(victim.read_bytes())
    if damage == "flip a data byte":
        data[-5] ^= 0x40
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = bytearray()
    else:
        data[12:20] = b"garbage!"
    victim.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="feature cache: corrupt entry .* deleted, recomputing"):
        again = detector.predict(batch, "object")
    assert cache.stats.corrupt == 1 and (cache.stats.hits, cache.stats.misses) == (1, 3)
    assert torch.equal(again.image_scores, expected.image_scores)
    assert torch.equal(again.anomaly_maps, expected.anomaly_maps)
    assert victim.is_file() and victim.read_bytes() != bytes(data)  # written anew
    detector.predict(batch, "object")
    assert cache.stats.corrupt == 1 and cache.stats.hits == 3  # and read back cleanly


# ---------------------------------------------------------------------------------------------------- concurrency

def _doubled(batch: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return batch.sum(dim=(1, 2, 3)), [batch * 2, batch[:, :1] - 1]


STAGE, DESCRIPTION = "test.concurrent", '{"what": "concurrency test"}'


def _entry(n: int) -> dict[str, torch.Tensor]:
    """Returns the tensors of entry ``n`` (what every writer writes under its key)."""
    return {"0": torch.full((64, 256), float(n)), "1": torch.arange(n + 1, dtype=torch.float64)}


def _hammer(root: str, worker: int, rounds: int) -> None:
    """Writes the same 16 entries over and over while reading them back; exits 3 if a read saw a broken entry."""
    cache = FeatureCache(root)
    generator = torch.Generator().manual_seed(worker)
    bad = 0
    for _ in range(rounds):
        for n in torch.randperm(16, generator=generator).tolist():
            cache.write(STAGE, f"key{n:02d}", _entry(n), DESCRIPTION, {"structure": '{"tuple": ["tensor", "tensor"]}'})
            other = int(torch.randint(16, (1,), generator=generator))
            found = cache.read(STAGE, f"key{other:02d}", DESCRIPTION)
            if found is not None and any(not torch.equal(found.tensors[k], v) for k, v in _entry(other).items()):
                bad += 1
    raise SystemExit(3 if bad or cache.stats.corrupt else 0)


def test_two_processes_writing_and_reading_at_once_do_not_corrupt_the_cache(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    # fork: the workers start at once (spawn re-imports torch); they only run small tensor operations
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_hammer, args=(str(root), n, 15)) for n in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0  # 3: a reader saw a half-written entry
    assert not list(root.glob("*/*/.*.tmp"))  # every temporary file was renamed or removed
    cache = FeatureCache(root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no corrupt entry
        for n in range(16):
            found = cache.read(STAGE, f"key{n:02d}", DESCRIPTION)
            assert found is not None and all(torch.equal(found.tensors[k], v) for k, v in _entry(n).items())


# ------------------------------------------------------------------------------------------------------- eviction

def test_eviction_keeps_the_size_within_the_bound_and_drops_the_least_recently_used(tmp_path: Path) -> None:
    probe = FeatureCache(tmp_path / "probe")
    probe.run_stage("test.doubled", {}, images(1, size=8), _doubled)
    entry_size = next(probe.entries()).size
    cache = FeatureCache(tmp_path / "cache", max_bytes=5 * entry_size)
    batch = images(8, size=8, seed=3)
    for i in range(4):  # 4 entries, each older than the next
        cache.run_stage("test.doubled", {}, batch[i:i + 1], _doubled)
        path = entry_files(cache)
        for n, file in enumerate(sorted(path, key=lambda p: p.stat().st_mtime)):
            os.utime(file, (1_000_000 + n, 1_000_000 + n))
    cache.run_stage("test.doubled", {}, batch[0:1], _doubled)  # a hit: image 0 becomes the most recently used
    assert cache.stats.hits == 1
    cache.run_stage("test.doubled", {}, batch[4:7], _doubled)  # 3 more: 7 entries > 5, the 2 oldest must go
    cache.evict()
    sizes = [e.size for e in cache.entries()]
    assert sum(sizes) <= cache.max_bytes and len(sizes) == 5
    hits = cache.stats.hits
    cache.run_stage("test.doubled", {}, batch[0:1], _doubled)  # kept: it was used recently
    assert cache.stats.hits == hits + 1
    misses = cache.stats.misses
    cache.run_stage("test.doubled", {}, batch[1:3], _doubled)  # images 1 and 2 were the least recently used
    assert cache.stats.misses == misses + 2


def test_sizes_parse_with_binary_units() -> None:
    assert parse_size("20G") == 20 * 2**30 and parse_size("500MiB") == 500 * 2**20
    assert parse_size("1.5k") == 1536 and parse_size("1024") == 1024
    with pytest.raises(ValueError, match="expected a number with an optional unit"):
        parse_size("lots")


# ------------------------------------------------------------------------------------------------- jobs and CLI

TINY_CLI = ["--set", "model=tiny-ViT-L-14-336-quickgelu", "--pretrained", "random", "--set", "image_size=56"]
DATA = ["--dataset", "synthetic", "--dataset-option", "image_size=48", "--dataset-option", "n_train=1",
        "--dataset-option", "n_test_normal=2", "--dataset-option", "n_test_anomalous=2", "--categories", "carpet"]


def test_training_uses_the_cache_by_default_and_run_when_asked(isolated_results: Path, mlflow_store: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--method", "anomalyclip", *DATA, *TINY_CLI, "--epochs", "2", "--batch-size", "2"]) == 0
    mlflow.set_tracking_uri(f"sqlite:///{mlflow_store}")
    runs = mlflow.search_runs(experiment_names=["zsadbench"])
    row = runs.iloc[0]
    assert row["params.feature_cache"] == "on"
    assert row["params.feature_cache.root"] == str(isolated_results / "cache" / "features")
    assert row["metrics.feature_cache/misses"] == 4 and row["metrics.feature_cache/hits"] == 4
    checkpoint = isolated_results / "training" / row.run_id / "epoch_2.pth"

    run = ["run", "--method", "anomalyclip", "--checkpoint", str(checkpoint), *DATA, *TINY_CLI]
    assert main(run) == 0  # evaluation: off by default
    assert main([*run, "--feature-cache"]) == 0
    runs = mlflow.search_runs(experiment_names=["zsadbench"], filter_string="tags.`zsadbench.kind` = 'evaluation'",
                              order_by=["start_time ASC"])
    assert list(runs["params.feature_cache"]) == ["off", "on"]
    assert runs.iloc[1]["metrics.feature_cache/hits"] == 4  # the training's entries: same images, same backbone
    assert runs.iloc[0]["metrics.image_auroc"] == runs.iloc[1]["metrics.image_auroc"]

    capsys.readouterr()
    assert main(["cache", "info"]) == 0
    shown = capsys.readouterr().out
    assert "anomalyclip.dual_path" in shown and str(isolated_results / "cache" / "features") in shown
    assert "bound 20.0 GiB" in shown and " 4 " in shown.splitlines()[-1] + " "
    assert main(["cache", "clear"]) == 0
    assert "removed 4 entries" in capsys.readouterr().out
    assert not list(FeatureCache().entries())

    assert main(["train", "--method", "anomalyclip", *DATA, *TINY_CLI, "--epochs", "1", "--no-feature-cache"]) == 0
    assert not list(FeatureCache().entries())


def test_the_cache_folder_follows_the_option_and_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ZSADBENCH_FEATURE_CACHE", str(tmp_path / "from-env"))
    monkeypatch.setenv("ZSADBENCH_FEATURE_CACHE_SIZE", "1G")
    assert FeatureCache().root == tmp_path / "from-env" and FeatureCache().max_bytes == 2**30
    assert main(["cache", "info", "--dir", str(tmp_path / "option")]) == 0
    assert str(tmp_path / "option") in capsys.readouterr().out
    monkeypatch.setenv("ZSADBENCH_FEATURE_CACHE_SIZE", "huge")
    with pytest.raises(ValueError, match="ZSADBENCH_FEATURE_CACHE_SIZE"):
        FeatureCache()


def test_which_methods_declare_a_frozen_stage() -> None:
    from zsadbench.methods.adaptclip import AdaptCLIP
    from zsadbench.methods.headclip import HeadCLIP
    from zsadbench.methods.winclip import WinClip

    assert has_frozen_stages(AnomalyCLIP) and has_frozen_stages(AdaptCLIP) and has_frozen_stages(AprilGAN)
    assert has_frozen_stages(WinClip) and not has_frozen_stages(HeadCLIP)


def test_winclip_windows_are_cached_exactly_for_zero_and_few_shot(tmp_path: Path) -> None:
    from zsadbench.methods.winclip import WinClip

    options = {"model": "tiny-ViT-B-16-plus-240", "pretrained": "random", "image_size": 80}
    batch, shots = images(4, size=80, seed=3), images(2, size=80, seed=4)
    plain_zero = WinClip(**options)
    plain = plain_zero.predict(batch, "object")
    plain_few = WinClip(**options, shots=2)
    plain_few.set_reference(shots, "object")
    expected_few = plain_few.predict(batch[[2, 0]], "object")
    cache = FeatureCache(tmp_path / "cache")
    zero = WinClip(**options)
    assert use_feature_cache(zero, cache)
    first = zero.predict(batch, "object")
    assert (cache.stats.hits, cache.stats.misses) == (0, 4)
    few = WinClip(**options, shots=2)  # the few-shot run reads the test images the zero-shot run stored
    use_feature_cache(few, cache)
    few.set_reference(shots, "object")
    again = few.predict(batch[[2, 0]], "object")  # another batch of the same images
    assert (cache.stats.hits, cache.stats.misses) == (2, 6)
    assert torch.equal(first.image_scores, plain.image_scores) and torch.equal(first.anomaly_maps, plain.anomaly_maps)
    for i in range(4):  # a stored image read alone equals the image computed alone
        alone = zero.predict(batch[[i]], "object")
        assert torch.equal(alone.image_scores, plain_zero.predict(batch[[i]], "object").image_scores), i
    assert torch.equal(again.image_scores, expected_few.image_scores)
    assert torch.equal(again.anomaly_maps, expected_few.anomaly_maps)
    assert not torch.equal(again.anomaly_maps, plain.anomaly_maps[[2, 0]])  # the few-shot branch did contribute


@pytest.mark.parametrize("model", ["tiny-ViT-L-14-336", "tiny-dinov2_vitl14"])
def test_musc_patch_tokens_are_cached_exactly_and_reused_by_other_settings(tmp_path: Path, model: str) -> None:
    from zsadbench.methods.musc import MuSc

    from zsadbench.detector import ImageSet

    options = {"model": model, "pretrained": "random", "image_size": 56, "rscin": False}
    batch = images(5, seed=2)
    plain = MuSc(**options).predict_set(ImageSet.from_tensor(batch, batch_size=2), "object")
    cache = FeatureCache(tmp_path / "cache")
    detector = MuSc(**options)
    assert use_feature_cache(detector, cache)
    first = detector.predict_set(ImageSet.from_tensor(batch, batch_size=2), "object")
    assert torch.equal(first.image_scores, plain.image_scores) and torch.equal(first.anomaly_maps, plain.anomaly_maps)
    other = MuSc(**{**options, "r_list": (1, 3)})  # other scoring settings, the same frozen tokens
    use_feature_cache(other, cache)
    second = other.predict_set(ImageSet.from_tensor(batch, batch_size=5), "object")
    assert (cache.stats.hits, cache.stats.misses) == (5, 5)
    expected = MuSc(**{**options, "r_list": (1, 3)}).predict_set(ImageSet.from_tensor(batch, batch_size=5), "object")
    assert torch.equal(second.anomaly_maps, expected.anomaly_maps)
