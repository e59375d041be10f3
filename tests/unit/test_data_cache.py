"""Decoded-frame cache (tempme.data.cache)."""

from __future__ import annotations

import errno
import os
import stat

import numpy as np
import pytest
from data_fixtures import FPS, NUM_FRAMES, build_video_files, frame_index, write_corrupt, write_video

from tempme.data import cache as cache_module
from tempme.data.annotations import VideoItem
from tempme.data.cache import FrameCache
from tempme.data.transforms import resize_short_side
from tempme.data.video import VideoDecodeError, read_frames, sample_frame_indices


@pytest.fixture(scope="module")
def video_files(tmp_path_factory):
    return build_video_files(tmp_path_factory.mktemp("videos"))


@pytest.fixture
def items(video_files):
    return [
        VideoItem("clip/one", video_files.mp4, ["x"]),
        VideoItem("clip:two", video_files.mkv, ["y"]),
        VideoItem("broken", video_files.corrupt, ["z"]),
        VideoItem("empty", video_files.empty, ["w"]),
    ]


def test_round_trip_stores_short_side_resized_uint8(items, tmp_path):
    cache = FrameCache(tmp_path, max_frames=6, image_size=24)
    assert cache.get(items[0]) is None
    frames = cache.get_or_create(items[0])
    stored = np.load(cache.path_for(items[0]))
    assert stored.dtype == np.uint8 and stored.shape == (6, 24, 32, 3)
    expected = [np.asarray(resize_short_side(f, 24)) for f in read_frames(items[0].path, 6)]
    np.testing.assert_array_equal(stored, np.stack(expected))
    loaded = cache.get(items[0])
    assert [np.asarray(f).tolist() for f in loaded] == [np.asarray(f).tolist() for f in frames]
    assert [frame_index(f) for f in loaded] == sample_frame_indices(NUM_FRAMES, FPS, 6)


def test_file_names_are_safe_and_settings_do_not_collide(items, tmp_path):
    small = FrameCache(tmp_path, max_frames=4, image_size=24)
    path = small.path_for(items[0])
    assert (
        path.parent == tmp_path / "m4_r1_s24"
        and path.name.startswith("clip_one-")
        and path.suffix == ".npy"
    )
    assert small.path_for(items[0]) != small.path_for(VideoItem("clip_one", items[0].path))
    assert FrameCache(tmp_path, max_frames=8, image_size=24).path_for(items[0]) != path
    assert FrameCache(tmp_path, max_frames=4, framerate=2.0, image_size=24).path_for(items[0]) != path
    assert FrameCache(tmp_path, max_frames=4, image_size=32).path_for(items[0]) != path
    decord = FrameCache(tmp_path, max_frames=4, image_size=24, backend="decord").path_for(items[0])
    assert decord.parent == tmp_path / "m4_r1_s24_decord" and decord.name == path.name  # decoders differ in pixels
    window = VideoItem(items[0].video_id, items[0].path, start=1.0, end=3.0)
    assert small.path_for(window) != path


def test_prepare_reports_ok_and_skipped(items, tmp_path):
    cache = FrameCache(tmp_path, max_frames=4, image_size=24)
    summary = cache.prepare(items, num_workers=2, progress=False)
    assert summary.ok == 2
    assert sorted(s.video_id for s in summary.skipped) == ["broken", "empty"]
    assert all(cache.get(item) is not None for item in items[:2])
    assert cache.prepare(items[:2], progress=False).ok == 2  # already cached: nothing decoded


def test_get_or_create_raises_for_bad_video(items, tmp_path):
    with pytest.raises(VideoDecodeError, match="corrupt.mp4"):
        FrameCache(tmp_path).get_or_create(items[2])


def test_write_is_atomic(items, tmp_path, monkeypatch):
    cache = FrameCache(tmp_path, max_frames=4, image_size=24)

    def crash_mid_write(stream, array):
        stream.write(b"\x93NUMPY partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module.np, "save", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        cache.get_or_create(items[0])
    assert list(cache.folder.iterdir()) == []  # neither the entry nor the temporary file remains
    monkeypatch.undo()
    assert len(cache.get_or_create(items[0])) == 4
    assert [p.suffix for p in cache.folder.iterdir()] == [".npy"]


def test_unreadable_entry_is_dropped(items, tmp_path):
    cache = FrameCache(tmp_path, max_frames=4, image_size=24)
    path = cache.path_for(items[0])
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a numpy file")
    assert cache.get(items[0]) is None and not path.exists()


def test_entries_get_the_mode_of_a_plain_write(items, tmp_path):
    previous = os.umask(0o027)
    try:
        cache = FrameCache(tmp_path, max_frames=4, image_size=24)
        cache.get_or_create(items[0])
        # 0o666 less the umask, as np.save to a plain file gives; not the temporary file's 0o600.
        assert stat.S_IMODE(cache.path_for(items[0]).stat().st_mode) == 0o640
    finally:
        os.umask(previous)


def test_an_entry_it_may_not_read_is_reported_not_deleted(items, tmp_path, monkeypatch):
    cache = FrameCache(tmp_path, max_frames=4, image_size=24)
    cache.get_or_create(items[0])
    path = cache.path_for(items[0])

    def refuse(file, *args, **kwargs):  # as np.load fails for another user's 0o600 file (root reads any)
        raise PermissionError(errno.EACCES, "Permission denied", str(file))

    monkeypatch.setattr(cache_module.np, "load", refuse)
    with pytest.raises(PermissionError, match="Permission denied"):
        cache.get(items[0])
    assert path.exists()


def test_the_same_id_in_two_folders_is_two_entries(tmp_path):
    # Two annotation files (or two data.video_dir values) naming clips/x.mp4: one good, one corrupt.
    good = write_video(tmp_path / "a" / "clips" / "x.mp4")
    corrupt = write_corrupt(tmp_path / "b" / "clips" / "x.mp4")
    cache = FrameCache(tmp_path / "cache", max_frames=4, image_size=24)
    assert len(cache.get_or_create(VideoItem("clips/x.mp4", good))) == 4
    with pytest.raises(VideoDecodeError, match="corrupt|unreadable"):
        cache.get_or_create(VideoItem("clips/x.mp4", corrupt))
    summary = cache.prepare([VideoItem("clips/x.mp4", corrupt)], progress=False)
    assert summary.ok == 0 and [s.path for s in summary.skipped] == [corrupt]
    assert cache.path_for(VideoItem("clips/x.mp4", good)).name.startswith("clips_x.mp4-")  # still readable


def test_a_replaced_video_is_decoded_again(tmp_path):
    video = write_video(tmp_path / "clip.mp4", num_frames=NUM_FRAMES)
    cache = FrameCache(tmp_path / "cache", max_frames=4, image_size=24)
    item = VideoItem("clip", video)
    before = [frame_index(f) for f in cache.get_or_create(item)]
    assert before == sample_frame_indices(NUM_FRAMES, FPS, 4)
    write_video(video, num_frames=20)  # edited in place: another length, so other frames
    assert cache.get(item) is None
    assert [frame_index(f) for f in cache.get_or_create(item)] == sample_frame_indices(20, FPS, 4)


def test_a_touched_video_of_the_same_size_is_a_new_entry(tmp_path):
    video = write_video(tmp_path / "clip.mp4")
    cache = FrameCache(tmp_path / "cache", max_frames=4, image_size=24)
    item = VideoItem("clip", video)
    cache.get_or_create(item)
    info = video.stat()
    os.utime(video, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))
    assert cache.get(item) is None


def test_entries_of_an_older_decoding_are_not_reused(items, tmp_path, monkeypatch):
    """Frames decoded before a change in decoding (0.2: turned upright) would stand for other pixels."""
    from tempme.data import cache as cache_module

    path = FrameCache(tmp_path, max_frames=4, image_size=24).path_for(items[0])
    monkeypatch.setattr(cache_module, "DECODING_VERSION", cache_module.DECODING_VERSION - 1)
    assert FrameCache(tmp_path, max_frames=4, image_size=24).path_for(items[0]) != path
