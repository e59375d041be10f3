"""The vectorised, plan-driven encoder against the plain step-by-step reference of SPEC section 1."""

import pytest
import torch

import tempme
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
]


@pytest.mark.parametrize("preset,frames,method,overrides", CASES)
def test_encoder_matches_reference(preset, frames, method, overrides):
    torch.manual_seed(0)
    model = tempme.create_model(preset, method=method, frames=frames, **overrides).eval()
    randomise_adapters(model)
    merge = model.config.merge
    video = torch.randn(2, frames, 3, 224, 224)
    mask = torch.ones(2, frames)
    mask[1, -1] = 0
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
            mask=mask,
        )
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)


def test_reference_detects_a_wrong_token_order():
    """Guard that the comparison above can fail: scrambling the output order changes the features."""
    torch.manual_seed(0)
    model = tempme.create_model("tiny-B/32", frames=12).eval()
    randomise_adapters(model)
    video = torch.randn(1, 12, 3, 224, 224)
    with torch.no_grad():
        ours = model.encode_video(video)
        # Swapping the clip positional embeddings of two clips changes the result.
        cpe = model.visual.transformer.resblocks[8].clip_pos_embed
        cpe.copy_(cpe.flip(1))
        changed = model.encode_video(video)
    assert not torch.allclose(ours, changed, atol=1e-5)
