"""CLIP encoders with LoRA, and TempMe's progressive token merging in the video encoder.

Parameter names follow OpenAI CLIP (``visual.transformer.resblocks.0.attn.in_proj_weight`` ...), so
OpenAI and open_clip checkpoints load directly. Added parameters: ``attn.lora_a`` / ``attn.lora_b`` in
every attention layer, and ``clip_pos_embed`` on the ClipMe blocks of the video encoder.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import flex_attention

from .config import MIN_WORDS, MergeConfig, ModelConfig
from .merging import (
    MergePlan,
    bipartite_soft_matching,
    join_clips,
    match_patches,
    merge_weighted,
    needs_autograd,
    normalized_patches,
    use_fused_kernels,
)
from .schedule import LayerPlan, build_plan, merge_counts, simulate
from .userwarnings import VideoEncoderWarning, warn


QUICK_GELU_SCALE = 1.702
# How proportional attention adds log(size) of each key to the attention logits.
SIZE_ATTENTION = {
    "bias": "an additive attention bias (scaled_dot_product_attention with a mask)",
    "channels": "an extra query/key channel per head, so that bias-free attention kernels apply",
    "flex": "FlexAttention adding log(size) as a score modification (its kernel compiled on first use; "
    "on a CPU, inference only)",
    "values": "size-weighted values with the size as an extra value channel, the output divided by it: "
    "queries and keys keep their width, and bias-free kernels apply",
    "auto": "channels on a GPU, bias elsewhere: whichever measured faster there",
}
HEAD_PAD = 8  # extra channels per attention head for the size channel or value: head sizes stay multiples of 8
# The form an inference-optimised model uses. On an H100 (ViT-B/16, 12 frames, bf16, CUDA graphs) the
# size channel ran tempme 5% faster than the bias; on 2 CPU cores 2-6% slower; training steps ran
# slower with it on both, so the trainable model keeps the bias (docs/benchmarks.md).
INFERENCE_SIZE_ATTENTION = "auto"


def check_size_attention(name: str) -> None:
    """Refuse a ``size_attention`` that is not one of ``SIZE_ATTENTION``."""
    if name not in SIZE_ATTENTION:
        raise ValueError(f"unknown size attention {name!r}; choose one of {', '.join(SIZE_ATTENTION)}")


def resolve_size_attention(name: str, device: torch.device | str) -> str:
    """``bias``, ``channels``, ``flex`` or ``values``: what ``name`` (one of ``SIZE_ATTENTION``) means on ``device``."""
    check_size_attention(name)
    if name != "auto":
        return name
    return "channels" if torch.device(device).type == "cuda" else "bias"


@functools.cache
def compiled_flex_attention():
    """FlexAttention compiled once, for all shapes: the token count changes from layer to layer, and a
    static compilation per shape would run into dynamo's recompilation limit. Built on first use, as
    importing the compiler takes seconds."""
    return torch.compile(flex_attention, dynamic=True)


def flex_size_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_size: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + log s_j) v`` for ``q, k, v [B, heads, N, d]``, ``log_size [B, N]``.

    FlexAttention adds log(size) inside its fused kernel, so there is neither a dense bias (which keeps
    SDPA off its fastest kernels) nor wider heads (the size channel). Inside a ``torch.compile``d model
    the compiler builds the kernel with the rest; otherwise the kernel is compiled on first use.
    """
    if q.device.type == "cpu":
        if q.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                "size attention 'flex' cannot train on the CPU (FlexAttention has no CPU backward); use 'bias'"
            )
        # Left out of a compiled model's graph (disabling at import would load the compiler, seconds).
        return torch.compiler.disable(flex_size_attention_cpu)(q, k, v, log_size)
    attend = flex_attention if torch.compiler.is_compiling() else compiled_flex_attention()
    return attend(q, k, v, score_mod=log_size_score(log_size))


def flex_size_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_size: torch.Tensor) -> torch.Tensor:
    """torch 2.13 builds FlexAttention's CPU kernel for contiguous inputs of more than one sequence,
    and not inside a compiled model's graph (it finds no kernel there): ``flex_size_attention`` runs
    this outside it."""
    if q.shape[0] == 1:
        # torch 2.13's CPU kernel for a batch of one sequence does not compile (a C++ error in the
        # generated code): the sequence goes twice, and one result is kept.
        q, k, v, log_size = (t.expand(2, *t.shape[1:]) for t in (q, k, v, log_size))
        return flex_size_attention_cpu(q, k, v, log_size)[:1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return compiled_flex_attention()(q, k, v, score_mod=log_size_score(log_size))


def size_weighted_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + log s_j) v`` for ``q, k, v [B, heads, N, d]``, ``size [B, N]``, returned
    as ``[B, N, heads, d]`` (ready to be flattened for the out-projection).

    Adding log(s_j) to the logits weighs key j's exponential by s_j, so plain attention over the values
    ``[s_j v_j, s_j]`` gives ``(sum_j e_j s_j v_j, sum_j e_j s_j) / sum_j e_j``, and the quotient of
    its two parts is proportional attention exactly. Queries and keys keep their width (the size
    channel widens them): only the values grow, by ``HEAD_PAD`` channels (the size, then zeros), for
    kernels that take value heads wider than query and key heads (cuDNN's and the CPU's do).
    """
    batch, heads, tokens, dim = v.shape
    weight = size.to(torch.float32)
    if v.dtype == torch.float16:
        # Any factor common to a sequence's keys cancels in the quotient: one that keeps s_j v_j
        # within float16's range (sizes reach thousands).
        weight = weight / weight.amax(dim=1, keepdim=True)
    weight = weight[:, None, :, None]  # [B, 1, N, 1]
    size_columns = F.pad(weight, (0, HEAD_PAD - 1)).to(v.dtype).expand(batch, heads, tokens, HEAD_PAD)
    # The out= path below carries no gradient, and would break a compiled graph.
    if needs_autograd(q, k, v) or torch.compiler.is_compiling():
        values = torch.cat([v * weight.to(v.dtype), size_columns], dim=-1)
        out = F.scaled_dot_product_attention(q, k, values)
        return (out[..., :dim] / out[..., dim : dim + 1]).transpose(1, 2)
    # Without autograd, each product is written where it goes: no concatenated copy, no copy to
    # the out-projection's layout.
    values = v.new_empty(batch, tokens, heads, dim + HEAD_PAD).transpose(1, 2)
    torch.mul(v, weight.to(v.dtype), out=values[..., :dim])  # rounded as the size column is
    values[..., dim:] = size_columns
    out = F.scaled_dot_product_attention(q, k, values)
    attended = v.new_empty(batch, tokens, heads, dim)
    torch.div(out[..., :dim].transpose(1, 2), out[..., dim : dim + 1].transpose(1, 2), out=attended)
    return attended


def log_size_score(log_size: torch.Tensor):
    """A FlexAttention ``score_mod`` adding ``log_size [B, N]`` of each key."""

    def add_log_size(score, batch, head, query, key):
        return score + log_size[batch, key]

    return add_log_size


def warn_if_tome_r_capped(plan: tuple[LayerPlan, ...], merge: MergeConfig, tokens_per_frame: int) -> None:
    """Warn when ImgMe layers merge fewer than ``tome_r`` tokens: a layer merges at most half its
    patches (the paper's count formula), so a larger ``tome_r`` gives a schedule other than the one asked
    for. The paper's schedules never reach the cap."""
    capped = [(row.layer, row.r) for row in simulate(plan, merge, tokens_per_frame)
              if row.kind == "imgme" and row.r < merge.tome_r]
    if capped:
        merged = ", ".join(f"{r} in layer {layer}" for layer, r in capped[:3]) + (" ..." if len(capped) > 3 else "")
        warn(
            f"tome_r={merge.tome_r} is more than some layers can merge (at most half the patches of a "
            f"frame of {tokens_per_frame - 1} patches): they merge {merged}",
            VideoEncoderWarning,
        )


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, OpenAI CLIP's activation (see ``ResidualBlock.fold_activation_scale``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(QUICK_GELU_SCALE * x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 for fp16 inputs, as OpenAI CLIP does, so half precision stays stable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float16:
            return super().forward(x)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused QKV projection and a LoRA branch on it.

    ``qkv = x W^T + b + (x A^T) B^T`` with A ``[rank, D]`` (kaiming-uniform) and B ``[3D, rank]`` (zeros),
    no alpha/rank scaling. ``out_proj`` has no LoRA.
    """

    def __init__(self, width: int, heads: int, lora_rank: int = 0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)
        if lora_rank > 0:
            self.lora_a = nn.Parameter(torch.empty(lora_rank, width))
            self.lora_b = nn.Parameter(torch.zeros(3 * width, lora_rank))
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        else:
            self.lora_a = self.lora_b = None

    @property
    def lora_rank(self) -> int:
        return 0 if self.lora_a is None else self.lora_a.shape[0]

    @torch.no_grad()
    def fold_lora(self) -> None:
        """Fold ``B A`` into the in-projection and drop the LoRA branch; outputs stay the same."""
        if self.lora_a is None:
            return
        self.in_proj_weight += self.lora_b.to(torch.float32).mm(self.lora_a.float()).to(self.in_proj_weight.dtype)
        self.lora_a = self.lora_b = None

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        size: torch.Tensor | None = None,
        size_attention: str = "bias",
        return_metric: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x ``[B, N, D]`` -> attention output ``[B, N, D]`` and, with ``return_metric``, the keys averaged
        over heads ``[B, N, D/heads]`` (the ImgMe / intra-clip merge metric), else ``None``.

        ``attn_mask`` (broadcastable to ``[B, heads, N, N]``) is added to the logits. ``size [B, N]``
        (float32) adds log(size) of each key (proportional attention), in the way ``size_attention``
        names (see ``SIZE_ATTENTION``).
        """
        if size is not None and size_attention == "channels":
            return self.forward_size_channel(x, size.log(), return_metric)
        batch, tokens, width = x.shape
        q, k, v = self.project_heads(x)
        if size is not None and size_attention == "values":
            out = size_weighted_attention(q, k, v, size)
        elif size is not None and size_attention == "flex":
            out = flex_size_attention(q, k, v, size.log()).transpose(1, 2)
        else:
            if size is not None:
                attn_mask = size.log()[:, None, None, :]
            if attn_mask is not None:
                attn_mask = attn_mask.to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2)
        return self.out_proj(out.reshape(batch, tokens, width)), k.mean(dim=1) if return_metric else None

    def project_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x ``[B, N, D]`` -> q, k, v ``[B, heads, N, D/heads]`` (views of one fused projection)."""
        batch, tokens, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        if self.lora_a is not None:
            qkv = qkv + F.linear(F.linear(x, self.lora_a), self.lora_b)
        return qkv.view(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4).unbind(0)

    def forward_size_channel(
        self, x: torch.Tensor, log_size: torch.Tensor, return_metric: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Softmax(q k^T / sqrt(d) + log s_j) v with no dense bias, so bias-free kernels apply.

        Every head gets ``HEAD_PAD`` extra channels straight from the in-projection (a zero-padded copy
        of its weights, far smaller than padded copies of q, k and v would be): the first extra
        query channel is the constant sqrt(d) (a bias), the first extra key channel is set to log(s_j),
        so the scaled dot product gains exactly log(s_j). The rest are zeros, for aligned head sizes.
        The out-projection's weights get matching zero columns.
        """
        batch, tokens, width = x.shape
        dim = width // self.heads
        bias = self.pad_heads(self.in_proj_bias)
        bias.view(3, self.heads, dim + HEAD_PAD)[0, :, dim] = dim**0.5  # a fresh copy: written in place
        qkv = F.linear(x, self.pad_heads(self.in_proj_weight), bias)
        if self.lora_a is not None:
            qkv = qkv + F.linear(F.linear(x, self.lora_a), self.pad_heads(self.lora_b))
        qkv = qkv.view(batch, tokens, 3, self.heads, dim + HEAD_PAD)
        qkv[:, :, 1, :, dim] = log_size[:, :, None].to(qkv.dtype)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, scale=dim**-0.5)
        # v's extra channels are zero, so the output's are too: the out-projection reads them against
        # zero weight columns rather than a sliced copy of the output being made.
        out = out.transpose(1, 2).reshape(batch, tokens, self.heads * (dim + HEAD_PAD))
        out_weight = F.pad(self.out_proj.weight.view(width, self.heads, dim), (0, HEAD_PAD)).flatten(1)
        return F.linear(out, out_weight, self.out_proj.bias), k[..., :dim].mean(dim=1) if return_metric else None

    def pad_heads(self, rows: torch.Tensor) -> torch.Tensor:
        """``[3 * heads * d, ...]`` -> ``[3 * heads * (d + HEAD_PAD), ...]``, zeros after each head's rows."""
        per_head = rows.view(3, self.heads, -1, *rows.shape[1:])
        return F.pad(per_head, (0, 0) * (rows.dim() - 1) + (0, HEAD_PAD)).flatten(0, 2)


class ResidualBlock(nn.Module):
    def __init__(self, width: int, heads: int, lora_rank: int = 0, clip_pos_clips: int = 0):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads, lora_rank)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, width * 4), gelu=QuickGELU(), c_proj=nn.Linear(width * 4, width))
        )
        # Clip positional embedding of a ClipMe layer: one vector per input clip, zero at start.
        self.clip_pos_embed = nn.Parameter(torch.zeros(1, clip_pos_clips, 1, width)) if clip_pos_clips else None

    @torch.no_grad()
    def fold_activation_scale(self) -> None:
        """Turn QuickGELU into SiLU by moving its 1.702 into the MLP weights; outputs stay the same.

        ``QuickGELU(y) = SiLU(1.702 y) / 1.702``, so scaling ``c_fc`` by 1.702 and ``c_proj``'s weight by
        1/1.702 leaves one fused SiLU kernel where eager mode ran three (scale, sigmoid, product) over
        the MLP's widest activation. The weights then differ from the checkpoint's: inference only.
        """
        if not isinstance(self.mlp.gelu, QuickGELU):
            return
        self.mlp.c_fc.weight *= QUICK_GELU_SCALE
        self.mlp.c_fc.bias *= QUICK_GELU_SCALE
        self.mlp.c_proj.weight /= QUICK_GELU_SCALE
        self.mlp.gelu = nn.SiLU()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Plain pre-LN block (the text encoder)."""
        x = x + self.attn(self.ln_1(x), attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, lora_rank: int = 0, clip_pos_clips: dict | None = None):
        super().__init__()
        clip_pos_clips = clip_pos_clips or {}
        self.resblocks = nn.ModuleList(
            ResidualBlock(width, heads, lora_rank, clip_pos_clips.get(i, 0)) for i in range(layers)
        )


@dataclass
class VideoTokens:
    """The video encoder's token state. Counts per clip; ``x`` is ``[videos * clips, tokens, D]``."""

    x: torch.Tensor
    size: torch.Tensor | None  # [videos * clips, tokens, 1]; None while no token has been merged
    source: torch.Tensor | None  # [videos * clips, tokens, frames * input tokens] when tracking
    videos: int
    num_cls: int

    @property
    def clips(self) -> int:
        return self.x.shape[0] // self.videos


class VisionTransformer(nn.Module):
    """CLIP's ViT with TempMe merging, following a per-layer plan fixed at construction."""

    def __init__(self, config: ModelConfig, output_dim: int):
        super().__init__()
        vision = config.clip.vision
        self.merge = config.merge
        self.frames = config.frames
        self.image_size = vision.image_size
        self.plan: tuple[LayerPlan, ...] = build_plan(config.merge, vision.layers, config.frames)
        warn_if_tome_r_capped(self.plan, config.merge, vision.tokens_per_frame)
        # How proportional attention adds log(size) (SIZE_ATTENTION): the bias while training,
        # INFERENCE_SIZE_ATTENTION once optimize_for_inference has run.
        self.size_attention = "bias"
        self.merge_kernels = "torch"  # how merges run: one of merging.MERGE_KERNELS
        scale = vision.width**-0.5
        self.conv1 = nn.Conv2d(3, vision.width, vision.patch_size, vision.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(vision.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(vision.tokens_per_frame, vision.width))
        self.ln_pre = LayerNorm(vision.width)
        with_cpe = config.merge.clip_pos_embed  # clipme steps: method tempme only
        cpe_clips = {i: step.clips_in for i, step in enumerate(self.plan) if step.kind == "clipme" and with_cpe}
        self.transformer = Transformer(vision.width, vision.layers, vision.heads, config.lora.rank, cpe_clips)
        self.ln_post = LayerNorm(vision.width)
        self.proj = nn.Parameter(scale * torch.randn(vision.width, output_dim))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images ``[N, 3, H, W]`` -> tokens ``[N, 1 + grid^2, D]`` after ``ln_pre``.

        The patch convolution (``conv1``: kernel = stride = patch) is computed as what it is, one
        matrix product over the patches laid out as rows: cuDNN's convolution kernel took 8% of a
        ViT-B/16 forward on an H100. Row 0 is a zero "patch" where the class token goes; it stays
        zero through the product and takes the class embedding with the positional embedding.
        """
        count, channels, height, width = images.shape
        patch = self.conv1.kernel_size[0]
        rows, cols = height // patch, width // patch
        patches = images.new_empty(count, 1 + rows * cols, channels * patch * patch)
        patches[:, 0] = 0
        grid = images.reshape(count, channels, rows, patch, cols, patch).permute(0, 2, 4, 1, 3, 5)
        patches[:, 1:].view(count, rows, cols, channels, patch, patch).copy_(grid)
        x = patches @ self.conv1.weight.reshape(self.conv1.out_channels, -1).t().to(images.dtype)
        position = self.positional_embedding + F.pad(self.class_embedding[None], (0, 0, 0, rows * cols))
        return self.ln_pre(x + position.to(x.dtype))

    def apply_merge(self, state: VideoTokens, plan: MergePlan) -> VideoTokens:
        x, size, source = merge_weighted(plan, state.x, state.size, state.source)
        return VideoTokens(x, size, source, state.videos, state.num_cls)

    def cross_clip_merge(
        self, state: VideoTokens, block: ResidualBlock, step: LayerPlan, r_cross: int, fused: bool = False
    ) -> VideoTokens:
        """ClipMe, first half: join clips, add CPE, merge ``r_cross`` tokens across the joined frames on the hidden states."""
        joined = step.clips_joined
        joined_cls = state.num_cls * joined
        # The CPE is added after the metric is taken, so it is averaged into merged tokens but not matched on;
        # with nothing to merge across (r_cross = 0) it is not added at all, as in the authors' code (SPEC section 1).
        clip_offset = block.clip_pos_embed.to(state.x.dtype) if r_cross > 0 and block.clip_pos_embed is not None else None

        def join(t: torch.Tensor | None, offset: torch.Tensor | None = None) -> torch.Tensor | None:
            return None if t is None else join_clips(t, state.videos, joined, state.num_cls, offset)

        joined_state = VideoTokens(
            join(state.x, clip_offset), join(state.size), join(state.source), state.videos, joined_cls
        )
        if r_cross == 0:
            return joined_state
        # Normalised clip by clip, the patch rows of consecutive clips already lie in joined order.
        patches = normalized_patches(state.x.detach(), state.num_cls)
        plan = match_patches(patches.view(joined_state.x.shape[0], -1, patches.shape[-1]), r_cross, joined_cls, fused)
        return self.apply_merge(joined_state, plan)

    def check_frames(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Raise a message naming what is wrong with ``frames`` (and ``mask``) for this encoder, where the
        forward pass would fail deep inside with a shape error, or run on a wrong frame count."""
        size = self.image_size
        expected = f"[batch, {self.frames}, 3, {size}, {size}]"
        if not isinstance(frames, torch.Tensor):
            raise TypeError(f"frames must be a float tensor shaped {expected}, got {type(frames).__name__}")
        if not frames.is_floating_point():
            raise TypeError(f"frames must be a float tensor of CLIP-normalised pixels, got dtype {frames.dtype}")
        if frames.dim() != 5 or tuple(frames.shape[2:]) != (3, size, size):
            raise ValueError(f"frames must be shaped {expected}, got {list(frames.shape)}")
        if frames.shape[1] != self.frames:
            raise ValueError(
                f"this model was built for {self.frames} frames (its merge schedule and clip positional "
                f"embeddings depend on it), got {frames.shape[1]}; sample {self.frames} frames or build "
                f"the model with frames={frames.shape[1]}"
            )
        if mask is not None and tuple(mask.shape) != tuple(frames.shape[:2]):
            raise ValueError(f"video mask must be shaped {list(frames.shape[:2])}, got {list(mask.shape)}")

    def forward_tokens(
        self, frames: torch.Tensor, track_source: bool = False, layers: int | None = None
    ) -> VideoTokens:
        """Run the encoder on ``frames [B, F, 3, H, W]``; return the token state after ``layers`` layers."""
        self.check_frames(frames)
        depth = len(self.plan)
        if layers is not None and not 0 <= layers <= depth:
            raise ValueError(f"layers must be from 0 to the encoder's {depth}, got {layers}")
        size_attention = resolve_size_attention(self.size_attention, frames.device)
        fused = use_fused_kernels(self.merge_kernels, frames.device)
        videos, num_frames = frames.shape[:2]
        x = self.embed(frames.flatten(0, 1))
        source = None
        if track_source:
            per_frame = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
            source = torch.block_diag(*[per_frame] * num_frames).view(num_frames, x.shape[1], -1)
            source = source.repeat(videos, 1, 1)
        state = VideoTokens(x, None, source, videos, num_cls=1)
        for block, step in list(zip(self.transformer.resblocks, self.plan))[:layers]:
            r_cross, r = merge_counts(step, self.merge, state.x.shape[1])
            if step.kind == "clipme":
                state = self.cross_clip_merge(state, block, step, r_cross, fused)
            size = state.size[..., 0] if self.merge.prop_attn and state.size is not None else None
            attn_out, keys = block.attn(
                block.ln_1(state.x), size=size, size_attention=size_attention, return_metric=r > 0
            )
            state = VideoTokens(state.x + attn_out, state.size, state.source, videos, state.num_cls)
            if r > 0:
                state = self.apply_merge(state, bipartite_soft_matching(keys, r, state.num_cls, fused))
            state = dataclasses.replace(state, x=state.x + block.mlp(block.ln_2(state.x)))
        return state

    def forward(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """frames ``[B, F, 3, H, W]`` -> per-video embedding ``[B, output_dim]``.

        Each frame's CLS token goes through ``ln_post`` and ``proj`` and is L2-normalised; the video
        embedding is their mean over the frames where ``mask`` is 1 (not normalised again).
        """
        videos, num_frames = frames.shape[:2]
        state = self.forward_tokens(frames)
        tokens, width = state.x.shape[1:]
        cls = state.x.view(videos, state.clips, tokens, width)[:, :, : state.num_cls].reshape(videos, num_frames, width)
        frame_features = F.normalize(self.ln_post(cls) @ self.proj.to(cls.dtype), dim=-1)
        if mask is None:
            return frame_features.mean(dim=1)
        mask = mask.to(frame_features.dtype).unsqueeze(-1)
        return (frame_features * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


class TempMe(nn.Module):
    """CLIP with LoRA in both encoders and TempMe merging in the video encoder.

    Build with ``tempme.create_model`` or ``tempme.load_model``. The text side keeps OpenAI CLIP's
    top-level parameter names (``token_embedding``, ``transformer``, ``ln_final`` ...).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        clip, text = config.clip, config.clip.text
        if not MIN_WORDS <= config.max_words <= text.context_length:
            raise ValueError(f"max_words must be from {MIN_WORDS} (start, one word, end) to the text context length "
                             f"{text.context_length}, got {config.max_words}")
        self.visual = VisionTransformer(config, clip.embed_dim)
        self.token_embedding = nn.Embedding(text.vocab_size, text.width)
        self.positional_embedding = nn.Parameter(torch.empty(text.context_length, text.width))
        self.transformer = Transformer(text.width, text.layers, text.heads, config.lora.rank)
        self.ln_final = LayerNorm(text.width)
        self.text_projection = nn.Parameter(torch.empty(text.width, clip.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=text.width**-0.5)
        self.set_trainable("lora")

    @property
    def plan(self) -> tuple[LayerPlan, ...]:
        return self.visual.plan

    def set_trainable(self, mode: str = "lora") -> None:
        """``lora``: only LoRA and clip positional embeddings train (the paper). ``full``: everything
        but the logit scale, which stays frozen at the checkpoint's value in both modes."""
        if mode not in ("lora", "full"):
            raise ValueError(f"trainable mode must be 'lora' or 'full', got {mode!r}")
        if self.activation_folded:
            raise ValueError(
                "this model was optimised for inference (LoRA folded, MLP weights rescaled): it cannot be "
                "trained; load the weights again to train"
            )
        for name, param in self.named_parameters():
            if mode == "full":
                param.requires_grad_(name != "logit_scale")
            else:
                param.requires_grad_(is_adapter_parameter(name))

    def fold_lora(self) -> "TempMe":
        """Fold every LoRA branch into its weights (same outputs, less compute). Returns ``self``."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.fold_lora()
        return self

    @property
    def activation_folded(self) -> bool:
        """Whether ``optimize_for_inference`` moved QuickGELU's scale into the MLP weights (which then
        hold other values than the checkpoint's)."""
        return any(isinstance(m, ResidualBlock) and isinstance(m.mlp.gelu, nn.SiLU) for m in self.modules())

    @property
    def weights_folded(self) -> bool:
        """Whether ``optimize_for_inference`` or ``fold_lora`` changed the weights since the model was
        built (its ``model_fingerprint`` then differs from the weights it was loaded from)."""
        lora_gone = self.config.lora.rank > 0 and any(
            isinstance(m, Attention) and m.lora_rank == 0 for m in self.modules()
        )
        return self.activation_folded or lora_gone

    def optimize_for_inference(self) -> "TempMe":
        """Fold LoRA and QuickGELU's scale into the weights, and add log(size) to attention in the form
        that measured faster on the device the video is on (``INFERENCE_SIZE_ATTENTION``, ``auto``): the
        same outputs with less work.

        For deployment and benchmarks. The folded model can no longer be trained or saved as a tempme
        checkpoint (its LoRA is gone and its MLP weights are rescaled). Returns ``self``.
        """
        self.visual.size_attention = INFERENCE_SIZE_ATTENTION
        self.fold_lora()
        for module in self.modules():
            if isinstance(module, ResidualBlock):
                module.fold_activation_scale()
        self.requires_grad_(False)  # and set_trainable refuses: see above
        return self

    def encode_video(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """CLIP-normalised frames ``[B, F, 3, H, W]`` (optional mask ``[B, F]``) -> ``[B, embed_dim]``."""
        self.visual.check_frames(frames, mask)
        weight = self.visual.conv1.weight  # frames decoded on the CPU go to the model's device and dtype
        if frames.shape[0] == 0:  # as encode_text([]) gives
            return weight.new_zeros(0, self.config.clip.embed_dim)
        return self.visual(frames.to(weight.device, weight.dtype), None if mask is None else mask.to(weight.device))

    def tokenize(self, texts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from .tokenizer import tokenize

        return tokenize(texts, max_words=self.config.max_words)

    def encode_text(self, texts: str | list[str] | torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Captions (strings, or token ids ``[N, L]`` with mask ``[N, L]``) -> ``[N, embed_dim]``.

        The feature is taken at the EOT token (the largest id); it is not normalised.
        """
        if isinstance(texts, (str, list, tuple)):
            ids, mask = self.tokenize(list(texts) if not isinstance(texts, str) else texts)
        else:
            ids = texts
        if ids.dim() != 2:
            raise ValueError(f"token ids must be shaped [N, L], got {list(ids.shape)}")
        if ids.shape[1] > self.positional_embedding.shape[0]:
            raise ValueError(f"token ids have length {ids.shape[1]} > context length {self.positional_embedding.shape[0]}")
        device = self.token_embedding.weight.device
        ids = ids.to(device)
        mask = torch.ones_like(ids) if mask is None else mask.to(device)
        length = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:length]
        causal = torch.full((length, length), float("-inf"), device=device).triu(1)
        padding = torch.zeros(mask.shape, device=device).masked_fill(mask == 0, float("-inf"))
        bias = (causal + padding[:, None, :])[:, None].to(x.dtype)  # [N, 1, L, L]
        for block in self.transformer.resblocks:
            x = block(x, bias)
        x = self.ln_final(x)
        eot = x[torch.arange(x.shape[0], device=device), ids.argmax(dim=-1)]
        return eot @ self.text_projection.to(eot.dtype)

    def forward(self, frames, text_ids, text_mask=None, video_mask=None):
        """Video and text embeddings ``([B, D], [N, D])`` for training."""
        return self.encode_video(frames, video_mask), self.encode_text(text_ids, text_mask)


ADAPTER_NAME_PARTS = ("lora_a", "lora_b", "clip_pos_embed")


def is_adapter_parameter(name: str) -> bool:
    """LoRA and clip positional embeddings: what the paper trains and what a tempme checkpoint holds."""
    return any(part in name for part in ADAPTER_NAME_PARTS)
