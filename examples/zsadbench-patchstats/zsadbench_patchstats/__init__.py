"""Patchstats: a zsadbench method plugin (registered through the ``zsadbench.methods`` entry point)."""

from zsadbench_patchstats.detector import Patchstats, PatchstatsConfig

__all__ = ["Patchstats", "PatchstatsConfig"]
