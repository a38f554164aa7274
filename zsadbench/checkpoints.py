"""Checkpoint files: plain torch pickles of tensors and small metadata, readable with ``weights_only=True``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FORMAT = "zsadbench-checkpoint"  # the ``format`` entry of checkpoint files zsadbench writes


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not fit the method (names the keys)."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Returns the dict stored in a checkpoint file (never executes pickled code)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    check_torch_file(path, "checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(exc).strip().splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


def check_torch_file(path: Path, what: str) -> None:
    """Raises a one-line error unless ``path`` starts like a file of ``torch.save`` (a zip archive or a pickle)."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise CheckpointError(f"{what} {path} is not a PyTorch file (expected what torch.save writes: .pt / .pth)")


def unwrap_checkpoint(checkpoint: dict[str, Any], method: str, path: str | Path,
                      accepted: tuple[str, ...] = ()) -> dict[str, Any]:
    """Returns the learnable state held by a checkpoint: a zsadbench file's ``state_dict``, else the dict itself.

    A zsadbench checkpoint (``format`` = ``zsadbench-checkpoint``) written by another method than ``method`` or the
    ``accepted`` ones is an error naming both.
    """
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        return checkpoint
    if checkpoint.get("method") not in (method, *accepted):
        raise CheckpointError(f"checkpoint {path} was written by method {checkpoint.get('method')!r}; it cannot be "
                              f"loaded into {method!r}")
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} has no 'state_dict' entry")
    return state


def write_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Writes ``state`` atomically (temporary file then rename), so an interruption never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def check_keys(state: dict[str, Any], expected: dict[str, tuple[int, ...]], what: str) -> None:
    """Raises CheckpointError naming missing, unexpected and mis-shaped keys of ``state`` against ``expected``."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: {tuple(state[k].shape)} != {expected[k]}" for k in sorted(set(expected) & set(state))
              if hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(expected[k])]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected)}")
        if shapes:
            parts.append(f"wrong shapes: {'; '.join(shapes)}")
        raise CheckpointError(f"{what} does not fit: " + "; ".join(parts))
