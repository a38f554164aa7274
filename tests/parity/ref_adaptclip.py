"""Reference side of the AdaptCLIP parity check: gaobb/AdaptCLIP's test.py inference, zero-shot and k-shot.

    python tests/parity/ref_adaptclip.py --ref-root /path/to/AdaptCLIP --weights clip_s0.pt \\
        --images 2 --shots 1 --seed 0 --out adaptclip_ref.pt [--adapter-ckpt epoch_15.pth]

``--ref-root`` is a work tree of gaobb/AdaptCLIP (@354d9e3, GPL-2.0): its modules are imported from there,
unchanged, never copied. The driver replays test.py with scripts/test_adaptclip.sh's settings (features 6/12/18/24,
DPAM_layer 20, 518 px, n_ctx 12, visual reduction 4, PQ mid dim 128 with context, fusion average_mean, sigma 4) on
the weights file (``adaptcliplib.load(<file>)``: the reference's OpenAI-style build, QuickGELU):

1. adapters: drawn under ``torch.manual_seed(--seed)`` in test.py's order (textual, visual, prompt-query), then every
   BatchNorm gets non-trivial eval statistics (PyTorch's mean 0 / var 1 would leave the prompt-query branch, whose
   inputs are ~0.05, nearly constant): a train-mode pass over the query features, each query the other's prompt,
   with a cumulative average, then seeded jitter of the affine and the statistics (image-level BatchNorm1d layers
   see two samples, so their variance is pooled over channels first). Saved as ``{"textual_learner",
   "visual_learner", "pq_learner"}`` (the released epoch_15.pth layout) to ``<OUT>_adapters.pth`` and loaded back
   into fresh adapters as test.py loads ``--checkpoint_path``. ``--adapter-ckpt`` loads a given file instead;
2. static text (``prepare_static_text_feature``) and learned text, once;
3. the k-shot prompt memory through test.py's own ``build_prompt_memory`` / ``prompt_association`` (a list of
   batches stands in for the DataLoader); then per batch of queries the visual, textual and prompt-query adapters
   and both fusions, as test.py's loop body.

Intermediates the reference does not return are recorded read-only: forward hooks on the adapters' modules, a
wrapper of ``adaptclip.compute_similarity`` that keeps its output, and, during the prompt-query forward, a stand-in
for the module's ``torch`` that keeps what ``torch.min`` returns (the alignment distance and its argmin).
``prompt_sampling`` holds the indices the reference ``PromptDataset`` draws for a few class sizes, seeds and shots.
Workarounds, all in this process: import stand-ins (``pkg_resources``; ``tools/__init__.py`` imports cv2,
torchmetrics and matplotlib for metrics and plots, so a bare ``tools`` package over the reference folder is
registered and only ``tools.utils`` is imported), a rewinding ``torch.jit.load``, and ``Tensor.cuda`` as identity
while the static text is prepared on a machine without CUDA (the reference hard-codes ``.cuda()`` there).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

FEATURES = [6, 12, 18, 24]
DPAM_LAYER = 20
IMAGE_SIZE = 518
PATCH = 14
WIDTH = 768
N_CTX = 12
VL_REDUCTION = 4
PQ_MID_DIM = 128
SIGMA = 4
FUSION = "average_mean"
CLASS = "synthetic"
REFERENCE_FILES = ("adaptcliplib/adaptclip.py", "adaptcliplib/model_load.py", "adaptcliplib/build_model.py",
                   "tools/utils.py", "dataset/dataset.py", "test.py", "scripts/test_adaptclip.sh")


class MinRecorder(types.SimpleNamespace):
    """Stands in for ``torch`` inside adaptcliplib.adaptclip: forwards everything, keeps what ``torch.min`` returns."""

    def __init__(self) -> None:
        super().__init__(calls=[])

    def __getattr__(self, name: str) -> object:
        return getattr(torch, name)

    def min(self, *args: object, **kwargs: object) -> object:
        out = torch.min(*args, **kwargs)
        self.calls.append((out[0].detach().clone(), out[1].detach().clone()))
        return out


def batch_norms(*modules: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Returns the distinct BatchNorm modules of ``modules`` (the prompt-query heads are one shared instance)."""
    found: dict[int, nn.modules.batchnorm._BatchNorm] = {}
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                found.setdefault(id(m), m)
    return list(found.values())


@torch.no_grad()
def give_batch_norms_statistics(visual: nn.Module, pq: nn.Module, g: torch.Tensor, patches: list[torch.Tensor],
                                seed: int) -> None:
    """Sets every BatchNorm's running statistics from a train-mode pass, then jitters statistics and affines."""
    norms = batch_norms(visual, pq)
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: exactly the statistics of the calibration pass
    visual.train()
    pq.train()
    visual(g, patches, torch.ones(2, WIDTH))  # the statistics do not depend on the text features
    pq(g, patches, g.flip(0).unsqueeze(1), [p.flip(0).unsqueeze(1) for p in patches])  # each query the other's prompt
    visual.eval()
    pq.eval()
    generator = torch.Generator().manual_seed(seed + 4_242_421)
    for m in norms:
        m.momentum = 0.1
        channels = m.num_features
        if isinstance(m, nn.BatchNorm1d):  # two samples per call: per-channel variances are unreliable
            m.running_var.fill_(m.running_var.mean().item())
        spread = m.running_var.clamp_min(1e-12).sqrt()
        m.weight.copy_(0.7 + 0.6 * torch.rand(channels, generator=generator))
        m.bias.copy_(0.1 * torch.randn(channels, generator=generator))
        m.running_mean.add_(0.1 * spread * torch.randn(channels, generator=generator))
        m.running_var.mul_(0.8 + 0.4 * torch.rand(channels, generator=generator))
        m.num_batches_tracked.fill_(1000)


def prompt_sampling(prompt_dataset: type) -> dict[str, list[int]]:
    """Returns the indices the reference PromptDataset draws per class size, seed and number of shots."""
    draws: dict[str, list[int]] = {}
    sizes = (60, 209, 391)
    with tempfile.TemporaryDirectory() as tmp:
        train = {f"c{n}": [{"img_path": f"c{n}/train/good/{i:04d}.png", "mask_path": "", "cls_name": f"c{n}",
                            "specie_name": "good", "anomaly": 0} for i in range(n)] for n in sizes}
        Path(tmp, "meta.json").write_text(json.dumps({"train": train, "test": train}))
        for seed in (10, 20, 30):
            for shots in (1, 2, 4):
                data = prompt_dataset(root=tmp, transform=None, target_transform=None, dataset_name="synthetic",
                                      k_shots=shots, save_dir=tmp, mode="test", seed=seed)
                for n in sizes:
                    draws[f"n{n}_seed{seed}_k{shots}"] = [int(Path(d["img_path"]).stem) for d in data.prompt_data_all
                                                          if d["cls_name"] == f"c{n}"]
    return draws


def main() -> None:
    """Runs the reference on the synthetic images and writes the output file."""
    parser = common.common_arguments(__doc__)
    parser.add_argument("--shots", type=int, default=1, help="prompt images for the k-shot outputs (0: zero-shot only)")
    parser.add_argument("--batch-size", type=int, default=8, help="query batch size (test.py: 8)")
    parser.add_argument("--adapter-ckpt", help="adapters file (e.g. the released epoch_15.pth) instead of drawn ones")
    args = parser.parse_args()
    common.setup_torch(args.threads)
    shims = common.install_import_shims()
    started = time.perf_counter()
    with common.reference_on_path(args.ref_root, modules=("tools", "dataset")) as root:
        tools = common.stand_in_module("tools")  # only tools.utils: tools/__init__.py pulls in cv2, torchmetrics, plots
        tools.__path__ = [str(root / "tools")]  # type: ignore[attr-defined]
        from tools import utils as tool_utils

        for name in ("get_transform", "setup_seed", "normalize"):
            setattr(tools, name, getattr(tool_utils, name))
        for name in ("Evaluator", "get_logger", "visualizer"):
            setattr(tools, name, common.NeverCalled(f"tools.{name}"))
        shims.append("tools (package over the reference folder; utils real, the rest stand-ins)")
        import adaptcliplib
        import adaptcliplib.adaptclip as adaptclip_module
        from adaptcliplib import PQAdapter, TextualAdapter, VisualAdapter, fusion_fun
        from dataset import PromptDataset
        from scipy.ndimage import gaussian_filter

        spec = importlib.util.spec_from_file_location("adaptclip_reference_test", root / "test.py")
        assert spec is not None and spec.loader is not None
        reference_test = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(reference_test)  # its functions only: test() is not called
        with common.rewinding_jit_load():
            model, _ = adaptcliplib.load(os.path.abspath(args.weights), device="cpu")
    model.visual.DAPM_replace(DPAM_layer=DPAM_LAYER)
    model.eval()

    def adapters() -> tuple[nn.Module, nn.Module, nn.Module]:
        return (TextualAdapter(model, IMAGE_SIZE, N_CTX),
                VisualAdapter(IMAGE_SIZE, PATCH, input_dim=WIDTH, reduction=VL_REDUCTION),
                PQAdapter(IMAGE_SIZE, PATCH, context=True, input_dim=WIDTH, mid_dim=PQ_MID_DIM,
                          layers_num=len(FEATURES)))

    preprocess, target_transform = tool_utils.get_transform(image_size=IMAGE_SIZE)
    arrays, masks, labels = common.query_images(args.images, args.seed)
    images = common.transformed(preprocess, arrays)
    gt = common.binarised_masks(target_transform, masks)[:, 0]  # test.py: items['img_mask'][:, 0], thresholded

    adapters_file = Path(args.adapter_ckpt or common.sibling(args.out, "_adapters.pth"))
    if not args.adapter_ckpt:
        torch.manual_seed(args.seed)
        textual, visual, pq = adapters()
        with torch.no_grad():
            g, patches = model.encode_image(images[:2], FEATURES, DPAM_layer=DPAM_LAYER)
        if len(g) < 2:
            raise SystemExit("drawing adapters needs --images >= 2 (BatchNorm statistics from two queries)")
        give_batch_norms_statistics(visual, pq, g, patches, args.seed)
        adapters_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"textual_learner": textual.state_dict(), "visual_learner": visual.state_dict(),
                    "pq_learner": pq.state_dict()}, adapters_file)
    textual, visual, pq = adapters()  # test.py: build, load --checkpoint_path, eval
    checkpoint = torch.load(adapters_file)
    textual.load_state_dict(checkpoint["textual_learner"])
    visual.load_state_dict(checkpoint["visual_learner"])
    pq.load_state_dict(checkpoint["pq_learner"])
    for module in (model, textual, visual, pq):
        module.eval()

    with torch.no_grad():
        with common.cuda_is_identity():
            textual.prepare_static_text_feature(model)
        static_text = textual.static_text_features
        learned_prompts, tokenized_prompts = textual()
        learned_text = model.encode_text_learn(learned_prompts, tokenized_prompts).float()

    prompt_arrays = common.normal_images(args.shots, args.seed)
    out: dict = {}
    if args.shots:
        prompt_images = common.transformed(preprocess, prompt_arrays)
        loader = [{"cls_name": [CLASS] * len(b), "img": b, "img_mask": torch.zeros(len(b), 1, IMAGE_SIZE, IMAGE_SIZE),
                   "view_id": ["0"] * len(b)} for b in prompt_images.split(args.batch_size)]
        image_memory, patch_memory = reference_test.build_prompt_memory(
            model, loader, "cpu", [CLASS], ["0"], FEATURES, DPAM_LAYER)
        assert image_memory[CLASS].shape == (args.shots, WIDTH)  # test.py's list-of-bool-array indexing still selects
        out.update({"prompt_images_uint8": [torch.from_numpy(a) for a in prompt_arrays], "prompt_image": prompt_images,
                    "prompt_image_features": image_memory[CLASS].clone(),
                    "prompt_patch_tokens": torch.stack(patch_memory[CLASS], 1).clone()})

    va_global, va_local = common.Recorder(visual.global_adapter), common.Recorder(visual.local_adater)
    pq_norms = [common.Recorder(norm) for norm in pq.sharebn]
    pq_local_head = common.Recorder(pq.local_adapter[0])  # one module shared by the four layers
    pq_global_input = common.Recorder(pq.global_adapter[0], inputs=True)
    similarities: list[torch.Tensor] = []
    compute_similarity = adaptclip_module.compute_similarity

    def recording_similarity(*a: object, **k: object) -> object:
        result = compute_similarity(*a, **k)
        similarities.append(result[0].detach().clone())
        return result

    adaptclip_module.compute_similarity = recording_similarity
    rows: dict[str, list[torch.Tensor]] = {}

    def keep(key: str, value: torch.Tensor) -> None:
        rows.setdefault(key, []).append(value.detach().clone())

    for query in images.split(args.batch_size):
        b = len(query)
        with torch.no_grad():
            g, patches = model.encode_image(query, FEATURES, DPAM_layer=DPAM_LAYER)
            keep("image_features", g)
            keep("patch_tokens", torch.stack(patches, 1))
            va_logit, va_maps = visual(g, patches, static_text)
            keep("va_similarity", similarities.pop())
            keep("va_global_adapted", va_global.take()[0])
            keep("va_patch_adapted", va_local.take()[0])
            ta_logit, ta_maps = textual.compute_global_local_score(g, patches, learned_text)
            keep("ta_similarity", similarities.pop())
            branches = {}
            for name, logit, maps in (("va", va_logit, va_maps), ("ta", ta_logit, ta_maps)):
                branches[name] = (maps[:, 1], logit.softmax(-1)[:, 1])
                keep(f"{name}_logits", logit)
                keep(f"{name}_similarity_map_518", maps)
                keep(f"{name}_map", maps[:, 1])
                keep(f"{name}_score", logit.softmax(-1)[:, 1])
            (va_map, va_score), (ta_map, ta_score) = branches["va"], branches["ta"]
            fused = fusion_fun([va_map, ta_map], fusion_type=FUSION)  # test.py, k_shots == 0
            keep("zs_map_fused", fused)
            smoothed = torch.stack([torch.from_numpy(gaussian_filter(m, sigma=SIGMA)) for m in fused.cpu()])
            peak = smoothed.view(b, -1).max(dim=1).values
            score = fusion_fun([va_score, ta_score, peak], fusion_type=FUSION)
            keep("zs_map", torch.nan_to_num(smoothed, nan=0.0, posinf=0.0, neginf=0.0))
            keep("zs_score", torch.nan_to_num(score, nan=0.0, posinf=0.0, neginf=0.0))
            if not args.shots:
                continue
            prompt_g, prompt_patches = reference_test.prompt_association(image_memory, patch_memory, [CLASS] * b)
            minima = MinRecorder()
            adaptclip_module.torch = minima
            try:
                pq_logits, pq_maps, alignments = pq(g, patches, prompt_g, prompt_patches)
            finally:
                adaptclip_module.torch = torch
            keep("pq_align_d", torch.stack([c[0] for c in minima.calls], 1))
            keep("pq_align_idx", torch.stack([c[1] for c in minima.calls], 1))
            keep("pq_align_map", torch.cat(alignments, 1))
            keep("pq_fusion_bn", torch.stack([r.take()[0] for r in pq_norms], 1))
            keep("pq_local_logits_148", torch.stack(pq_local_head.take(), 1))
            keep("pq_pooled", torch.stack([c[0] for c in pq_global_input.take()], 1))
            keep("pq_logits", torch.stack(pq_logits, 1))
            layer_maps = torch.cat([m[:, 1].unsqueeze(1) for m in pq_maps], 1)  # test.py's k_shots > 0 branch
            keep("pq_map_layers", layer_maps)
            pq_map = layer_maps.mean(dim=1)
            alignment = fusion_fun(alignments, fusion_type="harmonic_mean")[:, 0]
            pq_score = torch.cat([x.softmax(-1).unsqueeze(-1) for x in pq_logits], -1).mean(-1)[:, 1]
            keep("pq_map", pq_map)
            keep("pq_align_hm", alignment)
            keep("pq_score", pq_score)
            fused = fusion_fun([fusion_fun([va_map, ta_map, pq_map], fusion_type=FUSION), alignment],
                               fusion_type="harmonic_mean")
            keep("fs_map_fused", fused)
            smoothed = torch.stack([torch.from_numpy(gaussian_filter(m, sigma=SIGMA)) for m in fused.cpu()])
            peak = smoothed.view(b, -1).max(dim=1).values
            score = fusion_fun([fusion_fun([va_score, ta_score, pq_score], fusion_type=FUSION), peak],
                               fusion_type="harmonic_mean")
            keep("fs_map", torch.nan_to_num(smoothed, nan=0.0, posinf=0.0, neginf=0.0))
            keep("fs_score", torch.nan_to_num(score, nan=0.0, posinf=0.0, neginf=0.0))
        print(f"batch of {b}: zero-shot {rows['zs_score'][-1].tolist()}", file=sys.stderr)
    adaptclip_module.compute_similarity = compute_similarity

    out.update({k: torch.cat(v) for k, v in rows.items()})
    out.update({
        "images_uint8": [torch.from_numpy(a) for a in arrays], "masks_uint8": [torch.from_numpy(m) for m in masks],
        "labels": torch.tensor(labels), "image": images, "gt_mask": gt,
        "pos_embed_interp": model.visual.positional_embedding.detach().clone(),
        "static_text_features": static_text.detach().clone(), "learned_prompts": learned_prompts.detach().clone(),
        "tokenized_prompts": tokenized_prompts.clone(), "learned_text_features": learned_text.detach().clone(),
        "prompt_sampling": prompt_sampling(PromptDataset),
    })
    out["meta"] = common.run_metadata(
        args, "gaobb/AdaptCLIP", REFERENCE_FILES, features=FEATURES, dpam_layer=DPAM_LAYER, image_size=IMAGE_SIZE,
        shots=args.shots, batch_size=args.batch_size, adapters=adapters_file.name, shims=shims,
        activation=type(model.visual.transformer.resblocks[0].mlp.gelu).__name__,
        seconds=round(time.perf_counter() - started, 1))
    common.save_output(out, args.out)


if __name__ == "__main__":
    main()
