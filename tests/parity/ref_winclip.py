"""Reference side of the WinCLIP parity check: anomalib's ``WinClipModel`` (2.7.0, from PyPI) on given weights.

    python tests/parity/ref_winclip.py --weights winclip_s0.pt --images 2 --shots 1 --out winclip_ref.pt

Run it with an interpreter that has ``anomalib`` (``pip install anomalib==2.7.0``); zsadbench is not needed there.
:func:`anomalib_winclip` builds anomalib's model on ``--arch`` (anomalib's ``BACKBONE``, ViT-B-16-plus-240) with the
weights file loaded strictly in place of the ``laion400m_e31`` download, computes the class's text embeddings with
anomalib's ``setup``, and returns it in eval mode; ``tests/test_parity_winclip.py`` also calls it in-process when
anomalib is importable next to zsadbench.

One workaround, applied only while anomalib's ``_get_window_embeddings`` runs: it permutes the window tokens to
(L, N, D) for open_clip < 2.26, whose transformer was sequence-first; from open_clip 2.26 on the transformer is
batch-first, the windows then attend across each other and every window embedding comes out identical
(anomalib#2571). ``transformer.batch_first`` is set to False for the duration of each call (the residual blocks keep
their own batch-first attention, so the transformer just transposes back and forth), which reproduces anomalib
under open_clip 2.24; with an older open_clip nothing is changed. ``window_embedding_std`` in the output shows the
windows differ.

The synthetic images (``tests/parity/common.py``) go through anomalib's own WinCLIP pre-processor (bicubic resize
to 240 x 240 with antialias, CLIP normalisation); ``OUT`` holds the preprocessed tensors, which zsadbench's test
feeds to its detector unchanged, the text embeddings, and the zero-shot and k-shot scores and maps.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ARCH = "ViT-B-16-plus-240"
CLASS_NAME = "metal_nut"  # the underscore becomes its own BPE token
REFERENCE_FILES = ("torch_model.py", "prompting.py", "utils.py", "lightning_model.py")


def batch_first_window_fix(model: torch.nn.Module) -> Callable:
    """Returns ``model._get_window_embeddings`` run with a sequence-first transformer (open_clip >= 2.26 fix)."""
    transformer = model.clip.visual.transformer
    window_embeddings = model._get_window_embeddings

    def fixed(feature_map: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if not getattr(transformer, "batch_first", False):  # open_clip < 2.26: anomalib is right as is
            return window_embeddings(feature_map, masks)
        transformer.batch_first = False
        try:
            return window_embeddings(feature_map, masks)
        finally:
            transformer.batch_first = True

    return fixed


def anomalib_winclip(arch: str, state: dict[str, torch.Tensor], class_name: str) -> torch.nn.Module:
    """Returns anomalib's WinClipModel on ``arch`` with ``state`` loaded strictly, text set up for ``class_name``."""
    from anomalib.models.image.winclip import torch_model

    saved = torch_model.BACKBONE, torch_model.PRETRAINED
    torch_model.BACKBONE, torch_model.PRETRAINED = arch, None  # build only: the weights come from ``state``
    try:
        model = torch_model.WinClipModel()  # no class name yet: the text embeddings need the loaded weights
    finally:
        torch_model.BACKBONE, torch_model.PRETRAINED = saved
    model.clip.load_state_dict(state, strict=True)
    model._get_window_embeddings = batch_first_window_fix(model)
    model.setup(class_name)
    return model.eval()


def main() -> None:
    """Runs anomalib's WinCLIP zero-shot and k-shot on the synthetic images and writes the output file."""
    parser = common.common_arguments(__doc__, work_tree=False)
    parser.add_argument("--arch", default=ARCH, help="open_clip architecture (anomalib's BACKBONE by default)")
    parser.add_argument("--class-name", default=CLASS_NAME)
    parser.add_argument("--shots", type=int, default=1, help="normal reference images for WinCLIP+ (0: zero-shot)")
    args = parser.parse_args()
    common.setup_torch(args.threads)
    started = time.perf_counter()
    import anomalib
    from anomalib.models.image.winclip import WinClip, torch_model

    args.ref_root = str(Path(torch_model.__file__).parent)  # what the output's file hashes refer to
    model = anomalib_winclip(args.arch, torch.load(args.weights, map_location="cpu", weights_only=True),
                             args.class_name)
    preprocess = WinClip.configure_pre_processor().transform
    arrays, _, labels = common.query_images(args.images, args.seed)
    images = torch.stack([preprocess(torch.from_numpy(a).permute(2, 0, 1).float() / 255.0) for a in arrays])
    out: dict = {"images_uint8": [torch.from_numpy(a) for a in arrays], "labels": torch.tensor(labels),
                 "images": images, "text_embeddings": model.text_embeddings.detach().clone()}
    with torch.no_grad():
        zero = model(images)
        windows = model.encode_image(images)[1]
    out.update(zero_shot_scores=zero.pred_score.clone(), zero_shot_maps=zero.anomaly_map.clone(),
               window_embedding_std=min(w.std(dim=1).mean().item() for w in windows))
    if args.shots:
        references = torch.stack([preprocess(torch.from_numpy(a).permute(2, 0, 1).float() / 255.0)
                                  for a in common.normal_images(args.shots, args.seed)])
        model.setup(reference_images=references)
        with torch.no_grad():
            few = model(images)
        out.update(reference_images=references, few_shot_scores=few.pred_score.clone(),
                   few_shot_maps=few.anomaly_map.clone())
    out["meta"] = common.run_metadata(
        args, f"anomalib {anomalib.__version__} WinClipModel", REFERENCE_FILES, arch=args.arch,
        image_size=int(images.shape[-1]), class_name=args.class_name, shots=args.shots,
        transformer_batch_first=bool(getattr(model.clip.visual.transformer, "batch_first", False)),
        seconds=round(time.perf_counter() - started, 1))
    print(f"window embedding std {out['window_embedding_std']:.4g}, zero-shot {zero.pred_score.tolist()}",
          file=sys.stderr)
    common.save_output(out, args.out)


if __name__ == "__main__":
    main()
