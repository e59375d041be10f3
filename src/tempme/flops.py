"""Count the video encoder's multiply-accumulates the way the paper does (fvcore's convention).

Counted: matrix products (linear layers, attention's two matmuls, the small merge similarity matmuls),
the patch embedding (as the convolution it is), and layer norms at 5 per element. Softmax and other
elementwise work is ignored, as in fvcore. One multiply-accumulate counts as one "flop", so the totals are the paper's GFLOPs.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .config import ModelConfig
from .schedule import LayerTokens, simulate

aten = torch.ops.aten


def _prod(shape) -> int:
    return math.prod(int(s) for s in shape)


def _mm(args, out) -> int:
    return _prod(args[0].shape) * int(args[1].shape[-1])


def _addmm(args, out) -> int:
    return _prod(args[1].shape) * int(args[2].shape[-1])


def _bmm(args, out) -> int:
    return _prod(args[0].shape) * int(args[1].shape[-1])


def _layer_norm(args, out) -> int:
    return 5 * _prod(args[0].shape)


def _attention(args, out) -> int:
    """Fused attention: ``q k^T`` plus ``attn v``, per batch and head."""
    q, k, v = args[:3]
    *batch, queries, dim = q.shape
    keys = k.shape[-2]
    return _prod(batch) * queries * keys * (dim + v.shape[-1])


_COUNTERS = {
    aten.mm.default: _mm,
    aten.addmm.default: _addmm,
    aten.bmm.default: _bmm,
    aten.baddbmm.default: lambda args, out: _bmm(args[1:], out),
    aten.native_layer_norm.default: _layer_norm,
    aten._scaled_dot_product_flash_attention_for_cpu.default: _attention,
    aten._scaled_dot_product_flash_attention.default: _attention,
    aten._scaled_dot_product_efficient_attention.default: _attention,
    aten._scaled_dot_product_cudnn_attention.default: _attention,
}


class MacCounter(TorchDispatchMode):
    """Context manager that adds up multiply-accumulates per aten op kind (``counts``)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        counter = _COUNTERS.get(func)
        if counter is not None:
            first_output = out[0] if isinstance(out, (tuple, list)) else out
            self.counts[func.overloadpacket.__name__] += counter(args, first_output)
        return out

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class FlopReport:
    preset: str
    method: str
    frames: int
    gflops: float  # video encoder, one video, multiply-accumulates / 1e9
    by_op: dict[str, float]
    layers: list[LayerTokens]

    @property
    def tokens(self) -> int:
        """Tokens per video at the encoder's output (the paper's '# Tokens')."""
        last = self.layers[-1]
        return last.clips * last.out_tokens


def count_video_flops(config: ModelConfig, preset: str = "") -> FlopReport:
    """Run one video through a freshly built encoder (LoRA folded) and count its MACs.

    ``config``: a ``ModelConfig``, or a model built from one (``model.config`` is read).
    Runs on the meta device: every shape in the encoder is fixed by the plan, so no values are needed
    and nothing is allocated. (On meta, fused attention decomposes into ``bmm``s; the count is the same.)
    """
    from .model import VisionTransformer

    config = getattr(config, "config", config)
    if not isinstance(config, ModelConfig):
        raise TypeError(f"count_video_flops takes a ModelConfig or a TempMe model, got {type(config).__name__}")

    vision = config.clip.vision
    with torch.device("meta"):
        encoder = VisionTransformer(config, config.clip.embed_dim).eval()
        for block in encoder.transformer.resblocks:
            block.attn.fold_lora()
        frames = torch.empty(1, config.frames, 3, vision.image_size, vision.image_size)
    with torch.no_grad(), MacCounter() as counter:
        encoder(frames)
    # The patch embedding runs as one matrix product over 1 + grid^2 rows per frame, row 0 a zero row
    # where the class token goes (VisionTransformer.embed); fvcore counts the convolution it computes.
    patches, patch_values = vision.tokens_per_frame - 1, 3 * vision.patch_size**2
    counter.counts["mm"] -= config.frames * (patches + 1) * patch_values * vision.width
    counter.counts["patch_embedding"] = config.frames * patches * patch_values * vision.width
    layers = simulate(encoder.plan, config.merge, vision.tokens_per_frame)
    return FlopReport(
        preset=preset,
        method=config.merge.method,
        frames=config.frames,
        gflops=counter.total / 1e9,
        by_op={name: count / 1e9 for name, count in counter.counts.items()},
        layers=layers,
    )
