"""Reference side of the MuSc parity check: xrli-U/MuSc's ``make_category_data`` on given weights and images.

    python tests/parity/ref_musc.py --ref-root /path/to/MuSc --weights clip_s0.pt --images 5 --image-size 518 \\
        --out musc_ref_518.pt

``--ref-root`` is a work tree of xrli-U/MuSc (@b76b93d); its code (and its vendored open_clip 2.16 fork) is imported
from there, unchanged. The driver writes the synthetic images as an MVTec AD category (``synthetic/test/{defect,
good}``, masks under ``ground_truth``) and runs ``MuSc(cfg, seed=42).make_category_data("synthetic")`` with
configs/musc.yaml's settings (ViT-L-14-336, ``openai`` weights, layers [5, 11, 17, 23], r [1, 3, 5], batch 4,
``--image-size`` 518 or the native 336, ``mvtec_ad``: RsCIN windows [1, 2, 3]). So the reference's own dataset class
reads and preprocesses the images, its loader builds the backbone (at 518 px a fresh ``CLIP(**config)``, exact GELU,
with the bicubic positional-embedding resize; at 336 px ``load_openai_model``, QuickGELU), and LNAMD, MSM, the map
interpolation and RsCIN run as released. Mutual scoring needs at least 5 images (the reference's interval average
keeps int(0.3 (N - 1)) values).

What happens in this process only:

- the ``openai`` download is redirected to ``--weights`` (``download_pretrained_from_url`` of the fork's
  ``openai`` module returns the file), so the fork's loader reads it as the OpenAI checkpoint;
- recording wrappers in ``models.musc``'s namespace, each returning exactly what it wraps returns: the backbone's
  ``encode_image`` (inputs, image features before musc.py normalises them in place, the four token tensors), the
  ``LNAMD`` class (the current degree), ``MSM`` (its input Z and its scores per layer and degree), ``F.interpolate``
  (patch scores and maps), ``RsCIN`` (raw scores, image features, windows, output);
- ``compute_metrics`` is replaced by a stand-in returning NaNs (the metrics are not compared, and the pixel AUPRO
  costs minutes); ``cv2`` / ``openpyxl`` (visualisation, Excel export) get stand-ins when missing;
- ``models``, ``datasets`` and ``utils`` (folders without ``__init__.py``) are pinned to the work tree, since an
  installed package of the same name would shadow them, and the reference is imported with the work tree as the
  current directory (musc.py appends the relative ``./models/backbone`` to ``sys.path``);
- ``CUDA_VISIBLE_DEVICES`` is emptied before torch is imported: the reference's ``torch.cuda.amp.autocast()`` is then
  off and everything runs in float32 on the CPU.

``divisions`` holds the image lists of the reference ``MVTecDataset`` for ``divide_num`` 2 and 3 (seed 42).
"""

from __future__ import annotations

import os

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: the reference's autocast stays off
os.environ.setdefault("TQDM_DISABLE", "1")

import contextlib  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ARCH = "ViT-L-14-336"
LAYERS = [5, 11, 17, 23]  # 0-based, configs/musc.yaml
R_LIST = [1, 3, 5]
BATCH_SIZE = 4
CATEGORY = "synthetic"
REFERENCE_FILES = ("models/musc.py", "models/modules/_LNAMD.py", "models/modules/_MSM.py", "models/modules/_RsCIN.py",
                   "datasets/mvtec.py", "models/backbone/open_clip/factory.py", "models/backbone/open_clip/openai.py",
                   "configs/musc.yaml")


def write_category(root: Path, arrays: list[np.ndarray], masks: list[np.ndarray], labels: list[int]) -> None:
    """Writes the images as one MVTec AD category; file names are the generation indices."""
    for index, (array, mask, label) in enumerate(zip(arrays, masks, labels)):
        defect = "defect" if label else "good"
        folder = root / CATEGORY / "test" / defect
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(folder / f"{index:03d}.png")
        if label:
            masks_folder = root / CATEGORY / "ground_truth" / defect
            masks_folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(masks_folder / f"{index:03d}_mask.png")


def generation_index(image_path: str) -> int:
    """Returns the generation index encoded in a written image's file name."""
    return int(Path(image_path).stem)


@contextlib.contextmanager
def inside(folder: Path) -> Iterator[None]:
    """Runs the block with ``folder`` as the current directory."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def main() -> None:
    """Runs the reference on the synthetic category and writes the output file."""
    parser = common.common_arguments(__doc__)
    parser.set_defaults(images=5)
    parser.add_argument("--image-size", type=int, default=518, help="518 (configs/musc.yaml) or 336 (native)")
    args = parser.parse_args()
    if args.images < 5:
        parser.error("--images must be at least 5: the reference's interval average needs int(0.3 (N - 1)) >= 1")
    common.setup_torch(args.threads)
    shims = common.install_import_shims({"cv2": ("applyColorMap", "imwrite"), "openpyxl": ("Workbook",)})
    started = time.perf_counter()
    weights = os.path.abspath(args.weights)

    with common.reference_on_path(args.ref_root, modules=("models", "datasets", "utils")) as root, inside(root):
        for name in ("models", "datasets", "utils"):  # namespace folders: pin them to the work tree
            package = common.stand_in_module(name)
            package.__path__ = [str(root / name)]  # type: ignore[attr-defined]
        out = run_reference(args, root, weights)
    out["meta"] = common.run_metadata(
        args, "xrli-U/MuSc", REFERENCE_FILES, arch=ARCH, img_size=args.image_size, feature_layers_0based=LAYERS,
        r_list=R_LIST, batch_size=BATCH_SIZE, topmin=[0, 0.3], shims=shims, **out.pop("meta_extra"),
        seconds=round(time.perf_counter() - started, 1))
    print(f"activation {out['meta']['activation']}, image scores {out['image_scores'].tolist()}", file=sys.stderr)
    common.save_output(out, args.out)


def run_reference(args, root: Path, weights: str) -> dict:  # noqa: ANN001 - argparse namespace
    """Returns the recorded outputs of the reference's make_category_data (run from inside its work tree)."""
    import models.backbone.open_clip.openai as fork_openai
    import models.musc as musc_module

    from datasets import mvtec

    fork_openai.download_pretrained_from_url = lambda url, cache_dir=None: weights  # the "openai" download
    recorded: dict = {"inputs": [], "features_raw": [], "tokens": [], "lnamd": {}, "msm": {}, "degree": None}

    reference_lnamd = musc_module.LNAMD

    class RecordingLNAMD(reference_lnamd):  # type: ignore[misc, valid-type]
        """The reference LNAMD; remembers the degree the following MSM calls belong to."""

        def __init__(self, *a: object, r: int, **k: object) -> None:
            recorded["degree"] = r
            super().__init__(*a, r=r, **k)

    reference_msm = musc_module.MSM

    def recording_msm(Z: torch.Tensor, **kwargs: object) -> torch.Tensor:  # noqa: N803 - the reference's name
        scores = reference_msm(Z=Z, **kwargs)
        recorded["lnamd"].setdefault(recorded["degree"], []).append(Z.detach().clone())
        recorded["msm"].setdefault(recorded["degree"], []).append(scores.detach().clone())
        return scores

    functional = musc_module.F

    class RecordingFunctional(types.SimpleNamespace):
        """``torch.nn.functional`` whose ``interpolate`` keeps its input and output."""

        def __getattr__(self, name: str) -> object:
            return getattr(functional, name)

        def interpolate(self, x: torch.Tensor, *a: object, **k: object) -> torch.Tensor:
            out = functional.interpolate(x, *a, **k)
            recorded.setdefault("interpolate", []).append((x.detach().clone(), out.detach().clone(), dict(k)))
            return out

    reference_rscin = musc_module.RsCIN

    def recording_rscin(scores_old: np.ndarray, cls_tokens: list | None = None, k_list: list | None = None):  # noqa: ANN202
        out = reference_rscin(scores_old, cls_tokens, k_list=k_list)
        recorded["rscin"] = (np.array(scores_old).copy(), np.array(cls_tokens).copy(), list(k_list or []),
                             np.array(out).copy())
        return out

    def metrics_not_computed(*a: object, **k: object) -> tuple:
        return (float("nan"),) * 3, (float("nan"),) * 4

    musc_module.LNAMD, musc_module.MSM, musc_module.RsCIN = RecordingLNAMD, recording_msm, recording_rscin
    musc_module.F = RecordingFunctional()
    musc_module.compute_metrics = metrics_not_computed

    arrays, masks, labels = common.query_images(args.images, args.seed)
    with tempfile.TemporaryDirectory(prefix="musc-parity-") as tmp:
        data = Path(tmp) / "data"
        write_category(data, arrays, masks, labels)
        cfg = {"datasets": {"dataset_name": "mvtec_ad", "data_path": str(data), "class_name": CATEGORY,
                            "img_resize": args.image_size, "divide_num": 1},
               "models": {"backbone_name": ARCH, "pretrained": "openai", "batch_size": BATCH_SIZE,
                          "feature_layers": LAYERS, "r_list": R_LIST},
               "device": 0, "testing": {"output_dir": str(Path(tmp) / "output"), "vis": False,
                                        "vis_type": "single_norm", "save_excel": False}}
        musc = musc_module.MuSc(cfg, seed=42)  # examples/musc_main.py
        clip = musc.clip_model
        encode_image = clip.encode_image

        def recording_encode_image(image: torch.Tensor, *a: object, **k: object) -> tuple:
            features, tokens = encode_image(image, *a, **k)
            recorded["inputs"].append(image.detach().clone())
            recorded["features_raw"].append(features.detach().clone())  # musc.py normalises them in place next
            recorded["tokens"].append(torch.stack([t.detach().clone() for t in tokens], 1))
            return features, tokens

        clip.encode_image = recording_encode_image
        datasets_made: list = []
        load_datasets = musc.load_datasets

        def recording_load_datasets(*a: object, **k: object) -> object:
            dataset = load_datasets(*a, **k)
            datasets_made.append(dataset)
            return dataset

        musc.load_datasets = recording_load_datasets
        musc.make_category_data(CATEGORY)
        order = [generation_index(t[2]) for t in datasets_made[0].data_to_iterate]
        divisions = {}
        for parts in (2, 3):
            divisions[parts] = [[generation_index(t[2]) for t in mvtec.MVTecDataset(
                source=str(data), split=mvtec.DatasetSplit.TEST, classname=CATEGORY, resize=args.image_size,
                imagesize=args.image_size, clip_transformer=musc.preprocess, divide_num=parts, divide_iter=i,
                random_seed=42).data_to_iterate] for i in range(parts)]

    scores_in, cls_tokens, k_list, scores_out = recorded["rscin"]
    patch_scores, maps, interpolation = recorded["interpolate"][0]
    out = {
        "src_images": [torch.from_numpy(a) for a in arrays], "src_masks": [torch.from_numpy(m) for m in masks],
        "src_labels": torch.tensor(labels), "order": torch.tensor(order),
        "labels": torch.tensor([labels[g] for g in order]),
        "inputs": torch.cat(recorded["inputs"]),
        "pos_embed_resized": clip.visual.positional_embedding.detach().clone(),
        "tokens": torch.cat(recorded["tokens"]), "image_features_raw": torch.cat(recorded["features_raw"]),
        "image_features": torch.from_numpy(cls_tokens),
        "lnamd": {r: torch.stack(z, 1) for r, z in recorded["lnamd"].items()},
        "msm": {r: torch.stack(s, 1) for r, s in recorded["msm"].items()},
        "patch_scores": patch_scores.reshape(len(order), -1), "anomaly_maps": maps[:, 0],
        "image_scores_raw": torch.from_numpy(scores_in), "image_scores": torch.from_numpy(scores_out).double(),
        "rscin_k_list": k_list, "divisions": divisions,
    }
    out["meta_extra"] = {"interpolation": interpolation,
                         "activation": type(clip.visual.transformer.resblocks[0].mlp.gelu).__name__}
    return out


if __name__ == "__main__":
    main()
