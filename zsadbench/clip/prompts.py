"""Learnable text prompts: AnomalyCLIP's object-agnostic prompts with deep text prompts, AdaptCLIP's input prompts,
PromptAD's semantic concatenation (:class:`ConcatenatedPrompts`, at the end of the module).

Two prompts, normal and abnormal, each ``[SOT] X_1 .. X_n <text> [EOT]`` where the n placeholder embeddings are
learned context vectors (CoOp style) and ``<text>`` is fixed: AnomalyCLIP "object." / "damaged object.", AdaptCLIP's
textual adapter "." / "." (its ``deep_depth`` is 1: input layer only).

Deep prompts (AnomalyCLIP ``compound_prompts_text``): ``deep_depth - 1`` learned (t, W) tensors, shared by both
prompts, that **overwrite** token positions 1..t of the input of text blocks 2..deep_depth (zqhang/AnomalyCLIP#75:
overwriting, not the concatenation of early paper versions). The reference casts them to fp16 before concatenating
them with the fp32 tokens, so they are effectively rounded to fp16 in the forward pass, and their gradients are
rounded to fp16 per prompt sequence in the backward pass; ``fp16_deep_prompts`` reproduces both.

Parameter names follow the reference's state-dict keys (``ctx_pos`` = normal context, ``ctx_neg`` = abnormal
context, ``compound_prompts_text.{i}``), so the authors' checkpoints map onto the module one to one; the frozen token
embeddings around the context (the reference's ``token_prefix_*`` / ``token_suffix_*`` buffers) are recomputed from
the backbone and are not part of the state.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from zsadbench.checkpoints import CheckpointError
from zsadbench.clip.backbone import ClipModel
from zsadbench.clip.text import TextTower, encode_text_embeddings, end_of_text_index, tokenize

log = logging.getLogger(__name__)

ANOMALYCLIP_TEXTS = ("object.", "damaged object.")  # "{}" and "damaged {}" with the class word "object"
PLACEHOLDER = "X"  # the reference tokenises n "X" placeholders, then swaps their embeddings for the context


class LearnablePrompts(nn.Module):
    """A normal and an abnormal learnable prompt (+ optional deep prompts) for a CLIP text tower."""

    token_ids: Tensor  # (2, L) token ids of the two prompts (buffer, not saved)
    token_embeddings: Tensor  # (2, L, W) their frozen token embeddings (buffer, not saved)

    def __init__(self, clip: ClipModel, model_name: str, *, n_ctx: int = 12,
                 texts: Sequence[str] = ANOMALYCLIP_TEXTS, deep_depth: int = 9, deep_length: int = 4,
                 fp16_deep_prompts: bool = True, init_std: float = 0.02, seed: int = 0) -> None:
        super().__init__()
        if len(texts) != 2:
            raise ValueError(f"LearnablePrompts needs two texts (normal, abnormal), got {list(texts)}")
        tower = TextTower(clip)
        token_embedding = tower.token_embedding
        text_blocks = len(tower.transformer.resblocks)
        if not 1 <= deep_depth <= text_blocks:
            raise ValueError(f"deep prompt depth {deep_depth} is outside 1..{text_blocks} (text blocks)")
        self.n_ctx, self.deep_depth, self.deep_length = n_ctx, deep_depth, deep_length
        self.fp16_deep_prompts = fp16_deep_prompts
        self.texts = tuple(texts)
        width = token_embedding.weight.shape[1]
        generator = torch.Generator().manual_seed(seed)
        # init order as the reference: normal context, abnormal context, then the deep prompts
        self.ctx_pos = nn.Parameter(init_std * torch.randn(1, 1, n_ctx, width, generator=generator))
        self.ctx_neg = nn.Parameter(init_std * torch.randn(1, 1, n_ctx, width, generator=generator))
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(init_std * torch.randn(deep_length, width, generator=generator))
             for _ in range(deep_depth - 1)])
        prompts = [" ".join([PLACEHOLDER] * n_ctx) + " " + text for text in self.texts]
        token_ids = tokenize(model_name, prompts).to(token_embedding.weight.device)
        if token_ids[:, -1].ne(0).any():  # the tokenizer truncates silently; a full row means it did
            raise ValueError(f"prompts {prompts} do not fit the text context of {token_ids.shape[1]} tokens")
        with torch.no_grad():
            embeddings = token_embedding(token_ids).float()
        self.register_buffer("token_ids", token_ids, persistent=False)
        self.register_buffer("token_embeddings", embeddings, persistent=False)

    def input_embeddings(self) -> Tensor:
        """Returns the (2, L, W) text-encoder input: [SOT] embedding, learned context, embeddings of the rest."""
        context = torch.cat([self.ctx_pos.reshape(1, self.n_ctx, -1), self.ctx_neg.reshape(1, self.n_ctx, -1)])
        frozen = self.token_embeddings
        return torch.cat([frozen[:, :1], context.to(frozen.dtype), frozen[:, 1 + self.n_ctx:]], dim=1)

    def deep_prompts(self) -> dict[int, Tensor]:
        """Returns {1-based text block: (2, t, W) tokens that overwrite positions 1..t of that block's input}."""
        out = {}
        for index, prompt in enumerate(self.compound_prompts_text):
            per_sequence = prompt.unsqueeze(0).expand(2, -1, -1)
            if self.fp16_deep_prompts:  # expanded first: the reference's gradient is rounded per sequence
                per_sequence = per_sequence.half().float()
            out[index + 2] = per_sequence
        return out

    def forward(self, clip: ClipModel) -> Tensor:
        """Returns the (2, E) text features [normal; abnormal] of the prompts (not normalised)."""
        return encode_text_embeddings(clip, self.input_embeddings(), end_of_text_index(self.token_ids),
                                      deep_prompts=self.deep_prompts() or None)

    # --- the authors' checkpoint layout (zqhang/AnomalyCLIP prompt_learner, gaobb/AdaptCLIP textual_learner) ---

    def reference_buffers(self) -> dict[str, Tensor]:
        """Returns the frozen buffers the reference stores beside the parameters (prefix/suffix embeddings, ids)."""
        e, ids, n = self.token_embeddings, self.token_ids, self.n_ctx
        out = {}
        for row, tag in enumerate(("pos", "neg")):
            out[f"token_prefix_{tag}"] = e[row, :1].reshape(1, 1, 1, -1)
            out[f"token_suffix_{tag}"] = e[row, 1 + n:].reshape(1, 1, e.shape[1] - 1 - n, -1)
            out[f"tokenized_prompts_{tag}"] = ids[row].reshape(1, 1, -1).to(torch.int32)
        return out

    def reference_state_dict(self, projections: int = 896) -> dict[str, Tensor]:
        """Returns the state in the reference's full key layout (with its unused ``compound_prompt_projections``)."""
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        state.update({k: v.clone() for k, v in self.reference_buffers().items()})
        width = self.ctx_pos.shape[-1]
        for i in range(self.deep_depth - 1):  # created but never used by the reference (zqhang/AnomalyCLIP#102)
            state[f"compound_prompt_projections.{i}.weight"] = torch.zeros(projections, width)
            state[f"compound_prompt_projections.{i}.bias"] = torch.zeros(projections)
        return state

    def load_reference_state(self, state: dict[str, Tensor], source: str) -> None:
        """Loads a state dict in the reference layout, checking the frozen buffers it carries.

        Parameters must all be present with the right shapes; the token-id buffers must equal ours (else the prompt
        templates differ); prefix/suffix embeddings that differ from this backbone's only warn (they are recomputed,
        and differ when the checkpoint was trained on other CLIP weights); the unused projections are ignored.
        """
        own = self.state_dict()
        buffers = self.reference_buffers()
        params = {k: v for k, v in state.items() if k in own}
        ignored = sorted(k for k in state if k.startswith("compound_prompt_projections."))
        unexpected = sorted(k for k in state if k not in own and k not in buffers and k not in ignored)
        missing = sorted(k for k in own if k not in state)
        wrong = [f"{k}: {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in sorted(params)
                 if tuple(state[k].shape) != tuple(own[k].shape)]
        wrong += [f"{k}: {tuple(state[k].shape)} != {tuple(buffers[k].shape)}" for k in sorted(buffers)
                  if k in state and tuple(state[k].shape) != tuple(buffers[k].shape)]
        if missing or unexpected or wrong:
            parts = [f"checkpoint {source} does not fit the prompt learner (n_ctx {self.n_ctx}, deep prompts "
                     f"{self.deep_depth - 1} x {self.deep_length}, width {self.ctx_pos.shape[-1]})"]
            if missing:
                parts.append(f"missing keys: {', '.join(missing)}")
            if unexpected:
                parts.append(f"unexpected keys: {', '.join(unexpected)}")
            if wrong:
                parts.append(f"wrong shapes: {'; '.join(wrong)}")
            raise CheckpointError("; ".join(parts))
        for tag in ("pos", "neg"):
            key = f"tokenized_prompts_{tag}"
            if key in state and not torch.equal(state[key].to(torch.int64).cpu(), buffers[key].to(torch.int64).cpu()):
                raise CheckpointError(f"checkpoint {source}: {key} differs from this prompt learner's tokens "
                                      f"(prompt texts {self.texts}, {self.n_ctx} context tokens)")
        differing = [k for k in buffers if k.startswith("token_") and k in state
                     and not torch.equal(state[k].float().cpu(), buffers[k].float().cpu())]
        if differing:
            warnings.warn(f"checkpoint {source}: the frozen token embeddings it stores ({', '.join(differing)}) differ "
                          "from this backbone's; it was trained on other CLIP weights", UserWarning, stacklevel=2)
        if ignored:
            log.info("checkpoint %s: ignoring %d unused compound_prompt_projections tensors", source, len(ignored))
        self.load_state_dict(params, strict=True)


class ConcatenatedPrompts(nn.Module):
    """PromptAD's learnable prompts: normal prompts and the anomaly prompts made from them by semantic concatenation.

    ``n_prompts`` normal prompts ``[SOT] N_1 .. N_n <class>. [EOT]`` each have their own ``n_ctx`` learned context
    vectors (CoOp). Anomaly prompts reuse the normal contexts (PromptAD §3.2, semantic concatenation):

    - manual: every normal context followed by a hand-written anomaly state, ``N_1 .. N_n damaged <class>.``, one per
      (state, normal prompt), state-major;
    - learned: every normal context followed by a learned anomaly suffix, ``N_1 .. N_n A_1 .. A_m <class>.``; row r
      pairs normal context ``r % n_prompts`` with anomaly context ``r % n_anomaly_prompts``, as the reference's two
      ``expand(...).reshape`` calls do (every pair once when the counts are coprime).

    Placeholder words "N" and "A" (one BPE token each) are tokenised and their embeddings swapped for the contexts, as
    the reference does. Parameter names follow the reference (``normal_ctx``, ``abnormal_ctx``).
    """

    normal_ids: Tensor  # (n_prompts, L)
    manual_ids: Tensor  # (n_states * n_prompts, L)
    learned_ids: Tensor  # (n_anomaly_prompts * n_prompts, L)
    normal_embeddings: Tensor  # frozen token embeddings of the three groups (buffers, not saved)
    manual_embeddings: Tensor
    learned_embeddings: Tensor

    def __init__(self, clip: ClipModel, model_name: str, class_word: str, anomaly_states: Sequence[str], *,
                 n_ctx: int = 4, n_prompts: int = 3, n_anomaly_ctx: int = 1, n_anomaly_prompts: int = 4,
                 init_std: float = 0.02, seed: int = 0) -> None:
        super().__init__()
        if min(n_ctx, n_prompts, n_anomaly_ctx, n_anomaly_prompts) < 1:
            raise ValueError(f"ConcatenatedPrompts: context lengths and prompt counts must be >= 1, got n_ctx={n_ctx}, "
                             f"n_prompts={n_prompts}, n_anomaly_ctx={n_anomaly_ctx}, "
                             f"n_anomaly_prompts={n_anomaly_prompts}")
        if not anomaly_states:
            raise ValueError("ConcatenatedPrompts: at least one hand-written anomaly state is needed")
        token_embedding = TextTower(clip).token_embedding
        width = token_embedding.weight.shape[1]
        self.n_ctx, self.n_prompts = n_ctx, n_prompts
        self.n_anomaly_ctx, self.n_anomaly_prompts = n_anomaly_ctx, n_anomaly_prompts
        self.class_word, self.anomaly_states = class_word, tuple(anomaly_states)
        generator = torch.Generator().manual_seed(seed)
        # init order as the reference: normal contexts, then anomaly contexts
        self.normal_ctx = nn.Parameter(init_std * torch.randn(n_prompts, n_ctx, width, generator=generator))
        self.abnormal_ctx = nn.Parameter(init_std * torch.randn(n_anomaly_prompts, n_anomaly_ctx, width,
                                                                generator=generator))
        normal_prefix = " ".join(["N"] * n_ctx)
        anomaly_prefix = " ".join(["A"] * n_anomaly_ctx)
        texts = {
            "normal": [f"{normal_prefix} {class_word}."] * n_prompts,
            "manual": [f"{normal_prefix} {state.format(class_word)}." for state in self.anomaly_states
                       for _ in range(n_prompts)],
            "learned": [f"{normal_prefix} {anomaly_prefix} {class_word}."] * (n_anomaly_prompts * n_prompts),
        }
        device = token_embedding.weight.device
        for group, prompts in texts.items():
            ids = tokenize(model_name, prompts).to(device)
            if ids[:, -1].ne(0).any():  # the tokenizer truncates silently; a full row means it did
                raise ValueError(f"prompt {prompts[0]!r} does not fit the text context of {ids.shape[1]} tokens")
            with torch.no_grad():
                embeddings = token_embedding(ids).float()
            self.register_buffer(f"{group}_ids", ids, persistent=False)
            self.register_buffer(f"{group}_embeddings", embeddings, persistent=False)

    def input_embeddings(self) -> tuple[Tensor, Tensor, Tensor]:
        """Returns the text-encoder inputs (normal, manual anomaly, learned anomaly), each (rows, L, W)."""
        n, m = self.n_ctx, self.n_anomaly_ctx
        normal_ctx = self.normal_ctx
        manual_rows = self.manual_ids.shape[0]
        learned_rows = self.learned_ids.shape[0]
        manual_ctx = normal_ctx.repeat(manual_rows // self.n_prompts, 1, 1)  # row r: normal context r % n_prompts
        learned_normal = normal_ctx.repeat(self.n_anomaly_prompts, 1, 1)
        learned_anomaly = self.abnormal_ctx.repeat(self.n_prompts, 1, 1)  # row r: anomaly context r % n_anomaly
        e_normal, e_manual, e_learned = self.normal_embeddings, self.manual_embeddings, self.learned_embeddings
        normal = torch.cat([e_normal[:, :1], normal_ctx, e_normal[:, 1 + n:]], dim=1)
        manual = torch.cat([e_manual[:, :1], manual_ctx, e_manual[:, 1 + n:]], dim=1)
        learned = torch.cat([e_learned[:, :1], learned_normal, learned_anomaly, e_learned[:, 1 + n + m:]], dim=1)
        assert manual.shape[0] == manual_rows and learned.shape[0] == learned_rows
        return normal, manual, learned

    def forward(self, clip: ClipModel) -> tuple[Tensor, Tensor, Tensor]:
        """Returns the unnormalised text features (normal, manual anomaly, learned anomaly), each (rows, E)."""
        groups = self.input_embeddings()
        ids = torch.cat([self.normal_ids, self.manual_ids, self.learned_ids])
        features = encode_text_embeddings(clip, torch.cat(groups), end_of_text_index(ids))  # one pass for all rows
        normal, manual, learned = features.split([g.shape[0] for g in groups])
        return normal, manual, learned
