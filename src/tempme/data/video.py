"""Frame sampling and video decoding.

Frames are chosen exactly like the TempMe/DRL decord loader: candidates at
``framerate`` frames per second over the clip, thinned with a truncated
``linspace`` when there are too many, or spread (with repeats) over the raw
frame range when there are too few. The result always has ``max_frames``
entries, so the video mask is all ones.

PyAV is the default decoder; ``backend="decord"`` uses decord when it is
installed (it is an optional dependency). PyAV seeks to the keyframe before each
sampled frame rather than decoding everything before it (several times faster on
long videos); a stream whose timestamps do not allow that is decoded in order.
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..files import first_line
from ..userwarnings import warn

if TYPE_CHECKING:
    import av

BACKENDS = ("pyav", "decord")


_MESSAGE_START = "cannot decode video "


class VideoDecodeError(ValueError):
    """A video file that cannot be decoded: missing, empty, corrupt or without a video stream.

    A ValueError (bad input data), so the command line prints it as one line naming the file and the
    reason. ``VideoDecodeError(message)`` with the message alone rebuilds the error from its text:
    that is how a DataLoader worker's error reaches the main process (see :meth:`_from_text`).
    """

    def __init__(self, path: str | os.PathLike, reason: str | None = None):
        if reason is None:
            path, reason = self._from_text(str(path))
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{_MESSAGE_START}{self.path}: {reason}")

    def __reduce__(self):
        # Pickled (to or from a worker process) as path and reason, not as the formatted message.
        return type(self), (self.path, self.reason)

    @staticmethod
    def _from_text(text: str) -> tuple[str, str]:
        """Path and reason from a message, or from a DataLoader worker's report of one.

        torch's DataLoader re-raises a worker's error in the main process as ``type(error)(text)``,
        where ``text`` is the worker's whole traceback ending in our message. Keeping only that
        message gives the user one line again. The path is taken to end at the first ": ".
        """
        lines = [line for line in text.splitlines() if _MESSAGE_START in line]
        if not lines:
            return "<unknown video>", text.strip() or "undecodable"
        message = lines[-1].split(_MESSAGE_START, 1)[1]
        path, separator, reason = message.partition(": ")
        return path, reason if separator else "undecodable"


@dataclass(frozen=True)
class SkippedVideo:
    """Marks a video that was left out because it could not be decoded."""

    video_id: str
    path: Path
    reason: str


def sample_frame_indices(
    num_frames: int,
    fps: float,
    max_frames: int,
    framerate: float = 1.0,
    start: float | None = None,
    end: float | None = None,
) -> list[int]:
    """Pick ``max_frames`` frame indices of a video, as the TempMe/DRL decord loader does.

    Args:
        num_frames: frames in the video (> 0).
        fps: the video's average frame rate.
        max_frames: how many indices to return.
        framerate: candidate frames per second (1 in TempMe).
        start, end: optional window in seconds; ``None`` means the whole video.

    Returns:
        ``max_frames`` non-decreasing indices in ``[0, num_frames - 1]``; short clips repeat frames.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if fps <= 0 or framerate <= 0:
        raise ValueError(f"fps and framerate must be positive, got fps={fps}, framerate={framerate}")
    if max_frames < 1:
        raise ValueError(f"max_frames must be positive, got {max_frames}")
    f_end = int(min(1e9 if end is None else end * fps, num_frames - 1))
    f_end = max(f_end, 0)
    # The reference leaves a window that starts past its end (or before 0) unclamped and then
    # returns indices outside the video; clamping keeps every index decodable.
    f_start = 0 if start is None else min(max(int(start * fps), 0), f_end)
    return _sample_range(f_start, f_end, fps, max_frames, framerate)


def _sample_range(f_start: int, f_end: int, fps: float, max_frames: int, framerate: float) -> list[int]:
    """``sample_frame_indices`` between frames ``f_start`` and ``f_end`` (both included)."""
    # A video slower than half the candidate rate would give stride 0; use every frame instead.
    stride = max(round(fps / framerate), 1)
    candidates = range(f_start, f_end + 1, stride)  # not listed: a damaged header can claim a billion frames
    if len(candidates) > max_frames:
        picks = np.linspace(0, len(candidates) - 1, max_frames, dtype=int)
        return [candidates[i] for i in picks]
    if len(candidates) == max_frames:
        return list(candidates)
    return [int(i) for i in np.linspace(f_start, f_end, max_frames, dtype=int)]


def read_frames(
    path: str | os.PathLike,
    max_frames: int,
    framerate: float = 1.0,
    start: float | None = None,
    end: float | None = None,
    backend: str = "pyav",
    around_damage: bool = False,
) -> list[Image.Image]:
    """Decode the sampled frames of a video as RGB images.

    Args:
        path: video file.
        max_frames, framerate, start, end: see :func:`sample_frame_indices`.
        backend: ``"pyav"`` (default) or ``"decord"`` (optional dependency).
        around_damage: a video that fails to decode part-way is read around its damaged stretch
            when at least half its frames decode whole, the nearest of those standing in for sampled
            frames that do not, with a warning (PyAV only; ``tempme index`` does, for users' own
            videos: benchmarks keep to the frames they sample, or leave a video out).

    Returns:
        ``max_frames`` RGB images in time order. A frame picked twice appears twice (same object).

    Raises:
        VideoDecodeError: the file is missing, empty, corrupt or has no video stream.
        ImportError: ``backend="decord"`` without decord installed.
    """
    _check_known_backend(backend)
    path = Path(path)
    _check_file(path)
    if backend == "decord":
        return _read_frames_decord(path, max_frames, framerate, start, end)
    return _read_frames_pyav(path, max_frames, framerate, start, end, around_damage)


def _check_file(path: Path) -> None:
    """Fail early with a precise reason on files FFmpeg would only call 'invalid data'."""
    if not path.exists():
        raise VideoDecodeError(path, "file not found")
    if not path.is_file():
        raise VideoDecodeError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise VideoDecodeError(path, "file is empty (0 bytes)")


def _pyav():
    """PyAV, imported on first use: commands that decode no video (bench, flops) start without it."""
    import av

    return av


def _open_container(path: Path) -> av.container.InputContainer:
    av = _pyav()
    try:
        return av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as err:
        raise VideoDecodeError(path, f"unreadable container ({_what_failed(err)})") from err


def _what_failed(error: Exception) -> str:
    """FFmpeg's words for a failure, without the errno and the file's path that its message repeats
    ("[Errno 1094995529] Invalid data found when processing input: '/videos/x.mp4'"), and with the
    decoder's last logged complaint where PyAV kept one (``error.log``: level, component, text)."""
    words = getattr(error, "strerror", None) or str(error)
    log = getattr(error, "log", None)
    if log and len(log) == 3 and str(log[2]).strip():
        words += f"; {log[1]}: {str(log[2]).strip()}"
    return words


def _video_stream(
    container: av.container.InputContainer, path: Path, flags_concealment: bool = False
) -> av.video.stream.VideoStream:
    """The container's first video stream, set to decode on several threads. Frame threading speeds
    up decoding several-fold and keeps presentation order, but loses the flag that marks a frame
    the decoder concealed errors in, now and then: with ``flags_concealment`` (reading around damage,
    which must not take such a frame) threads split each frame instead."""
    if not container.streams.video:
        raise VideoDecodeError(path, "no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "SLICE" if flags_concealment else "AUTO"
    return stream


def _stream_fps(stream: av.video.stream.VideoStream, path: Path) -> float:
    """Average frame rate as a float, like decord's ``get_avg_fps``."""
    rate: Fraction | None = stream.average_rate or stream.guessed_rate
    if not rate or rate <= 0:
        raise VideoDecodeError(path, "unknown frame rate")
    return float(rate)


def _declared_frame_count(stream: av.video.stream.VideoStream) -> int:
    """Frame count stored in the container (0 when the format does not record it, e.g. mkv/webm)."""
    return stream.frames


def _count_frames(path: Path) -> int:
    """Count frames by decoding the whole stream (no pixel conversion)."""
    with _open_container(path) as container:
        stream = _video_stream(container, path)
        return sum(1 for _ in _decode(container, stream, path))


def _decode(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, path: Path
) -> Iterator[av.VideoFrame]:
    """Yield decoded frames, turning FFmpeg errors into :class:`VideoDecodeError`."""
    av = _pyav()
    try:
        yield from container.decode(stream)
    except (av.FFmpegError, OSError, ValueError) as err:
        raise VideoDecodeError(path, f"corrupt stream ({_what_failed(err)})") from err


# Changes whenever the same file gives other frames than before, so that caches of decoded frames
# and of embeddings are not reused across it. 2: frames turned upright by the display rotation.
DECODING_VERSION = 2

# PIL's exact quarter turns, counter-clockwise as the display matrix counts them.
_QUARTER_TURNS = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


# Frames are resized to a few hundred pixels anyway; beyond 4K (8K video, or a damaged or crafted
# header), twelve RGB frames of a video would take gigabytes per decoding worker.
MAX_SHORT_SIDE = 2160


def upright_image(frame: "av.VideoFrame") -> Image.Image:
    """A decoded frame as an RGB image turned as players show it: phones store portrait video as
    landscape frames with a rotation in the stream's display matrix, and a model shown them sideways
    would see people lying down. A frame whose short side exceeds ``MAX_SHORT_SIDE`` is scaled down to it."""
    short = min(frame.width, frame.height)
    if short > MAX_SHORT_SIDE:
        scale = MAX_SHORT_SIDE / short
        image = frame.to_image(width=max(round(frame.width * scale), 1), height=max(round(frame.height * scale), 1))
    else:
        image = frame.to_image()
    turn = _QUARTER_TURNS.get(round(getattr(frame, "rotation", 0) or 0) % 360)
    return image if turn is None else image.transpose(turn)


def _decode_wanted(path: Path, wanted: set[int], refuse_corrupt: bool = False) -> tuple[dict[int, Image.Image], int]:
    """Decode sequentially up to the last wanted index.

    Returns:
        The wanted frames as RGB images by index, and how many frames were decoded
        (the true frame count whenever some wanted index lay past the end).
    """
    frames: dict[int, Image.Image] = {}
    decoded = 0
    for index, frame in _decoded_in_order(path, max(wanted), refuse_corrupt):
        decoded = index + 1
        if index in wanted:
            frames[index] = upright_image(frame)
    return frames, decoded


def _decoded_in_order(path: Path, last: int, refuse_corrupt: bool = False) -> Iterator[tuple[int, av.VideoFrame]]:
    """``(index, frame)`` of the video's frames from the first, decoded in order, up to ``last`` (or
    the end of the stream, if it comes first). ``refuse_corrupt``: a frame the decoder concealed errors
    in (flagged corrupt) is a VideoDecodeError, so that reading around the damage takes over."""
    with _open_container(path) as container:
        stream = _video_stream(container, path, flags_concealment=refuse_corrupt)
        for index, frame in enumerate(_decode(container, stream, path)):
            if refuse_corrupt and getattr(frame, "is_corrupt", False):
                raise VideoDecodeError(path, f"corrupt stream (frame {index} concealed by the decoder)")
            yield index, frame
            if index >= last:
                break


@dataclass(frozen=True)
class PacketTimes:
    """Presentation timestamps of a video stream, read from its packets without decoding.

    ``frames[i]`` is the timestamp of frame ``i`` in presentation order; ``keyframes`` are those of the
    frames decoding can start from, ascending.
    """

    frames: list[int]
    keyframes: list[int]

    def keyframe_before(self, index: int) -> int:
        """The timestamp of the keyframe that decoding starts from to reach frame ``index``."""
        at = bisect.bisect_right(self.keyframes, self.frames[index])
        return self.keyframes[max(at - 1, 0)]


def _packet_times(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> PacketTimes | None:
    """The stream's frame and keyframe timestamps, read through to its end; None when some packet has
    none or demuxing fails (the caller then decodes in order, which also reports what is wrong)."""
    av = _pyav()
    frames, keyframes = [], []
    try:
        for packet in container.demux(stream):
            # Skip the end-of-stream marker, and packets an edit list cuts (the decoder drops their
            # frames, so counting them would shift every index after them).
            if packet.size == 0 or getattr(packet, "is_discard", False):  # older PyAV lacks the flag
                continue
            if packet.pts is None:
                return None
            frames.append(packet.pts)
            if packet.is_keyframe:
                keyframes.append(packet.pts)
    except (av.FFmpegError, OSError, ValueError):
        return None
    if not keyframes or len(set(frames)) != len(frames):
        return None
    return PacketTimes(sorted(frames), sorted(keyframes))


def _decode_by_seeking(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, wanted: set[int], times: PacketTimes,
    refuse_corrupt: bool = False,
) -> dict[int, Image.Image] | None:
    """The wanted frames (indices into ``times.frames``) as ``_seek_frames`` finds them; None when it
    stops early: the caller then decodes in order instead."""
    frames = dict(_seek_frames(container, stream, sorted(wanted), times, refuse_corrupt))
    return frames if len(frames) == len(wanted) else None


def _seek_frames(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, wanted: list[int], times: PacketTimes,
    refuse_corrupt: bool = False,
) -> Iterator[tuple[int, Image.Image]]:
    """``(index, image)`` of the ``wanted`` frames (ascending indices into ``times.frames``), each
    reached by seeking to the keyframe before it unless the decoder is already past that keyframe.
    Stops early, without an error, at the first frame that does not come out with the timestamp its
    packet promised (or, with ``refuse_corrupt``, comes out flagged corrupt)."""
    av = _pyav()
    decoded: Iterator[av.VideoFrame] | None = None
    last_pts: int | None = None  # of the last frame decoded
    try:
        for index in wanted:
            target = times.frames[index]
            keyframe = times.keyframe_before(index)
            if decoded is None or last_pts is None or keyframe > last_pts:
                container.seek(keyframe, stream=stream, backward=True, any_frame=False)
                decoded = container.decode(stream)
            for frame in decoded:
                if frame.pts is None or (refuse_corrupt and getattr(frame, "is_corrupt", False)):
                    return
                last_pts = frame.pts
                if frame.pts >= target:
                    break
            else:
                return  # the stream ended first
            if frame.pts != target:
                return
            yield index, upright_image(frame)
    except (av.FFmpegError, OSError, ValueError):
        return


def _read_frames_pyav(
    path: Path, max_frames: int, framerate: float, start: float | None, end: float | None, around_damage: bool = False
) -> list[Image.Image]:
    # One open container serves the stream's facts, its packet timestamps and seeking: opening and
    # probing a file costs milliseconds, a fair share of reading 12 frames of a short clip.
    with _open_container(path) as container:
        stream = _video_stream(container, path, flags_concealment=around_damage)
        fps = _stream_fps(stream, path)
        # Sampled over the container's declared count where it has one, so the benchmarks' frames stay
        # those sampled since the first release (an over-stated count is caught below and resampled);
        # read_windows goes by the packets first, as windows need their real times.
        num_frames = _declared_frame_count(stream)
        times = _packet_times(container, stream)
        if num_frames <= 0:
            num_frames = len(times.frames) if times is not None else _count_frames(path)
        if num_frames <= 0:
            raise VideoDecodeError(path, "no decodable video frames")
        indices = sample_frame_indices(num_frames, fps, max_frames, framerate, start, end)
        if times is not None and max(indices) < len(times.frames):
            frames = _decode_by_seeking(container, stream, set(indices), times, refuse_corrupt=around_damage)
            if frames is not None:
                return [frames[i] for i in indices]
    failure = None
    try:
        frames, decoded = _decode_wanted(path, set(indices), refuse_corrupt=around_damage)
    except VideoDecodeError as error:
        if not around_damage or times is None:
            raise
        failure = error.reason
    if failure is not None:
        # Outside the except block, and with the stream let go: the error's traceback and the stream
        # hold the decoders, whose threads would live on with them (a process forked then, a
        # DataLoader worker, can inherit their locks).
        del container, stream
        if max(indices) >= len(times.frames):  # the container over-states its length (a file cut short)
            indices = sample_frame_indices(len(times.frames), fps, max_frames, framerate, start, end)
        return _frames_around_damage(path, indices, times, failure)
    if len(frames) < len(set(indices)):
        # The container over-stated its length: resample over the frames that really exist.
        if decoded == 0:
            raise VideoDecodeError(path, "no decodable video frames")
        indices = sample_frame_indices(decoded, fps, max_frames, framerate, start, end)
        frames, _ = _decode_wanted(path, set(indices), refuse_corrupt=around_damage)
    return [frames[i] for i in indices]


# A damaged video whose packets decode for at least this share of its frames is read around the
# damage (the nearest decodable frames standing in); one that decodes less is undecodable.
MIN_DECODABLE_SHARE = 0.5


def _whole_frames(path: Path, times: PacketTimes, from_index: int = 0) -> Iterator[tuple[int, av.VideoFrame]]:
    """``(index, frame)`` of the frames that come out whole (indices into ``times.frames``, ascending
    but for damage that reorders them), decoding the video packet by packet and passing over packets
    the decoder refuses; from the keyframe before frame ``from_index`` (from the start where seeking
    does not land on it: some containers, MPEG-TS among them, land after it).

    After a refused packet the decoder goes on with frames it fills in from what it lacks (garbage,
    flagged as nothing), up to the next keyframe: none counts until a keyframe packet decodes, and
    then only frames shown from that keyframe on. A frame the decoder flags as corrupt (one it
    concealed errors in) counts as a refused packet, unless it is shown before the keyframe decoding
    started over from (B-frames of the damaged stretch come out after that keyframe). One decoding
    thread, so that which frames come out does not depend on the machine's cores."""
    av = _pyav()
    index_of = {pts: index for index, pts in enumerate(times.frames)}
    keyframe = times.keyframe_before(from_index) if from_index > 0 else None
    with _open_container(path) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "NONE"
        packets = container.demux(stream)
        if keyframe is not None:
            first = _seek_to_keyframe(container, stream, packets, keyframe)
            packets = None if first is None else itertools.chain([first], packets)
        if packets is not None:
            damaged, whole_from = False, None  # after a refused packet; the keyframe decoding starts over from
            # B-frames come out before the frame they are predicted from: they wait for it to come out whole.
            held: list[tuple[int, av.VideoFrame]] = []
            for packet in packets:
                try:
                    frames = packet.decode()
                except (av.FFmpegError, OSError, ValueError):
                    damaged, whole_from = True, None
                    continue
                if damaged and packet.is_keyframe and packet.pts is not None:
                    damaged, whole_from = False, packet.pts
                for frame in frames:
                    if getattr(frame, "is_corrupt", False):  # PyAV 14 and later say so
                        if whole_from is None or frame.pts is None or frame.pts >= whole_from:
                            damaged, whole_from = True, None
                            held.clear()
                        continue
                    index = index_of.get(frame.pts)
                    if damaged or index is None or (whole_from is not None and frame.pts < whole_from):
                        continue
                    if _is_b_frame(frame):
                        held.append((index, frame))
                        if len(held) > _MAX_HELD_B_FRAMES:  # B-pictures used as P-frames (some encoders)
                            yield held.pop(0)
                        continue
                    yield from held
                    held.clear()
                    yield index, frame
            yield from held  # the last ones: what they are predicted from came out whole
            return
    yield from _whole_frames(path, times)


# B-frames held at most while their reference frame is awaited: H.264's and HEVC's most references.
_MAX_HELD_B_FRAMES = 16


def _is_b_frame(frame: av.VideoFrame) -> bool:
    """Whether ``frame`` is bidirectionally predicted (PyAV gives its picture type as a number or an enum)."""
    kind = frame.pict_type
    return getattr(kind, "name", None) == "B" or (isinstance(kind, int) and kind == 3)  # AV_PICTURE_TYPE_B


def _seek_to_keyframe(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                      packets: Iterator[av.Packet], keyframe: int) -> av.Packet | None:
    """Seek to the keyframe at ``keyframe`` (a timestamp): the first packet ``packets`` (the stream's
    demuxer) gives from there, or None where seeking fails or lands elsewhere."""
    av = _pyav()
    try:
        container.seek(keyframe, stream=stream, backward=True, any_frame=False)
        first = next((packet for packet in packets if packet.size > 0), None)
    except (av.FFmpegError, OSError, ValueError):
        return None
    if first is None or not first.is_keyframe or first.pts is None or first.pts > keyframe:
        return None
    return first


def _nearest(ordered: list[int], index: int) -> int:
    """The member of ``ordered`` (ascending, not empty) nearest to ``index``; the earlier of two as near."""
    at = bisect.bisect_left(ordered, index)
    return min(ordered[max(at - 1, 0) : at + 1], key=lambda candidate: (abs(candidate - index), candidate))


def _frames_around_damage(path: Path, indices: list[int], times: PacketTimes, failure: str) -> list[Image.Image]:
    """The sampled frames of a video that fails to decode part-way (a corrupt stretch in a download
    or a recording): each sampled frame that does not decode whole is replaced by the nearest one
    that does, with a warning, so that one bad stretch does not cost the whole video. Undecodable
    (``failure``: why decoding in order stopped) when under ``MIN_DECODABLE_SHARE`` of the frames
    decode. The whole video read as one window (``_windows_around_damage``), whose share of frames
    that decode is the video's, so it is never left out."""
    whole = Window(0, len(times.frames) - 1, 0.0, 0.0, indices)  # its times are not reported
    ((_, frames),) = _windows_around_damage(path, [whole], times, failure, whole_video=True)
    return frames


@dataclass(frozen=True)
class Window:
    """A stretch of a video and the frames sampled from it.

    ``first`` and ``last`` are the frames it spans (indices, both included); ``start`` and ``end``
    are its playback times in seconds (the first frame's timestamp, and the next window's or the end of
    the video); ``indices`` are its ``max_frames`` sampled frames, as ``sample_frame_indices`` picks
    them from a clip of those frames."""

    first: int
    last: int
    start: float
    end: float
    indices: list[int]


def plan_windows(
    times_s: Sequence[float], fps: float, window_s: float, max_frames: int, framerate: float = 1.0
) -> list[Window]:
    """Cut a video whose frame ``i`` shows at ``times_s[i]`` seconds (ascending) into windows of equal
    playback time, as many as come nearest to ``window_s`` seconds each, at least one, with no short
    window left over at the end; a window that would hold no frame (a gap in a variable frame rate)
    is left out. ``fps`` (the average frame rate) gives the last frame's duration and spaces the
    candidate frames as in ``sample_frame_indices``."""
    if not times_s:
        raise ValueError("a video without frames has no windows")
    origin, total = times_s[0], times_s[-1] - times_s[0] + 1 / fps
    count = max(1, math.floor(total / window_s + 0.5))  # halves up (round() takes them to the even number)

    def window_start(k: int) -> float:
        return origin + total * k / count

    windows = []
    first = 0
    while first < len(times_s):
        # The window of frame ``first``, found from its time: a gap in the timestamps (of hours, in a
        # damaged file) spans empty windows that are never listed.
        k = min(max(math.floor((times_s[first] - origin) * count / total), 0), count - 1)
        while k > 0 and window_start(k) > times_s[first]:  # the estimate's rounding, either way
            k -= 1
        while k + 1 < count and window_start(k + 1) <= times_s[first]:
            k += 1
        after = bisect.bisect_left(times_s, window_start(k + 1)) if k + 1 < count else len(times_s)
        end = times_s[after] - origin if after < len(times_s) else total
        indices = _sample_range(first, after - 1, fps, max_frames, framerate)
        windows.append(Window(first, after - 1, round(times_s[first] - origin, 3), round(end, 3), indices))
        first = after
    return windows


def read_windows(
    path: str | os.PathLike,
    max_frames: int,
    framerate: float,
    window_s: float,
    backend: str = "pyav",
    around_damage: bool = False,
) -> Iterator[tuple[Window, list[Image.Image] | None]]:
    """The windows of a video (``plan_windows``) with their sampled frames as RGB images, in time
    order, reading the file once: a long video's windows cost about what its frames cost, whether
    its frames are reached by seeking or by decoding in order. Frame times come from the packets'
    timestamps where they can be read, so windows and their times follow a variable frame rate.

    ``around_damage``: when decoding fails part-way and at least half the video's frames decode
    whole, the windows from the failure on are read around the damage, each on its own (PyAV only;
    see ``_windows_around_damage``): a window of which at least half the frames decode whole comes out
    with the nearest of those standing in for sampled frames that do not; the others come out as
    ``(window, None)``, left out; a warning says which.

    Raises:
        VideoDecodeError: the file is missing, empty, corrupt or has no video stream (possibly after
            some windows came out).
    """
    _check_known_backend(backend)
    path = Path(path)
    _check_file(path)
    if backend == "decord":
        yield from _read_windows_decord(path, max_frames, framerate, window_s)
        return
    with _open_container(path) as container:
        stream = _video_stream(container, path, flags_concealment=around_damage)
        fps = _stream_fps(stream, path)
        times = _packet_times(container, stream)
        if times is not None:
            # The packets say how many frames there are (a container's declared count can be more,
            # in a truncated file) and when each shows.
            origin, unit = times.frames[0], stream.time_base or Fraction(1, 1)
            times_s = [float((pts - origin) * unit) for pts in times.frames]
        else:
            num_frames = _declared_frame_count(stream)
            num_frames = num_frames if num_frames > 0 else _count_frames(path)
            times_s = [i / fps for i in range(num_frames)]
        if not times_s:
            raise VideoDecodeError(path, "no decodable video frames")
        windows = plan_windows(times_s, fps, window_s, max_frames, framerate)
        wanted = sorted({index for window in windows for index in window.indices})
        frames = _frames_once(container, stream, path, wanted, times, refuse_corrupt=around_damage)
        done, failure = 0, None
        try:
            for window, images in _group_windows(path, windows, frames):
                done += 1
                yield window, images
        except VideoDecodeError as error:
            if not around_damage or times is None:
                raise
            failure = error.reason
    if failure is not None:
        # Outside the except block, with the failed decoders let go (their threads and frame pools).
        del container, stream, frames
        yield from _windows_around_damage(path, windows[done:], times, failure)


def _windows_around_damage(
    path: Path, windows: list[Window], times: PacketTimes, failure: str, whole_video: bool = False
) -> Iterator[tuple[Window, list[Image.Image] | None]]:
    """``windows`` (the video's last ones, from where decoding in order failed: ``failure`` says why),
    read around the damage; ``None`` for a window left out.

    Undecodable when under ``MIN_DECODABLE_SHARE`` of the video's frames decode whole, as a whole
    video would be (the frames before ``windows`` are decoded for that only where it could decide
    it). Otherwise each window on its own: one of which at least that share of the frames decode
    has the nearest of them, within the window, stand in for sampled frames that do not; the others
    are left out (a stretch of a long recording lost, not the whole recording), with a warning that
    names their times. Decodes twice from the keyframe before ``windows``: once to find the frames that decode,
    once for the images, holding only the window at hand's. ``whole_video``: ``windows`` is one
    window spanning the video, sampled as a whole video is (the warning says so)."""
    first, total = windows[0].first, len(times.frames)
    decoded = sorted(index for index, _ in _whole_frames(path, times, first) if index >= first)
    if len(decoded) < MIN_DECODABLE_SHARE * total:  # then it depends on the frames before
        before = _whole_frames_before(path, times, first) if first > 0 else 0
        if before + len(decoded) < MIN_DECODABLE_SHARE * total:
            raise VideoDecodeError(path, failure)
    plan: list[tuple[Window, dict[int, int] | None]] = []  # each window's stand-ins (None: left out)
    for window in windows:
        inside = decoded[bisect.bisect_left(decoded, window.first) : bisect.bisect_right(decoded, window.last)]
        enough = len(inside) >= MIN_DECODABLE_SHARE * (window.last - window.first + 1)
        plan.append((window, {index: _nearest(inside, index) for index in window.indices} if enough else None))
    warn(_damage_report(path, total - first - len(decoded), total - first, failure, plan, whole_video))
    frames = _whole_frames(path, times, first)
    # Frames of any window, kept from when they come out until their window's turn: damage can
    # reorder them (seen in MPEG-TS), and windows share none.
    wanted = {index for _, stand_ins in plan if stand_ins is not None for index in stand_ins.values()}
    held: dict[int, Image.Image] = {}
    try:
        for window, stand_ins in plan:
            if stand_ins is None:
                yield window, None
                continue
            needed = set(stand_ins.values())
            while not needed <= held.keys():
                index, frame = next(frames, (None, None))
                if index is None:  # the same decoding gave these frames a moment ago
                    raise VideoDecodeError(path, f"{failure}; the file changed while it was read")
                if index in wanted:
                    held[index] = upright_image(frame)
            yield window, [held[stand_ins[index]] for index in window.indices]
            for index in needed:
                del held[index]
    finally:
        frames.close()


def _whole_frames_before(path: Path, times: PacketTimes, index: int) -> int:
    """How many of the frames before frame ``index`` decode whole (decoding from the start)."""
    return sum(1 for _ in itertools.takewhile(lambda found: found[0] < index, _whole_frames(path, times)))


def _damage_report(
    path: Path, undecodable: int, counted: int, failure: str, plan: list[tuple[Window, dict[int, int] | None]],
    whole_video: bool,
) -> str:
    """The warning of ``_windows_around_damage``: how many of the ``counted`` frames of ``plan``'s
    windows do not decode, what stood in where, and which stretches were left out."""
    since = f" from {plan[0][0].start:.1f} s on" if plan[0][0].first > 0 else ""
    message = f"{path}: {undecodable} of its {counted} frames{since} do not decode ({failure})"
    kept = [stand_ins for _, stand_ins in plan if stand_ins is not None]
    replaced = sum(1 for stand_ins in kept for index, frame in stand_ins.items() if index != frame)
    if replaced or whole_video:  # a whole video says how many stood in, none included
        sampled = sum(len(stand_ins) for stand_ins in kept)
        of_each = " of each window" if len(plan) > 1 else ""
        message += f"; the nearest decodable frames{of_each} stand in for {replaced} of the {sampled} sampled"
    left_out = merged_spans([[window.start, window.end] for window, stand_ins in plan if stand_ins is None])
    if left_out:
        message += f"; left out, as fewer than half of their frames decode: {spans_text(left_out)}"
    return message


def spans_text(spans: Sequence[Sequence[float]]) -> str:
    """``"8.0-12.0 s, 20.0-24.0 s"``: time spans of windows left out, as warnings and summaries name them."""
    return ", ".join(f"{start:.1f}-{end:.1f} s" for start, end in spans)


def merged_spans(spans: Sequence[Sequence[float]]) -> list[list[float]]:
    """``[start, end]`` spans in time order with those that touch joined: ``[[0, 10], [10, 20]]`` -> ``[[0, 20]]``."""
    merged: list[list[float]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def _frames_once(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, path: Path, wanted: list[int],
    times: PacketTimes | None, refuse_corrupt: bool = False,
) -> Iterator[tuple[int, Image.Image]]:
    """``(index, image)`` of the ``wanted`` frames (ascending), by seeking where the timestamps allow,
    then decoding in order from the start for whatever seeking could not place (``refuse_corrupt``:
    see ``_decoded_in_order``)."""
    done = -1
    if times is not None:  # windows are planned over its frames, so every wanted index is one of them
        for index, image in _seek_frames(container, stream, wanted, times, refuse_corrupt):
            done = index
            yield index, image
    rest = [index for index in wanted if index > done]
    if rest:
        wanted_set = set(rest)
        for index, frame in _decoded_in_order(path, rest[-1], refuse_corrupt):
            if index in wanted_set:
                yield index, upright_image(frame)


def _group_windows(
    path: Path, windows: list[Window], frames: Iterator[tuple[int, Image.Image]]
) -> Iterator[tuple[Window, list[Image.Image]]]:
    """Each window with its frames, as ``frames`` delivers them in order; only the frames of the window
    at hand are held. Where the stream ends before a window's last frames (a container that
    over-states its length), that window repeats the last frame it has, as a short clip does, and the
    windows stop there."""
    for window in windows:
        held: dict[int, Image.Image] = {}  # windows share no frames
        for index, image in frames:
            held[index] = image
            if index >= window.indices[-1]:
                break
        if not held:
            if window is windows[0]:
                raise VideoDecodeError(path, "no decodable video frames")
            return
        # Frames come in order, so those missing are the window's last ones.
        last_decoded = held[max(held)]
        yield window, [held.get(index, last_decoded) for index in window.indices]
        if len(held) < len(set(window.indices)):
            return


def _read_windows_decord(
    path: Path, max_frames: int, framerate: float, window_s: float
) -> Iterator[tuple[Window, list[Image.Image]]]:
    reader = _decord_reader(path)
    decord = _decord()
    try:
        fps = reader.get_avg_fps()
        windows = plan_windows([i / fps for i in range(len(reader))], fps, window_s, max_frames, framerate)
    except (decord.DECORDError, RuntimeError, OSError, ValueError) as err:
        raise _decord_error(path, err) from err
    for window in windows:
        try:
            batch = reader.get_batch(window.indices).asnumpy()
        except (decord.DECORDError, RuntimeError, OSError, ValueError) as err:
            raise _decord_error(path, err) from err
        yield window, [Image.fromarray(array) for array in batch]


def _read_frames_decord(
    path: Path, max_frames: int, framerate: float, start: float | None, end: float | None
) -> list[Image.Image]:
    reader = _decord_reader(path)
    decord = _decord()
    try:
        indices = sample_frame_indices(len(reader), reader.get_avg_fps(), max_frames, framerate, start, end)
        batch = reader.get_batch(indices).asnumpy()
    except (decord.DECORDError, RuntimeError, OSError, ValueError) as err:
        raise _decord_error(path, err) from err
    return [Image.fromarray(array) for array in batch]


def _check_known_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; choose one of {BACKENDS}")


def check_backend(backend: str) -> None:
    """Raise ValueError now, before any video is read (in worker processes, maybe), if ``backend`` is
    unknown or its package is not installed."""
    _check_known_backend(backend)
    if backend == "decord":
        try:
            _decord()
        except ImportError as error:
            raise ValueError(str(error)) from None


def _decord():
    try:
        import decord
    except ImportError as err:
        raise ImportError(
            "backend='decord' needs the optional decord package (pip install decord); or use backend='pyav'"
        ) from err
    return decord


def _decord_reader(path: Path):
    decord = _decord()
    try:
        return decord.VideoReader(str(path), num_threads=1)
    except (decord.DECORDError, RuntimeError, OSError, ValueError) as err:
        raise _decord_error(path, err) from err


def _decord_error(path: Path, err: Exception) -> VideoDecodeError:
    message = first_line(err)
    reason = "no video stream" if "cannot find video stream" in message else f"decord failed ({message})"
    return VideoDecodeError(path, reason)
