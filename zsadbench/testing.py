"""Conformance suite for method plugins: what every detector must do to run under zsadbench's evaluator.

A plugin's own tests call it in one line::

    import zsadbench.testing

    def test_conformance():
        zsadbench.testing.check_method("mymethod")          # raises ConformanceError listing every failed check

or subclass the pytest helper, which gives one test per check::

    class TestMyMethod(zsadbench.testing.MethodConformance):
        method = "mymethod"

The method is built through the registry (:func:`zsadbench.load_method`) with a tiny configuration: ``overrides``
when given, else its first ``regression_variants`` entry (the tiny seeded backbone its goldens use). The checks:

- ``interface``: the config is a dataclass whose every field has a default; ``input_size`` is two positive ints;
  ``transform`` gives a finite float (3, H, W) tensor at that size; ``predict`` (``predict_set`` for transductive
  methods, after ``set_reference`` for few-shot ones) gives (B,) scores and (B, H, W) maps, floating and finite;
- ``determinism``: two detectors built with the same seed give identical outputs on the same images;
- ``batch_size``: an inductive method scores each image the same alone as in a batch;
- ``device``: ``.to("cpu")`` returns the detector and keeps its outputs; with CUDA, ``.to("cuda")`` runs there;
- ``checkpoint``: a trainable method's ``state_dict`` (after changing its learnable parameters) saved to bytes,
  loaded into a fresh detector, gives identical outputs; an unexpected key is an error naming it;
- ``bad_input``: a batch of the wrong shape raises; a NaN image raises or comes back non-finite (never as a clean
  number); an unknown config key raises an error naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from zsadbench.detector import Detector, FewShot, ImageSet, Trainable
from zsadbench.types import Prediction

CHECKS = ("interface", "determinism", "batch_size", "device", "checkpoint", "bad_input")
BATCH = 8  # images per test batch, every other one with a bright square (MuSc scores sets of >= 5)
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}  # batch-size and device comparisons (kernels may differ with batch shape)


class ConformanceError(AssertionError):
    """One or more conformance checks failed; the message lists each."""


@dataclass
class ConformanceReport:
    """What :func:`check_method` ran: the checks passed, skipped (with why) and failed (with why)."""

    method: str
    passed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"conformance of {self.method!r}: {len(self.passed)} passed, {len(self.failed)} failed, "
                 f"{len(self.skipped)} skipped"]
        lines += [f"  FAILED  {name}: {why}" for name, why in self.failed.items()]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


class _Skip(Exception):
    """A check that does not apply to this method (the reason is the message)."""


def test_images(count: int = BATCH, size: int = 64, seed: int = 0) -> list[Image.Image]:
    """Returns ``count`` deterministic RGB test images: textured noise, every other one with a bright square."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        array = (96 + 48 * rng.standard_normal((size, size, 3))).clip(0, 255).astype(np.uint8)
        if i % 2:
            array[size // 4: size // 2, size // 3: size // 3 + size // 4] = (250, 240, 30)
        images.append(Image.fromarray(array))
    return images


class _Subject:
    """The method under test: how to build it and how to score a batch with it."""

    def __init__(self, method: str | type[Detector], overrides: dict[str, Any] | None, seed: int) -> None:
        from zsadbench.registry import get_method

        self.cls = get_method(method) if isinstance(method, str) else method
        self.name = method if isinstance(method, str) else (method.name or method.__name__)
        variants = getattr(self.cls, "regression_variants", None) or {}
        self.overrides = dict(overrides if overrides is not None else next(iter(variants.values()), {}))
        self.seed = seed

    def build(self, seed: int | None = None, **extra: Any) -> Detector:
        """Returns a detector built through the registry (or the class, when no name is registered)."""
        import zsadbench
        from zsadbench.registry import list_methods

        seed = self.seed if seed is None else seed
        config = {**self.overrides, **extra}
        if list_methods().get(self.name) is self.cls:
            return zsadbench.load_method(self.name, seed=seed, **config)
        return self.cls(seed=seed, **config)

    def batch(self, detector: Detector) -> Tensor:
        """Returns the preprocessed test batch."""
        return torch.stack([detector.transform(image) for image in test_images()])

    def predict(self, detector: Detector, images: Tensor, category: str = "conformance") -> Prediction:
        """Returns the detector's prediction of a preprocessed batch, the way the evaluator calls it."""
        if isinstance(detector, FewShot) and detector.shots > 0:
            plain = self.batch(detector)[:1]  # the first (plain) test image is the normal reference, for every batch
            reference = plain.expand(detector.shots, *plain.shape[1:])
            detector.set_reference(reference.to(detector.device), category)
        with torch.no_grad():
            if detector.transductive:
                prediction = detector.predict_set(  # type: ignore[attr-defined]
                    ImageSet.from_tensor(images.to(detector.device), batch_size=len(images)), category)
            else:
                prediction = detector.predict(images.to(detector.device), category)
        scores, maps = prediction
        return Prediction(torch.as_tensor(scores).detach().cpu(), torch.as_tensor(maps).detach().cpu())


def _close(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), **TOLERANCE, equal_nan=True)


def _describe(a: Tensor, b: Tensor) -> str:
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    return f"max abs difference {(a.double() - b.double()).abs().max().item():.3g}"


def check_interface(subject: _Subject) -> None:
    """Config dataclass with defaults, input size, transform output and prediction shapes, dtypes, finiteness."""
    cls = subject.cls
    config = getattr(cls, "Config", None)
    assert dataclasses.is_dataclass(config) and isinstance(config, type), \
        f"{cls.__qualname__}.Config must be a dataclass type, got {config!r}"
    missing = [f.name for f in dataclasses.fields(config)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    assert not missing, f"{config.__name__} fields without a default: {missing} (defaults = the reference's settings)"
    config()
    detector = subject.build()
    assert isinstance(detector, Detector), f"{cls.__qualname__} is not a zsadbench.Detector"
    assert isinstance(detector.config, config), f"detector.config is {type(detector.config).__name__}, not {config}"
    size = detector.input_size
    assert (isinstance(size, tuple) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)), \
        f"input_size must be (height, width) of positive ints, got {size!r}"
    image = detector.transform(test_images(1)[0])
    assert isinstance(image, Tensor) and image.is_floating_point(), \
        f"transform must return a float tensor, got {type(image).__name__} {getattr(image, 'dtype', '')}"
    assert tuple(image.shape) == (3, *size), f"transform gave shape {tuple(image.shape)}, expected (3, {size[0]}, " \
                                             f"{size[1]}) (input_size)"
    assert torch.isfinite(image).all(), "transform gave non-finite values"
    images = subject.batch(detector)
    scores, maps = subject.predict(detector, images)
    assert tuple(scores.shape) == (BATCH,), f"image scores have shape {tuple(scores.shape)}, expected ({BATCH},)"
    assert tuple(maps.shape) == (BATCH, *size), \
        f"anomaly maps have shape {tuple(maps.shape)}, expected ({BATCH}, {size[0]}, {size[1]}) (input_size)"
    assert scores.is_floating_point() and maps.is_floating_point(), \
        f"scores and maps must be floating point, got {scores.dtype} and {maps.dtype}"
    assert torch.isfinite(scores).all() and torch.isfinite(maps).all(), "scores or maps hold NaN or inf"


def check_determinism(subject: _Subject) -> None:
    """Two detectors built with the same seed give identical outputs on the same images."""
    first, second = subject.build(), subject.build()
    images = subject.batch(first)
    a, b = subject.predict(first, images), subject.predict(second, images)
    assert torch.equal(a.image_scores, b.image_scores), \
        f"same seed, different image scores ({_describe(a.image_scores, b.image_scores)})"
    assert torch.equal(a.anomaly_maps, b.anomaly_maps), \
        f"same seed, different maps ({_describe(a.anomaly_maps, b.anomaly_maps)})"
    again = subject.predict(first, images)
    assert torch.equal(a.image_scores, again.image_scores) and torch.equal(a.anomaly_maps, again.anomaly_maps), \
        "the same detector gives different outputs on a second call (state left over from the first?)"


def check_batch_size(subject: _Subject) -> None:
    """An inductive method scores each image the same alone as in a batch."""
    detector = subject.build()
    if detector.transductive:
        raise _Skip("transductive: an image's score depends on its set by design")
    images = subject.batch(detector)
    together = subject.predict(detector, images)
    alone = [subject.predict(detector, images[i:i + 1]) for i in range(len(images))]
    scores = torch.cat([p.image_scores for p in alone])
    maps = torch.cat([p.anomaly_maps for p in alone])
    assert _close(together.image_scores, scores), \
        f"image scores depend on the batch ({_describe(together.image_scores, scores)})"
    assert _close(together.anomaly_maps, maps), f"maps depend on the batch ({_describe(together.anomaly_maps, maps)})"


def check_device(subject: _Subject) -> None:
    """``.to("cpu")`` returns the detector and keeps its outputs; with CUDA, it runs there too."""
    detector = subject.build()
    images = subject.batch(detector)
    before = subject.predict(detector, images)
    moved = detector.to("cpu")
    assert moved is detector, f".to('cpu') must return the detector itself, got {type(moved).__name__}"
    assert detector.device == torch.device("cpu"), f"after .to('cpu'), detector.device is {detector.device}"
    after = subject.predict(detector, images)
    assert torch.equal(before.image_scores, after.image_scores) and torch.equal(before.anomaly_maps,
                                                                                after.anomaly_maps), \
        ".to('cpu') on a CPU detector changed its outputs"
    if torch.cuda.is_available():
        assert detector.to("cuda") is detector and detector.device.type == "cuda", ".to('cuda') did not move it"
        on_gpu = subject.predict(detector, images)
        assert torch.isfinite(on_gpu.image_scores).all() and tuple(on_gpu.anomaly_maps.shape) == \
            tuple(before.anomaly_maps.shape), "on CUDA: non-finite scores or maps of another shape"
        detector.to("cpu")
        back = subject.predict(detector, images)
        assert _close(before.image_scores, back.image_scores), \
            f"cpu -> cuda -> cpu changed the image scores ({_describe(before.image_scores, back.image_scores)})"


def check_checkpoint(subject: _Subject) -> None:
    """state_dict -> bytes -> load_state_dict into a fresh detector -> identical outputs; unexpected keys named."""
    detector = subject.build()
    if not isinstance(detector, Trainable):
        raise _Skip("not Trainable: nothing to checkpoint")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move the learnable state away from its initialisation, so a no-op load is caught
        for parameter in detector.trainable_parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator).to(parameter))
    buffer = io.BytesIO()
    torch.save(detector.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)
    fresh = subject.build()
    fresh.load_state_dict(copy.deepcopy(state))  # type: ignore[attr-defined]
    images = subject.batch(detector)
    a, b = subject.predict(detector, images), subject.predict(fresh, images)
    assert torch.equal(a.image_scores, b.image_scores) and torch.equal(a.anomaly_maps, b.anomaly_maps), \
        f"outputs differ after a checkpoint round trip ({_describe(a.anomaly_maps, b.anomaly_maps)})"
    unexpected = {**state, "not_a_real_key": torch.zeros(1)}
    try:
        subject.build().load_state_dict(unexpected)  # type: ignore[attr-defined]
    except Exception as exc:
        assert "not_a_real_key" in str(exc), f"an unexpected checkpoint key raised an error not naming it: {exc}"
    else:
        raise AssertionError("load_state_dict accepted an unexpected key 'not_a_real_key' silently")


def _raises(call: Callable[[], Any]) -> BaseException | None:
    try:
        call()
    except Exception as exc:
        return exc
    return None


def check_bad_input(subject: _Subject) -> None:
    """Wrong batch shapes raise, a NaN image never comes back as a clean number, unknown config keys are named."""
    detector = subject.build()
    images = subject.batch(detector)
    height, width = detector.input_size
    for what, bad in (("one channel", images[:, :1]), ("an unbatched image", images[0]),
                      ("half the input size", images[:, :, : height // 2, : width // 2])):
        outcome = _raises(functools.partial(subject.predict, subject.build(), bad))
        assert outcome is not None, f"predict accepted {what} (shape {tuple(bad.shape)}) silently; expected an " \
                                    f"error naming the expected shape (3, {height}, {width})"
    poisoned = images.clone()
    poisoned[1, :, 0, 0] = float("nan")
    try:
        scores, maps = subject.predict(subject.build(), poisoned)
    except Exception:
        pass  # an error is the best answer
    else:
        assert not (torch.isfinite(scores[1]) and torch.isfinite(maps[1]).all()), \
            "a NaN pixel came back as a finite score and map: corrupt input must raise or propagate NaN"
    outcome = _raises(lambda: subject.build(no_such_option=1))
    assert outcome is not None, "an unknown config key 'no_such_option' was accepted silently"
    assert "no_such_option" in str(outcome), f"the error for an unknown config key does not name it: {outcome}"


_FUNCTIONS: dict[str, Callable[[_Subject], None]] = {
    "interface": check_interface, "determinism": check_determinism, "batch_size": check_batch_size,
    "device": check_device, "checkpoint": check_checkpoint, "bad_input": check_bad_input}


def run_checks(method: str | type[Detector], overrides: dict[str, Any] | None = None, *, seed: int = 0,
               checks: Sequence[str] = CHECKS) -> ConformanceReport:
    """Returns the report of running the given conformance checks on a method (a registry name or a class)."""
    unknown = [c for c in checks if c not in _FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown conformance checks {unknown}; known: {', '.join(CHECKS)}")
    subject = _Subject(method, overrides, seed)
    report = ConformanceReport(subject.name)
    for name in checks:
        try:
            _FUNCTIONS[name](subject)
        except _Skip as skip:
            report.skipped[name] = str(skip)
        except Exception as exc:  # an assertion or any crash of the method counts as that check failing
            report.failed[name] = f"{type(exc).__name__}: {exc}" if not isinstance(exc, AssertionError) else str(exc)
        else:
            report.passed.append(name)
    return report


def check_method(method: str | type[Detector], overrides: dict[str, Any] | None = None, *, seed: int = 0,
                 checks: Sequence[str] = CHECKS) -> ConformanceReport:
    """Runs the conformance suite on a method; raises :class:`ConformanceError` listing every failed check."""
    report = run_checks(method, overrides, seed=seed, checks=checks)
    if report.failed:
        raise ConformanceError(str(report))
    return report


class MethodConformance:
    """pytest helper: subclass it (name starting with ``Test``) and set ``method``; one test per check."""

    method: ClassVar[str | type[Detector]] = ""
    overrides: ClassVar[dict[str, Any] | None] = None  # None: the method's first regression variant
    seed: ClassVar[int] = 0

    def _check(self, name: str) -> None:
        import pytest

        if not self.method:
            pytest.skip("set `method` on the subclass")
        report = run_checks(self.method, self.overrides, seed=self.seed, checks=[name])
        if name in report.skipped:
            pytest.skip(report.skipped[name])
        if report.failed:
            raise ConformanceError(str(report))

    def test_interface(self) -> None:
        """Config, input size, transform and prediction shapes."""
        self._check("interface")

    def test_determinism(self) -> None:
        """Same seed, same outputs."""
        self._check("determinism")

    def test_batch_size(self) -> None:
        """Inductive methods: batch-size invariance."""
        self._check("batch_size")

    def test_device(self) -> None:
        """Device moves."""
        self._check("device")

    def test_checkpoint(self) -> None:
        """Trainable methods: checkpoint round trip."""
        self._check("checkpoint")

    def test_bad_input(self) -> None:
        """Bad input raises clear errors."""
        self._check("bad_input")
