"""The vectorised, plan-driven encoder against the plain step-by-step reference of SPEC section 1."""

import dataclasses

import pytest
import torch

import tempme
from tempme.merging import split_sets
from reference_tempme import reference_video_features
from tiny_models import randomise_adapters


CASES = [
    ("tiny-B/32", 12, "tempme", {}),
    ("tiny-B/32", 12, "tome", {}),
    ("tiny-B/32", 12, "none", {}),
    ("tiny-B/32", 12, "tempme", {"merge_layers": (0, 4, 8), "clips_joined": (2, 2, 3)}),
    ("tiny-B/32", 12, "tempme", {"clips_joined": (3, 4), "merge_layers": (8, 9)}),
    ("tiny-B/32", 12, "tempme", {"prop_attn": False, "cross_merge_ratio": 0.0}),
    ("tiny-B/16", 4, "tempme", {"clips_joined": (2, 2, 1)}),
    # Ending with several clips: the mean over frames then pools each clip's CLS tokens with the mask.
    ("tiny-B/32", 12, "tempme", {"merge_layers": (8, 9), "clips_joined": (2, 2)}),
    ("tiny-B/32", 12, "tempme", {"merge_layers": (4,), "clips_joined": (4,), "clip_pos_embed": False}),
]


def encoder_and_reference(preset, frames, method, overrides):
    """The encoder's video features for two random videos (one with padded frames), and the reference's."""
    torch.manual_seed(0)
    model = tempme.create_model(preset, method=method, frames=frames, **overrides).eval()
    randomise_adapters(model)
    merge = model.config.merge
    video = torch.randn(2, frames, 3, 224, 224)
    mask = torch.ones(2, frames)
    mask[1, frames // 2 + 1 :] = 0  # several padded frames, across clips
    with torch.no_grad():
        ours = model.encode_video(video, mask)
        reference = reference_video_features(
            {k: v.detach() for k, v in model.state_dict().items()},
            video,
            heads=model.config.clip.vision.heads,
            layers=model.config.clip.vision.layers,
            method=method,
            tome_r=merge.tome_r,
            merge_layers=tuple(merge.merge_layers),
            frame_nums=tuple(merge.clips_joined),
            p_cross=merge.cross_merge_ratio,
            p_intra=merge.intra_merge_ratio,
            prop_attn=merge.prop_attn,
            clip_pos_embed=merge.clip_pos_embed,
            mask=mask,
        )
    return ours, reference


@pytest.mark.parametrize("preset,frames,method,overrides", CASES)
def test_encoder_matches_reference(preset, frames, method, overrides):
    ours, reference = encoder_and_reference(preset, frames, method, overrides)
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)


def test_the_comparison_fails_for_unmerged_tokens_out_of_order(monkeypatch):
    """Guard that the comparison above can fail on token order: with the unmerged tokens of each ImgMe
    merge reversed (vanilla ToMe leaves them in score order), later merges pair other tokens."""
    match = tempme.model.bipartite_soft_matching

    def unmerged_reversed(metric, r, num_cls, fused=False):
        plan = match(metric, r, num_cls, fused)
        a_start, _ = split_sets(num_cls)
        unmerged = len(range(a_start, plan.tokens_in - num_cls, 2)) - r
        keep = plan.keep_rows.view(plan.batch, -1).clone()
        keep[:, num_cls : num_cls + unmerged] = keep[:, num_cls : num_cls + unmerged].flip(1)
        return dataclasses.replace(plan, keep_rows=keep.flatten())

    monkeypatch.setattr(tempme.model, "bipartite_soft_matching", unmerged_reversed)
    ours, reference = encoder_and_reference("tiny-B/32", 12, "tempme", {})
    assert (ours - reference).abs().max() > 1e-3
