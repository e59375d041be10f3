"""CLIP image transform (tempme.data.transforms)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tempme.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    center_crop,
    clip_preprocess,
    frames_to_tensor,
    resize_short_side,
)


def test_uniform_red_image_normalises_to_clip_values():
    out = clip_preprocess(Image.new("RGB", (320, 240), (255, 0, 0)))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    expected = [(1 - CLIP_MEAN[0]) / CLIP_STD[0], -CLIP_MEAN[1] / CLIP_STD[1], -CLIP_MEAN[2] / CLIP_STD[2]]
    for channel, value in enumerate(expected):
        torch.testing.assert_close(out[channel], torch.full((224, 224), value), atol=1e-5, rtol=0)


def test_clip_constants():
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)


@pytest.mark.parametrize(
    ("size", "expected"), [((64, 48), (32, 24)), ((48, 64), (24, 32)), ((100, 30), (80, 24))]
)
def test_resize_short_side_truncates_long_side(size, expected):
    assert resize_short_side(Image.new("RGB", size), 24).size == expected


def test_center_crop_rounds_offsets():
    # Width 7, crop 4: left = round(1.5) = 2 (round half to even), so columns 2..5 survive.
    image = Image.fromarray(np.tile(np.arange(7, dtype=np.uint8), (4, 1)))
    cropped = np.asarray(center_crop(image, 4))
    assert cropped[0].tolist() == [2, 3, 4, 5]


def test_matches_manual_pipeline():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    resized = image.resize((44, 32), Image.Resampling.BICUBIC)  # short side 50 -> 32, long int(32*70/50)=44
    crop = torch.from_numpy(np.asarray(resized)[:, 6:38].astype(np.float32) / 255.0).permute(2, 0, 1)
    expected = (crop - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    torch.testing.assert_close(clip_preprocess(image, 32), expected)


def test_non_rgb_inputs_become_three_channels():
    assert clip_preprocess(Image.new("L", (40, 30), 128), 16).shape == (3, 16, 16)
    assert clip_preprocess(Image.new("RGBA", (40, 30)), 16).shape == (3, 16, 16)


def test_frames_to_tensor_shape():
    frames = [Image.new("RGB", (64, 48), (i, i, i)) for i in range(5)]
    out = frames_to_tensor(frames, 32)
    assert out.shape == (5, 3, 32, 32)
    torch.testing.assert_close(out[2], clip_preprocess(frames[2], 32))


def test_frames_to_tensor_rejects_empty():
    with pytest.raises(ValueError):
        frames_to_tensor([])
