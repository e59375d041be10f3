"""Triton kernels for the two index-heavy steps of a merge: planning it and applying it.

``tempme.merging`` builds a merge plan from about a dozen small tensor operations (a sort, a second
sort, gathers, a concatenation) and applies it with as many more. On a GPU each is a kernel of a few
microseconds, and an H100 replaying ViT-B/16 as a CUDA graph spent 3.7 ms of its 27 ms per batch on
them (docs/benchmarks.md, run 5); in eager training the GPU waited for the CPU to launch them. Here
each step is one kernel:

- ``plan_merge``: one program per sequence ranks the A tokens by their best score and makes the
  merges ``merging.match_patches`` makes (the same survivors in the same order, the same ties), with
  the merged tokens listed by destination;
- ``apply_merge``: one program per output row copies a kept token, or averages a B token with the
  A tokens merged into it (read in float32, written once: no atomics, so results are reproducible),
  and writes the new sizes and each moved token's share;
- ``apply_merge_backward``: its gradient, one program per output row, which writes the gradient of
  every input token that went to that row (``WeightedMerge``'s backward pass for fused plans).

Both need Triton and a CUDA device; with ``TRITON_INTERPRET=1`` set before this module is imported
they run on CPU tensors (slowly), which is how the tests check them where no GPU is.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .merging import MergePlan, split_sets

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # as Triton read it when defining the kernels below
# Ranking keys pack (destination, A position) in an int32, and a sequence's A tokens share one block.
MAX_SET = 1 << 14


def supports(device: torch.device) -> bool:
    """Whether the kernels run on ``device``: CUDA, or the CPU when interpreted."""
    return device.type == "cuda" or (INTERPRETED and device.type == "cpu")


@triton.jit
def _plan_kernel(
    score_ptr, best_b_ptr, keep_ptr, src_ptr, dst_ptr, start_ptr, stop_ptr,
    num_a, num_b, r, num_cls, tokens_in, a_first, b_first,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_CLS: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    a = tl.arange(0, BLOCK_A)
    in_a = a < num_a
    score = tl.load(score_ptr + seq * num_a + a, mask=in_a, other=-float("inf"))
    # torch's sort ranks NaN above everything (a metric that overflowed to inf gives NaN cosines);
    # NaN compares false, so left as it is no token would take its place and the plan would have holes.
    score = tl.where(score != score, float("inf"), score)
    best_b = tl.load(best_b_ptr + seq * num_a + a, mask=in_a, other=0).to(tl.int32)

    # The r best scores, ties to the lower A position (a stable descending sort's first r):
    # everything above the r-th score, then as many of the tokens equal to it as are still wanted.
    descending = tl.sort(score, descending=True)
    threshold = tl.max(tl.where(a == r - 1, descending, -float("inf")), axis=0)
    above = in_a & (score > threshold)
    tied = (in_a & (score == threshold)).to(tl.int32)
    tied_before = tl.cumsum(tied, axis=0) - tied
    wanted = r - tl.sum(above.to(tl.int32), axis=0)
    merged = (above | ((tied == 1) & (tied_before < wanted))) & (r > 0)

    tokens_out = tokens_in - r
    out_base = seq * tokens_out
    in_base = seq * tokens_in
    b_out_first = num_cls + num_a - r  # output rows: CLS, unmerged A (ascending), then every B token

    # Rows that receive no merged token: the CLS tokens and the unmerged A tokens.
    cls = tl.arange(0, BLOCK_CLS)
    is_cls = cls < num_cls
    tl.store(keep_ptr + out_base + cls, in_base + cls, mask=is_cls)
    tl.store(start_ptr + out_base + cls, 0, mask=is_cls)
    tl.store(stop_ptr + out_base + cls, 0, mask=is_cls)
    unmerged = (in_a & ~merged).to(tl.int32)
    unmerged_out = out_base + num_cls + tl.cumsum(unmerged, axis=0) - unmerged
    tl.store(keep_ptr + unmerged_out, in_base + a_first + 2 * a, mask=unmerged == 1)
    tl.store(start_ptr + unmerged_out, 0, mask=unmerged == 1)
    tl.store(stop_ptr + unmerged_out, 0, mask=unmerged == 1)

    # Merged tokens are listed by destination, then A position (sorting the packed keys gives that
    # order), so each B token's sources are one run of the list: its start and stop indices come from
    # the number of sources per B token (BLOCK_B - 1 is no B token: it counts the unmerged).
    b = tl.arange(0, BLOCK_B)
    is_b = b < num_b
    b_out = out_base + b_out_first + b
    tl.store(keep_ptr + b_out, in_base + b_first + 2 * b, mask=is_b)
    sources = tl.histogram(tl.where(merged, best_b, BLOCK_B - 1), BLOCK_B)
    sources_before = tl.cumsum(sources, axis=0) - sources
    tl.store(start_ptr + b_out, seq * r + sources_before, mask=is_b)
    tl.store(stop_ptr + b_out, seq * r + sources_before + sources, mask=is_b)
    key = tl.sort(tl.where(merged, best_b * BLOCK_A + a, 2147483647))
    source = key % BLOCK_A
    destination = key // BLOCK_A
    listed = a < r
    tl.store(src_ptr + seq * r + a, in_base + a_first + 2 * source, mask=listed)
    tl.store(dst_ptr + seq * r + a, out_base + b_out_first + destination, mask=listed)


def plan_merge(best_score: torch.Tensor, best_b: torch.Tensor, r: int, num_cls: int, tokens_in: int) -> MergePlan:
    """The plan of ``merging.match_patches`` from each A token's best score and best B match.

    ``best_score [batch, |A|]`` (float32, or float64) and ``best_b [batch, |A|]`` (int64) are the maximum
    and its position over the B tokens of the similarities, for sequences of ``tokens_in`` tokens whose
    first ``num_cls`` are CLS tokens (A and B alternate over the rest, as ``split_sets`` says).
    """
    batch, num_a = best_score.shape
    a_start, b_start = split_sets(num_cls)
    num_b = len(range(b_start, tokens_in - num_cls, 2))
    if num_a > MAX_SET:
        raise ValueError(f"fused matching takes at most {MAX_SET} tokens per set, got {num_a}")
    if batch * r >= 2**31:
        raise ValueError(f"fused matching lists at most 2^31 merged tokens, got {batch} x {r}")
    device = best_score.device
    rows_out = batch * (tokens_in - r)
    keep_rows = torch.empty(rows_out, dtype=torch.long, device=device)
    src_rows = torch.empty(batch * r, dtype=torch.long, device=device)
    dst_rows = torch.empty(batch * r, dtype=torch.long, device=device)
    source_start, source_stop = torch.empty(2, rows_out, dtype=torch.int32, device=device)  # loop bounds
    if batch:
        _plan_kernel[(batch,)](
            best_score.contiguous(), best_b.contiguous(), keep_rows, src_rows, dst_rows, source_start, source_stop,
            num_a, num_b, r, num_cls, tokens_in, num_cls + a_start, num_cls + b_start,
            BLOCK_A=triton.next_power_of_2(max(num_a, 2)),
            BLOCK_B=triton.next_power_of_2(num_b + 1),  # one spare bin for the unmerged
            BLOCK_CLS=triton.next_power_of_2(max(num_cls, 2)),
        )
    return MergePlan(keep_rows, src_rows, dst_rows, batch, tokens_in, source_start, source_stop)


@triton.jit
def _size(size_ptr, row, HAS_SIZE: tl.constexpr):
    """A token's size: read, or 1 before any merge."""
    if HAS_SIZE:
        return tl.load(size_ptr + row)
    else:
        return 1.0


@triton.jit
def _merge_kernel(
    x_ptr, size_ptr, keep_ptr, src_ptr, start_ptr, stop_ptr, out_ptr, new_size_ptr, share_ptr,
    channels,
    HAS_SIZE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    kept = tl.load(keep_ptr + row)
    start = tl.load(start_ptr + row)  # the tokens merged into this row: src_rows[start:stop]
    stop = tl.load(stop_ptr + row)
    # A row has few sources (often none): their rows and sizes are read again where needed (for the
    # total, each block of channels, the shares) rather than kept, which a loop of unknown length cannot.

    if HAS_SIZE:
        total = tl.load(size_ptr + kept)
        for moved in range(start, stop):
            total += tl.load(size_ptr + tl.load(src_ptr + moved))
    else:
        total = (1 + stop - start).to(tl.float32)
    # x_b + sum_a (s_a / S) (x_a - x_b), the same average as merging.merge_weighted, in float32.
    for c in range(0, channels, BLOCK_C):
        channel = c + tl.arange(0, BLOCK_C)
        in_row = channel < channels
        x_b = tl.load(x_ptr + kept * channels + channel, mask=in_row, other=0.0).to(tl.float32)
        average = x_b
        for moved in range(start, stop):
            source = tl.load(src_ptr + moved)
            share = _size(size_ptr, source, HAS_SIZE) / total
            x_a = tl.load(x_ptr + source * channels + channel, mask=in_row, other=0.0).to(tl.float32)
            average += share * (x_a - x_b)
        tl.store(out_ptr + row * channels + channel, average.to(out_ptr.dtype.element_ty), mask=in_row)
    tl.store(new_size_ptr + row, total)
    for moved in range(start, stop):
        tl.store(share_ptr + moved, _size(size_ptr, tl.load(src_ptr + moved), HAS_SIZE) / total)


def _channel_block(channels: int) -> int:
    """Channels a program of the merge kernels reads at once: a whole row of ViT-B and ViT-L (768,
    1024), wider rows in blocks of 1024."""
    return min(triton.next_power_of_2(channels), 1024)


def apply_merge(
    plan: MergePlan, x: torch.Tensor, size: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge ``x [B, N, C]`` with ``plan``, a fused plan (``plan_merge``). Computed in float32: for
    float16, bfloat16 and float32 tokens.

    ``size [B, N, 1]`` float32, or None for all ones. Returns the merged tokens ``[B, N - r, C]`` in
    ``x``'s dtype, the new sizes ``[B, N - r, 1]`` and each moved token's share ``s_a / S_b``
    ``[B, r, 1]`` (float32), as ``merging.merge_weighted`` computes them.
    """
    batch, _, channels = x.shape
    tokens_out = plan.tokens_out
    merged = x.new_empty(batch, tokens_out, channels)
    new_size = torch.empty(batch, tokens_out, 1, dtype=torch.float32, device=x.device)
    share = torch.empty(batch, plan.r, 1, dtype=torch.float32, device=x.device)
    if merged.numel():
        _merge_kernel[(batch * tokens_out,)](
            x.contiguous(), size.contiguous() if size is not None else new_size, plan.keep_rows, plan.src_rows,
            plan.source_start, plan.source_stop, merged, new_size, share, channels,
            HAS_SIZE=size is not None, BLOCK_C=_channel_block(channels),
        )
    return merged, new_size, share


@triton.jit
def _merge_backward_kernel(
    grad_ptr, keep_ptr, src_ptr, start_ptr, stop_ptr, share_ptr, grad_x_ptr,
    channels,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    kept = tl.load(keep_ptr + row)
    start = tl.load(start_ptr + row)
    stop = tl.load(stop_ptr + row)
    out_type = grad_x_ptr.dtype.element_ty
    # d out_b / d x_a = s_a / S_b, d out_b / d x_b = 1 - the sum of those shares: every input row is
    # written once, by the program of the output row it went to.
    for c in range(0, channels, BLOCK_C):
        channel = c + tl.arange(0, BLOCK_C)
        in_row = channel < channels
        grad = tl.load(grad_ptr + row * channels + channel, mask=in_row, other=0.0).to(tl.float32)
        kept_grad = grad
        for moved in range(start, stop):
            moved_grad = tl.load(share_ptr + moved) * grad
            kept_grad -= moved_grad
            tl.store(grad_x_ptr + tl.load(src_ptr + moved) * channels + channel, moved_grad.to(out_type), mask=in_row)
        tl.store(grad_x_ptr + kept * channels + channel, kept_grad.to(out_type), mask=in_row)


def apply_merge_backward(plan: MergePlan, grad: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """The gradient ``[B, N, C]`` of ``apply_merge``'s tokens from that of its output ``grad [B, N - r, C]``
    and the shares it returned: one program per output row, no atomics."""
    batch, tokens_out, channels = grad.shape
    grad_x = grad.new_empty(batch, plan.tokens_in, channels)
    if grad.numel():
        _merge_backward_kernel[(batch * tokens_out,)](
            grad.contiguous(), plan.keep_rows, plan.src_rows, plan.source_start, plan.source_stop, share, grad_x,
            channels, BLOCK_C=_channel_block(channels),
        )
    return grad_x
