"""Writes the seeded random full-size CLIP state dict that a parity check hands to both sides.

    python tests/parity/make_weights.py --arch ViT-L-14-336-quickgelu --seed 0 --out /tmp/parity/clip_s0.pt

The weights are ``zsadbench.clip.testing.clip_like_state_dict``: open_clip's initialisation under ``--seed``, then
non-trivial LayerNorm affines and attention biases (a dropped affine or bias shows), vision q/k rows scaled by 2
(attention is not near-uniform over 1370 tokens) and a logit scale of ln 100 (a method that uses it instead of the
references' fixed 0.07 shows). By default every value is then rounded to the float16 grid and stored as float32:
the OpenAI loaders of the references (AnomalyCLIP, AdaptCLIP, MuSc's ``build_model_from_openai_state_dict``) cast
the weights to float16 and back, which loses nothing on such values. The key layout is open_clip's, which is also
OpenAI's. ``--openai-metadata`` adds the three scalars of the OpenAI release (input resolution, context length,
vocabulary size) that mark a file as OpenAI weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from zsadbench.clip.testing import clip_like_state_dict


def main() -> None:
    """Writes the weights file described by the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-L-14-336-quickgelu", help="open_clip architecture")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--no-fp16-grid", action="store_true", help="keep the float32 values as drawn")
    parser.add_argument("--openai-metadata", action="store_true",
                        help="add input_resolution / context_length / vocab_size as OpenAI's files have")
    args = parser.parse_args()

    torch.set_num_threads(2)
    state = clip_like_state_dict(args.arch, seed=args.seed)
    if not args.no_fp16_grid:
        state = {k: v.half().float() if v.is_floating_point() else v for k, v in state.items()}
    if args.openai_metadata:
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        state["input_resolution"] = torch.tensor(grid * state["visual.conv1.weight"].shape[-1])
        state["context_length"] = torch.tensor(state["positional_embedding"].shape[0])
        state["vocab_size"] = torch.tensor(state["token_embedding.weight"].shape[0])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in state.items()}, out)
    print(f"wrote {out}: {args.arch}, seed {args.seed}, {len(state)} tensors, "
          f"{sum(v.numel() for v in state.values()) / 1e6:.1f} M values", file=sys.stderr)


if __name__ == "__main__":
    main()
