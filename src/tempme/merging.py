"""Token merging: bipartite soft matching with several CLS tokens, and the clip join of ClipMe.

Small pure functions on tensors, in the spirit of ToMe's ``merge.py``. Shapes use
B = sequences (frames or clips), N = tokens per sequence, C = channels.

Every token carries a *size* (how many input patches it stands for). Merging is a size-weighted
average, and the sizes feed proportional attention (log-size added to the attention logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MergePlan:
    """Where every token goes in one bipartite merge. Index tensors are int64, positions absolute.

    - ``keep [B, N - r]``: the tokens that survive, in output order:
      CLS tokens, unmerged A tokens (ascending), then all B tokens (original order);
    - ``src [B, r]``: the A tokens merged away;
    - ``dst [B, r]``: for each of them, the *output* position of the B token it merges into.
    """

    keep: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor


def split_sets(num_cls: int) -> tuple[int, int]:
    """Offsets (relative to the first patch) of sets A and B for ``num_cls`` CLS tokens.

    Tokens alternate by absolute position: even positions are sources (A), odd ones destinations (B).
    """
    a_start = num_cls % 2  # absolute index num_cls + j is even  <=>  j has the parity of num_cls
    return a_start, 1 - a_start


def max_merge(num_tokens: int, num_cls: int) -> int:
    """Most tokens one bipartite merge can remove: half the patches, rounded down."""
    return (num_tokens - num_cls) // 2


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_cls: int) -> MergePlan:
    """Plan the merge of the ``r`` A tokens most similar to their best B match.

    metric: ``[B, N, C]`` features compared by cosine similarity (keys or hidden states).
    The first ``num_cls`` tokens never take part. ``r`` must not exceed ``max_merge(N, num_cls)``.
    """
    batch, num_tokens = metric.shape[:2]
    if not 0 <= r <= max_merge(num_tokens, num_cls):
        raise ValueError(f"cannot merge r={r} of {num_tokens - num_cls} patch tokens")
    a_start, b_start = split_sets(num_cls)
    with torch.no_grad():
        metric = F.normalize(metric[:, num_cls:].float(), dim=-1)
        a, b = metric[:, a_start::2], metric[:, b_start::2]
        scores = a @ b.transpose(-1, -2)  # [B, |A|, |B|]
        best_score, best_dst = scores.max(dim=-1)
        order = best_score.argsort(dim=-1, descending=True, stable=True)
        src = order[:, :r]
        # Unmerged tokens keep their original order (vanilla ToMe leaves them in score order).
        unmerged = order[:, r:].sort(dim=-1).values
        dst = best_dst.gather(1, src)
        device = metric.device
        a_positions = num_cls + a_start + 2 * torch.arange(a.shape[1], device=device)
        b_positions = num_cls + b_start + 2 * torch.arange(b.shape[1], device=device)
        keep = torch.cat(
            [
                torch.arange(num_cls, device=device).expand(batch, -1),
                a_positions[unmerged],
                b_positions.expand(batch, -1),
            ],
            dim=1,
        )
        first_b_output = num_cls + unmerged.shape[1]
    return MergePlan(keep=keep, src=a_positions[src], dst=first_b_output + dst)


def gather_rows(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tokens[b, index[b, k]]`` for ``tokens [B, N, C]`` and ``index [B, K]``, giving ``[B, K, C]``.

    One ``index_select`` of whole rows of the flattened tokens: row copies, cheaper than ``gather``
    with an index expanded over the channels (which computes an address for every element).
    """
    batch, num_tokens, channels = tokens.shape
    rows = _flat_rows(index, num_tokens)
    return tokens.reshape(batch * num_tokens, channels).index_select(0, rows).view(batch, -1, channels)


def add_rows_(tokens: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """In place, ``tokens[b, index[b, k]] += values[b, k]`` (repeated indices add up). Returns ``tokens``.

    ``tokens [B, N, C]`` must be contiguous; ``index [B, K]``; ``values [B, K, C]``.
    """
    batch, num_tokens, channels = tokens.shape
    tokens.view(batch * num_tokens, channels).index_add_(0, _flat_rows(index, num_tokens), values.reshape(-1, channels))
    return tokens


def _flat_rows(index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Per-sequence token indices ``[B, K]`` -> row indices of the flattened ``[B * N, C]`` tokens."""
    offsets = num_tokens * torch.arange(index.shape[0], device=index.device)
    return (index + offsets[:, None]).flatten()


def merge_sum(plan: MergePlan, tokens: torch.Tensor) -> torch.Tensor:
    """Merge ``tokens [B, N, C]`` by summation (sizes, source maps), giving ``[B, N - r, C]``."""
    return add_rows_(gather_rows(tokens, plan.keep), plan.dst, gather_rows(tokens, plan.src))


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

    The kept rows are copied out and scaled, and the ``r`` moved rows, scaled, are added onto their
    destinations: two passes over ``x`` (copy, scale), whatever ``r``.
    """
    if size is None:
        size = torch.ones(x.shape[0], x.shape[1], 1, device=x.device)
    new_size = merge_sum(plan, size)
    kept_share = size.gather(1, plan.keep.unsqueeze(-1)) / new_size
    moved_share = size.gather(1, plan.src.unsqueeze(-1)) / new_size.gather(1, plan.dst.unsqueeze(-1))
    kept = gather_rows(x, plan.keep) * kept_share.to(x.dtype)
    merged = add_rows_(kept, plan.dst, gather_rows(x, plan.src) * moved_share.to(x.dtype))
    if source is not None:
        source = merge_sum(plan, source)
    return merged, new_size, source


def join_clips(tokens: torch.Tensor, videos: int, clips_joined: int, num_cls: int) -> torch.Tensor:
    """Concatenate each group of ``clips_joined`` consecutive clips of a video into one clip.

    tokens: ``[videos * clips, N, C]`` with clips of a video consecutive. Returns
    ``[videos * clips / f, f * N, C]`` ordered ``[CLS of clip 1 .. CLS of clip f | patches of clip 1 | ..]``.
    """
    clips_total, num_tokens, channels = tokens.shape
    new_clips = clips_total // (videos * clips_joined)
    grouped = tokens.reshape(videos * new_clips, clips_joined, num_tokens, channels)
    cls = grouped[:, :, :num_cls].reshape(videos * new_clips, clips_joined * num_cls, channels)
    patches = grouped[:, :, num_cls:].reshape(videos * new_clips, -1, channels)
    return torch.cat([cls, patches], dim=1)


def imgme_count(num_tokens: int, num_cls: int, r: int) -> int:
    """ImgMe / ToMe: a fixed ``r`` per layer, capped at half the patches."""
    return min(r, max_merge(num_tokens, num_cls))


def proportional_count(num_tokens: int, num_cls: int, ratio: float) -> int:
    """Tokens merged when a fraction ``ratio`` of the sequence (CLS included) goes, capped at half the patches.

    Truncates a float product as the reference does: 880 * 0.3 is exactly 264.0 in float64.
    """
    return min(int(num_tokens * ratio), max_merge(num_tokens, num_cls))

