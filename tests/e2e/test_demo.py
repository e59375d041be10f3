"""The offline demo: the synthetic captions say what the frames show, and ``tempme demo --quick`` runs end to end."""

from __future__ import annotations

import dataclasses
import json
import re

import av
import numpy as np
import pytest
import torch

from tempme import TempMe
from tempme_cli.main import main
from tempme_train.demo import DemoConfig, run_demo
from tempme_train.synthetic import (
    BACKGROUND,
    COLOURS,
    MotionVideo,
    OrderVideo,
    WorldConfig,
    grid_cell,
    render,
    sample_stills,
    sample_videos,
    shape_mask,
    to_model_input,
)

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = WorldConfig()
# Unit steps in image coordinates (y grows downwards), written out here rather than imported.
EXPECTED_STEP = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}


def colour_mask(frame: np.ndarray, colour: str) -> np.ndarray:
    """Pixels within noise range of a palette colour: ``[H, W]`` bool."""
    distance = np.abs(frame.astype(int) - np.array(COLOURS[colour])).max(axis=-1)
    return distance < 40


def centre(frame: np.ndarray, colour: str) -> np.ndarray:
    """Centre of the bounding box of the shape of that colour: its drawing centre, for every shape."""
    ys, xs = np.nonzero(colour_mask(frame, colour))
    assert len(xs) > 20, f"no {colour} shape in the frame"
    return np.array([(xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2])


def shapes_present(frame: np.ndarray) -> set[str]:
    return {colour for colour in COLOURS if colour_mask(frame, colour).sum() > 20}


def test_motion_captions_match_the_motion_in_the_frames():
    batch = sample_videos(WORLD, np.random.default_rng(0))  # every group, with pixel noise
    motions = [(frames, video) for frames, video in zip(batch.frames, batch.videos) if isinstance(video, MotionVideo)]
    assert {video.caption.split()[-1] for _, video in motions} == set(EXPECTED_STEP)
    for frames, video in motions:
        colour, destination = video.caption.split()[1], video.caption.split()[-1]
        track = np.array([centre(frame, colour) for frame in frames])
        steps = np.diff(track, axis=0)  # [F - 1, 2]
        expected = WORLD.speed * np.array(EXPECTED_STEP[destination])
        np.testing.assert_allclose(steps, np.broadcast_to(expected, steps.shape), atol=0.5, err_msg=video.caption)


def test_order_captions_match_which_shape_appears_first():
    batch = sample_videos(WORLD, np.random.default_rng(1))
    orders = [(frames, video) for frames, video in zip(batch.frames, batch.videos) if isinstance(video, OrderVideo)]
    assert orders
    half = WORLD.frames // 2
    for frames, video in orders:
        first_colour, first_shape, second_colour, second_shape = re.fullmatch(
            r"a (\w+) (\w+) appears, then a (\w+) (\w+) appears", video.caption
        ).groups()
        assert all(shapes_present(frame) == {first_colour} for frame in frames[:half]), video.caption
        assert all(shapes_present(frame) == {second_colour} for frame in frames[half:]), video.caption
        # The caption's shapes: a clean render covers exactly as many pixels as that shape.
        clean = render(video, WORLD)
        for frame, shape in ((clean[0], first_shape), (clean[-1], second_shape)):
            drawn = (frame != BACKGROUND).any(axis=-1).sum()
            assert drawn == shape_mask(shape, (16, 16), WORLD.object_radius, WORLD.image_size).sum(), video.caption


def test_each_video_comes_with_its_reversal_made_of_the_same_frames():
    batch = sample_videos(WORLD, np.random.default_rng(2), num_groups=10)
    for index in range(0, len(batch.videos), 2):
        video, twin = batch.videos[index], batch.videos[index + 1]
        assert batch.groups[index] == batch.groups[index + 1]
        assert video.caption != twin.caption
        # Played backwards, a video is its twin's kind of video: same frames in reverse, reversed caption.
        backwards = video.reversed(WORLD)
        np.testing.assert_array_equal(render(backwards, WORLD), render(video, WORLD)[::-1])
        assert backwards.caption == twin.caption


def test_mean_pooled_frames_cannot_tell_a_video_from_its_reversal_but_tempme_can():
    config = DemoConfig()
    frames = to_model_input(sample_videos(WORLD, np.random.default_rng(3), num_groups=4).frames)
    backwards = frames.flip(1)  # every video played backwards
    torch.manual_seed(0)
    none = TempMe(config.model_config("none")).eval()
    tempme = TempMe(config.model_config("tempme")).eval()
    for block in tempme.visual.transformer.resblocks:
        if block.clip_pos_embed is not None:  # as after training: clip positional embeddings tell frames apart
            torch.nn.init.normal_(block.clip_pos_embed)
    with torch.no_grad():
        none_change = (none.encode_video(frames) - none.encode_video(backwards)).norm(dim=-1)
        tempme_change = (tempme.encode_video(frames) - tempme.encode_video(backwards)).norm(dim=-1)
    assert (none_change < 1e-5).all()  # only float rounding: the mean over frames ignores their order
    assert (tempme_change > 1e-3).all()


def test_still_captions_name_the_place_of_the_shape():
    images, captions = sample_stills(WORLD, np.random.default_rng(4), 81)
    assert len(set(captions)) == 81
    for image, caption in zip(images[:, 0], captions):
        colour = caption.split()[1]
        x, y = centre(image, colour)
        assert caption.endswith(grid_cell((int(x), int(y)), WORLD.image_size)), caption


def test_quick_demo_is_deterministic():
    config = dataclasses.replace(DemoConfig.quick(seed=3), methods=("tempme",))
    first, second = run_demo(config), run_demo(config)
    assert first.pretrain_final_loss == second.pretrain_final_loss
    assert first.methods[0].final_loss == second.methods[0].final_loss
    assert first.methods[0].t2v == second.methods[0].t2v


def test_quick_demo_from_the_cli(tmp_path, capsys):
    videos = tmp_path / "videos"
    code = main(["demo", "--quick", "--threads", "1", "--output", str(tmp_path), "--save-dir", str(videos)])
    assert code == 0
    captured = capsys.readouterr()
    result = json.loads((tmp_path / "results.json").read_text())
    assert "R-sum" in captured.out  # the table
    # stderr is not a terminal here, as in a batch job's log: each of the 4 bars draws when it opens and
    # closes, not on every step (the loss shown does not force a redraw), each time on a line of its own.
    redraws = [line for line in captured.err.splitlines() if "%|" in line]
    assert 4 <= len(redraws) <= 4 * 3 and "\r" not in captured.err, captured.err
    # With --json into a log, as every --json of tempme: one line of JSON, and no bars for the script to skip.
    assert main(["demo", "--quick", "--json", "--threads", "1", "--methods", "tempme"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 1 and set(json.loads(captured.out)["methods"]) == {"tempme"}
    assert "%|" not in captured.err, captured.err

    methods = result["methods"]
    assert set(methods) == {"none", "tome", "tempme"}
    none, tempme = methods["none"], methods["tempme"]
    assert none["tokens"] == WORLD.frames * 17  # no merging: 16 patches + CLS per frame
    assert tempme["tokens"] < methods["tome"]["tokens"] < none["tokens"]
    assert tempme["gflops"] < methods["tome"]["gflops"] < none["gflops"]
    for name, method in methods.items():
        assert method["videos_per_s"] > 0, name

    written = sorted(videos.glob("*.mp4"))
    assert len(written) == 8
    with av.open(str(written[0])) as container:
        assert sum(1 for _ in container.decode(video=0)) == WORLD.frames


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_a_seed_the_generators_cannot_take_is_refused_by_name(seed, capsys):
    assert main(["demo", "--quick", "--seed", seed]) == 2
    assert f"--seed must be between 0 and 2**32 - 1, got {seed}" in capsys.readouterr().err
