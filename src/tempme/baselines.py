"""Reference encoders that ``tempme bench`` times beside TempMe's three merging methods.

- ``plain-vit``: a plain CLIP-sized ViT with fused-QKV ``scaled_dot_product_attention``, no LoRA, no
  merging (``PlainViT``), run frame by frame (``FrameEncoder``);
- ``timm-vit``: timm's CLIP ViT of the same size, random weights, where timm imports;
- ``merge-free``: TempMe's encoder on the token shapes of the ``tempme`` schedule with merging itself
  free (``MergeFreeEncoder``), the speed ceiling for ``tempme``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIPConfig, VisionConfig
from .schedule import simulate

TIMM_MODELS = {
    "ViT-B/32": "vit_base_patch32_clip_224",
    "ViT-B/16": "vit_base_patch16_clip_224",
    "ViT-L/14": "vit_large_patch14_clip_224",
}


class PlainBlock(nn.Module):
    """A pre-LN transformer block with fused-QKV attention through ``scaled_dot_product_attention``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(self.norm1(x)).view(batch, tokens, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, width)
        x = x + self.proj(attn)
        return x + self.mlp(self.norm2(x))


class PlainViT(nn.Module):
    """A CLIP-sized image ViT with no LoRA and no merging: the speed reference for method ``none``.

    images ``[N, 3, H, W]`` -> CLS embeddings ``[N, output_dim]``.
    """

    def __init__(self, vision: VisionConfig, output_dim: int):
        super().__init__()
        width = vision.width
        self.patch_embed = nn.Conv2d(3, width, vision.patch_size, vision.patch_size, bias=False)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, vision.tokens_per_frame, width) * width**-0.5)
        self.norm_pre = nn.LayerNorm(width)
        self.blocks = nn.Sequential(*(PlainBlock(width, vision.heads) for _ in range(vision.layers)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, output_dim, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.blocks(self.norm_pre(x))
        return self.head(self.norm(x[:, 0]))


class FrameEncoder(nn.Module):
    """Encode every frame with an image model and average the normalised frame embeddings, the way
    TempMe's video encoder pools its per-frame CLS tokens."""

    def __init__(self, image_encoder: nn.Module):
        super().__init__()
        self.image_encoder = image_encoder

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        videos, num_frames = frames.shape[:2]
        features = F.normalize(self.image_encoder(frames.flatten(0, 1)), dim=-1)
        return features.view(videos, num_frames, -1).mean(dim=1)


class MergeFreeEncoder(nn.Module):
    """TempMe's video encoder with merging made free: every layer runs on the token shapes that the
    ``tempme`` schedule gives it, but tokens are dropped by slicing instead of matched and merged, and
    attention has no size bias. Its speed is the ceiling for method ``tempme``; the gap is what merging
    costs. Its outputs mean nothing.

    frames ``[B, F, 3, H, W]`` -> ``[B, output_dim]``.
    """

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self.layers = simulate(visual.plan, visual.merge, visual.positional_embedding.shape[0])

    def forward(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` is accepted, as the video encoder's forward does, and ignored (no padded frames)."""
        videos, num_frames = frames.shape[:2]
        x = self.visual.embed(frames.flatten(0, 1))
        for block, layer in zip(self.visual.transformer.resblocks, self.layers):
            x = x.reshape(videos * layer.clips, -1, x.shape[-1])[:, : layer.attn_tokens]
            x = x + block.attn(block.ln_1(x))[0]
            x = x[:, : layer.out_tokens]
            x = x + block.mlp(block.ln_2(x))
        cls = x[:, : self.layers[-1].cls].reshape(videos * num_frames, -1)
        features = F.normalize(self.visual.ln_post(cls) @ self.visual.proj.to(cls.dtype), dim=-1)
        return features.view(videos, num_frames, -1).mean(dim=1)


def timm_available() -> bool:
    try:
        import timm  # noqa: F401
    except Exception:  # timm fails in several ways where torchvision does not load
        return False
    return True


def timm_encoder(preset: str, clip: CLIPConfig) -> nn.Module:
    """timm's CLIP ViT of this preset's size, random weights, a head to the embedding size."""
    if preset not in TIMM_MODELS:
        raise ValueError(f"timm-vit has CLIP sizes only ({', '.join(TIMM_MODELS)}), not {preset!r}")
    if not timm_available():
        raise ValueError("timm-vit needs the timm package, which is not importable here")
    import timm

    return timm.create_model(TIMM_MODELS[preset], pretrained=False, num_classes=clip.embed_dim)
