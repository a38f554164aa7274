"""Content hashes that identify what a result was computed from (weights files, checkpoints)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Returns the SHA-256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weights_id(pretrained: str | None) -> str:
    """Returns how a weights setting is recorded: the tag itself, or ``sha256:<digest>`` of a local file."""
    if pretrained and Path(pretrained).expanduser().is_file():
        return f"sha256:{file_sha256(Path(pretrained).expanduser())}"
    return str(pretrained)
