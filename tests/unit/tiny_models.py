"""A CLIP small enough for end-to-end tests: 32-pixel frames of 2x2 patches, 16-dim embeddings."""

from __future__ import annotations

import tempme
from tempme.config import CLIPConfig, TextConfig, VisionConfig

TINY_32 = CLIPConfig(
    embed_dim=16,
    vision=VisionConfig(width=32, layers=4, heads=2, patch_size=16, image_size=32),
    text=TextConfig(width=32, layers=1, heads=2),
)


def register_tiny_preset(name: str) -> str:
    """Register ``TINY_32`` under ``name`` (so configs and ``load_model`` can name it) and return the name."""
    tempme.register_preset(name, TINY_32)
    return name
