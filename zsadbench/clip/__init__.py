"""Shared CLIP machinery: loading (open_clip), attention steps, vision taps, window embeddings, text encoding."""
