"""Parity of zsadbench's HeadCLIP head weights with zqhang/AnomalyCLIP through the folding identity (optional).

The official HeadCLIP code is not available, so its learnable head weights are checked against the AnomalyCLIP
reference (docs/methods/headclip.md): static weights w (U(0.5, 1.5), three heads switched off) on all 24 layers
must equal the reference run on CLIP weights whose attention out-projection input columns are scaled per head by w,
in both DPAM paths. This test writes that folded weights file and the reference command when they are missing::

    ZSADBENCH_PARITY_HEADCLIP=REF_FOLDED.pt ZSADBENCH_PARITY_ANOMALYCLIP_WEIGHTS=clip_rand_s0.pt \\
        ZSADBENCH_PARITY_HEADCLIP_PROMPTS=ref_s0_prompt_learner.pth nox -s parity -- -k headclip

With ZSADBENCH_PARITY_ANOMALYCLIP_TRAIN (the AnomalyCLIP parity test's training step on the unfolded weights), one
HeadCLIP training step with the head weights at 1 is compared too (losses and prompt gradients; gradients
now also flow through the vision tower into the head weights). REF_FOLDED.pt is the output of the project's driver
tests/parity/ref_anomalyclip.py on ``<weights>_folded.pt`` with the prompt-learner file (``--prompt-learner-ckpt``);
ZSADBENCH_PARITY_HEADCLIP_PROMPTS defaults to ``<REF_FOLDED>_prompt_learner.pth``. In full::

    python tests/parity/make_weights.py --arch ViT-L-14-336-quickgelu --seed 0 --out W/clip_s0.pt
    ZSADBENCH_PARITY_HEADCLIP=W/headclip_ref.pt ZSADBENCH_PARITY_ANOMALYCLIP_WEIGHTS=W/clip_s0.pt \\
        nox -s parity -- -k headclip                 # first run: writes W/clip_s0_folded.pt, skips with the command
    python tests/parity/ref_anomalyclip.py --ref-root AnomalyCLIP --weights W/clip_s0_folded.pt --images 2 \\
        --prompt-learner-ckpt W/anomalyclip_ref_prompt_learner.pth --out W/headclip_ref.pt
    ZSADBENCH_PARITY_HEADCLIP=W/headclip_ref.pt ZSADBENCH_PARITY_ANOMALYCLIP_WEIGHTS=W/clip_s0.pt \\
        ZSADBENCH_PARITY_HEADCLIP_PROMPTS=W/anomalyclip_ref_prompt_learner.pth nox -s parity -- -k headclip
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.parity

REF = os.environ.get("ZSADBENCH_PARITY_HEADCLIP")
WEIGHTS = os.environ.get("ZSADBENCH_PARITY_ANOMALYCLIP_WEIGHTS")
TRAIN = os.environ.get("ZSADBENCH_PARITY_ANOMALYCLIP_TRAIN")
if not (REF and WEIGHTS):
    pytest.skip("set ZSADBENCH_PARITY_HEADCLIP (reference driver output on folded weights) and "
                "ZSADBENCH_PARITY_ANOMALYCLIP_WEIGHTS", allow_module_level=True)

from anomalyclip_reference import assert_inference_parity, check_training_step, compare_inference  # noqa: E402
from zsadbench.methods.headclip import HeadCLIP  # noqa: E402


def head_weights(layers: int = 24, heads: int = 16) -> torch.Tensor:
    """Returns the test's static head weights: U(0.5, 1.5) from seed 0, heads (3, 0), (10, 7), (20, 15) at zero."""
    w = 0.5 + torch.rand(layers, heads, generator=torch.Generator().manual_seed(0))
    w[[3, 10, 20], [0, 7, 15]] = 0.0
    return w


def folded_weights(weights: Path) -> Path:
    """Returns ``<weights>_folded.pt``: each vision out_proj weight's input columns scaled per head (written once)."""
    out = weights.with_name(weights.stem + "_folded.pt")
    if not out.exists():
        state = torch.load(weights, weights_only=True)
        w = head_weights()
        for layer in range(24):
            key = f"visual.transformer.resblocks.{layer}.attn.out_proj.weight"
            state[key] = state[key] * w[layer].repeat_interleave(state[key].shape[1] // 16)[None]
        torch.save(state, out)
    return out


def test_static_head_weights_match_the_reference_with_folded_weights() -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if not Path(REF).exists():
        folded = folded_weights(Path(WEIGHTS))
        pytest.skip(f"no reference output {REF}: run tests/parity/ref_anomalyclip.py --ref-root AnomalyCLIP "
                    f"--weights {folded} "
                    f"--prompt-learner-ckpt PROMPTS --out {REF} (see this module's docstring)")
    ref = torch.load(REF, weights_only=True)
    prompts = os.environ.get("ZSADBENCH_PARITY_HEADCLIP_PROMPTS") or str(
        Path(REF).with_name(Path(REF).stem + "_prompt_learner.pth"))
    detector = HeadCLIP(pretrained=WEIGHTS, checkpoint=prompts, **{"jas.alpha": 1.0})
    with torch.no_grad():
        detector.head_weights.weight.copy_(head_weights())
    figures = compare_inference(detector, ref)
    print("\nheadclip folding parity " + json.dumps(figures))
    assert_inference_parity(figures, ref)
    if TRAIN:
        identity = HeadCLIP(pretrained=WEIGHTS, checkpoint=prompts)  # head weights 1: AnomalyCLIP's training step
        check_training_step(identity, ref, torch.load(TRAIN, weights_only=True))
        assert all(p.grad is not None for p in identity.head_weights.parameters())
