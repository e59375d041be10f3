"""A CLIP small enough for end-to-end tests: 32-pixel frames of 2x2 patches, 16-dim embeddings."""

from __future__ import annotations

import torch

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


def randomise_adapters(model: torch.nn.Module, seed: int = 0, clip_pos: bool = True) -> torch.nn.Module:
    """Non-zero LoRA B matrices (and clip positional embeddings unless ``clip_pos`` is False), drawn
    from ``seed``: at their initial zeros, folding them or their gradient paths would go untested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_b" in name or (clip_pos and "clip_pos_embed" in name):
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return model
