"""PromptAD: Learning Prompts with only Normal Samples for Few-Shot Anomaly Detection (Li et al., CVPR 2024).

Paper: https://arxiv.org/abs/2404.05231. Reference implementation: FuNz-0/PromptAD @0f86ce0 (The Unlicense: public
domain), ``PromptAD/model.py``, ``PromptAD/CLIPAD/transformer.py`` (``V2VTransformer``), ``train_cls.py``,
``train_seg.py``, ``utils/metrics.py``.

Method, as the reference computes it (per category, from the K normal shots only, fitted when the shots arrive):

1. Backbone: ViT-B-16-plus-240 (open_clip, GELU, 240 px, 15×15 grid) with the CLIP-Surgery V-V dual path in **every**
   block (the reference replaces blocks -1..-12). Global feature ``ln_post(o_12[CLS]) @ proj``; patch features
   ``ln_post(v_12) @ proj`` from the V-V stream; memory features: the original stream read by forward hooks on blocks
   3 and 8, which the next block's in-place ``x_ori += attn`` turns into the state half-way through blocks 4 and 9
   (after the attention residual, before the MLP; raw width 896, no ln_post). All features are L2-normalised.
2. Prompts (semantic concatenation, §3.2): learnable normal contexts; anomaly prompts = normal context + hand-written
   anomaly state ("damaged {}", ... plus the category's own defect descriptions) or + learned anomaly suffix
   (:class:`zsadbench.clip.prompts.ConcatenatedPrompts`). Two independent prompt sets are learned: one for the image
   score (3 normal prompts, loss on the global feature, ``train_cls.py``) and one for the map (1 normal prompt, loss on
   every patch feature, ``train_seg.py``).
3. Loss (§3.3): cross-entropy of ``[cos(f, t̄_n), cos(f, t_a,i)...] * s`` towards the normal anchor (s = CLIP's **raw**
   ``logit_scale`` parameter, not its exponential, as the reference uses it), plus the explicit anomaly margin
   (squared-distance triplet loss, margin 0, anchors = normalised mean normal / anomaly features;
   :func:`zsadbench.losses.triplet_margin_loss`), plus ``lambda1`` × the squared distance between the mean manual and
   the mean learned anomaly feature. SGD (lr 0.002, momentum 0.9, weight decay 5e-4), cosine schedule to 1e-5 over
   100 epochs, one step per epoch (all shots in one batch).
4. Scores: textual = softmax(s · [cos(f, t_n), cos(f, t_a)])[anomalous] with t the normalised means of the raw prompt
   features; visual memory = mean over the two memory layers of min over the shots' tokens of (1 − cos) / 2. Map = the
   harmonic fusion 1 / (1/textual + 1/visual) on the grid, bilinear to 400 px, Gaussian σ = 4. Image score =
   1 / (1/textual(global) + 1/max(visual map bilinear at 400 px)) (``metric_cal_img``).

Deliberate deviations from the reference:

- fp32 throughout; the reference forces fp16 (``self.precision = 'fp16'``) on GPU. Its fp32 path has a typo
  (``logit_scalef``) that the parity driver works around.
- The prompts are those after the last of the epochs; the reference keeps the epoch with the best **test** AUROC
  (image AUROC for the image prompts, pixel AUROC for the map prompts), which needs the test labels.
- Maps are computed at ``map_resolution`` (400, the reference's) and then resized (bilinear, antialiased) to the input
  size the harness evaluates at.
- Preprocessing is the shared PIL bicubic squash (the reference first resizes with cv2 to 1024×1024). The reference also
  feeds its **test** images in BGR order (cv2.imread without conversion; shots are converted to RGB); zsadbench feeds
  RGB to both.
- The shots are drawn by the shared seeded protocol (:meth:`zsadbench.detector.FewShot.reference_indices`) by
  default. The reference reads fixed index lists (MVTec AD / VisA only) into an unsorted ``glob`` listing;
  ``--set reference_protocol=list --set reference_list=PromptAD/datasets/seeds_mvtec`` reads the same lists as
  positions in the sorted listing (= the file numbers of MVTec AD).
- Prompt contexts are initialised from a generator seeded with ``fit.seed`` (normal, then anomaly contexts, N(0, 0.02²)
  as the reference) instead of the global RNG state left by building the CLIP model. Categories outside the
  reference's table get only the eight generic anomaly states.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from zsadbench.clip.backbone import load_clip
from zsadbench.clip.dual_path import forward_dual_path
from zsadbench.clip.prompts import ConcatenatedPrompts
from zsadbench.clip.vision import project_tokens
from zsadbench.detector import Detector, FewShot
from zsadbench.filters import gaussian_filter
from zsadbench.losses import triplet_margin_loss
from zsadbench.registry import register_method
from zsadbench.transforms import ClipTransform
from zsadbench.types import Prediction

# The reference's prompt texts (PromptAD/model.py): generic anomaly states, per-category defect descriptions, words.
GENERIC_ANOMALY_STATES = ("damaged {}", "flawed {}", "abnormal {}", "imperfect {}", "blemished {}", "{} with flaw",
                          "{} with defect", "{} with damage")
CATEGORY_ANOMALY_STATES: dict[str, tuple[str, ...]] = {
    "bottle": ("{} with large breakage", "{} with small breakage", "{} with contamination"),
    "toothbrush": ("{} with defect", "{} with anomaly"),
    "carpet": ("{} with hole", "{} with color stain", "{} with metal contamination", "{} with thread residue",
               "{} with thread", "{} with cut"),
    "hazelnut": ("{} with crack", "{} with cut", "{} with hole", "{} with print"),
    "leather": ("{} with color stain", "{} with cut", "{} with fold", "{} with glue", "{} with poke"),
    "cable": ("{} with bent wire", "{} with missing part", "{} with missing wire", "{} with cut", "{} with poke"),
    "capsule": ("{} with crack", "{} with faulty imprint", "{} with poke", "{} with scratch",
                "{} squeezed with compression"),
    "grid": ("{} with breakage", "{} with thread residue", "{} with thread", "{} with metal contamination",
             "{} with glue", "{} with a bent shape"),
    "pill": ("{} with color stain", "{} with contamination", "{} with crack", "{} with faulty imprint",
             "{} with scratch", "{} with abnormal type"),
    "transistor": ("{} with bent lead", "{} with cut lead", "{} with damage", "{} with misplaced transistor"),
    "metal_nut": ("{} with a bent shape ", "{} with color stain", "{} with a flipped orientation", "{} with scratch"),
    "screw": ("{} with manipulated front", "{} with scratch neck", "{} with scratch head"),
    "zipper": ("{} with broken teeth", "{} with fabric border", "{} with defect fabric", "{} with broken fabric",
               "{} with split teeth", "{} with squeezed teeth"),
    "tile": ("{} with crack", "{} with glue strip", "{} with gray stroke", "{} with oil", "{} with rough surface"),
    "wood": ("{} with color stain", "{} with hole", "{} with scratch", "{} with liquid"),
    "candle": ("{} with melded wax", "{} with foreign particals", "{} with extra wax", "{} with chunk of wax missing",
               "{} with weird candle wick", "{} with damaged corner of packaging", "{} with different colour spot"),
    "capsules": ("{} with scratch", "{} with discolor", "{} with misshape", "{} with leak", "{} with bubble"),
    "cashew": ("{} with breakage", "{} with small scratches", "{} with burnt", "{} with stuck together",
               "{} with spot"),
    "chewinggum": ("{} with corner missing", "{} with scratches", "{} with chunk of gum missing",
                   "{} with colour spot", "{} with cracks"),
    "fryum": ("{} with breakage", "{} with scratches", "{} with burnt", "{} with colour spot",
              "{} with fryum stuck together", "{} with colour spot"),
    "macaroni1": ("{} with color spot", "{} with small chip around edge", "{} with small scratches",
                  "{} with breakage", "{} with cracks"),
    "macaroni2": ("{} with color spot", "{} with small chip around edge", "{} with small scratches",
                  "{} with breakage", "{} with cracks"),
    "pcb1": ("{} with bent", "{} with scratch", "{} with missing", "{} with melt"),
    "pcb2": ("{} with bent", "{} with scratch", "{} with missing", "{} with melt"),
    "pcb3": ("{} with bent", "{} with scratch", "{} with missing", "{} with melt"),
    "pcb4": ("{} with scratch", "{} with extra", "{} with missing", "{} with wrong place", "{} with damage",
             "{} with burnt", "{} with dirt"),
    "pipe_fryum": ("{} with breakage", "{} with small scratches", "{} with burnt", "{} with stuck together",
                   "{} with colour spot", "{} with cracks"),
}
CLASS_WORDS = {"macaroni1": "macaroni", "macaroni2": "macaroni", "pcb1": "printed circuit board",
               "pcb2": "printed circuit board", "pcb3": "printed circuit board", "pcb4": "printed circuit board",
               "pipe_fryum": "pipe fryum", "chewinggum": "chewing gum", "metal_nut": "metal nut"}


@dataclass
class PromptFitConfig:
    """The per-category prompt fit on the K shots (train_cls.py / train_seg.py defaults)."""

    epochs: int = 100  # one SGD step per epoch: all shots form one batch
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 0.0005
    lr_min: float = 1e-5  # CosineAnnealingLR eta_min, T_max = epochs, stepped once per epoch
    lambda1: float = 0.001  # weight of the manual-vs-learned anomaly feature matching loss
    seed: int = 111  # seeds the context initialisation (the reference's setup_seed(111))
    progress: bool = True  # tqdm bar over the epochs


@dataclass
class PromptADConfig:
    """PromptAD settings; defaults are the reference's."""

    model: str = "ViT-B-16-plus-240"  # open_clip architecture (GELU)
    pretrained: str = "laion400m_e32"  # open_clip tag, a local weights file, or "random"
    image_size: int = 240  # 15×15 patch grid
    shots: int = 1  # k normal reference images per category (PromptAD is few-shot only: >= 1)
    reference_seed: int = 10  # seed of the shared reference-image draw ("seeded" protocol)
    reference_protocol: str = "seeded"  # or "list": the reference's fixed per-category index files
    reference_list: str | None = None  # for "list": PromptAD's datasets/seeds_<dataset> folder
    n_ctx: int = 4  # learned context vectors per normal prompt
    n_anomaly_ctx: int = 1  # learned anomaly-suffix vectors per learned anomaly prompt
    n_prompts_image: int = 3  # normal prompts of the image-score prompt set (train_cls.py n_pro)
    n_prompts_map: int = 1  # normal prompts of the map prompt set (train_seg.py n_pro)
    n_anomaly_prompts: int = 4  # learned anomaly suffixes (n_pro_ab)
    vv_start_layer: int = 1  # CLIP-Surgery V-V path from the first block on (the reference replaces all 12)
    memory_layers: tuple[int, ...] = (4, 9)  # attention taps the reference's hooks on blocks 3 and 8 end up holding
    map_resolution: int = 400  # the reference's --resolution: maps are upsampled and smoothed at this size
    sigma: float = 4.0  # Gaussian smoothing of the map at map_resolution
    class_name: str | None = None  # prompt class word; None = the reference's word for the category
    activation: str = "auto"  # "auto" follows the weights (GELU for laion400m_e32)
    fit: PromptFitConfig = field(default_factory=PromptFitConfig)


@dataclass
class ImageFeatures:
    """The four L2-normalised features the reference's ``encode_image`` returns."""

    global_feature: Tensor  # (B, E)
    patch_tokens: Tensor  # (B, P, E): V-V stream, ln_post, proj
    memory: list[Tensor]  # per memory layer: (B, P, D) original stream, raw width


@dataclass
class CategoryModel:
    """What the fit leaves for one category: the two text classifiers and the visual memory."""

    image_text: Tensor  # (2, E) normalised [normal, anomalous] of the image prompt set
    map_text: Tensor  # (2, E) of the map prompt set
    memory: list[Tensor]  # per memory layer: (K * P, D) normalised shot tokens
    losses: dict[str, list[float]]  # per prompt set: the loss of every step


def anchor_losses(features: Tensor, normal: Tensor, manual: Tensor, learned: Tensor, logit_scale: Tensor,
                  lambda1: float) -> dict[str, Tensor]:
    """Returns PromptAD's losses for normalised image or patch features (B, E) / (B, P, E) and raw text features.

    ``loss`` = CE(normal anchor vs every anomaly prompt) + triplet margin + lambda1 * anomaly matching.
    """
    anomalous = torch.cat([manual, learned])
    matching = (F.normalize(manual, dim=-1).mean(dim=0) - F.normalize(learned, dim=-1).mean(dim=0)).norm() ** 2
    normal_anchor = F.normalize(normal.mean(dim=0, keepdim=True), dim=-1)
    anomalous_anchor = F.normalize(anomalous.mean(dim=0, keepdim=True), dim=-1)
    anomalous = F.normalize(anomalous, dim=-1)
    logits = torch.cat([features @ normal_anchor.T, features @ anomalous.T], dim=-1) * logit_scale
    target = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    cross_entropy = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    margin = triplet_margin_loss(features, normal_anchor, anomalous_anchor)
    loss = cross_entropy + margin + matching * lambda1
    return {"loss": loss, "cross_entropy": cross_entropy, "margin": margin, "matching": matching}


def text_classifier(normal: Tensor, manual: Tensor, learned: Tensor) -> Tensor:
    """Returns the (2, E) normalised [mean normal, mean anomalous] of raw prompt features (the reference's gallery)."""
    means = torch.stack([normal.mean(dim=0), torch.cat([manual, learned]).mean(dim=0)])
    return F.normalize(means, dim=-1)


def memory_distance(features: Tensor, memory: Tensor) -> Tensor:
    """Returns (B, P): min over the (M, D) memory of (1 − cos) / 2 for normalised (B, P, D) features (not clamped)."""
    return (1.0 - features @ memory.T).amin(dim=-1) / 2.0


@register_method("promptad")
class PromptAD(Detector, FewShot):
    """PromptAD: prompts learned per category from K normal shots, fused with a visual memory of the shots."""

    label = "PromptAD"
    paper = "arXiv:2404.05231"
    reference = "FuNz-0/PromptAD@0f86ce0"
    code_license = "The Unlicense"
    weights_license = "MIT (open_clip LAION-400M ViT-B-16-plus-240)"
    Config = PromptADConfig
    regression_variants = {  # tiny seeded backbone (12-layer vision tower, 80 px: 5×5 grid), short fit
        "1-shot": {"model": "tiny-ViT-B-16-plus-240", "pretrained": "random", "image_size": 80, "shots": 1,
                   "map_resolution": 80, "sigma": 0.8, "fit.epochs": 5, "fit.progress": False},
    }

    def __init__(self, config: PromptADConfig | None = None, *, seed: int = 0, **overrides: object) -> None:
        super().__init__(config, seed=seed, **overrides)
        cfg: PromptADConfig = self.config
        if cfg.shots < 1:
            raise ValueError(f"promptad learns its prompts from normal shots: shots must be >= 1, got {cfg.shots} "
                             "(use --shots K)")
        if cfg.fit.epochs < 1:
            raise ValueError(f"promptad: fit.epochs must be >= 1, got {cfg.fit.epochs}")
        if cfg.map_resolution < 1 or cfg.sigma < 0:
            raise ValueError(f"promptad: map_resolution must be >= 1 and sigma >= 0, got {cfg.map_resolution}, "
                             f"{cfg.sigma}")
        self.backbone = load_clip(cfg.model, cfg.pretrained, image_size=cfg.image_size,
                                  activation=cfg.activation, seed=seed)  # type: ignore[arg-type]
        self.clip = self.backbone.model
        depth = len(self.clip.visual.transformer.resblocks)
        bad = [k for k in cfg.memory_layers if not max(2, cfg.vv_start_layer) <= k <= depth]
        if bad or len(cfg.memory_layers) != 2:
            raise ValueError(f"promptad: memory_layers must be two blocks in {max(2, cfg.vv_start_layer)}..{depth}, "
                             f"got {cfg.memory_layers}")
        self.categories: dict[str, CategoryModel] = {}
        self._transform = ClipTransform(cfg.image_size)

    # ---- preprocessing -----------------------------------------------------------------------------------------------
    def transform(self, image: Image.Image) -> Tensor:
        """Returns the (3, S, S) tensor: PIL bicubic squash to S×S, OpenAI mean/std."""
        return self._transform(image)

    def to(self, device: str | torch.device) -> PromptAD:
        """Moves the backbone and every fitted category to ``device``."""
        super().to(device)
        self.clip.to(self.device)
        self.categories = {c: CategoryModel(m.image_text.to(self.device), m.map_text.to(self.device),
                                            [x.to(self.device) for x in m.memory], m.losses)
                           for c, m in self.categories.items()}
        return self

    def describe(self) -> dict[str, str | int | bool]:
        """Returns the backbone facts (weights id, activation)."""
        return self.backbone.describe()

    # ---- 1. image features -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: Tensor) -> ImageFeatures:
        """Returns the normalised global feature, V-V patch features and memory features of a preprocessed batch."""
        cfg = self.config
        depth = len(self.clip.visual.transformer.resblocks)
        out = forward_dual_path(self.clip.visual, images.to(self.device, torch.float32),
                                start_layer=cfg.vv_start_layer, vv_taps=(depth,),
                                attention_taps=tuple(cfg.memory_layers))
        global_feature = project_tokens(self.clip.visual, out.tokens[:, 0])
        patches = project_tokens(self.clip.visual, out.vv_taps[depth][:, 1:])
        memory = [F.normalize(out.attention_taps[k][:, 1:], dim=-1) for k in cfg.memory_layers]
        return ImageFeatures(F.normalize(global_feature, dim=-1), F.normalize(patches, dim=-1), memory)

    # ---- 2. prompts --------------------------------------------------------------------------------------------------
    def class_word(self, category: str) -> str:
        """Returns the class word of ``category``'s prompts (the reference's mapping, e.g. metal_nut -> metal nut)."""
        return self.config.class_name or CLASS_WORDS.get(category, category)

    def make_prompts(self, category: str, n_prompts: int) -> ConcatenatedPrompts:
        """Returns a freshly initialised (seeded) prompt set for ``category`` with ``n_prompts`` normal prompts."""
        cfg = self.config
        states = GENERIC_ANOMALY_STATES + CATEGORY_ANOMALY_STATES.get(category, ())
        return ConcatenatedPrompts(self.clip, cfg.model, self.class_word(category), states, n_ctx=cfg.n_ctx,
                                   n_prompts=n_prompts, n_anomaly_ctx=cfg.n_anomaly_ctx,
                                   n_anomaly_prompts=cfg.n_anomaly_prompts, seed=cfg.fit.seed).to(self.device)

    # ---- 3. the fit on the shots -------------------------------------------------------------------------------------
    def fit_prompts(self, prompts: ConcatenatedPrompts, features: Tensor, description: str) -> list[float]:
        """Trains ``prompts`` on normalised shot features (K, E) or (K, P, E); returns the loss of every step."""
        fit = self.config.fit
        optimizer = torch.optim.SGD(prompts.parameters(), lr=fit.lr, momentum=fit.momentum,
                                    weight_decay=fit.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=fit.epochs, eta_min=fit.lr_min)
        logit_scale = self.clip.logit_scale.detach()  # the raw parameter, as the reference uses it
        losses = []
        for _ in tqdm(range(fit.epochs), desc=description, disable=not fit.progress, leave=False):
            optimizer.zero_grad()
            normal, manual, learned = prompts(self.clip)
            step = anchor_losses(features, normal, manual, learned, logit_scale, fit.lambda1)
            step["loss"].backward()
            optimizer.step()
            schedule.step()
            losses.append(step["loss"].detach().item())
        return losses

    def set_reference(self, images: Tensor, category: str) -> None:
        """Fits ``category``'s two prompt sets on its K normal shots and stores their visual memory."""
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(f"promptad: reference images of {category!r} must be a non-empty (k, 3, H, W) batch, "
                             f"got shape {tuple(images.shape)}")
        cfg = self.config
        shots = self.encode(images)
        memory = [m.reshape(-1, m.shape[-1]) for m in shots.memory]
        classifiers, losses = [], {}
        for task, n_prompts, features in (("image", cfg.n_prompts_image, shots.global_feature),
                                          ("map", cfg.n_prompts_map, shots.patch_tokens)):
            prompts = self.make_prompts(category, n_prompts)
            with torch.enable_grad():
                losses[task] = self.fit_prompts(prompts, features, f"promptad {category} {task} prompts")
            with torch.no_grad():
                classifiers.append(text_classifier(*prompts(self.clip)))
        self.categories[category] = CategoryModel(classifiers[0], classifiers[1], memory, losses)

    # ---- 4. scoring --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score_grids(self, images: Tensor, category: str) -> tuple[Tensor, Tensor, Tensor]:
        """Returns textual image scores (B,), textual patch scores (B, P) and visual memory scores (B, P)."""
        model = self.categories.get(category)
        if model is None:
            raise RuntimeError(f"promptad: no shots were set for category {category!r}; call "
                               f"set_reference(images, {category!r}) first (PromptAD learns its prompts from them)")
        features = self.encode(images)
        scale = self.clip.logit_scale
        image_text = (scale * features.global_feature @ model.image_text.T).softmax(dim=-1)[:, 1]
        patch_text = (scale * features.patch_tokens @ model.map_text.T).softmax(dim=-1)[..., 1]
        visual = torch.stack([memory_distance(f, m) for f, m in zip(features.memory, model.memory)]).mean(dim=0)
        return image_text, patch_text, visual

    @torch.no_grad()
    def predict_at(self, images: Tensor, category: str, resolution: int) -> Prediction:
        """Returns image scores and anomaly maps computed as the reference does, with maps at ``resolution``²."""
        image_text, patch_text, visual = self.score_grids(images, category)
        batch = images.shape[0]
        height, width = self.backbone.grid_size
        size = (resolution, resolution)

        def upsample(grid: Tensor) -> Tensor:
            return F.interpolate(grid.reshape(batch, 1, height, width), size=size, mode="bilinear",
                                 align_corners=False)[:, 0]

        fused = 1.0 / (1.0 / patch_text + 1.0 / visual)
        maps = upsample(fused)
        if self.config.sigma > 0:
            maps = gaussian_filter(maps, self.config.sigma)
        image_scores = 1.0 / (1.0 / upsample(visual).flatten(1).amax(dim=-1) + 1.0 / image_text)
        return Prediction(image_scores, maps)

    @torch.no_grad()
    def predict(self, images: Tensor, category: str) -> Prediction:
        """Returns image scores (B,) and anomaly maps (B, S, S) for a preprocessed batch of ``category``."""
        prediction = self.predict_at(images, category, self.config.map_resolution)
        maps = prediction.anomaly_maps
        if tuple(maps.shape[-2:]) != self.input_size:
            maps = F.interpolate(maps[:, None], size=self.input_size, mode="bilinear", align_corners=False,
                                 antialias=maps.shape[-1] > self.input_size[1])[:, 0]
        return Prediction(prediction.image_scores, maps)
