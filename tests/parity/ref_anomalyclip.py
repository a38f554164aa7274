"""Reference side of the AnomalyCLIP parity check: zqhang/AnomalyCLIP's test.py inference on given weights.

    python tests/parity/ref_anomalyclip.py --ref-root /path/to/AnomalyCLIP --weights clip_s0.pt \\
        --images 2 --seed 0 --out anomalyclip_ref.pt [--prompt-learner-ckpt epoch_15.pth] [--dump-layers 6 12 24]

``--ref-root`` is a work tree of zqhang/AnomalyCLIP (@45ed4dd): its modules are imported from there, unchanged. The
driver replays test.py with test.sh's settings (design 9_12_4_multiscale: 12 context vectors, deep prompts of 4
tokens in text blocks 2..9; DPAM_layer 20; features_list [24]; 518 px; sigma 4; one image per batch) on the weights
file (loaded through ``AnomalyCLIP_lib.load(<file>)``, i.e. the reference's own OpenAI-style build, QuickGELU):

1. the prompt learner is drawn under ``torch.manual_seed(--seed)`` (unless ``--prompt-learner-ckpt``), saved as
   ``{"prompt_learner": state_dict}`` to ``<OUT>_prompt_learner.pth`` and loaded back the way test.py loads
   ``--checkpoint_path``; zsadbench's parity test loads the same file through its ``--checkpoint`` reader;
2. text features once, then per image: ``encode_image``, the global probability, ``compute_similarity`` and
   ``get_similarity_map`` on layer 24, (S_abnormal + 1 - S_normal) / 2, scipy's Gaussian.

The synthetic images go through the reference's ``utils.get_transform`` (images) and target transform (masks,
thresholded at 0.5 as test.py does). ``OUT`` holds the raw images and masks and every intermediate the test compares
(see ``tests/test_parity_anomalyclip.py``). Workarounds, all in this process: ``pkg_resources`` / ``thop`` stand-ins
(common.install_import_shims) and a ``torch.jit.load`` that rewinds the file it failed on (common.rewinding_jit_load).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DESIGN = {"Prompt_length": 12, "learnabel_text_embedding_depth": 9, "learnabel_text_embedding_length": 4}
FEATURES = [24]
DPAM_LAYER = 20
IMAGE_SIZE = 518
SIGMA = 4
TEMPERATURE = 0.07
REFERENCE_FILES = ("AnomalyCLIP_lib/AnomalyCLIP.py", "AnomalyCLIP_lib/model_load.py", "AnomalyCLIP_lib/build_model.py",
                   "prompt_ensemble.py", "utils.py", "test.py", "test.sh")


def block_outputs(blocks: torch.nn.ModuleList, layers: list[int]) -> tuple[dict[int, list], list]:
    """Returns (outputs by 1-based block, hook handles): each block's output cloned at once (updated in place later)."""
    outputs: dict[int, list] = {}
    handles = []
    for layer in layers:
        def hook(module, args, out, layer=layer):  # noqa: ANN001, ANN202
            outputs.setdefault(layer, []).append([o.detach().clone() for o in out] if isinstance(out, list)
                                                 else out.detach().clone())
        handles.append(blocks[layer - 1].register_forward_hook(hook))
    return outputs, handles


def main() -> None:
    """Runs the reference on the synthetic images and writes the output file."""
    parser = common.common_arguments(__doc__)
    parser.add_argument("--prompt-learner-ckpt", help="a {'prompt_learner': ...} file (e.g. the released epoch_15.pth) "
                                                       "instead of a freshly drawn prompt learner")
    parser.add_argument("--dump-layers", type=int, nargs="*", default=[],
                        help="1-based vision blocks whose outputs are saved (o_l, and v_l from block 6 on)")
    args = parser.parse_args()
    common.setup_torch(args.threads)
    shims = common.install_import_shims()
    started = time.perf_counter()
    with common.reference_on_path(args.ref_root):
        import AnomalyCLIP_lib
        from prompt_ensemble import AnomalyCLIP_PromptLearner
        from scipy.ndimage import gaussian_filter
        from utils import get_transform

        with common.rewinding_jit_load():
            model, _ = AnomalyCLIP_lib.load(os.path.abspath(args.weights), device="cpu", design_details=DESIGN)
    model.eval()

    learner_file = Path(args.prompt_learner_ckpt or common.sibling(args.out, "_prompt_learner.pth"))
    if not args.prompt_learner_ckpt:
        torch.manual_seed(args.seed)
        drawn = AnomalyCLIP_PromptLearner(model, DESIGN)
        learner_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"prompt_learner": drawn.state_dict()}, learner_file)
    prompt_learner = AnomalyCLIP_PromptLearner(model, DESIGN)  # test.py: build, then load --checkpoint_path
    prompt_learner.load_state_dict(torch.load(learner_file)["prompt_learner"])
    model.visual.DAPM_replace(DPAM_layer=DPAM_LAYER)

    with torch.no_grad():
        prompts, tokenized_prompts, deep_prompts = prompt_learner(cls_id=None)
        text_raw = model.encode_text_learn(prompts, tokenized_prompts, deep_prompts).float()
        text = torch.stack(torch.chunk(text_raw, dim=0, chunks=2), dim=1)
        text = text / text.norm(dim=-1, keepdim=True)

    preprocess, target_transform = get_transform(type("Args", (), {"image_size": IMAGE_SIZE})())
    arrays, masks, labels = common.query_images(args.images, args.seed)
    images = common.transformed(preprocess, arrays)
    gt = common.binarised_masks(target_transform, masks)

    dumped, handles = block_outputs(model.visual.transformer.resblocks, sorted(set(args.dump_layers)))
    rows: dict[str, list[torch.Tensor]] = {}
    for i in range(len(images)):  # test.py's DataLoader: batch size 1
        with torch.no_grad():
            g, patch_features = model.encode_image(images[i:i + 1], FEATURES, DPAM_layer=DPAM_LAYER)
            rows.setdefault("image_features_raw", []).append(g[0])
            g = g / g.norm(dim=-1, keepdim=True)
            rows.setdefault("image_features", []).append(g[0])
            probs = ((g @ text.permute(0, 2, 1)) / TEMPERATURE).softmax(-1)
            rows.setdefault("text_probs", []).append(probs[0, 0])
            rows.setdefault("image_score", []).append(probs[:, 0, 1][0])
            maps = []
            for patch in patch_features:
                rows.setdefault("patch_tokens_raw", []).append(patch[0])
                patch = patch / patch.norm(dim=-1, keepdim=True)
                similarity, _ = AnomalyCLIP_lib.compute_similarity(patch, text[0])
                side = round((similarity.shape[1] - 1) ** 0.5)
                rows.setdefault("prob_map_37", []).append(similarity[0, 1:].reshape(side, side, -1).permute(2, 0, 1))
                similarity_map = AnomalyCLIP_lib.get_similarity_map(similarity[:, 1:, :], IMAGE_SIZE)
                rows.setdefault("similarity_map_518", []).append(similarity_map[0].permute(2, 0, 1))
                maps.append((similarity_map[..., 1] + 1 - similarity_map[..., 0]) / 2.0)
            summed = torch.stack(maps).sum(dim=0)
            rows.setdefault("anomaly_map_518", []).append(summed[0])
            smoothed = torch.stack([torch.from_numpy(gaussian_filter(m, sigma=SIGMA)) for m in summed.cpu()])
            rows.setdefault("anomaly_map_smoothed", []).append(smoothed[0])
        print(f"image {i}: score {rows['image_score'][-1].item():.6f}", file=sys.stderr)
    for handle in handles:
        handle.remove()

    out: dict = {k: torch.stack([v.detach().clone() for v in vs]) for k, vs in rows.items()}
    for layer, calls in dumped.items():  # LND, batch 1: [v_l, o_l] in the dual-path blocks, o_l before
        out[f"layer_o_{layer}"] = torch.stack([(c[1] if isinstance(c, list) else c)[:, 0] for c in calls])
        if isinstance(calls[0], list):
            out[f"layer_v_{layer}"] = torch.stack([c[0][:, 0] for c in calls])
    out.update({
        "images_uint8": [torch.from_numpy(a) for a in arrays], "masks_uint8": [torch.from_numpy(m) for m in masks],
        "labels": torch.tensor(labels), "image": images, "gt_mask": gt,
        "pos_embed_interp": model.visual.positional_embedding.detach().clone(),
        "prompts": prompts.detach().clone(), "tokenized_prompts": tokenized_prompts.clone(),
        "text_features_raw": text_raw.detach().clone(), "text_features": text.detach().clone(),
    })
    out["meta"] = common.run_metadata(
        args, "zqhang/AnomalyCLIP", REFERENCE_FILES, design=DESIGN, features=FEATURES, dpam_layer=DPAM_LAYER,
        image_size=IMAGE_SIZE, sigma=SIGMA, prompt_learner=learner_file.name, shims=shims,
        activation=type(model.visual.transformer.resblocks[0].mlp.gelu).__name__,
        seconds=round(time.perf_counter() - started, 1))
    common.save_output(out, args.out)


if __name__ == "__main__":
    main()
