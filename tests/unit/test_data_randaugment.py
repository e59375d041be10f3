"""Video RandAugment (tempme.data.randaugment)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from tempme.data.randaugment import INCREASING_OPS, AugmentStep, VideoRandAugment, apply_steps


def _textured_frame(size=(40, 30), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _arrays(frames):
    return [np.asarray(frame) for frame in frames]


def test_increasing_set_has_the_fifteen_timm_ops():
    assert len(INCREASING_OPS) == 15 and len(set(INCREASING_OPS)) == 15
    assert {"PosterizeIncreasing", "SolarizeIncreasing", "TranslateXRel", "TranslateYRel"} <= set(
        INCREASING_OPS
    )


def test_identical_frames_get_identical_outputs():
    frame = _textured_frame()
    augment = VideoRandAugment(prob=1.0, rng=random.Random(3))
    for _ in range(10):
        outputs = _arrays(augment([frame.copy() for _ in range(4)]))
        for other in outputs[1:]:
            np.testing.assert_array_equal(outputs[0], other)


def test_same_ops_and_parameters_for_every_frame():
    """A video's frames all go through the ops drawn once for it: each augmented frame is what those
    ops give that frame alone."""
    frames = [_textured_frame(seed=s) for s in range(3)]
    for seed in range(5):
        steps = VideoRandAugment(prob=1.0, rng=seed).sample_steps()  # what the same draw gives
        together = _arrays(VideoRandAugment(prob=1.0, rng=seed)(frames))
        one_by_one = [np.asarray(apply_steps([frame], steps)[0]) for frame in frames]
        for joint, single in zip(together, one_by_one, strict=True):
            np.testing.assert_array_equal(joint, single)


def test_sizes_and_mode_are_kept():
    frames = [_textured_frame((40, 30)), _textured_frame((64, 48)).convert("L")]
    augment = VideoRandAugment(prob=1.0, rng=1)
    for _ in range(20):
        out = augment(frames)
        assert [f.size for f in out] == [(40, 30), (64, 48)] and all(f.mode == "RGB" for f in out)


def test_deterministic_with_seeded_generator():
    frames = [_textured_frame(seed=s) for s in range(2)]
    first = _arrays(VideoRandAugment(rng=random.Random(42))(frames))
    second = _arrays(VideoRandAugment(rng=random.Random(42))(frames))
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


def test_global_random_module_is_used_without_rng():
    random.seed(7)
    first = VideoRandAugment().sample_steps()
    random.seed(7)
    assert VideoRandAugment().sample_steps() == first


def test_step_count_follows_probability():
    assert len(VideoRandAugment(prob=1.0, rng=0).sample_steps()) == 4
    assert VideoRandAugment(prob=0.0, rng=0).sample_steps() == []
    counts = [len(VideoRandAugment(rng=seed).sample_steps()) for seed in range(400)]
    assert 1.8 < np.mean(counts) < 2.2  # 4 ops x p=0.5


def test_magnitude_is_clipped_to_ten():
    augment = VideoRandAugment(num_ops=50, magnitude=100.0, magnitude_std=0.0, prob=1.0, rng=0)
    steps = {step.name: step.args for step in augment.sample_steps()}
    assert abs(steps["Rotate"][0]) == pytest.approx(30.0)
    assert steps["PosterizeIncreasing"] == (0,)
    assert steps["SolarizeIncreasing"] == (0,)
    assert steps["SolarizeAdd"] == (110,)
    assert abs(steps["TranslateXRel"][0]) == pytest.approx(0.45)
    assert abs(steps["ShearX"][0]) == pytest.approx(0.3)
    assert steps["ColorIncreasing"][0] in (pytest.approx(0.1), pytest.approx(1.9))


def test_magnitude_seven_parameters():
    augment = VideoRandAugment(num_ops=60, magnitude=7.0, magnitude_std=0.0, prob=1.0, rng=2)
    steps = {step.name: step.args for step in augment.sample_steps()}
    assert abs(steps["Rotate"][0]) == pytest.approx(21.0)
    assert steps["PosterizeIncreasing"] == (2,)
    assert steps["SolarizeIncreasing"] == (256 - 179,)
    assert steps["SolarizeAdd"] == (77,)
    assert abs(steps["TranslateYRel"][0]) == pytest.approx(0.315)


@pytest.mark.parametrize("name", INCREASING_OPS)
def test_every_op_runs(name):
    frame = _textured_frame()
    step = next(s for s in VideoRandAugment(num_ops=80, prob=1.0, rng=4).sample_steps() if s.name == name)
    out = apply_steps([frame], [step])[0]
    assert out.size == frame.size and out.mode == "RGB"


def test_translate_moves_by_fraction_of_width_and_fills_grey():
    frame = Image.new("RGB", (40, 30), (255, 255, 255))
    out = np.asarray(apply_steps([frame], [AugmentStep("TranslateXRel", (0.25,))])[0])
    # Sampling at x + 10 leaves the last 10 columns outside the source: grey fill.
    assert (out[:, -10:] == 128).all() and (out[:, :29] == 255).all()
