"""Parity of zsadbench's AnomalyCLIP with zqhang/AnomalyCLIP on identical weights, prompts and images (optional).

The reference is never vendored: the project's driver ``tests/parity/ref_anomalyclip.py`` imports it from a work
tree of zqhang/AnomalyCLIP (@45ed4dd) named on its command line, replays its test.py on a random full-size
ViT-L-14-336 state dict (``tests/parity/make_weights.py``) and saves every intermediate tensor
(text features, per-layer features, maps, scores), plus the prompt-learner file it used
(``<OUT>_prompt_learner.pth``, the authors' key layout). This test feeds zsadbench the same weights file, the same
prompt-learner file and the same raw images and compares (minutes on CPU: ViT-L at 518 px)::

    python tests/parity/make_weights.py --arch ViT-L-14-336-quickgelu --seed 0 --out W/clip_s0.pt
    python tests/parity/ref_anomalyclip.py --ref-root AnomalyCLIP --weights W/clip_s0.pt --images 2 \\
        --out W/anomalyclip_ref.pt [--dump-layers 6 12 24]
    ZSADBENCH_PARITY_ANOMALYCLIP=W/anomalyclip_ref.pt ZSADBENCH_PARITY_ANOMALYCLIP_WEIGHTS=W/clip_s0.pt \\
        [ZSADBENCH_PARITY_ANOMALYCLIP_TRAIN=TRAIN.pt] nox -s parity -- -k anomalyclip

``TRAIN.pt`` (optional) holds one reference training step on images 0 and 1 (losses, gradients, parameters after one
Adam step). Stages compared: 1 (preprocessing, masks), 2 (positional embedding), 3 (text features), 4 (both
streams per layer, when the driver ran with ``--dump-layers``), 5-8 (features, probabilities, maps, scores), 9 (one
training step), 10 (the authors' layout loads; its token buffers equal ours).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.parity

REF = os.environ.get("ZSADBENCH_PARITY_ANOMALYCLIP")
WEIGHTS = os.environ.get("ZSADBENCH_PARITY_ANOMALYCLIP_WEIGHTS")
TRAIN = os.environ.get("ZSADBENCH_PARITY_ANOMALYCLIP_TRAIN")
if not (REF and WEIGHTS):
    pytest.skip("set ZSADBENCH_PARITY_ANOMALYCLIP (reference driver output) and ZSADBENCH_PARITY_ANOMALYCLIP_WEIGHTS",
                allow_module_level=True)

from anomalyclip_reference import assert_inference_parity, check_training_step, compare_inference  # noqa: E402
from zsadbench.methods.anomalyclip import AnomalyCLIP  # noqa: E402


def test_anomalyclip_matches_the_reference() -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    ref = torch.load(REF, weights_only=True)
    learner_file = Path(REF).with_name(Path(REF).stem + "_prompt_learner.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # row 10: the stored prefix/suffix embeddings equal ours exactly
        detector = AnomalyCLIP(pretrained=WEIGHTS, checkpoint=str(learner_file))
    figures = compare_inference(detector, ref)
    print("\nanomalyclip parity " + json.dumps(figures))
    assert_inference_parity(figures, ref)

    if TRAIN:
        check_training_step(detector, ref, torch.load(TRAIN, weights_only=True))
