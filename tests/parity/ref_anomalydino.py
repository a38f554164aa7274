"""Reference-side parity driver for AnomalyDINO: runs dammsi/AnomalyDINO (and anomalib's AnomalyDINO) and records.

Runs in the reference's own environment (torch, opencv, faiss-cpu, scikit-learn, scipy, tifffile, matplotlib; anomalib
2.7 for the second anchor), never in zsadbench's. It imports the reference from ``--ref-root`` (a work tree of
dammsi/AnomalyDINO) and the DINOv2 model code from ``--dinov2-root`` (a work tree of facebookresearch/dinov2, which
the reference loads through ``torch.hub``); nothing of either is copied into zsadbench.

1. Weights: a full-size random DINOv2 (``dinov2_vits14`` by default, the official state-dict layout) is created once
   with ``--seed`` and saved to ``--weights`` (reused when the file exists); every side loads that file.
2. Data: a small MVTec-layout benchmark of smooth random textures with bright-blob defects is written to
   ``--data-dir`` (``--image-px`` square PNGs; at the model resolution the maps of both sides have the same size).
3. Few-shot: the reference's ``run_anomaly_detection`` per category (preset ``agnostic``: MVTec's ``capsule`` is
   masked, ``bottle`` is not; both rotate the references), faiss on the CPU, its saved patch distances (.npy), maps
   (.tiff) and scores, plus every feature / mask it computed (the memory bank, the test tokens and masks).
4. Batched zero-shot: ``run_anomalydino_batched.calculate_cosine_distances`` on all test images of each category,
   with the script's masking and score, and ``dists2map`` maps.
5. anomalib (when importable): ``AnomalyDINOModel`` on the same weights and the reference's preprocessed tensors,
   masking off and on; its scores, maps and patch tokens.

    python tests/parity/ref_anomalydino.py --ref-root /refs/AnomalyDINO --dinov2-root /refs/dinov2 \\
        --weights dinov2_vits14_rand_s0.pth --data-dir /tmp/ad_data --out ad_ref.pt
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

CATEGORIES = ("capsule", "bottle")  # masked and unmasked under the reference's MVTec presets


def make_weights(dinov2_root: str, model_name: str, seed: int, path: Path) -> None:
    """Saves a random DINOv2 state dict (official layout) created with the hub code under ``seed``."""
    torch.manual_seed(seed)
    model = torch.hub.load(dinov2_root, model_name, source="local", pretrained=False)
    torch.save(model.state_dict(), path)


def smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Returns zero-mean unit-std smooth noise (size, size)."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-12)


def make_image(rng: np.random.Generator, size: int, defect: bool) -> np.ndarray:
    """Returns a (size, size, 3) uint8 texture with a centred object, and a bright blob when ``defect``."""
    y, x = np.mgrid[0:size, 0:size] / size
    base = 0.35 + 0.08 * smooth_noise(rng, size, size / 40)
    obj = ((y - 0.5) ** 2 + (x - 0.5) ** 2) < 0.28 ** 2
    image = np.stack([base + 0.3 * obj, base + 0.2 * obj, base + 0.1 * obj], axis=-1)
    image += 0.03 * rng.standard_normal(image.shape)
    if defect:
        cy, cx = rng.uniform(0.35, 0.65, size=2)
        blob = ((y - cy) ** 2 + (x - cx) ** 2) < rng.uniform(0.03, 0.06) ** 2
        image[blob] = [0.95, 0.1, 0.1]
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def make_dataset(root: Path, size: int, train: int, tests: int, seed: int) -> None:
    """Writes ``root/<category>/{train/good, test/good, test/defect}/NNN.png`` (cv2, RGB on disk)."""
    import cv2

    rng = np.random.default_rng(seed)
    for category in CATEGORIES:
        for split, kind, count in (("train", "good", train), ("test", "good", tests), ("test", "defect", tests)):
            folder = root / category / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = make_image(rng, size, kind == "defect")
                cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def install_hub(dinov2_root: str, weights: Path) -> None:
    """Makes the reference's ``torch.hub.load('facebookresearch/dinov2', name)`` load the local code and weights."""
    original = torch.hub.load
    state = torch.load(weights, map_location="cpu")

    def load(repo: str, name: str, *args, **kwargs):  # noqa: ANN001, ANN202
        if repo != "facebookresearch/dinov2":
            return original(repo, name, *args, **kwargs)
        model = original(dinov2_root, name, source="local", pretrained=False)
        model.load_state_dict(state)
        return model

    torch.hub.load = load
    torch.cuda.synchronize = lambda *a, **k: None  # the reference times its GPU kernels; this run is on the CPU


class Recorder:
    """Wraps the reference model's feature extraction and masking and keeps every output in call order."""

    def __init__(self, model) -> None:  # noqa: ANN001
        self.features: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        extract, mask = model.extract_features, model.compute_background_mask

        def extract_features(tensor):  # noqa: ANN001, ANN202
            out = extract(tensor)
            self.features.append(np.array(out))
            return out

        def compute_background_mask(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            out = mask(*args, **kwargs)
            self.masks.append(np.array(out))
            return out

        model.extract_features = extract_features
        model.compute_background_mask = compute_background_mask

    def take(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Returns and forgets what was recorded since the last call."""
        out = (self.features, self.masks)
        self.features, self.masks = [], []
        return out


def read_rgb(path: Path) -> np.ndarray:
    """Returns the RGB uint8 image as the reference reads it."""
    import cv2

    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def run_fewshot(model, recorder: Recorder, data: Path, shots: int, seed: int, work: Path) -> dict:  # noqa: ANN001
    """Runs the reference's few-shot detection per category and returns its outputs and intermediates."""
    import tifffile
    from src.detection import run_anomaly_detection
    from src.utils import get_dataset_info

    _, _, masking_default, rotation_default = get_dataset_info("MVTec", "agnostic")
    out = {}
    for category in CATEGORIES:
        recorder.take()
        scores, _, _ = run_anomaly_detection(
            model, category, str(data), shots, {category: ["defect"]}, str(work), save_examples=False,
            masking=masking_default[category], mask_ref_images=False, rotation=rotation_default[category],
            knn_metric="L2_normalized", knn_neighbors=1, faiss_on_cpu=True, seed=seed, save_patch_dists=True,
            save_tiffs=True)
        features, masks = recorder.take()
        references = sorted(os.listdir(data / category / "train" / "good"))[seed * shots:(seed + 1) * shots]
        n_bank = len(references) * (8 if rotation_default[category] else 1)
        processed = list(scores)  # the reference's processing order (its features and masks follow it)
        names = sorted(scores)
        order = [processed.index(n) for n in names]
        maps_dir = work / "anomaly_maps" / f"seed={seed}" / category / "test"
        out[category] = {
            "masking": masking_default[category], "rotation": rotation_default[category],
            "references": references,
            "reference_images": [read_rgb(data / category / "train" / "good" / r) for r in references],
            "reference_features": np.stack(features[:n_bank]),
            "names": names,
            "test_images": [read_rgb(data / category / "test" / n) for n in names],
            "test_features": np.stack(features[n_bank:])[order],
            "test_masks": np.stack(masks[n_bank:])[order] if masking_default[category] else None,
            "scores": np.array([scores[n] for n in names]),
            "patch_distances": np.stack([np.load(maps_dir / (n.rsplit(".", 1)[0] + ".npy")) for n in names]),
            "maps": np.stack([tifffile.imread(maps_dir / (n.rsplit(".", 1)[0] + ".tiff")) for n in names]),
        }
        print(f"few-shot {category}: masking={masking_default[category]} rotation={rotation_default[category]} "
              f"scores={np.round(out[category]['scores'], 4).tolist()}")
    return out


def run_batched(model, data: Path) -> dict:  # noqa: ANN001
    """Runs the reference's batched zero-shot scoring per category (``masking_only`` preset, the script's)."""
    import run_anomalydino_batched as batched
    from src.utils import dists2map, get_dataset_info

    _, _, masking_default, _ = get_dataset_info("MVTec", "masking_only")
    out = {}
    for category in CATEGORIES:
        names, images, features, masks, grids = [], [], [], [], []
        for kind in ("good", "defect"):  # the script's order: 'good' first, then the defect types alphabetically
            for file in sorted(os.listdir(data / category / "test" / kind)):
                image = read_rgb(data / category / "test" / kind / file)
                tensor, grid = model.prepare_image(image)
                tokens = model.extract_features(tensor)
                masks.append(model.compute_background_mask(tokens, grid, threshold=10,
                                                           masking_type=masking_default[category]))
                names.append(f"{kind}/{file}")
                images.append(image)
                features.append(tokens)
                grids.append(grid)
        dists = []
        for index in range(len(features)):
            d = batched.calculate_cosine_distances(features, index, device="cpu")
            d[~masks[index]] = 0.0
            dists.append(d)
        out[category] = {
            "masking": masking_default[category], "names": names, "test_images": images,
            "test_features": np.stack(features), "test_masks": np.stack(masks),
            "patch_distances": np.stack(dists),
            "scores": np.array([batched.dists_to_score(d) for d in dists]),
            "maps": np.stack([dists2map(d.reshape(g), img.shape) for d, g, img in zip(dists, grids, images)]),
        }
        print(f"batched {category}: masking={masking_default[category]} "
              f"scores={np.round(out[category]['scores'], 4).tolist()}")
    return out


def run_anomalib(model, fewshot: dict, weights: Path, timm_name: str) -> dict | None:  # noqa: ANN001
    """Runs anomalib's AnomalyDINOModel on the reference's preprocessed tensors, masking off and on."""
    try:
        import timm
        from anomalib.models.image.anomaly_dino.torch_model import AnomalyDINOModel
        from timm.models.vision_transformer import checkpoint_filter_fn
    except ImportError as exc:
        print(f"anomalib not importable ({exc}); skipping the second anchor")
        return None
    import anomalib

    create = timm.create_model

    def create_random(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        kwargs["pretrained"] = False  # no download: the weights file is loaded below
        return create(*args, **kwargs)

    timm.create_model = create_random
    state = torch.load(weights, map_location="cpu")
    out: dict = {"version": anomalib.__version__}
    try:
        for masking in (False, True):
            for category, ref in fewshot.items():
                detector = AnomalyDINOModel(num_neighbours=1, encoder_name=timm_name, masking=masking)
                backbone = detector.feature_encoder.feature_extractor
                backbone.load_state_dict(checkpoint_filter_fn(state, backbone))
                references = torch.stack([model.prepare_image(i)[0] for i in ref["reference_images"]])
                tests = torch.stack([model.prepare_image(i)[0] for i in ref["test_images"]])
                with torch.no_grad():
                    detector.train()
                    detector(references)
                    detector.fit()
                    detector.eval()
                    result = detector(tests)
                    tokens_references = detector.extract_features(references)
                    tokens_tests = detector.extract_features(tests)
                out[(category, masking)] = {"inputs_references": references, "inputs_tests": tests,
                                            "tokens_references": tokens_references, "tokens_tests": tokens_tests,
                                            "scores": result.pred_score.flatten().double(),
                                            "maps": result.anomaly_map[:, 0].double()}
                print(f"anomalib {category} masking={masking}: "
                      f"scores={np.round(result.pred_score.flatten().numpy(), 4).tolist()}")
    finally:
        timm.create_model = create
    return out


def main() -> None:
    """Parses the arguments, runs the reference (and anomalib) and saves the recording."""
    global CATEGORIES
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref-root", required=True, help="work tree of dammsi/AnomalyDINO")
    parser.add_argument("--dinov2-root", required=True, help="work tree of facebookresearch/dinov2 (hub code)")
    parser.add_argument("--weights", required=True, type=Path, help="DINOv2 state dict (created when missing)")
    parser.add_argument("--model", default="dinov2_vits14")
    parser.add_argument("--timm-name", default="vit_small_patch14_dinov2", help="the same model in timm (anomalib)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and the synthetic data")
    parser.add_argument("--resolution", type=int, default=448, help="the reference's --resolution")
    parser.add_argument("--image-px", type=int, default=448, help="size of the synthetic PNGs")
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--shot-seed", type=int, default=0, help="the reference's few-shot seed")
    parser.add_argument("--train", type=int, default=3, help="normal training images per category")
    parser.add_argument("--tests", type=int, default=2, help="good and defective test images per category (each)")
    parser.add_argument("--data-dir", type=Path, help="where the synthetic benchmark is written (default: temp)")
    parser.add_argument("--categories", default=",".join(CATEGORIES), help="comma-separated MVTec category names")
    parser.add_argument("--no-anomalib", action="store_true")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    CATEGORIES = tuple(args.categories.split(","))
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    if not args.weights.exists():
        make_weights(args.dinov2_root, args.model, args.seed, args.weights)
        print(f"wrote random {args.model} weights (seed {args.seed}) to {args.weights}")
    sys.path.insert(0, args.ref_root)
    install_hub(args.dinov2_root, args.weights)
    from src.backbones import get_model

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data_dir or Path(tmp) / "data"
        make_dataset(data, args.image_px, args.train, args.tests, args.seed)
        model = get_model(args.model, "cpu", smaller_edge_size=args.resolution)
        recorder = Recorder(model)
        fewshot = run_fewshot(model, recorder, data, args.shots, args.shot_seed, Path(tmp) / "work")
        recorder.take()
        batched = run_batched(model, data)
        anomalib_out = None if args.no_anomalib else run_anomalib(model, fewshot, args.weights, args.timm_name)
    meta = {"model": args.model, "resolution": args.resolution, "image_px": args.image_px, "shots": args.shots,
            "shot_seed": args.shot_seed, "seed": args.seed, "weights": str(args.weights),
            "ref_root": args.ref_root, "timm_name": args.timm_name}
    torch.save({"meta": meta, "fewshot": fewshot, "batched": batched, "anomalib": anomalib_out}, args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
