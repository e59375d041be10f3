"""Bipartite soft matching and the clip join on small hand-made inputs."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tempme
from tempme.merging import (
    add_rows_,
    bipartite_soft_matching,
    gather_rows,
    imgme_count,
    join_clips,
    match_patches,
    merge_sum,
    merge_weighted,
    normalized_patches,
    patch_similarities,
    proportional_count,
)


def unit(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_sets_alternate_by_absolute_position_with_one_cls():
    # Positions: 0 = CLS, 1..6 = patches. A (sources) = even positions 2, 4, 6; B = 1, 3, 5.
    # Token 4 points the same way as destination 5, everything else is orthogonal-ish.
    metric = torch.stack([
        unit(1, 0, 0, 0),  # 0 CLS (identical to token 2: must still never merge)
        unit(0, 1, 0, 0),  # 1 B
        unit(1, 0, 0, 0),  # 2 A
        unit(0, 0, 1, 0),  # 3 B
        unit(0, 0, 0, 1),  # 4 A  -> best match 5 (score 1)
        unit(0, 0, 0, 1),  # 5 B
        unit(0, 1, 1, 0),  # 6 A  -> best match 1 or 3 (score 0.707)
    ])[None]
    x = torch.arange(7, dtype=torch.float32).view(1, 7, 1)
    plan = bipartite_soft_matching(metric, r=1, num_cls=1)
    merged, size, _ = merge_weighted(plan, x, None)
    # Output: CLS, unmerged A (2, 6 ascending), then B (1, 3, 5) where 5 absorbed 4: (4 + 5) / 2.
    assert merged.flatten().tolist() == [0, 2, 6, 1, 3, 4.5]
    assert size.flatten().tolist() == [1, 1, 1, 1, 1, 2]


def test_sets_with_two_cls_tokens_start_at_the_first_patch():
    # Two CLS tokens: patches at absolute 2..5; A = even = 2, 4 (relative 0, 2); B = 3, 5.
    metric = torch.stack([unit(1, 0), unit(1, 0), unit(0, 1), unit(1, 0), unit(1, 0), unit(0, 1)])[None]
    x = torch.tensor([10.0, 11.0, 2.0, 3.0, 4.0, 5.0]).view(1, 6, 1)
    plan = bipartite_soft_matching(metric, r=2, num_cls=2)
    merged, size, _ = merge_weighted(plan, x, None)
    # 2 -> 5 (both (0,1)), 4 -> 3 (both (1,0)); CLS 10, 11 untouched although they match too.
    assert merged.flatten().tolist() == [10, 11, 3.5, 3.5]
    assert size.flatten().tolist() == [1, 1, 2, 2]


def test_merge_is_size_weighted_and_sizes_add():
    metric = torch.stack([unit(1, 0), unit(0, 1), unit(0, 1)])[None]  # CLS, B=1, A=2 -> 1
    x = torch.tensor([0.0, 1.0, 4.0]).view(1, 3, 1)
    size = torch.tensor([1.0, 1.0, 3.0]).view(1, 3, 1)
    plan = bipartite_soft_matching(metric, r=1, num_cls=1)
    merged, new_size, _ = merge_weighted(plan, x, size)
    assert merged.flatten().tolist() == [0.0, (1 * 1 + 3 * 4) / 4]
    assert new_size.flatten().tolist() == [1.0, 4.0]


def test_unmerged_sources_keep_ascending_order_not_score_order():
    # A = 2, 4, 6, 8 with scores towards B chosen so the score order is 8, 2, 6, 4.
    dims = torch.eye(8)
    tokens = [dims[7], dims[0], None, dims[1], None, dims[2], None, dims[3], None]
    tokens[8] = dims[3]  # score 1 with token 7
    tokens[2] = 0.9 * dims[0] + 0.1 * dims[6]
    tokens[6] = 0.5 * dims[2] + 0.5 * dims[6]
    tokens[4] = 0.1 * dims[1] + 0.9 * dims[6]
    metric = torch.stack(tokens)[None]
    x = torch.arange(9, dtype=torch.float32).view(1, 9, 1)
    plan = bipartite_soft_matching(metric, r=1, num_cls=1)
    assert plan.src.tolist() == [[8]]  # token 8 is the best-matched source
    assert plan.dst.tolist() == [[7]]  # into token 7, which lands last in the output
    merged, _, _ = merge_weighted(plan, x, None)
    assert merged.flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7.5]


def test_merging_source_maps_tracks_patches():
    metric = torch.stack([unit(1, 0), unit(0, 1), unit(0, 1)])[None]
    x = torch.zeros(1, 3, 1)
    source = torch.eye(3)[None]
    plan = bipartite_soft_matching(metric, r=1, num_cls=1)
    _, _, merged_source = merge_weighted(plan, x, None, source)
    assert merged_source[0].tolist() == [[1, 0, 0], [0, 1, 1]]


def test_r_zero_only_reorders():
    metric = torch.randn(2, 9, 4)
    x = torch.randn(2, 9, 3)
    plan = bipartite_soft_matching(metric, r=0, num_cls=1)
    out = merge_sum(plan, x)
    expected = torch.cat([x[:, :1], x[:, 2::2], x[:, 1::2]], dim=1)
    torch.testing.assert_close(out, expected)


def test_r_above_half_the_patches_is_refused():
    with pytest.raises(ValueError, match="cannot merge r=4"):
        bipartite_soft_matching(torch.randn(1, 8, 4), r=4, num_cls=1)  # 7 patches: at most 3


def test_counts_cap_at_half_the_patches():
    assert imgme_count(50, 1, 2) == 2
    assert imgme_count(6, 1, 10) == 2  # 5 patches -> at most 2
    assert imgme_count(5, 4, 3) == 0  # one patch cannot merge
    assert proportional_count(880, 64, 0.3) == 264  # 880 * 0.3 is exactly 264.0
    assert proportional_count(107, 12, 0.1) == 10  # int(10.7)
    assert proportional_count(14, 12, 0.9) == 1  # int(12.6) capped by (14 - 12) // 2
    assert proportional_count(40, 1, 0.0) == 0


def test_join_clips_puts_all_cls_first_then_patches_clip_by_clip():
    # 1 video, 4 clips of 3 tokens (1 CLS + 2 patches); value = 10 * clip + position.
    tokens = torch.tensor([[10.0 * c + p for p in range(3)] for c in range(4)]).unsqueeze(-1)
    joined = join_clips(tokens, videos=1, clips_joined=2, num_cls=1)
    assert joined.shape == (2, 6, 1)
    assert joined[0].flatten().tolist() == [0, 10, 1, 2, 11, 12]
    assert joined[1].flatten().tolist() == [20, 30, 21, 22, 31, 32]


def test_join_clips_keeps_videos_apart_and_handles_several_cls():
    # 2 videos x 2 clips, each clip 2 CLS + 1 patch.
    tokens = torch.arange(12, dtype=torch.float32).view(4, 3, 1)
    joined = join_clips(tokens, videos=2, clips_joined=2, num_cls=2)
    assert joined.shape == (2, 6, 1)
    assert joined[0].flatten().tolist() == [0, 1, 3, 4, 2, 5]
    assert joined[1].flatten().tolist() == [6, 7, 9, 10, 8, 11]


def test_row_gather_and_add_by_hand():
    tokens = torch.arange(12.0).view(2, 3, 2)  # sequence 0: rows [0,1] [2,3] [4,5]; sequence 1: [6,7] [8,9] [10,11]
    picked = gather_rows(tokens, torch.tensor([2, 0, 4, 4]))  # flat rows: 2 of sequence 0, ..., 1 of sequence 1
    assert picked.tolist() == [[[4, 5], [0, 1]], [[8, 9], [8, 9]]]
    target = torch.zeros(2, 2, 2)
    add_rows_(target, torch.tensor([1, 1, 2, 3]), torch.ones(2, 2, 2))  # row 1 of sequence 0 gets two
    assert target.tolist() == [[[0, 0], [2, 2]], [[1, 1], [1, 1]]]


def test_plan_rows_are_the_positions_in_the_flattened_tensors():
    plan = bipartite_soft_matching(torch.randn(3, 7, 4), 2, 1)
    assert plan.keep_rows.tolist() == (plan.keep + 7 * torch.arange(3)[:, None]).flatten().tolist()
    assert plan.src_rows.tolist() == (plan.src + 7 * torch.arange(3)[:, None]).flatten().tolist()
    assert plan.dst_rows.tolist() == (plan.dst + 5 * torch.arange(3)[:, None]).flatten().tolist()


def test_weighted_merge_gradients_are_exact():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 4, dtype=torch.float64, requires_grad=True)
    size = torch.rand(2, 9, 1, dtype=torch.float64) + 1
    plan = bipartite_soft_matching(torch.randn(2, 9, 3), 3, 1)
    assert torch.autograd.gradcheck(lambda tokens: merge_weighted(plan, tokens, size)[0], (x,))


def by_hand_weighted_merge(plan, x, size):
    """The merge formula token by token: x_b <- (s_b x_b + sum s_a x_a) / (s_b + sum s_a)."""
    out, out_size = [], []
    for seq in range(x.shape[0]):
        total = {int(k): size[seq, k].clone() for k in plan.keep[seq]}
        weighted = {int(k): size[seq, k] * x[seq, k] for k in plan.keep[seq]}
        for a, dst in zip(plan.src[seq].tolist(), plan.dst[seq].tolist()):
            b = int(plan.keep[seq, dst])
            total[b] += size[seq, a]
            weighted[b] += size[seq, a] * x[seq, a]
        keep = plan.keep[seq].tolist()
        out.append(torch.stack([weighted[k] / total[k] for k in keep]))
        out_size.append(torch.stack([total[k] for k in keep]))
    return torch.stack(out), torch.stack(out_size)


@pytest.mark.parametrize("with_autograd", [False, True])
def test_weighted_merge_matches_the_formula_with_and_without_autograd(with_autograd):
    torch.manual_seed(1)
    x = torch.randn(3, 11, 5, dtype=torch.float64, requires_grad=with_autograd)
    size = torch.randint(1, 4, (3, 11, 1)).double()
    plan = bipartite_soft_matching(torch.randn(3, 11, 4), 4, 1)
    merged, new_size, _ = merge_weighted(plan, x, size)
    expected, expected_size = by_hand_weighted_merge(plan, x.detach(), size)
    torch.testing.assert_close(merged.detach(), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(new_size, expected_size)


def test_weighted_merge_backward_equals_autograd_through_the_plain_formula():
    # WeightedMerge's own backward against autograd through gathers, products and index_add.
    torch.manual_seed(2)
    size = torch.randint(1, 5, (4, 13, 1)).double()
    plan = bipartite_soft_matching(torch.randn(4, 13, 6), 5, 2)
    upstream = torch.randn(4, 13 - 5, 8, dtype=torch.float64)
    x = torch.randn(4, 13, 8, dtype=torch.float64, requires_grad=True)
    merge_weighted(plan, x, size)[0].backward(upstream)

    plain_x = x.detach().clone().requires_grad_()
    kept_size, moved_size = gather_rows(size, plan.keep_rows), gather_rows(size, plan.src_rows)
    new_size = add_rows_(kept_size.clone(), plan.dst_rows, moved_size)
    kept = gather_rows(plain_x, plan.keep_rows) * (kept_size / new_size)
    moved = gather_rows(plain_x, plan.src_rows) * (moved_size / gather_rows(new_size, plan.dst_rows))
    add_rows_(kept, plan.dst_rows, moved).backward(upstream)
    torch.testing.assert_close(x.grad, plain_x.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_autograd", [False, True])
def test_join_clips_adds_the_clip_offset_to_every_token_of_its_clip(with_autograd):
    # 2 videos x 4 clips of 3 tokens (1 CLS), joined in pairs; offset of clip c = 100 * (c + 1).
    tokens = torch.arange(2 * 4 * 3, dtype=torch.float32).view(8, 3, 1).requires_grad_(with_autograd)
    offset = (100.0 * torch.arange(1, 5)).view(1, 4, 1, 1).requires_grad_(with_autograd)
    joined = join_clips(tokens, videos=2, clips_joined=2, num_cls=1, clip_offset=offset)
    expected = join_clips((tokens.detach().view(2, 4, 3, 1) + offset.detach()).view(8, 3, 1), 2, 2, 1)
    assert torch.equal(joined.detach(), expected)
    # video 0, second joined clip = clips 2 and 3: CLS 6 + 300, 9 + 400, then patches 7, 8 (+300), 10, 11 (+400)
    assert joined[1].flatten().tolist() == [306, 409, 307, 308, 410, 411]
    if with_autograd:
        joined.sum().backward()
        assert torch.equal(tokens.grad, torch.ones_like(tokens))
        assert offset.grad.flatten().tolist() == [6.0, 6.0, 6.0, 6.0]  # 2 videos x 3 tokens per clip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalized_patches_equal_normalising_in_float32(dtype):
    torch.manual_seed(3)
    metric = torch.randn(3, 9, 16).to(dtype)
    patches = normalized_patches(metric, num_cls=2)
    assert patches.dtype == torch.float32 and patches.is_contiguous()
    assert torch.equal(patches, torch.nn.functional.normalize(metric[:, 2:].float(), dim=-1))


def test_normalized_patches_in_half_precision_are_rounded_once():
    # A half-precision metric on a GPU is normalised in float32 and rounded once to its own dtype.
    torch.manual_seed(3)
    metric = torch.randn(3, 9, 16).to(torch.bfloat16)
    patches = normalized_patches(metric, num_cls=2, dtype=torch.bfloat16)
    assert patches.dtype == torch.bfloat16 and patches.is_contiguous()
    expected = torch.nn.functional.normalize(metric[:, 2:].float(), dim=-1).to(torch.bfloat16)
    assert torch.equal(patches, expected)


def test_half_precision_similarities_are_float32_and_keep_close_scores_apart():
    # Two B tokens whose similarities to the A token differ by less than bf16's spacing near 1
    # (2^-8): rounded to bf16 they would tie (and the lower index would win); in float32 the better
    # one wins.
    a = torch.tensor([[[1.0, 1.0, 1.0]]], dtype=torch.bfloat16)
    values = torch.tensor([[[0.5, 0.49609375, 2**-10], [0.5, 0.49609375, 1.5 * 2**-10]]])
    b = values.to(torch.bfloat16)
    assert torch.equal(b.float(), values)  # the inputs themselves are exact in bf16
    assert (a @ b.transpose(-1, -2))[0, 0].unique().numel() == 1  # a tie once rounded to bf16
    scores = patch_similarities(a, b)
    assert scores.dtype == torch.float32
    assert scores.argmax().item() == 1
    torch.testing.assert_close(scores, a.float() @ b.float().transpose(-1, -2), rtol=0, atol=0)


def test_similarities_stay_float32_under_autocast():
    # Training and evaluation run under autocast, which would round a float32 product to bf16.
    a = torch.tensor([[[1.0, 1.0, 1.0]]])
    b = torch.tensor([[[0.5, 0.49609375, 2**-10], [0.5, 0.49609375, 1.5 * 2**-10]]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ b.transpose(-1, -2)).dtype == torch.bfloat16  # what autocast does to a plain product
        scores = patch_similarities(a, b)
    assert scores.dtype == torch.float32 and scores.argmax().item() == 1
    assert normalized_patches(a, num_cls=0).dtype == torch.float32  # a CPU multiplies in float32


def test_cross_clip_metric_joined_as_a_view_plans_like_the_joined_metric():
    # ClipMe normalises each clip's patches and views consecutive clips as one joined sequence.
    torch.manual_seed(4)
    hidden = torch.randn(2 * 4, 7, 12)  # 2 videos x 4 clips, 1 CLS + 6 patches each
    joined = join_clips(hidden, videos=2, clips_joined=2, num_cls=1)
    reference = bipartite_soft_matching(joined, 5, num_cls=2)
    patches = normalized_patches(hidden, num_cls=1)
    plan = match_patches(patches.view(4, 12, 12), 5, num_cls=2)
    for field in ("keep", "src", "dst", "keep_rows", "src_rows", "dst_rows"):
        assert torch.equal(getattr(plan, field), getattr(reference, field)), field


class OperatorCount(TorchDispatchMode):
    """Counts the operators that compute something (views excluded): on a GPU, roughly the kernels."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_merge_costs_few_small_operators(dtype):
    # On a GPU each operator of matching and merging is a small kernel of a few microseconds, one
    # per merge of every layer: their number is the cost (docs/design.md, "Merging").
    keys, x = torch.randn(4, 197, 64, dtype=dtype), torch.randn(4, 197, 32, dtype=dtype)
    size = torch.rand(4, 197, 1) + 1
    with torch.inference_mode():
        with OperatorCount() as matching:
            plan = bipartite_soft_matching(keys, 10, 1)
        with OperatorCount() as merging:
            merge_weighted(plan, x, size)
    assert sum(matching.counts.values()) <= 14, matching.counts
    assert sum(merging.counts.values()) <= 11, merging.counts
    assert "copy_" not in merging.counts and "clone" not in merging.counts  # no dtype casts, no extra copies
    # Backward: no zero-filled gradient for the sizes either (they have none).
    tokens = x.clone().requires_grad_()
    merged, _, _ = merge_weighted(plan, tokens, size)
    upstream = torch.randn_like(merged)
    with OperatorCount() as backward:
        merged.backward(upstream)
    assert sum(backward.counts.values()) <= 10, backward.counts
    assert not {"zeros", "zeros_like", "new_zeros", "fill_"} & set(backward.counts), backward.counts


@pytest.mark.parametrize("patches", [0, 1])
def test_merging_nothing_where_no_patch_has_a_partner_keeps_every_token(patches):
    tokens = torch.randn(3, 1 + patches, 8)
    plan = bipartite_soft_matching(tokens, 0, num_cls=1)
    merged, size, _ = merge_weighted(plan, tokens, None)
    assert torch.equal(merged, tokens) and torch.equal(size, torch.ones(3, 1 + patches, 1))


def test_a_float64_model_merges_in_float64():
    # Matching divides in at least float32: a float64 metric keeps float64 (narrowing it is an error).
    torch.manual_seed(0)
    model = tempme.create_model("tiny-B/32", frames=4).eval()
    video = torch.randn(2, 4, 3, 224, 224)
    with torch.no_grad():
        single = model.encode_video(video)
        double = model.double().encode_video(video.double())
    assert double.dtype == torch.float64
    torch.testing.assert_close(double.float(), single, atol=1e-5, rtol=1e-4)
    metric = torch.randn(2, 9, 4, dtype=torch.float64)
    assert normalized_patches(metric, 1).dtype == torch.float64
    expected = torch.nn.functional.normalize(metric[:, 1:], dim=-1)
    torch.testing.assert_close(normalized_patches(metric, 1), expected, atol=1e-15, rtol=0)
