"""Third-party plugins registered only through entry points are found and run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from zsadbench import registry

PLUGIN = textwrap.dedent('''
    """A third-party method and dataset that zsadbench knows only through entry points."""
    from dataclasses import dataclass

    import numpy as np
    import torch
    from PIL import Image

    from zsadbench import Dataset, Detector, Prediction


    @dataclass
    class BrightnessConfig:
        image_size: int = 32


    class BrightnessDetector(Detector):
        """Anomaly map = distance of each pixel's brightness to the image median."""

        Config = BrightnessConfig

        @property
        def input_size(self):
            return (self.config.image_size, self.config.image_size)

        def transform(self, image):
            size = self.config.image_size
            array = np.asarray(image.convert("L").resize((size, size)), dtype=np.float32) / 255.0
            return torch.from_numpy(array)[None].expand(3, -1, -1)

        def predict(self, images, category):
            grey = images[:, 0]
            amap = (grey - grey.flatten(1).median(dim=1).values[:, None, None]).abs()
            return Prediction(amap.flatten(1).max(dim=1).values, amap)


    def load_demo(root):
        """A dataset plugin reading an MVTec-style tree."""
        from zsadbench.datasets.mvtec import read_tree

        return Dataset("demo-data", root, read_tree(root, "demo-data"))
''')


def make_plugin(folder: Path) -> Path:
    """Writes an importable package plus a dist-info with entry points (what `pip install` would leave)."""
    (folder / "zsad_demo_plugin").mkdir(parents=True)
    (folder / "zsad_demo_plugin" / "__init__.py").write_text(PLUGIN)
    info = folder / "zsad_demo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: zsad-demo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[zsadbench.methods]\ndemo-brightness = zsad_demo_plugin:BrightnessDetector"
                                           "\n\n[zsadbench.datasets]\ndemo-data = zsad_demo_plugin:load_demo\n")
    return folder


def test_entry_point_plugin_is_found_and_runs(tmp_path: Path, synthetic_root: Path, isolated_results: Path) -> None:
    plugin_path = make_plugin(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": str(plugin_path), "ZSADBENCH_RESULTS": str(isolated_results)}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "zsadbench.cli", *args], env=env, capture_output=True,
                              text=True, timeout=300)

    listed = cli("methods")
    assert listed.returncode == 0, listed.stderr
    assert any(line.split()[0] == "demo-brightness" for line in listed.stdout.splitlines())
    assert "demo-data" in cli("datasets").stdout
    out_json = tmp_path / "out.json"
    done = cli("run", "--method", "demo-brightness", "--dataset", "demo-data", "--data-root", str(synthetic_root),
               "--categories", "carpet", "--json", str(out_json))
    assert done.returncode == 0, done.stderr
    result = json.loads(out_json.read_text())
    assert list(result["categories"]) == ["carpet"] and 0.0 <= result["mean"]["image_auroc"] <= 1.0
    # without the entry point the method is unknown
    plain = subprocess.run([sys.executable, "-m", "zsadbench.cli", "methods"], capture_output=True, text=True,
                           env={k: v for k, v in env.items() if k != "PYTHONPATH"}, timeout=300)
    assert "demo-brightness" not in plain.stdout


def test_unknown_names_list_the_registered_ones() -> None:
    with pytest.raises(KeyError, match="unknown method 'nope'; registered: .*"):
        registry.get_method("nope")
    with pytest.raises(KeyError, match="unknown dataset 'nope'; registered: .*mvtec"):
        registry.get_dataset("nope")


def test_duplicate_registration_is_refused() -> None:
    class A:
        pass

    class B:
        pass

    registry.register_method("dup-test")(A)
    try:
        with pytest.raises(ValueError, match="already registered"):
            registry.register_method("dup-test")(B)
    finally:
        registry._methods.pop("dup-test")
