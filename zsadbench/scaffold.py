"""``zsadbench new-method NAME``: writes a method plugin package that works from the first minute.

The package (``zsadbench-<name>/``) holds a pyproject with the ``zsadbench.methods`` entry point, a detector module
with a typed config and a simple but real method (patch colour statistics: each patch's distance to the image's median
patch), tests that run the conformance suite (:mod:`zsadbench.testing`) and the regression check, and the method's
goldens, created by running the check on the freshly written code. Replace the method, keep the tests, re-create the
goldens when the numbers change on purpose.
"""

from __future__ import annotations

import importlib.util
import keyword
import re
import sys
from pathlib import Path
from typing import Any

NAME = re.compile(r"^[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*$")

PYPROJECT = '''[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{distribution}"
version = "0.1.0"
description = "{label}: a zsadbench method plugin"
requires-python = ">=3.11"
dependencies = ["zsadbench"]

[project.optional-dependencies]
test = ["pytest>=8"]

# how zsadbench finds the method: `zsadbench methods` lists it, `zsadbench run --method {name}` runs it
[project.entry-points."zsadbench.methods"]
{name} = "{package}.detector:{cls}"

[tool.setuptools]
packages = ["{package}"]

[tool.setuptools.package-data]
# the regression goldens ship with the package, so `zsadbench check` finds them wherever it runs
{package} = ["goldens/*.json"]

[tool.pytest.ini_options]
testpaths = ["tests"]
'''

INIT = '''"""{label}: a zsadbench method plugin (registered through the ``zsadbench.methods`` entry point)."""

from {package}.detector import {cls}, {cls}Config

__all__ = ["{cls}", "{cls}Config"]
'''

DETECTOR = '''"""{label}: patch colour statistics, a simple but real zero-shot baseline (replace it with your method).

Each image is cut into patches; a patch's anomaly score is the distance of its mean colour to the image's median patch
colour (the image is its own reference, so no training and no normal images are needed), smoothed and upsampled to
the input size. The image score is the map's maximum.

Open this file with the paper (title, arXiv link), the reference implementation (owner/repo @ commit), a summary, and
the deliberate deviations from the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from zsadbench import Detector, Prediction


@dataclass
class {cls}Config:
    """{label}'s settings (defaults = the reference's)."""

    image_size: int = 224  # input size; the anomaly maps come back at this size
    patch_size: int = 8  # side of the square patches whose mean colours are compared
    smoothing: int = 3  # box filter (odd side, in patches) over the patch-distance grid


class {cls}(Detector):
    """Patch colour statistics: each patch's colour distance to the image's median patch."""

    Config = {cls}Config
    label = "{label}"
    # `zsadbench check`: the tiny configurations guarded by the goldens in goldens/ (next to this module)
    regression_variants = {{"zero-shot": {{"image_size": 32, "patch_size": 4}}}}

    def __init__(self, config: {cls}Config | None = None, *, seed: int = 0, **overrides: Any) -> None:
        super().__init__(config, seed=seed, **overrides)
        cfg = self.config
        if cfg.patch_size < 1 or cfg.image_size % cfg.patch_size:
            raise ValueError(f"{name}: image_size {{cfg.image_size}} must be a multiple of patch_size "
                             f"{{cfg.patch_size}} (>= 1)")
        if cfg.smoothing < 1 or cfg.smoothing % 2 == 0:
            raise ValueError(f"{name}: smoothing must be an odd number of patches >= 1, got {{cfg.smoothing}}")

    def transform(self, image: Image.Image) -> Tensor:
        """Returns the (3, S, S) float tensor in [0, 1] of an image resized to the input size."""
        size = self.config.image_size
        array = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    def predict(self, images: Tensor, category: str) -> Prediction:
        """Returns image scores (B,) and anomaly maps (B, S, S) of a preprocessed batch."""
        expected = (3, *self.input_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"{name}: expected a batch of shape (B, {{', '.join(map(str, expected))}}), got "
                             f"{{tuple(images.shape)}}")
        bad = (~torch.isfinite(images)).flatten(1).any(dim=1)
        if bad.any():
            raise ValueError(f"{name}: images {{bad.nonzero().flatten().tolist()}} of the batch hold NaN or inf")
        cfg = self.config
        patches = F.avg_pool2d(images.float(), cfg.patch_size)  # (B, 3, h, w) mean colour of each patch
        centre = patches.flatten(2).median(dim=2).values  # (B, 3) the image's median patch colour
        distance = (patches - centre[:, :, None, None]).norm(dim=1, keepdim=True)
        distance = F.avg_pool2d(distance, cfg.smoothing, stride=1, padding=cfg.smoothing // 2,
                                count_include_pad=False)
        maps = F.interpolate(distance, size=self.input_size, mode="bilinear", align_corners=False)[:, 0]
        return Prediction(maps.flatten(1).amax(dim=1), maps)
'''

TEST = '''"""{label} passes zsadbench's conformance suite and its regression goldens."""

from __future__ import annotations

import zsadbench
import zsadbench.testing
from zsadbench.regression import check, format_report
from {package}.detector import {cls}


def registered() -> str:
    """Returns the method's registry name, registering the class when the package is not installed."""
    if "{name}" not in zsadbench.list_methods():
        zsadbench.register_method("{name}")({cls})
    return "{name}"


def test_conformance() -> None:
    zsadbench.testing.check_method(registered())


class TestConformance(zsadbench.testing.MethodConformance):
    """The same checks, one test each."""

    method = {cls}


def test_regression_goldens() -> None:
    report = check([registered()], progress=False)
    assert not report.failed, format_report(report)
'''

README = '''# {distribution}

{label}, a [zsadbench](https://pypi.org/project/zsadbench/) method plugin, made with `zsadbench new-method {name}`.

```bash
pip install -e .                          # registers the method through its entry point
zsadbench methods                         # lists {name}
zsadbench run --method {name} --dataset synthetic
python -m pytest                          # conformance suite + regression goldens
zsadbench check --method {name}           # the regression check alone
```

Change the method in `{package}/detector.py`; when its numbers change on purpose, re-create the goldens
(`zsadbench check --method {name} --update`, written to `{package}/goldens/`), look at the diff and commit it.
'''


def _identifiers(name: str) -> dict[str, str]:
    words = re.split(r"[-_]", name)
    return {"name": name, "package": "zsadbench_" + "_".join(words), "distribution": "zsadbench-" + "-".join(words),
            "cls": "".join(w.capitalize() for w in words), "label": " ".join(w.capitalize() for w in words)}


def _load(package_dir: Path, ids: dict[str, str]) -> type:
    """Imports the written detector module from its file (the package is not installed) and returns the class."""
    module_name = f"{ids['package']}.detector"
    spec = importlib.util.spec_from_file_location(ids["package"], package_dir / "__init__.py",
                                                  submodule_search_locations=[str(package_dir)])
    assert spec is not None and spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules[ids["package"]] = package
    spec.loader.exec_module(package)
    return getattr(sys.modules[module_name], ids["cls"])


def new_method(name: str, out: str | Path = ".", golden: bool = True) -> dict[str, Any]:
    """Writes the plugin package of method ``name`` under ``out`` and returns what was written (and checked)."""
    from zsadbench.registry import list_methods, register_method

    if not NAME.match(name):
        raise ValueError(f"method name {name!r}: use lower-case letters and digits, words joined by '-' or '_' "
                         "(e.g. 'patch-stats')")
    ids = _identifiers(name)
    if any(keyword.iskeyword(w) for w in ids["package"].split("_")):
        raise ValueError(f"method name {name!r} gives the package name {ids['package']!r}, not a valid identifier")
    registered = list_methods()
    if name in registered:
        cls = registered[name]
        raise ValueError(f"method {name!r} is already registered ({cls.__module__}.{cls.__qualname__}); choose "
                         "another name")
    root = Path(out).expanduser().resolve() / ids["distribution"]
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"{root} exists and is not empty; new-method only writes into a new or empty folder")
    package_dir = root / ids["package"]
    files = {root / "pyproject.toml": PYPROJECT, root / "README.md": README, package_dir / "__init__.py": INIT,
             package_dir / "detector.py": DETECTOR, root / "tests" / f"test_{ids['package']}.py": TEST}
    for path, template in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(**ids))
    written = sorted(files)
    result: dict[str, Any] = {"root": root, "files": written, "name": name, **ids}
    if golden:
        from zsadbench.regression import check, format_report

        register_method(name)(_load(package_dir, ids))
        report = check([name], update=True, goldens=package_dir / "goldens", progress=False)
        if report.failed:
            raise RuntimeError(f"the new method's goldens could not be created:\n{format_report(report)}")
        result["files"] = written + sorted((package_dir / "goldens").glob("*.json"))
    return result
