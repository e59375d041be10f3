"""Bipartite soft matching and the clip join on small hand-made inputs."""

import pytest
import torch

from tempme.merging import (
    add_rows_,
    bipartite_soft_matching,
    gather_rows,
    imgme_count,
    join_clips,
    merge_sum,
    merge_weighted,
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
