"""Speed of zsadbench's PromptAD against FuNz-0/PromptAD (same process, weights, shots and images; CPU).

    python benchmarks/bench_promptad.py --ref-root PromptAD [--epochs 5] [--repeats 5] [--batch 2] [--threads 2]

Both sides get the same full-size ViT-B-16-plus-240 random weights (240 px, fp32: the reference built in fp32 as in
tests/parity/ref_promptad.py). Two figures, medians over alternating repeats with the load average:

- predict: one batch through the fitted model: the reference's ``forward(x, 'cls')`` and ``forward(x, 'seg')`` (its
  image score and its map come from two calls) against ``PromptAD.predict``.
- fit (``--epochs`` epochs, once per side): the reference's ``train_cls.fit`` + ``train_seg.fit`` as they run (each
  epoch also scores the test batch: the reference picks its best epoch on the test set) against
  ``set_reference`` followed by one ``predict`` of the same batch. Needs the reference's training scripts to import
  (cv2, loguru, seaborn); skipped otherwise.

Target: ratio (reference time / ours) >= 1. Without ``--ref-root`` (or ``ZSADBENCH_PARITY_PROMPTAD``) only zsadbench's
times are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace


def parse_args() -> argparse.Namespace:
    """Returns the command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref-root", default=os.environ.get("ZSADBENCH_PARITY_PROMPTAD"),
                        help="checkout of github.com/FuNz-0/PromptAD (default: $ZSADBENCH_PARITY_PROMPTAD)")
    parser.add_argument("--repeats", type=int, default=5, help="timed predicts per side (after one warm-up)")
    parser.add_argument("--batch", type=int, default=2, help="test images per predict")
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=5, help="prompt-fit epochs of the fit comparison")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args()


def reference_models(ref_root: str, state: dict, category: str, shots: int):  # noqa: ANN201 - reference modules
    """Returns (train_cls, train_seg or None, cls model, seg model) of the reference in fp32 with ``state`` loaded."""
    sys.path.insert(0, str(Path(ref_root).resolve()))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "parity"))
    import torch  # noqa: PLC0415
    from PromptAD import model as promptad_model  # noqa: PLC0415
    from ref_promptad import build_model  # noqa: PLC0415 - the parity driver's fp32 set-up

    def build(n_pro: int):  # noqa: ANN202
        zeros = torch.zeros(n_pro, 4, state["token_embedding.weight"].shape[1])
        return build_model(promptad_model, promptad_model.CLIPAD, state, category, shots, n_pro, zeros,
                           torch.zeros(4, 1, zeros.shape[-1]))

    try:
        import train_cls  # noqa: PLC0415
        import train_seg  # noqa: PLC0415
    except ImportError as error:
        print(f"reference training scripts do not import ({error}); fit comparison skipped")
        train_cls = train_seg = None
    return train_cls, train_seg, build(3), build(1)


def main() -> None:
    """Runs the benchmark and prints medians and ratios."""
    args = parse_args()
    import numpy as np
    import torch
    from zsadbench.methods.promptad import PromptAD

    from zsadbench.clip.testing import synthetic_images

    torch.set_num_threads(args.threads)
    category = "bottle"
    pictures = synthetic_images(args.shots + args.batch, seed=0, anomalous=(args.shots + 1,))
    options = {"fit.epochs": args.epochs, "fit.progress": False}
    ours = PromptAD(pretrained="random", shots=args.shots, seed=0, **options)
    state = {k: v.clone() for k, v in ours.clip.state_dict().items()}
    shots = torch.stack([ours.transform(p) for p in pictures[:args.shots]])
    images = torch.stack([ours.transform(p) for p in pictures[args.shots:]])
    load = os.getloadavg()[0]

    start = time.perf_counter()
    ours.set_reference(shots, category)
    ours.predict(images, category)
    ours_fit = time.perf_counter() - start

    theirs = None
    if args.ref_root:
        train_cls, train_seg, cls_model, seg_model = reference_models(args.ref_root, state, category, args.shots)
        theirs = (cls_model, seg_model)
        if train_cls is not None:
            arrays = torch.from_numpy(np.stack([np.asarray(p) for p in pictures]))
            labels = torch.tensor([0] + [1] * (args.batch - 1))
            masks = torch.zeros(args.batch, *arrays.shape[1:3], dtype=torch.uint8)
            masks[1:, 100:140, 120:170] = 255
            names = [f"{category}-{i}" for i in range(len(pictures))]
            train = [(arrays[:args.shots].flip(-1), masks[:1].expand(args.shots, -1, -1), torch.zeros(args.shots),
                      names[:args.shots], ["good"] * args.shots)]
            test = [(arrays[args.shots:], masks, labels, names[args.shots:], ["good"] * args.batch)]
            fit_args = SimpleNamespace(Epoch=args.epochs, lr=0.002, momentum=0.9, weight_decay=0.0005, lambda1=0.001,
                                       resolution=400, vis=False)
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                train_cls.fit(cls_model, fit_args, test, "cpu", check_path=f"{tmp}/c.pt", train_data=train)
                train_seg.fit(seg_model, fit_args, test, "cpu", img_dir=tmp, check_path=f"{tmp}/s.pt",
                              train_data=train)
                theirs_fit = time.perf_counter() - start
            print(f"fit ({args.epochs} epochs, {args.shots} shot(s)): zsadbench {ours_fit:.2f} s, reference "
                  f"{theirs_fit:.2f} s, ratio {theirs_fit / ours_fit:.2f}")
        else:
            cls_model.build_image_feature_gallery(*cls_model.encode_image(shots)[2:])
            seg_model.build_image_feature_gallery(*seg_model.encode_image(shots)[2:])
            cls_model.build_text_feature_gallery()
            seg_model.build_text_feature_gallery()
    if theirs is None or train_cls is None:
        print(f"fit ({args.epochs} epochs, {args.shots} shot(s)): zsadbench {ours_fit:.2f} s")

    def run_ours() -> None:
        ours.predict(images, category)

    def run_theirs() -> None:
        with torch.no_grad():
            theirs[0](images, "cls")
            theirs[1](images, "seg")

    runners = {"zsadbench": run_ours} | ({"reference": run_theirs} if theirs else {})
    times: dict[str, list[float]] = {name: [] for name in runners}
    for run in runners.values():
        run()  # warm-up
    for _ in range(args.repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    line = ", ".join(f"{name} {m * 1000:.0f} ms" for name, m in medians.items())
    ratio = f", ratio {medians['reference'] / medians['zsadbench']:.2f}" if "reference" in medians else ""
    print(f"predict (batch {args.batch}, median of {args.repeats}): {line}{ratio}; load average {load:.1f}")


if __name__ == "__main__":
    main()
