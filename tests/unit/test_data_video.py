"""Frame sampling and decoding (tempme.data.video)."""

from __future__ import annotations

import pickle
import random
import sys
import warnings
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

import pytest
from data_fixtures import FPS, NUM_FRAMES, build_video_files, frame_colour, frame_index, write_video

from tempme.data import video as video_module
from tempme.data import RetrievalVideos, VideoItem, VideoWindows
from tempme.data.video import (
    VideoDecodeError,
    check_backend,
    plan_windows,
    read_frames,
    read_windows,
    sample_frame_indices,
)


@pytest.fixture(scope="module")
def video_files(tmp_path_factory):
    return build_video_files(tmp_path_factory.mktemp("videos"))


class TestSampleFrameIndices:
    def test_worked_example_10s_30fps(self):
        assert sample_frame_indices(300, 30.0, 12) == [
            0,
            27,
            54,
            81,
            108,
            135,
            163,
            190,
            217,
            244,
            271,
            299,
        ]

    def test_more_candidates_than_frames_uses_truncated_linspace(self):
        # 60 s at 25 fps: 60 candidates 0, 25, ..., 1475 thinned to 12 by linspace(0, 59, 12).
        candidates = list(range(0, 1500, 25))
        picks = [0, 5, 10, 16, 21, 26, 32, 37, 42, 48, 53, 59]
        assert sample_frame_indices(1500, 25.0, 12) == [candidates[i] for i in picks]

    def test_exactly_max_frames_candidates_are_taken_as_is(self):
        # 12 s at 10 fps: candidates 0, 10, ..., 110.
        assert sample_frame_indices(120, 10.0, 12) == list(range(0, 120, 10))

    def test_short_clip_repeats_frames(self):
        assert sample_frame_indices(5, 10.0, 12) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4]

    def test_single_frame_video(self):
        assert sample_frame_indices(1, 25.0, 4) == [0, 0, 0, 0]

    def test_non_integer_fps_rounds_the_stride(self):
        # 29.97 fps -> stride 30; 100 s gives 100 candidates thinned to 3.
        assert sample_frame_indices(2997, 29.97, 3) == [0, 1470, 2970]

    def test_framerate_two_halves_the_stride(self):
        assert sample_frame_indices(50, 10.0, 10, framerate=2.0) == list(range(0, 50, 5))

    def test_start_end_window(self):
        # 2 s .. 4 s at 10 fps: frames 20..40, candidates 20, 30, 40.
        assert sample_frame_indices(50, 10.0, 3, start=2.0, end=4.0) == [20, 30, 40]

    def test_end_past_video_is_clamped(self):
        assert sample_frame_indices(50, 10.0, 5, end=31.0) == [0, 10, 20, 30, 40]

    def test_start_past_end_is_clamped(self):
        assert sample_frame_indices(50, 10.0, 2, start=100.0) == [49, 49]

    def test_fps_below_framerate_uses_every_frame(self):
        assert sample_frame_indices(4, 0.4, 4) == [0, 1, 2, 3]

    @pytest.mark.parametrize("args", [(0, 10.0, 12), (10, 0.0, 12), (10, 10.0, 0)])
    def test_invalid_arguments(self, args):
        with pytest.raises(ValueError):
            sample_frame_indices(*args)

    def test_always_max_frames_and_in_range(self):
        for num_frames in (1, 7, 33, 301, 5000):
            for max_frames in (1, 12, 64):
                indices = sample_frame_indices(num_frames, 29.97, max_frames)
                assert len(indices) == max_frames
                assert indices == sorted(indices)
                assert indices[0] >= 0 and indices[-1] <= num_frames - 1


# 25 s at 10 fps with a keyframe every 10 frames: seeking skips most of the decoding. x264 adds
# B-frames (decode order differs from presentation order); the webm records no frame count.
# (mpeg4 is left out: its encoder skips some of these flat frames, so they cannot be told by colour.)
SEEKABLE = {
    "x264.mp4": dict(codec="libx264"),
    "vp9.webm": dict(codec="libvpx-vp9"),
}
SEEKABLE_FRAMES = 250


@pytest.fixture(scope="module")
def seekable(tmp_path_factory):
    root = tmp_path_factory.mktemp("seekable")
    return {
        name: write_video(root / name, num_frames=SEEKABLE_FRAMES, keyframe_every=10, **options)
        for name, options in SEEKABLE.items()
    }


def packet_times(path):
    with video_module._open_container(path) as container:
        return video_module._packet_times(container, video_module._video_stream(container, path))


def decode_by_seeking(path, wanted, times):
    with video_module._open_container(path) as container:
        return video_module._decode_by_seeking(container, video_module._video_stream(container, path), wanted, times)


class TestSeeking:
    @pytest.mark.parametrize("name", list(SEEKABLE))
    def test_seeking_returns_the_sampled_frames_without_decoding_in_order(self, seekable, name, monkeypatch):
        def in_order(*args):
            raise AssertionError("decoded in order, not by seeking")

        monkeypatch.setattr(video_module, "_decode_wanted", in_order)
        monkeypatch.setattr(video_module, "_count_frames", in_order)
        for window in ((None, None), (3.0, 17.5)):
            frames = read_frames(seekable[name], 12, start=window[0], end=window[1])
            expected = sample_frame_indices(SEEKABLE_FRAMES, FPS, 12, start=window[0], end=window[1])
            assert [frame_index(f) for f in frames] == expected

    @pytest.mark.parametrize("name", list(SEEKABLE))
    def test_seeking_gives_the_pixels_of_decoding_in_order(self, seekable, name):
        path = seekable[name]
        wanted = {0, 9, 10, 11, 55, 120, 121, 249}  # around keyframes, and the last frame
        by_seeking = decode_by_seeking(path, wanted, packet_times(path))
        in_order, _ = video_module._decode_wanted(path, wanted)
        assert sorted(by_seeking) == sorted(wanted)
        for index in wanted:
            assert by_seeking[index].tobytes() == in_order[index].tobytes(), index

    def test_seeks_only_where_a_keyframe_lies_ahead(self, seekable, monkeypatch):
        path = seekable["x264.mp4"]
        times = packet_times(path)
        seeks = []
        open_container = video_module._open_container

        class SeekSpy:
            def __init__(self, container):
                self.container = container

            def __enter__(self):
                self.container.__enter__()
                return self

            def __exit__(self, *exc):
                return self.container.__exit__(*exc)

            def __getattr__(self, name):
                return getattr(self.container, name)

            def seek(self, offset, **options):
                seeks.append(offset)
                return self.container.seek(offset, **options)

        monkeypatch.setattr(video_module, "_open_container", lambda p: SeekSpy(open_container(p)))
        keyframe_indices = [times.frames.index(k) for k in times.keyframes]  # where x264 put them
        middle = next(i for i in keyframe_indices if i >= 100 and i + 1 not in keyframe_indices)
        late = keyframe_indices[-1]
        frames = decode_by_seeking(path, {5, middle, middle + 1, late}, times)
        assert sorted(frames) == [5, middle, middle + 1, late]
        before_5 = max(k for k in times.keyframes if k <= times.frames[5])
        # middle + 1 follows middle in the same group of pictures: decoding goes on without a seek.
        assert seeks == [before_5, times.frames[middle], times.frames[late]]

    def test_packet_table_leaves_out_what_the_decoder_drops(self):
        class Packet:
            def __init__(self, pts, size=100, key=False, discard=False):
                self.pts, self.size, self.is_keyframe, self.is_discard = pts, size, key, discard

        packets = [Packet(-2, key=True, discard=True), Packet(4), Packet(0, key=True), Packet(2), Packet(None, size=0)]

        class Container:
            def demux(self, stream):
                return iter(packets)

        times = video_module._packet_times(Container(), stream=None)
        assert (times.frames, times.keyframes) == ([0, 2, 4], [0])
        packets.append(Packet(None))
        assert video_module._packet_times(Container(), stream=None) is None  # a frame without a timestamp

    def test_a_container_that_seeks_imprecisely_is_decoded_in_order(self, tmp_path):
        # MPEG-TS seeks by byte position and lands past the keyframe asked for (today's PyAV):
        # whatever frames seeking cannot place exactly come from decoding in order.
        path = write_video(tmp_path / "clip.ts", num_frames=SEEKABLE_FRAMES, keyframe_every=10, codec="mpeg2video")
        frames = read_frames(path, 12)
        assert [frame_index(f) for f in frames] == sample_frame_indices(SEEKABLE_FRAMES, FPS, 12)

    def test_a_stream_that_breaks_its_timestamps_is_decoded_in_order(self, seekable, monkeypatch):
        path = seekable["x264.mp4"]
        times = packet_times(path)
        shifted = video_module.PacketTimes([t + 1 for t in times.frames], times.keyframes)
        assert decode_by_seeking(path, {5, 100}, shifted) is None
        monkeypatch.setattr(video_module, "_packet_times", lambda container, stream: shifted)
        frames = read_frames(path, 12)
        assert [frame_index(f) for f in frames] == sample_frame_indices(SEEKABLE_FRAMES, FPS, 12)


def write_variable_rate_video(path, times_ms):
    """A clip whose frame ``i`` shows at ``times_ms[i]`` milliseconds (frame colours as ``write_video``'s)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=50)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        for index, time_ms in enumerate(times_ms):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), frame_colour(index), np.uint8), format="rgb24")
            frame.pts, frame.time_base = time_ms, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


class TestWindows:
    def test_equal_windows_cover_the_video_without_a_short_one_at_the_end(self):
        times = [i / 10 for i in range(120)]  # 12 s at 10 fps
        windows = plan_windows(times, 10.0, 4.0, max_frames=3)
        assert [(w.first, w.last, w.start, w.end) for w in windows] == [(0, 39, 0.0, 4.0), (40, 79, 4.0, 8.0),
                                                                        (80, 119, 8.0, 12.0)]
        # Frames sampled from each window's frames as from a clip of them: 1 fps candidates, thinned.
        assert [w.indices for w in windows] == [[0, 10, 30], [40, 50, 70], [80, 90, 110]]
        # 7 s in windows of about 3 s: two of 3.5 s, not two of 3 s and one of 1 s.
        assert [(w.start, w.end) for w in plan_windows([i / 10 for i in range(70)], 10.0, 3.0, 4)] == [
            (0.0, 3.5), (3.5, 7.0)]
        # 7.5 s in windows of about 3 s is 2.5 windows: halves go up (round() would give two, to the even).
        assert len(plan_windows([i / 10 for i in range(75)], 10.0, 3.0, 4)) == 3
        # Shorter than 1.5 windows: one window, the whole video.
        assert [(w.first, w.last) for w in plan_windows([i / 10 for i in range(44)], 10.0, 3.0, 4)] == [(0, 43)]
        assert [(w.first, w.last, w.end) for w in plan_windows([0.0], 25.0, 30.0, 4)] == [(0, 0, 0.04)]

    def test_windows_follow_the_frames_timestamps(self):
        # Ten frames a second apart, then fifty at 50 fps: 11 s in all, 60 frames.
        times = [float(i) for i in range(10)] + [10 + k / 50 for k in range(50)]
        windows = plan_windows(times, 60 / 11, 5.0, max_frames=4)
        assert [(w.first, w.last, w.start, w.end) for w in windows] == [(0, 5, 0.0, 6.0), (6, 59, 6.0, 11.163)]
        # A gap longer than a window leaves no empty window behind.
        gap = plan_windows([0.0, 0.5, 20.0, 20.5], 2.0, 5.0, max_frames=2)
        assert [(w.first, w.last, w.start) for w in gap] == [(0, 1, 0.0), (2, 3, 20.0)]
        # A damaged file's timestamp centuries on: the three hundred million empty windows are not listed.
        gap = plan_windows([0.0, 0.04, 1e10], 25.0, 30.0, max_frames=2)
        assert [(w.first, w.last, w.start, w.end) for w in gap] == [(0, 1, 0.0, 1e10), (2, 2, 1e10, 1e10 + 0.04)]

    def test_a_header_claiming_a_billion_frames_is_sampled_without_listing_them(self):
        # Listed as candidates, a billion frames took 36 GB; a million, measured here, some 36 MB.
        import tracemalloc

        tracemalloc.start()
        try:
            assert sample_frame_indices(10**6, 1.0, 3) == [0, 499_999, 999_999]
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 2**20, peak
        assert sample_frame_indices(2**31, 1.0, 3) == [0, 500_000_000, 1_000_000_000]

    def test_read_windows_gives_each_windows_frames(self, video_files):
        windows = list(read_windows(video_files.mp4, 4, 1.0, 2.5))  # 5 s: two windows of 2.5 s
        assert [w for w, _ in windows] == plan_windows([i / FPS for i in range(NUM_FRAMES)], FPS, 2.5, 4)
        assert [(w.start, w.end) for w, _ in windows] == [(0.0, 2.5), (2.5, 5.0)]
        for window, frames in windows:
            assert [frame_index(f) for f in frames] == window.indices

    @pytest.mark.parametrize("ext", ["mp4", "mkv"])
    def test_a_variable_frame_rate_video_has_windows_in_real_time(self, tmp_path, ext):
        times_ms = [1000 * i for i in range(10)] + [10000 + 20 * k for k in range(50)]
        path = write_variable_rate_video(tmp_path / f"vfr.{ext}", times_ms)
        windows = list(read_windows(path, 4, 1.0, 5.0))
        assert [(w.first, w.last, w.start) for w, _ in windows] == [(0, 5, 0.0), (6, 59, 6.0)]
        assert [frame_index(f) for f in windows[1][1]] == windows[1][0].indices

    def test_a_video_that_cannot_seek_is_decoded_once_for_all_its_windows(self, tmp_path, monkeypatch):
        # MPEG-TS lands past the keyframe asked for: its frames come from decoding in order, once
        # for all the windows, not once per window.
        path = write_video(tmp_path / "clip.ts", num_frames=SEEKABLE_FRAMES, keyframe_every=10, codec="mpeg2video")
        decoded = []
        original = video_module._decode

        def counting(container, stream, path):
            for frame in original(container, stream, path):
                decoded.append(1)
                yield frame

        monkeypatch.setattr(video_module, "_decode", counting)
        windows = list(read_windows(path, 4, 1.0, 2.0))
        assert len(windows) == 13  # 25 s in windows of about 2 s: 12.5, and halves go up
        for window, frames in windows:
            assert [frame_index(f) for f in frames] == window.indices
        assert len(decoded) <= SEEKABLE_FRAMES

    def test_long_videos_seek_rather_than_decode_everything(self, seekable, monkeypatch):
        def in_order(*args):
            raise AssertionError("decoded in order, not by seeking")

        monkeypatch.setattr(video_module, "_decode_wanted", in_order)
        monkeypatch.setattr(video_module, "_count_frames", in_order)
        monkeypatch.setattr(video_module, "_decode", in_order)
        windows = list(read_windows(seekable["x264.mp4"], 4, 1.0, 5.0))
        assert len(windows) == 5
        for window, frames in windows:
            assert [frame_index(f) for f in frames] == window.indices

    def test_a_container_that_overstates_its_length_has_no_windows_past_the_end(self, video_files, monkeypatch):
        monkeypatch.setattr(video_module, "_packet_times", lambda container, stream: None)
        monkeypatch.setattr(video_module, "_declared_frame_count", lambda stream: 80)  # 50 frames really
        windows = list(read_windows(video_files.mp4, 4, 1.0, 2.0))  # planned: 4 windows over 8 s
        assert [(w.first, w.last) for w, _ in windows] == [(0, 19), (20, 39), (40, 59)]
        for window, frames in windows[:2]:
            assert [frame_index(f) for f in frames] == window.indices
        # The window the stream ends in keeps the frames it has (40 and 46 of 40, 46, 52, 59), the last repeated.
        assert windows[2][0].indices == [40, 46, 52, 59]
        assert [frame_index(f) for f in windows[2][1]] == [40, 46, 46, 46]

    @pytest.mark.parametrize("name, reason", [
        ("corrupt", "unreadable container"), ("empty", "file is empty"), ("audio_only", "no video stream"),
    ])
    def test_an_undecodable_file_says_why(self, video_files, name, reason):
        with pytest.raises(VideoDecodeError, match=reason):
            list(read_windows(getattr(video_files, name), 4, 1.0, 2.0))


class TestReadFrames:
    def test_mp4_returns_the_sampled_frames(self, video_files):
        frames = read_frames(video_files.mp4, 12)
        assert [frame_index(f) for f in frames] == sample_frame_indices(NUM_FRAMES, FPS, 12)
        assert all(f.mode == "RGB" and f.size == (64, 48) for f in frames)

    def test_more_candidates_than_max_frames(self, video_files):
        assert [frame_index(f) for f in read_frames(video_files.mp4, 3)] == [0, 20, 40]

    def test_start_end(self, video_files):
        assert [frame_index(f) for f in read_frames(video_files.mp4, 3, start=2.0, end=4.0)] == [20, 30, 40]

    def test_30fps_clip(self, video_files):
        frames = read_frames(video_files.long, 12)
        assert [frame_index(f) for f in frames] == sample_frame_indices(150, 30.0, 12)

    def test_container_without_frame_count_counts_its_packets(self, video_files):
        frames = read_frames(video_files.mkv, 12)
        assert [frame_index(f) for f in frames] == sample_frame_indices(NUM_FRAMES, FPS, 12)

    def test_container_without_frame_count_or_timestamps_counts_by_decoding(self, video_files, monkeypatch):
        monkeypatch.setattr(video_module, "_packet_times", lambda container, stream: None)
        frames = read_frames(video_files.mkv, 12)
        assert [frame_index(f) for f in frames] == sample_frame_indices(NUM_FRAMES, FPS, 12)

    def test_overstated_frame_count_is_corrected(self, video_files, monkeypatch):
        monkeypatch.setattr(video_module, "_declared_frame_count", lambda stream: 80)
        frames = read_frames(video_files.mp4, 12)
        assert [frame_index(f) for f in frames] == sample_frame_indices(NUM_FRAMES, FPS, 12)

    def test_short_clip_repeats_frames(self, video_files):
        frames = read_frames(video_files.mp4, 64)
        assert len(frames) == 64
        assert [frame_index(f) for f in frames] == sample_frame_indices(NUM_FRAMES, FPS, 64)

    @pytest.mark.parametrize(
        ("name", "reason"),
        [
            ("corrupt", "unreadable container"),
            ("empty", "empty (0 bytes)"),
            ("audio_only", "no video stream"),
        ],
    )
    def test_bad_files_raise_naming_file_and_reason(self, video_files, name, reason):
        path = getattr(video_files, name)
        with pytest.raises(VideoDecodeError) as info:
            read_frames(path, 4)
        assert str(path) in str(info.value) and reason in str(info.value)
        assert str(info.value).count(str(path)) == 1 and "Errno" not in str(info.value)  # FFmpeg's words only
        assert info.value.path == path

    def test_missing_file(self, tmp_path):
        with pytest.raises(VideoDecodeError, match="file not found"):
            read_frames(tmp_path / "absent.mp4", 4)

    def test_decode_errors_are_value_errors_that_survive_other_processes(self, video_files):
        # A ValueError, so the command line prints it as one line instead of a traceback.
        with pytest.raises(ValueError) as info:
            read_frames(video_files.corrupt, 4)
        error = info.value
        # Pickled to or from a worker process: still the file and the reason.
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is VideoDecodeError and (copy.path, copy.reason) == (error.path, error.reason)
        # torch's DataLoader re-raises a worker's error as type(error)(worker traceback text).
        report = (
            "Caught VideoDecodeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            '  File "x.py", line 1, in f\n    raise VideoDecodeError(path, reason)\n'
            f"tempme.data.video.VideoDecodeError: {error}\n"
        )
        rebuilt = VideoDecodeError(report)
        assert str(rebuilt) == f"cannot decode video {video_files.corrupt}: {error.reason}"
        assert rebuilt.path == video_files.corrupt and "unreadable container" in rebuilt.reason

    def test_unknown_backend(self, video_files):
        with pytest.raises(ValueError, match="unknown video backend"):
            read_frames(video_files.mp4, 4, backend="opencv")

    def test_decord_missing_gives_install_hint(self, video_files, monkeypatch):
        monkeypatch.setitem(sys.modules, "decord", None)
        with pytest.raises(ImportError, match="pip install decord"):
            read_frames(video_files.mp4, 4, backend="decord")
        # Datasets refuse it when built, in the main process, before workers would each fail on it.
        with pytest.raises(ValueError, match="pip install decord"):
            RetrievalVideos([VideoItem("a", video_files.mp4)], backend="decord")
        with pytest.raises(ValueError, match="pip install decord"):
            VideoWindows([video_files.mp4], 2.0, backend="decord")
        with pytest.raises(ValueError, match="unknown video backend 'opencv'"):
            check_backend("opencv")


class TestDecordBackend:
    """The optional decord backend picks the same frames as PyAV and fails the same way."""

    @pytest.fixture(autouse=True)
    def needs_decord(self):
        pytest.importorskip("decord")

    def test_same_frames_as_pyav(self, video_files):
        for path, max_frames in ((video_files.mp4, 12), (video_files.long, 12), (video_files.mp4, 64)):
            with_decord = read_frames(path, max_frames, backend="decord")
            with_pyav = read_frames(path, max_frames)
            assert [frame_index(f) for f in with_decord] == [frame_index(f) for f in with_pyav]
            assert all(f.mode == "RGB" and f.size == g.size for f, g in zip(with_decord, with_pyav))

    def test_start_end(self, video_files):
        frames = read_frames(video_files.mp4, 3, start=2.0, end=4.0, backend="decord")
        assert [frame_index(f) for f in frames] == [20, 30, 40]

    @pytest.mark.parametrize(
        ("name", "reason"), [("corrupt", "decord failed"), ("empty", "empty (0 bytes)"), ("audio_only", "no video stream")]
    )
    def test_bad_files_raise_naming_file_and_reason(self, video_files, name, reason):
        path = getattr(video_files, name)
        with pytest.raises(VideoDecodeError) as info:
            read_frames(path, 4, backend="decord")
        assert str(path) in str(info.value) and reason in str(info.value)

    def test_windows_as_pyav_reads_them(self, video_files):
        for path in (video_files.mp4, video_files.long):
            with_decord = list(read_windows(path, 4, 1.0, 2.0, backend="decord"))
            with_pyav = list(read_windows(path, 4, 1.0, 2.0))
            assert [w for w, _ in with_decord] == [w for w, _ in with_pyav]
            for (_, frames), (_, expected) in zip(with_decord, with_pyav):
                assert [frame_index(f) for f in frames] == [frame_index(f) for f in expected]
        with pytest.raises(VideoDecodeError, match="no video stream"):
            list(read_windows(video_files.audio_only, 4, 1.0, 2.0, backend="decord"))


def turn_display(path, clockwise: int) -> None:
    """Write a display rotation into an mp4's track header, as phones do (PyAV cannot write one):
    players then show the stored frames turned ``clockwise`` degrees (90 or 270)."""
    data = bytearray(path.read_bytes())
    header = data.index(b"tkhd") + 4
    matrix = header + (40 if data[header] == 0 else 52)  # after the times, ids, layer and volume
    sine = {90: 1, 270: -1}[clockwise]
    one, two_30 = 0x00010000, 0x40000000  # 16.16 and 2.30 fixed point
    values = [0, sine * one, 0, -sine * one, 0, 0, 0, 0, two_30]
    data[matrix : matrix + 36] = b"".join(value.to_bytes(4, "big", signed=True) for value in values)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("clockwise", [90, 270])
def test_phone_videos_stored_sideways_are_read_upright(tmp_path, clockwise):
    """A portrait phone video: landscape frames, and a display matrix that players turn them by."""
    path = tmp_path / f"portrait{clockwise}.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(5))
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        for _ in range(10):
            pixels = np.zeros((32, 64, 3), np.uint8)
            pixels[:16, :32] = 255  # the stored frame's top-left quarter is white
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode(None))
    turn_display(path, clockwise)
    with av.open(str(path)) as container:  # as ffprobe reports it: counter-clockwise degrees
        assert next(container.decode(video=0)).rotation == {90: -90, 270: 90}[clockwise]
    first_window = next(iter(read_windows(path, max_frames=1, framerate=1.0, window_s=1.0)))[1]
    for frames in (read_frames(path, max_frames=2), first_window):
        upright = np.asarray(frames[0].convert("L"), dtype=float)
        assert upright.shape == (64, 32)  # portrait: 32 wide, 64 high
        # Turned clockwise by 90, the stored top-left lands at the top right; by 270, at the bottom left.
        white = {90: upright[:32, 16:], 270: upright[32:, :16]}[clockwise]
        assert white.mean() > 200 and upright.mean() < 100


def test_an_ffmpeg_error_is_told_in_ffmpegs_words_with_its_last_complaint():
    class DecoderError(Exception):  # shaped like PyAV's FFmpegError
        strerror = "Invalid data found when processing input"
        log = (16, "h264", "no frame!\n")

    assert video_module._what_failed(DecoderError("[Errno 1094995529] ...: '/x.mp4'")) == (
        "Invalid data found when processing input; h264: no frame!")


def damaged_copy(path: Path, start: float, length: float, target: Path) -> Path:
    """``path`` with the bytes from ``start`` (a share of the file) over ``length`` (a share) overwritten."""
    data = bytearray(path.read_bytes())
    first, count = int(len(data) * start), int(len(data) * length)
    data[first : first + count] = random.Random(1).randbytes(count)
    target.write_bytes(data)
    return target


def all_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [np.asarray(frame.to_image(), dtype=np.int16) for frame in container.decode(video=0)]


@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])  # libx264: B-frames, shown in another order than decoded
def test_a_damaged_stretch_can_be_read_around_with_whole_frames_only(tmp_path, codec):
    clean = write_video(tmp_path / "clean.mp4", num_frames=200, codec=codec, keyframe_every=20)
    damaged = damaged_copy(clean, 0.6, 0.05, tmp_path / "damaged.mp4")
    with pytest.raises(VideoDecodeError, match="corrupt stream"):
        read_frames(damaged, 12)  # as benchmarks read videos: a damaged one is left out
    with pytest.warns(UserWarning, match=r"damaged.mp4: \d+ of its 200 frames do not decode .*stand in for \d+ of"):
        frames = read_frames(damaged, 12, around_damage=True)
    reference = all_frames(clean)
    sampled = sample_frame_indices(200, FPS, 12)
    shown = [frame_index(frame) for frame in frames]
    own = sum(abs(shown_index - index) <= 1 for index, shown_index in zip(sampled, shown))  # mpeg4 colours: +-1
    assert 8 <= own < 12  # most away from the damage show their own frame; some were stood in for
    for index, shown_index, frame in zip(sampled, shown, frames):
        # A whole frame of the video, not one the decoder filled in: the clean file's frame it shows.
        difference = np.abs(np.asarray(frame, dtype=np.int16) - reference[shown_index]).mean()
        assert difference < 4, (index, shown_index, difference)
        assert abs(shown_index - index) <= 40  # near: the damage spans a couple of keyframe intervals


def test_a_video_mostly_damaged_is_undecodable_even_read_around(tmp_path):
    clean = write_video(tmp_path / "clean.mp4", num_frames=200, keyframe_every=20)
    with pytest.raises(VideoDecodeError, match="corrupt stream"):
        read_frames(damaged_copy(clean, 0.3, 0.5, tmp_path / "damaged.mp4"), 12, around_damage=True)


@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])
def test_windows_of_a_damaged_video_are_read_around_the_damage_each_on_its_own(tmp_path, codec):
    clean = write_video(tmp_path / "clean.mp4", num_frames=200, codec=codec, keyframe_every=20)
    damaged = damaged_copy(clean, 0.3, 0.2, tmp_path / "damaged.mp4")  # frames from about 70 to 130-160
    planned = [window for window, _ in read_windows(clean, 4, 1.0, 4.0)]
    assert [(window.start, window.end) for window in planned] == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20)]
    with pytest.raises(VideoDecodeError, match="corrupt stream"):
        list(read_windows(damaged, 4, 1.0, 4.0))
    left_out = r"left out, as fewer than half of their frames decode: 8.0-1[26].0 s"  # adjacent ones merged
    with pytest.warns(UserWarning, match=rf"damaged.mp4: \d+ of its \d+ frames from \d+.0 s on do not decode .*{left_out}"):
        every = list(read_windows(damaged, 4, 1.0, 4.0, around_damage=True))
    assert [window for window, _ in every] == planned  # in time order, those left out as (window, None)
    windows = [(window, frames) for window, frames in every if frames is not None]
    spans = [(window.start, window.end) for window, _ in windows]
    assert (0, 4) in spans and (16, 20) in spans and (8, 12) not in spans  # 80-119: none decodes
    reference = all_frames(clean)
    for window, frames in windows:
        shown = [frame_index(frame) for frame in frames]
        assert all(window.first - 1 <= index <= window.last + 1 for index in shown), (window, shown)  # mpeg4: +-1
        for frame, index in zip(frames, shown):  # a whole frame of the video, not one the decoder filled in
            assert np.abs(np.asarray(frame, dtype=np.int16) - reference[index]).mean() < 4, (window, index)
    assert [frame_index(frame) for frame in windows[0][1]] == [0, 10, 20, 30]  # before the damage: as sampled


def test_a_last_window_left_out_is_all_the_warning_says_of_it(tmp_path):
    clean = write_video(tmp_path / "clean.mp4", num_frames=200, keyframe_every=20)
    damaged = damaged_copy(clean, 0.7, 0.1, tmp_path / "damaged.mp4")  # the damage begins in the last window
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        every = list(read_windows(damaged, 4, 1.0, 4.0, around_damage=True))
    assert [frames is None for _, frames in every] == [False] * 4 + [True]
    (message,) = [str(warning.message) for warning in caught]
    # Nothing stood in for anything: no "stand in for 0 of the 0 sampled".
    assert "stand in" not in message and message.endswith("left out, as fewer than half of their frames decode: "
                                                           "16.0-20.0 s"), message


@pytest.mark.parametrize("start, length", [(0.02, 0.75), (0.05, 0.7)])  # no window decodes; only the last one
def test_a_video_mostly_damaged_is_undecodable_in_windows_too(tmp_path, start, length):
    clean = write_video(tmp_path / "clean.mp4", num_frames=200, keyframe_every=20)
    damaged = damaged_copy(clean, start, length, tmp_path / "damaged.mp4")
    with pytest.raises(VideoDecodeError, match="corrupt stream"):
        list(read_windows(damaged, 4, 1.0, 4.0, around_damage=True))


def test_whole_frames_from_a_keyframe_are_those_from_the_start(tmp_path):
    clean = write_video(tmp_path / "clean.mp4", num_frames=200, codec="libx264", keyframe_every=20)
    damaged = damaged_copy(clean, 0.6, 0.05, tmp_path / "damaged.mp4")
    with av.open(str(damaged)) as container:
        times = video_module._packet_times(container, container.streams.video[0])
    from_start = [index for index, _ in video_module._whole_frames(damaged, times)]
    from_100 = [index for index, _ in video_module._whole_frames(damaged, times, from_index=100)]
    keyframe = from_100[0]  # decoding starts at the keyframe at or before frame 100
    assert 80 <= keyframe <= 100 and from_100 == [index for index in from_start if index >= keyframe]
    assert len(from_start) < 200 and from_start == sorted(from_start)


@pytest.mark.parametrize("codec", ["mpeg2video", "libx264"])
def test_whole_frames_from_a_keyframe_of_a_transport_stream_lose_none(tmp_path, codec):
    """Seeking in MPEG-TS lands after the keyframe asked for: decoding then starts from the beginning
    rather than count the frames up to the next keyframe as damaged."""
    path = write_video(tmp_path / "clip.ts", num_frames=150, codec=codec, keyframe_every=20)
    with av.open(str(path)) as container:
        times = video_module._packet_times(container, container.streams.video[0])
    for from_index in (45, 130):
        frames = [index for index, _ in video_module._whole_frames(path, times, from_index=from_index)]
        assert frames[0] <= from_index and frames == list(range(frames[0], 150)), (from_index, frames[:5])


def test_touching_spans_are_merged():
    assert video_module.merged_spans([[0, 10], [10, 20], [30, 40], [40, 45], [60, 70]]) == [[0, 20], [30, 45], [60, 70]]
    assert video_module.merged_spans([]) == []


def write_textured_video(path: Path, num_frames: int = 200, keyframe_every: int = 20, codec: str = "mpeg4") -> Path:
    """Noise scrolling a row a frame (10 fps): a decoder that conceals damage makes frames that differ
    visibly from the clean ones, where the flat colours of ``write_video`` would hide it."""
    rows = np.random.default_rng(0).integers(0, 255, (96 + num_frames, 128, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(10))
        stream.width, stream.height, stream.pix_fmt, stream.gop_size = 128, 96, "yuv420p", keyframe_every
        for index in range(num_frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rows[index : index + 96].copy(), format="rgb24")))
        container.mux(stream.encode(None))
    return path


@pytest.mark.parametrize("whole", [False, True])
def test_a_frame_the_decoder_concealed_is_not_taken(tmp_path, whole):
    """Damage from the middle of frame 70's packet: the decoder conceals frame 70 (flags it corrupt)
    and refuses 71 on. Frame 70 is a sampled one (windows of 4 s, 4 frames: 40, 50, 60, 70)."""
    clean = write_textured_video(tmp_path / "clean.mp4")
    with av.open(str(clean)) as container:
        packets = [(packet.pos, packet.size) for packet in container.demux(video=0) if packet.size]
    data = bytearray(clean.read_bytes())
    start, end = packets[70][0] + packets[70][1] // 2, packets[119][0] + packets[119][1]
    data[start:end] = random.Random(1).randbytes(end - start)
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    reference = all_frames(clean)

    def a_clean_frame_near(frame, first: int, last: int) -> bool:
        frame = np.asarray(frame, dtype=np.int16)
        return min(np.abs(frame - reference[index]).mean() for index in range(first, last + 1)) < 1

    with pytest.warns(UserWarning, match="frames (from .* on )?do not decode"):
        if whole:
            frames = read_frames(damaged, 20, framerate=1.0, around_damage=True)  # one frame a second
            assert all(a_clean_frame_near(frame, 0, 199) for frame in frames)
        else:
            windows = [(w, f) for w, f in read_windows(damaged, 4, 1.0, 4.0, around_damage=True) if f is not None]
            assert windows[1][0].indices == [40, 50, 60, 70]
            for window, frames in windows:
                assert all(a_clean_frame_near(frame, window.first, window.last) for frame in frames), window


@pytest.mark.parametrize("name, codec, share", [("clip.avi", "mpeg4", 0.93), ("clip.ts", "libx264", 0.519)])
def test_a_file_cut_short_is_read_over_the_frames_it_holds(tmp_path, name, codec, share):
    """A partial download: the header counts more frames than the packets hold (AVI), or the stream
    just ends (MPEG-TS), and the decoder conceals the last, cut frame. Read around damage, it samples
    the frames there are, whole ones. (Decoding on frame threads, FFmpeg now and then drops the flag
    that marks a concealed frame: the TS case took one in about half its runs then.)"""
    clean = write_textured_video(tmp_path / f"clean_{name}", codec=codec)
    data = clean.read_bytes()
    cut = tmp_path / name
    cut.write_bytes(data[: int(len(data) * share)])
    reference = all_frames(clean)
    for _ in range(4):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frames may stand in for the cut one
            frames = read_frames(cut, 12, around_damage=True)
        assert len(frames) == 12
        for frame in frames:
            frame = np.asarray(frame, dtype=np.int16)
            assert min(np.abs(frame - clean_frame).mean() for clean_frame in reference) < 1


def test_frames_beyond_4k_are_scaled_down_as_they_are_converted():
    from tempme.data.video import upright_image

    assert upright_image(av.VideoFrame(5000, 3000, "yuv420p")).size == (3600, 2160)
    assert upright_image(av.VideoFrame(3840, 2160, "yuv420p")).size == (3840, 2160)  # 4K as it is
