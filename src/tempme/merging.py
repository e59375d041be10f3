"""Token merging: bipartite soft matching with several CLS tokens, and the clip join of ClipMe.

Small pure functions on tensors, in the spirit of ToMe's ``merge.py``. Shapes use
B = sequences (frames or clips), N = tokens per sequence, C = channels.

Every token carries a *size* (how many input patches it stands for). Merging is a size-weighted
average, and the sizes feed proportional attention (log-size added to the attention logits).
"""

from __future__ import annotations

import functools
import importlib.util
from contextlib import nullcontext
from dataclasses import dataclass
from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

# How matching and merging run. The fused kernels make the same merges (tests); they are not the
# default until a GPU run measures them faster than the tensor operations (docs/benchmarks.md).
MERGE_KERNELS = {
    "torch": "tensor operations (a dozen small kernels per merge on a GPU)",
    "triton": "one Triton kernel to plan a merge and one to apply it (CUDA only; needs Triton)",
    "auto": "triton on a CUDA device where Triton is installed, torch elsewhere",
}


@functools.cache
def fused_kernels() -> ModuleType:
    """``tempme.fused_merging``, imported on first use: Triton is optional, and slow to import."""
    if importlib.util.find_spec("triton") is None:
        raise ValueError("merge kernels 'triton' need Triton (pip install triton; CUDA builds of torch include it)")
    from . import fused_merging

    return fused_merging


def use_fused_kernels(name: str, device: torch.device | str) -> bool:
    """Whether merges on ``device`` take the fused kernels, for ``name`` one of ``MERGE_KERNELS``.
    Never inside a compiled graph: the compiler traces the tensor operations."""
    if name not in MERGE_KERNELS:
        raise ValueError(f"unknown merge kernels {name!r}; choose one of {', '.join(MERGE_KERNELS)}")
    if name == "torch" or torch.compiler.is_compiling():
        return False
    if name == "auto":
        return torch.device(device).type == "cuda" and importlib.util.find_spec("triton") is not None
    if not fused_kernels().supports(torch.device(device)):
        raise ValueError(
            f"merge kernels 'triton' run on CUDA devices, not {torch.device(device)} "
            "(TRITON_INTERPRET=1 runs them on the CPU, slowly, for tests)"
        )
    return True


@dataclass(frozen=True)
class MergePlan:
    """Where every token goes in one bipartite merge of ``batch`` sequences of ``tokens_in`` tokens.

    Positions are rows of the flattened tensors (int64): the input ``[batch * tokens_in, C]`` for
    ``keep_rows`` and ``src_rows``, the output ``[batch * tokens_out, C]`` for ``dst_rows``. Computed
    once, they serve every tensor merged with this plan (tokens, sizes, source maps).

    - ``keep_rows [batch * tokens_out]``: the tokens that survive, in output order: CLS tokens,
      unmerged A tokens (ascending), then all B tokens (original order);
    - ``src_rows [batch * r]``: the A tokens merged away, sequence by sequence (within a sequence by
      score in ``match_patches``, by destination then position in the fused kernels' plans);
    - ``dst_rows [batch * r]``: for each of them, the output row of the B token it merges into;
    - ``source_start``, ``source_stop [batch * tokens_out]`` (int32), fused plans only: for each output
      row, the run ``src_rows[start:stop]`` merged into it (empty but for B tokens). They make the plan
      ``fused``: ``merge_weighted`` applies it with the fused kernels (``tempme.fused_merging``).

    ``keep``, ``src`` and ``dst`` give the same as positions within each sequence, ``[batch, K]``.
    """

    keep_rows: torch.Tensor
    src_rows: torch.Tensor
    dst_rows: torch.Tensor
    batch: int
    tokens_in: int
    source_start: torch.Tensor | None = None
    source_stop: torch.Tensor | None = None

    @property
    def tokens_out(self) -> int:
        return self.keep_rows.numel() // self.batch

    @property
    def r(self) -> int:
        """Tokens merged away per sequence."""
        return self.src_rows.numel() // self.batch

    @property
    def fused(self) -> bool:
        """Whether the fused kernels made this plan, and so apply it."""
        return self.source_start is not None

    def _positions(self, rows: torch.Tensor, tokens: int) -> torch.Tensor:
        sequence = torch.arange(self.batch, device=rows.device)[:, None]
        return rows.view(self.batch, -1) - sequence * tokens

    @property
    def keep(self) -> torch.Tensor:
        return self._positions(self.keep_rows, self.tokens_in)

    @property
    def src(self) -> torch.Tensor:
        return self._positions(self.src_rows, self.tokens_in)

    @property
    def dst(self) -> torch.Tensor:
        return self._positions(self.dst_rows, self.tokens_out)


def split_sets(num_cls: int) -> tuple[int, int]:
    """Offsets (relative to the first patch) of sets A and B for ``num_cls`` CLS tokens.

    Tokens alternate by absolute position: even positions are sources (A), odd ones destinations (B).
    """
    a_start = num_cls % 2  # absolute index num_cls + j is even  <=>  j has the parity of num_cls
    return a_start, 1 - a_start


def max_merge(num_tokens: int, num_cls: int) -> int:
    """Most tokens one bipartite merge can remove: half the patches, rounded down."""
    return (num_tokens - num_cls) // 2


def normalized_patches(metric: torch.Tensor, num_cls: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The patch rows of ``metric [B, N, C]`` scaled to unit length: ``[B, N - num_cls, C]`` in ``dtype``.

    The norm and the quotient are computed in float32 (float64 for a float64 metric), and the result
    is rounded once to ``dtype`` (by default ``similarity_dtype(metric)``). Contiguous, so consecutive
    sequences can be viewed as one joined sequence for free (ClipMe). In float32 the values equal
    ``F.normalize(metric.float())``.
    """
    dtype = dtype or similarity_dtype(metric)
    patches = metric[:, num_cls:]
    exact = torch.float64 if metric.dtype == torch.float64 else torch.float32
    norm = torch.linalg.vector_norm(patches, dim=-1, keepdim=True, dtype=exact).clamp_min(1e-12)
    if dtype == exact:
        return torch.div(patches, norm)
    # One kernel: the quotient is computed in float32 and rounded as it is written.
    return torch.div(patches, norm, out=torch.empty(patches.shape, dtype=dtype, device=metric.device))


def similarity_dtype(metric: torch.Tensor) -> torch.dtype:
    """The dtype in which normalised patches of ``metric`` are multiplied. On a GPU a half type: the
    metric's own, or autocast's for a float32 metric under autocast (``patch_similarities`` then
    takes one tensor-core product with float32 results, where float32 inputs run several times
    slower). Elsewhere float32, or float64 for a float64 metric."""
    if metric.dtype == torch.float64:
        return torch.float64
    if metric.is_cuda:
        if metric.dtype in (torch.float16, torch.bfloat16):
            return metric.dtype
        if torch.is_autocast_enabled("cuda"):
            return torch.get_autocast_dtype("cuda")
    return torch.float32


def patch_similarities(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``[B, |A|, |B|]`` of normalised patches ``a [B, |A|, C]`` and ``b [B, |B|, C]``.

    The scores are float32 whatever the inputs' dtype (float64 for float64), under autocast too.
    Scores rounded to half precision would tie often (bf16 keeps 8 significant bits), so half-precision
    inputs are multiplied exactly and summed in float32: on a GPU by one tensor-core product with
    float32 output."""
    # Autocast exists on CPUs and GPUs (not on the meta device, where FLOPs are counted).
    no_autocast = torch.autocast(a.device.type, enabled=False) if a.device.type in ("cpu", "cuda") else nullcontext()
    with no_autocast:
        if a.dtype in (torch.float32, torch.float64):
            return a @ b.transpose(-1, -2)
        if a.is_cuda:
            return torch.bmm(a, b.transpose(-1, -2), out_dtype=torch.float32)
        return a.float() @ b.float().transpose(-1, -2)  # the same arithmetic: CPUs have no such product


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_cls: int, fused: bool = False) -> MergePlan:
    """Plan the merge of the ``r`` A tokens most similar to their best B match.

    metric: ``[B, N, C]`` features compared by cosine similarity (keys or hidden states).
    The first ``num_cls`` tokens never take part. ``r`` must not exceed ``max_merge(N, num_cls)``.
    ``fused``: plan with the fused kernel (see ``MERGE_KERNELS``); the same merges.
    """
    with torch.no_grad():
        return match_patches(normalized_patches(metric, num_cls), r, num_cls, fused)


def match_patches(patches: torch.Tensor, r: int, num_cls: int, fused: bool = False) -> MergePlan:
    """``bipartite_soft_matching`` on patches already normalised (``normalized_patches``):
    ``patches [B, N - num_cls, C]`` of sequences that start with ``num_cls`` CLS tokens."""
    batch, num_patches = patches.shape[:2]
    num_tokens = num_cls + num_patches
    if not 0 <= r <= max_merge(num_tokens, num_cls):
        raise ValueError(f"cannot merge r={r} of {num_patches} patch tokens")
    a_start, b_start = split_sets(num_cls)
    device = patches.device
    with torch.no_grad():
        a, b = patches[:, a_start::2], patches[:, b_start::2]
        scores = patch_similarities(a, b)
        if b.shape[1] == 0:  # at most one patch: nothing to match with, and r is 0
            best_score = scores.new_zeros(scores.shape[:2])
            best_b = torch.zeros(scores.shape[:2], dtype=torch.long, device=device)
        else:
            best_score, best_b = scores.max(dim=-1)
            if fused:
                return fused_kernels().plan_merge(best_score, best_b, r, num_cls, num_tokens)
        order = best_score.argsort(dim=-1, descending=True, stable=True)
        merged = order[:, :r]  # indices into A
        # Unmerged tokens keep their original order (vanilla ToMe leaves them in score order).
        unmerged = order[:, r:].sort(dim=-1).values
        # Every input row number laid out as the input: its CLS, A and B columns are views of it, so
        # each index below costs one small kernel (on a GPU, launching them costs more than running them).
        rows = torch.arange(batch * num_tokens, device=device).view(batch, num_tokens)
        a_rows = rows[:, num_cls + a_start :: 2]
        keep_rows = torch.cat([rows[:, :num_cls], a_rows.gather(1, unmerged), rows[:, num_cls + b_start :: 2]], dim=1)
        src_rows = a_rows.gather(1, merged)
        tokens_out = num_tokens - r
        b_first_out = num_cls + unmerged.shape[1]  # B tokens follow the CLS and unmerged A tokens
        b_first_out_rows = torch.arange(b_first_out, b_first_out + batch * tokens_out, tokens_out, device=device)
        dst_rows = best_b.gather(1, merged) + b_first_out_rows[:, None]
    return MergePlan(
        keep_rows=keep_rows.flatten(),
        src_rows=src_rows.flatten(),
        dst_rows=dst_rows.flatten(),
        batch=batch,
        tokens_in=num_tokens,
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
    """Merge ``tokens [B, N, C]`` by summation (source maps), giving ``[B, N - r, C]``."""
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

    Computed as ``x_b + sum (s_a / S_b) (x_a - x_b)`` with ``S_b`` the merged size, the same average:
    the kept rows are copied out and only the ``r`` moved rows are read and written again, where the
    plain formula rescales every B token. ``WeightedMerge`` gives it a backward pass of the same kind.
    """
    merged, new_size = WeightedMerge.apply(x, plan, size)
    if source is not None:
        source = merge_sum(plan, source)
    return merged, new_size, source


class WeightedMerge(torch.autograd.Function):
    """``merge_weighted``'s arithmetic, ``[B, N, C] -> [B, N - r, C]`` and sizes, with its own backward pass.

    A fused plan is applied (and differentiated) by the fused kernels, any other by tensor operations.
    Every input token is either kept or moved, exactly once, so the gradient is the output gradient put
    back in input order, plus the moved tokens' shares: row copies and ``r`` rows of arithmetic, instead
    of autograd's zero-filled scatters for each gather and their sum. The shares (from sizes) are constants.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: MergePlan, size: torch.Tensor | None):
        # The kernels compute in float32: a float64 model keeps its precision with tensor operations,
        # which apply any plan (they do not need the fused plan's order).
        ctx.fused = plan.fused and x.dtype != torch.float64
        if ctx.fused:
            merged, new_size, moved_share = fused_kernels().apply_merge(plan, x, size)
        else:
            merged, new_size, moved_share = _merge_rows(plan, x, size)
        ctx.plan, ctx.input_shape = plan, x.shape
        ctx.save_for_backward(moved_share)
        ctx.mark_non_differentiable(new_size)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the sizes, which have none
        return merged, new_size

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor, _size_grad: torch.Tensor | None):
        # d out_b / d x_a = s_a / S_b for a merged into b; d out_b / d x_b = 1 - sum of those shares.
        plan, (batch, tokens, channels) = ctx.plan, ctx.input_shape
        (moved_share,) = ctx.saved_tensors
        if grad is None:  # only the sizes were used further on
            return None, None, None
        if ctx.fused:
            return fused_kernels().apply_merge_backward(plan, grad, moved_share), None, None
        grad = grad.contiguous()
        grad_x = grad.new_empty(batch, tokens, channels)
        rows = grad_x.view(-1, channels)
        rows.index_copy_(0, plan.keep_rows, grad.view(-1, channels))
        moved = gather_rows(grad, plan.dst_rows)
        moved *= moved_share
        moved = moved.view(-1, channels)
        rows.index_copy_(0, plan.src_rows, moved)
        rows.index_add_(0, plan.keep_rows.index_select(0, plan.dst_rows), moved, alpha=-1)
        return grad_x, None, None


def _merge_rows(
    plan: MergePlan, x: torch.Tensor, size: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``WeightedMerge``'s forward pass in tensor operations: the merged tokens, their sizes, and the
    moved tokens' shares ``s_a / S_b [B, r, 1]`` (float32)."""
    if size is None:
        size = torch.ones(x.shape[0], x.shape[1], 1, device=x.device)
    moved_size = gather_rows(size, plan.src_rows)
    new_size = add_rows_(gather_rows(size, plan.keep_rows), plan.dst_rows, moved_size)
    moved_share = moved_size / gather_rows(new_size, plan.dst_rows)  # float32: in-place products take it as is
    merged = gather_rows(x, plan.keep_rows)
    pull = gather_rows(x, plan.src_rows)
    pull -= gather_rows(merged, plan.dst_rows)
    pull *= moved_share
    return add_rows_(merged, plan.dst_rows, pull), new_size, moved_share


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

