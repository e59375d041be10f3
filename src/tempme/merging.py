"""Token merging: bipartite soft matching with several CLS tokens, and the clip join of ClipMe.

Small pure functions on tensors, in the spirit of ToMe's ``merge.py``. Shapes use
B = sequences (frames or clips), N = tokens per sequence, C = channels.

Every token carries a *size* (how many input patches it stands for). Merging is a size-weighted
average, and the sizes feed proportional attention (log-size added to the attention logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable


@dataclass(frozen=True)
class MergePlan:
    """Where every token goes in one bipartite merge. Index tensors are int64, positions absolute.

    - ``keep [B, N - r]``: the tokens that survive, in output order:
      CLS tokens, unmerged A tokens (ascending), then all B tokens (original order);
    - ``src [B, r]``: the A tokens merged away;
    - ``dst [B, r]``: for each of them, the *output* position of the B token it merges into;
    - ``b_count``: how many B tokens there are: the last ``b_count`` output positions of every sequence;
    - ``b_first``: the input position of the first B token (they are every other token from there).

    The same indices as rows of the flattened input ``[B * N, C]`` (``keep_rows``, ``src_rows``) and
    of the flattened output ``[B * (N - r), C]`` (``dst_rows``): computed once, they serve every
    tensor merged with this plan (tokens, sizes, source maps).
    """

    keep: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    keep_rows: torch.Tensor
    src_rows: torch.Tensor
    dst_rows: torch.Tensor
    b_count: int
    b_first: int


def split_sets(num_cls: int) -> tuple[int, int]:
    """Offsets (relative to the first patch) of sets A and B for ``num_cls`` CLS tokens.

    Tokens alternate by absolute position: even positions are sources (A), odd ones destinations (B).
    """
    a_start = num_cls % 2  # absolute index num_cls + j is even  <=>  j has the parity of num_cls
    return a_start, 1 - a_start


def max_merge(num_tokens: int, num_cls: int) -> int:
    """Most tokens one bipartite merge can remove: half the patches, rounded down."""
    return (num_tokens - num_cls) // 2


def normalized_patches(metric: torch.Tensor, num_cls: int) -> torch.Tensor:
    """The patch rows of ``metric [B, N, C]`` scaled to unit length, in float32: ``[B, N - num_cls, C]``.

    Contiguous, so consecutive sequences can be viewed as one joined sequence for free (ClipMe).
    The norm is read straight from ``metric``'s own dtype and the division writes float32, one pass
    fewer than converting first; the values equal ``F.normalize(metric.float())``.
    """
    patches = metric[:, num_cls:]
    norm = torch.linalg.vector_norm(patches, dim=-1, keepdim=True, dtype=torch.float32)
    return torch.div(patches, norm.clamp_min(1e-12))


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_cls: int) -> MergePlan:
    """Plan the merge of the ``r`` A tokens most similar to their best B match.

    metric: ``[B, N, C]`` features compared by cosine similarity (keys or hidden states).
    The first ``num_cls`` tokens never take part. ``r`` must not exceed ``max_merge(N, num_cls)``.
    """
    with torch.no_grad():
        return match_patches(normalized_patches(metric, num_cls), r, num_cls)


def match_patches(patches: torch.Tensor, r: int, num_cls: int) -> MergePlan:
    """``bipartite_soft_matching`` on patches already normalised (``normalized_patches``):
    ``patches [B, N - num_cls, C]`` of sequences that start with ``num_cls`` CLS tokens."""
    batch, num_patches = patches.shape[:2]
    num_tokens = num_cls + num_patches
    if not 0 <= r <= max_merge(num_tokens, num_cls):
        raise ValueError(f"cannot merge r={r} of {num_patches} patch tokens")
    a_start, b_start = split_sets(num_cls)
    with torch.no_grad():
        a, b = patches[:, a_start::2], patches[:, b_start::2]
        scores = a @ b.transpose(-1, -2)  # [B, |A|, |B|]
        best_score, best_dst = scores.max(dim=-1)
        order = best_score.argsort(dim=-1, descending=True, stable=True)
        merged = order[:, :r]  # indices into A
        # Unmerged tokens keep their original order (vanilla ToMe leaves them in score order).
        unmerged = order[:, r:].sort(dim=-1).values
        best_b = best_dst.gather(1, merged)  # indices into B
        device = patches.device
        a_positions = torch.arange(num_cls + a_start, num_tokens, 2, device=device)
        b_positions = torch.arange(num_cls + b_start, num_tokens, 2, device=device)
        keep = torch.cat(
            [
                torch.arange(num_cls, device=device).expand(batch, -1),
                a_positions[unmerged],
                b_positions.expand(batch, -1),
            ],
            dim=1,
        )
        src = a_positions[merged]
        dst = best_b + (num_cls + unmerged.shape[1])  # B tokens follow the CLS and unmerged A tokens
        sequence = torch.arange(batch, device=device)[:, None]
        input_offset = sequence * num_tokens
    return MergePlan(
        keep=keep,
        src=src,
        dst=dst,
        keep_rows=(keep + input_offset).flatten(),
        src_rows=(src + input_offset).flatten(),
        dst_rows=(dst + sequence * keep.shape[1]).flatten(),
        b_count=b_positions.shape[0],
        b_first=num_cls + b_start,
    )


def gather_rows(tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows [B * K]`` (indices into the flattened ``[B * N, C]``) of ``tokens [B, N, C]``, as ``[B, K, C]``.

    One ``index_select`` of whole rows: row copies, cheaper than ``gather`` with an index expanded
    over the channels (which computes an address for every element).
    """
    batch, _, channels = tokens.shape
    return tokens.reshape(-1, channels).index_select(0, rows).view(batch, -1, channels)


def add_rows_(tokens: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """In place, add ``values [B, K, C]`` onto the rows ``rows [B * K]`` of the flattened ``tokens [B, M, C]``
    (which must be contiguous); repeated rows add up. Returns ``tokens``."""
    channels = tokens.shape[-1]
    tokens.view(-1, channels).index_add_(0, rows, values.reshape(-1, channels))
    return tokens


def merge_sum(plan: MergePlan, tokens: torch.Tensor) -> torch.Tensor:
    """Merge ``tokens [B, N, C]`` by summation (sizes, source maps), giving ``[B, N - r, C]``."""
    return add_rows_(gather_rows(tokens, plan.keep_rows), plan.dst_rows, gather_rows(tokens, plan.src_rows))


def merge_weighted(
    plan: MergePlan,
    x: torch.Tensor,
    size: torch.Tensor | None,
    source: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Merge tokens ``x [B, N, C]`` as a size-weighted average; sizes ``[B, N, 1]`` add up.

    ``x_b <- (s_b x_b + sum s_a x_a) / (s_b + sum s_a)``. ``size=None`` means every token has size 1.
    Sizes are float32 whatever the dtype of ``x``: bfloat16 cannot count past 256.
    ``source [B, N, P]`` (which input patches each token holds) is summed when given.
    Returns ``(x, size, source)`` with ``N - r`` tokens.

    The kept rows are copied out, the B tokens among them (the last ``plan.b_count`` of each sequence,
    the only ones that can receive) are rescaled in place, and the ``r`` moved rows, scaled, are added
    onto their destinations: every other kept token's share is exactly 1. ``WeightedMerge`` gives it
    a backward pass of the same kind.
    """
    if size is None:
        size = torch.ones(x.shape[0], x.shape[1], 1, device=x.device)
    kept_size, moved_size = gather_rows(size, plan.keep_rows), gather_rows(size, plan.src_rows)
    new_size = add_rows_(kept_size.clone(), plan.dst_rows, moved_size)
    first_b = new_size.shape[1] - plan.b_count
    b_share = (kept_size[:, first_b:] / new_size[:, first_b:]).to(x.dtype)
    moved_share = (moved_size / gather_rows(new_size, plan.dst_rows)).to(x.dtype)
    merged = WeightedMerge.apply(x, plan, b_share, moved_share)
    if source is not None:
        source = merge_sum(plan, source)
    return merged, new_size, source


class WeightedMerge(torch.autograd.Function):
    """``merge_weighted``'s token arithmetic, ``[B, N, C] -> [B, N - r, C]``, with its own backward pass.

    Every input token is either kept or moved, exactly once, so the gradient is a permutation of the
    output gradient with the same shares: one row copy and the B tokens' rescaling, instead of
    autograd's zero-filled scatters for each gather, their sum and a scaled copy of the whole
    gradient. The shares (from sizes) are constants.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: MergePlan, b_share: torch.Tensor, moved_share: torch.Tensor):
        ctx.plan, ctx.input_shape = plan, x.shape
        ctx.save_for_backward(b_share, moved_share)
        merged = gather_rows(x, plan.keep_rows)
        merged[:, merged.shape[1] - plan.b_count :] *= b_share
        return add_rows_(merged, plan.dst_rows, gather_rows(x, plan.src_rows) * moved_share)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        plan, (batch, tokens, channels) = ctx.plan, ctx.input_shape
        b_share, moved_share = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad.new_empty(batch, tokens, channels)
        grad_x.view(-1, channels).index_copy_(0, plan.keep_rows, grad.view(-1, channels))
        grad_x[:, plan.b_first :: 2] *= b_share
        moved = gather_rows(grad, plan.dst_rows) * moved_share
        grad_x.view(-1, channels).index_copy_(0, plan.src_rows, moved.view(-1, channels))
        return grad_x, None, None, None


def needs_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records operations on any of ``tensors`` here."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def join_clips(
    tokens: torch.Tensor, videos: int, clips_joined: int, num_cls: int, clip_offset: torch.Tensor | None = None
) -> torch.Tensor:
    """Concatenate each group of ``clips_joined`` consecutive clips of a video into one clip.

    tokens: ``[videos * clips, N, C]`` with clips of a video consecutive. Returns
    ``[videos * clips / f, f * N, C]`` ordered ``[CLS of clip 1 .. CLS of clip f | patches of clip 1 | ..]``.
    ``clip_offset`` (one vector per clip, e.g. ClipMe's clip positional embedding ``[1, clips, 1, C]``)
    is added to every token of its clip on the way.

    Without autograd or a compiler, the sum is written straight into the joined tensor: one pass over
    the tokens. Otherwise it is computed out of place (``out=`` carries no gradient and breaks a
    compiled graph; the compiler fuses the two passes anyway).
    """
    clips_total, num_tokens, channels = tokens.shape
    new_clips = clips_total // (videos * clips_joined)
    grouped = tokens.reshape(videos, new_clips, clips_joined, num_tokens, channels)
    offset = None if clip_offset is None else clip_offset.reshape(1, new_clips, clips_joined, 1, channels)
    cls, patches = grouped[:, :, :, :num_cls], grouped[:, :, :, num_cls:]
    if needs_autograd(tokens, clip_offset) or torch.compiler.is_compiling():
        if offset is not None:
            cls, patches = cls + offset, patches + offset
        return torch.cat(
            [cls.reshape(videos * new_clips, -1, channels), patches.reshape(videos * new_clips, -1, channels)], dim=1
        )
    joined = tokens.new_empty(videos * new_clips, clips_joined * num_tokens, channels)
    split = clips_joined * num_cls
    for part, out in ((cls, joined[:, :split]), (patches, joined[:, split:])):
        out = out.view(videos, new_clips, clips_joined, -1, channels)
        if offset is None:
            out.copy_(part)
        else:
            torch.add(part, offset, out=out)
    return joined


def imgme_count(num_tokens: int, num_cls: int, r: int) -> int:
    """ImgMe / ToMe: a fixed ``r`` per layer, capped at half the patches."""
    return min(r, max_merge(num_tokens, num_cls))


def proportional_count(num_tokens: int, num_cls: int, ratio: float) -> int:
    """Tokens merged when a fraction ``ratio`` of the sequence (CLS included) goes, capped at half the patches.

    Truncates a float product as the reference does: 880 * 0.3 is exactly 264.0 in float64.
    """
    return min(int(num_tokens * ratio), max_merge(num_tokens, num_cls))

