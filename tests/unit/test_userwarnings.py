"""tempme's warnings name the line of the user's program that led to them, however deep the check."""

from __future__ import annotations

import inspect

import pytest
from torch.utils.data import DataLoader

import tempme
from tempme.data import RetrievalVideos, VideoItem, collate_skip_bad


def test_a_model_setting_warning_points_at_the_call_that_made_the_model(tmp_path):
    from tempme.weights import save_weights

    path = save_weights(tempme.create_model("tiny-B/32", method="none", frames=2), tmp_path / "w.safetensors")
    for make in (lambda: tempme.create_model("tiny-B/32", method="tome", frames=2, tome_r=30),
                 lambda: tempme.load_model(path, method="tome", frames=2, tome_r=30)):  # deeper inside tempme
        with pytest.warns(UserWarning, match="tome_r=30 is more than some layers can merge") as record:
            make()
        assert (record[0].filename, record[0].lineno) == (__file__, make.__code__.co_firstlineno)


def test_a_warning_from_inside_a_context_manager_points_at_its_with(tmp_path, monkeypatch):
    import fcntl

    from tempme.files import exclusive_lock

    def no_locks(*args):
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="cannot lock") as record:
        line = inspect.currentframe().f_lineno + 1
        with exclusive_lock(tmp_path / "x.index"):
            pass
    assert (record[0].filename, record[0].lineno) == (__file__, line)


def test_a_skipped_video_warning_points_at_the_loop_not_into_torch(tmp_path):
    videos = RetrievalVideos([VideoItem("gone", tmp_path / "gone.mp4")], max_frames=2, image_size=32)
    with pytest.warns(UserWarning, match="skipping video 'gone'") as record:
        line = inspect.currentframe().f_lineno + 1
        batches = list(DataLoader(videos, batch_size=1, collate_fn=collate_skip_bad))
    assert batches == [None]
    assert (record[0].filename, record[0].lineno) == (__file__, line)


def test_warnings_about_the_video_encoder_alone_say_so():
    # `tempme search` loads a model for its text encoder and leaves these out; under torchrun every
    # process gives them alike, as other shared warnings.
    from tempme.userwarnings import SharedWarning, VideoEncoderWarning

    assert issubclass(VideoEncoderWarning, SharedWarning)
    with pytest.warns(VideoEncoderWarning, match="tome_r=30 is more than some layers can merge"):
        tempme.create_model("tiny-B/32", method="tome", frames=2, tome_r=30)
    with pytest.warns(VideoEncoderWarning, match="method 'none' never reads tome_r"):
        tempme.create_model("tiny-B/32", method="none", frames=2, tome_r=3)
