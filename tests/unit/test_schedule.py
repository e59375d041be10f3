"""Per-layer token counts (SPEC section 3, worked out by hand there) and refused schedules."""

import warnings

import pytest
import torch

import tempme
from tempme.config import balanced_factors, default_merge_config, get_preset
from tempme.model import warn_if_tome_r_capped
from tempme.schedule import ScheduleError, build_plan, simulate


def rows_for(preset, frames, method="tempme", **overrides):
    clip = get_preset(preset)
    merge = default_merge_config(clip, frames, method).replace(**overrides)
    plan = build_plan(merge, clip.vision.layers, frames)
    return simulate(plan, merge, clip.vision.tokens_per_frame)


def test_b32_12_frames_matches_spec_table():
    rows = rows_for("ViT-B/32", 12)
    assert [(r.clips, r.out_tokens) for r in rows[:8]] == [(12, 50 - 2 * (i + 1)) for i in range(8)]
    # layer: (r0, r1, attn tokens, clips, out tokens)
    assert [(r.r_cross, r.r, r.attn_tokens, r.clips, r.out_tokens) for r in rows[8:11]] == [
        (20, 4, 48, 6, 44), (26, 6, 62, 3, 56), (50, 11, 118, 1, 107)
    ]
    assert (rows[11].kind, rows[11].r, rows[11].out_tokens) == ("intra", 10, 97)
    assert [r.cls for r in rows[8:]] == [2, 4, 12, 12]


def test_b16_12_frames_matches_spec_table():
    rows = rows_for("ViT-B/16", 12)
    assert rows[7].out_tokens == 117
    assert [(r.r_cross, r.r, r.attn_tokens, r.out_tokens) for r in rows[8:11]] == [
        (93, 28, 141, 113), (90, 27, 136, 109), (130, 39, 197, 158)
    ]
    assert (rows[11].r, rows[11].clips * rows[11].out_tokens) == (31, 127)


def test_b32_64_frames_matches_spec_table():
    rows = rows_for("ViT-B/32", 64)
    assert rows[7].out_tokens == 34
    assert [(r.r_cross, r.r, r.clips, r.attn_tokens, r.out_tokens) for r in rows[8:11]] == [
        (40, 9, 16, 96, 87), (104, 24, 4, 244, 220), (264, 61, 1, 616, 555)
    ]
    assert [r.cls for r in rows[8:11]] == [4, 16, 64]
    assert rows[11].clips * rows[11].out_tokens == 500


def test_tome_and_none_token_totals():
    assert rows_for("ViT-B/32", 12, "tome")[-1].out_tokens * 12 == 312  # 12 x 26
    assert rows_for("ViT-B/16", 12, "tome")[-1].out_tokens * 12 == 924  # 12 x 77
    assert rows_for("ViT-B/32", 12, "none")[-1].out_tokens * 12 == 600


def test_table10_schedule_12_4_1():
    rows = rows_for("ViT-B/32", 12, merge_layers=(8, 9), clips_joined=(3, 4))
    # Layer 8: 3 clips of 34 -> 102 tokens, r0 = int(30.6) = 30, attention on 72, r1 = int(7.2) = 7 -> 65.
    assert (rows[8].r_cross, rows[8].attn_tokens, rows[8].r, rows[8].out_tokens) == (30, 72, 7, 65)
    # Layer 9: 4 clips of 65 -> 260, r0 = int(78.0) = 78, attention on 182, r1 = int(18.2) = 18 -> 164.
    assert (rows[9].r_cross, rows[9].attn_tokens, rows[9].r, rows[9].out_tokens) == (78, 182, 18, 164)
    # Layers 10, 11 intra-only: int(16.4) = 16 -> 148, int(14.8) = 14 -> 134.
    assert [(r.kind, r.out_tokens) for r in rows[10:]] == [("intra", 148), ("intra", 134)]
    assert rows[-1].clips == 1


def test_table10_schedule_12_6_3_leaves_three_clips():
    rows = rows_for("ViT-B/32", 12, merge_layers=(8, 9), clips_joined=(2, 2))
    # Layer 9: 2 clips of 44 -> 88, r0 = int(26.4) = 26, 62, r1 = int(6.2) = 6 -> 56.
    # Layer 10: int(5.6) = 5 -> 51; layer 11: int(5.1) = 5 -> 46; 3 clips x 46 = 138 tokens.
    assert [r.out_tokens for r in rows[9:]] == [56, 51, 46]
    assert rows[-1].clips == 3 and rows[-1].cls == 4


def test_forward_shapes_follow_the_simulation():
    model = tempme.create_model("tiny-B/32", frames=12).eval()
    rows = simulate(model.plan, model.config.merge, 50)
    with torch.no_grad():
        for layers in (1, 8, 9, 12):
            state = model.visual.forward_tokens(torch.randn(2, 12, 3, 224, 224), layers=layers)
            row = rows[layers - 1]
            assert (state.clips, state.x.shape[1], state.num_cls) == (row.clips, row.out_tokens, row.cls)


def test_balanced_factors():
    assert balanced_factors(12) == (2, 2, 3)
    assert balanced_factors(64) == (4, 4, 4)
    assert balanced_factors(8) == (2, 2, 2)
    assert balanced_factors(1) == (1, 1, 1)


@pytest.mark.parametrize("overrides,message", [
    ({"clips_joined": (2, 2, 5)}, "cannot join 5 clips at layer 10: 3 clips remain"),
    ({"merge_layers": (8, 9, 12)}, "merge layer 12 is out of range"),
    ({"merge_layers": (-1, 9, 10)}, "merge layer -1 is out of range"),
    ({"merge_layers": (9, 8, 10)}, "strictly increasing"),
    ({"merge_layers": (8, 9)}, "same length"),
    ({"cross_merge_ratio": 1.0}, "cross_merge_ratio=1.0 is outside"),
    ({"intra_merge_ratio": -0.1}, "intra_merge_ratio=-0.1 is outside"),
    ({"tome_r": -1}, "tome_r must be >= 0"),
    ({"method": "fast"}, "unknown merge method 'fast'"),
    # Wrong types, named before they fail deep in the forward pass or pass as true.
    ({"tome_r": 2.5}, "tome_r must be an integer, got 2.5"),
    ({"tome_r": True}, "tome_r must be an integer, got True"),
    ({"merge_layers": (8, 9, 10.0)}, r"merge_layers must be a sequence of integers, got \(8, 9, 10.0\)"),
    ({"cross_merge_ratio": "0.3"}, "cross_merge_ratio must be a number, got '0.3'"),
    ({"prop_attn": "no"}, "prop_attn must be True or False, got 'no'"),
    ({"clip_pos_embed": 0}, "clip_pos_embed must be True or False, got 0"),
])
def test_impossible_schedules_are_refused_at_build_time(overrides, message):
    with pytest.raises(ScheduleError, match=message):
        tempme.create_model("tiny-B/32", frames=12, **overrides)


def test_frame_count_not_divisible_is_refused():
    with pytest.raises(ScheduleError, match="cannot join 2 clips at layer 8: 9 clips remain"):
        tempme.create_model("tiny-B/32", frames=9, clips_joined=(2, 2, 3))


def test_a_tome_r_beyond_half_the_patches_is_warned_about():
    # ViT-B/32: 49 patches a frame, so ImgMe merges at most 24, then 12 (of 25), then 6 (of 13) ...
    with pytest.warns(UserWarning, match=r"tome_r=30 is more than some layers can merge \(at most half the "
                      r"patches of a frame of 49 patches\): they merge 24 in layer 0, 12 in layer 1, 6 in layer 2 \.\.\."):
        tempme.create_model("ViT-B/32", method="tempme", frames=12, tome_r=30)
    # tome in all twelve layers with r=8: 49 -> 41 -> 33 -> 25 -> 17 -> 9 patches; layer 5 can merge 4.
    with pytest.warns(UserWarning, match="they merge 4 in layer 5, 2 in layer 6, 1 in layer 7 ..."):
        tempme.create_model("ViT-B/32", method="tome", frames=2, tome_r=8)


@pytest.mark.parametrize("preset, frames", [("ViT-B/32", 12), ("ViT-B/16", 12), ("ViT-B/32", 64)])
@pytest.mark.parametrize("method", ["none", "tome", "tempme"])
def test_the_papers_schedules_are_not_warned_about(preset, frames, method):
    clip = get_preset(preset)
    merge = default_merge_config(clip, frames, method)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_tome_r_capped(build_plan(merge, clip.vision.layers, frames), merge, clip.vision.tokens_per_frame)


def test_settings_the_method_never_reads_are_warned_about_from_python():
    with pytest.warns(UserWarning, match="method 'none' never reads tome_r: the model is the same without it"):
        tempme.create_model("tiny-B/32", method="none", frames=12, tome_r=3)
    with pytest.warns(UserWarning, match="method 'tome' never reads clips_joined, merge_layers: .* without them"):
        tempme.create_model("tiny-B/32", method="tome", frames=12, merge_layers=[8, 9, 10], clips_joined=[2, 2, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tempme.create_model("tiny-B/32", method="tome", frames=12, tome_r=3, prop_attn=False)  # both read
