"""Test fixtures for tempme.data: tiny videos and annotation files in each benchmark's format.

Videos are 64x48 at 10 fps. Each frame is a flat colour that encodes its index
(red = low 4 bits, green = high 4 bits, in steps of 16), so tests can tell which
frames a decoder returned even after lossy compression.

Test modules wrap the ``build_*`` functions in module-scoped fixtures.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

WIDTH, HEIGHT = 64, 48
FPS = 10
NUM_FRAMES = 50  # 5 s
_STEP = 16


def frame_colour(index: int) -> tuple[int, int, int]:
    """RGB colour of frame ``index`` (0 <= index < 256)."""
    return ((index % _STEP) * _STEP + 8, (index // _STEP) * _STEP + 8, 128)


def frame_index(image: Image.Image) -> int:
    """Recover the frame index from a decoded (possibly lossy, possibly resized) frame."""
    red, green, _ = np.asarray(image.convert("RGB"), dtype=np.float64).mean(axis=(0, 1))
    return round((red - 8) / _STEP) + _STEP * round((green - 8) / _STEP)


def write_video(
    path: Path,
    num_frames: int = NUM_FRAMES,
    fps: int = FPS,
    codec: str = "mpeg4",
    container_format: str | None = None,
    keyframe_every: int | None = None,
) -> Path:
    """Write a colour-indexed clip; the container follows the extension unless a format is given.

    ``keyframe_every``: the encoder's GOP size (its default otherwise, often longer than the clip).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        if keyframe_every is not None:
            stream.codec_context.gop_size = keyframe_every
        for index in range(num_frames):
            pixels = np.empty((HEIGHT, WIDTH, 3), dtype=np.uint8)
            pixels[...] = frame_colour(index)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def write_corrupt(path: Path) -> Path:
    """Random bytes with a video extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(0).randbytes(4096))
    return path


def write_damaged_video(path: Path) -> Path:
    """A 20 s clip (10 fps) with a damaged stretch: frames 80 to 119 do not decode, so in windows of
    4 s the one from 8 to 12 s has fewer than half its frames and is left out (see test_search.py)."""
    clean = write_video(path.with_name(f"clean_{path.name}"), num_frames=200, keyframe_every=20)
    data = bytearray(clean.read_bytes())
    clean.unlink()
    first, count = int(len(data) * 0.3), int(len(data) * 0.2)  # frames 66 to 127: 80-119 none
    data[first : first + count] = random.Random(1).randbytes(count)
    path.write_bytes(data)
    return path


def write_empty(path: Path) -> Path:
    """A 0-byte file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def write_audio_only(path: Path) -> Path:
    """A valid media file with no video stream (1 s of silence, WAV)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def _write_csv(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


@dataclass(frozen=True)
class Benchmark:
    """Where a fixture benchmark lives."""

    anno_dir: Path
    video_dir: Path


def build_msrvtt(root: Path) -> Benchmark:
    """MSRVTT: train 9k/7k CSVs, the JSFUSION test CSV and ``MSRVTT_data.json``.

    ``video3`` has no file; ``video9771`` exists only as ``.webm``.
    """
    anno, videos = root / "msrvtt_anno", root / "msrvtt_videos"
    _write_csv(anno / "MSRVTT_train.9k.csv", ["video_id", "video0", "video1", "video2", "video3"])
    _write_csv(anno / "MSRVTT_train.7k.csv", ["video_id", "video0", "video1"])
    _write_csv(
        anno / "MSRVTT_JSFUSION_test.csv",
        [
            "key,vid_key,video_id,sentence",
            "ret0,msr9770,video9770,a person is connecting something to system",
            "ret1,msr9771,video9771,a little girl does gymnastics",
        ],
    )
    sentences = [
        ("video1", "a man talks about cars"),
        ("video0", "a cartoon animals runs through an ice cave in a video game"),
        ("video9770", "someone plugs in a cable"),
        ("video0", "a character runs in a game"),
        ("video2", "people dance on a stage"),
        ("video3", "a dog plays in the snow"),
        ("video1", "a car review"),
        ("video5", "a caption of a video in no split"),
    ]
    _write_json(
        anno / "MSRVTT_data.json",
        {
            "info": {
                "year": "2016",
                "version": "1.0",
                "description": "fixture",
                "contributor": "t",
                "data_created": "x",
            },
            "videos": [
                {
                    "category": 9,
                    "url": "https://www.youtube.com/watch?v=XXXXXXXXXXX",
                    "video_id": f"video{i}",
                    "start time": 137.72,
                    "end time": 149.44,
                    "split": "train",
                    "id": i,
                }
                for i in range(4)
            ],
            "sentences": [{"caption": c, "video_id": v, "sen_id": i} for i, (v, c) in enumerate(sentences)],
        },
    )
    for video_id in ("video0", "video1", "video2", "video9770"):
        write_video(videos / f"{video_id}.mp4")
    write_video(videos / "video9771.webm", codec="libvpx")
    return Benchmark(anno, videos)


DIDEMO_VIDEOS = ("26292851@N04_4253489686_265c3c8051.m4v", "10015567@N08_3655084291_d8b58466fa.mov")


def build_didemo(root: Path) -> Benchmark:
    """DiDeMo: ``{split}_list.txt`` and ``{split}_data.json``; files named exactly like ``video``.

    The second video is stored X-CLIP style as ``<video>.mp4`` in a subfolder; the third listed
    train video has no descriptions.
    """
    anno, videos = root / "didemo_anno", root / "didemo_videos"
    first, second = DIDEMO_VIDEOS
    _write_csv(anno / "train_list.txt", [first, second, "99999999@N00_1_abc.mp4"])
    moments = [
        (first, "someone kicks the bug towards some rocks."),
        (second, "a dog runs."),
        (first, "the bug flips over."),
        ("not_listed@N00_2_xyz.mp4", "a video outside the split."),
    ]
    _write_json(
        anno / "train_data.json",
        [
            {
                "annotation_id": i,
                "description": text,
                "video": video,
                "times": [[4, 4], [4, 4], [0, 0], [4, 4]],
                "dl_link": "https://www.flickr.com/video_download.gne?id=4253489686",
                "num_segments": 6,
            }
            for i, (video, text) in enumerate(moments)
        ],
    )
    _write_csv(anno / "test_list.txt", [first])
    _write_json(
        anno / "test_data.json",
        [{"annotation_id": 9, "description": "a bug.", "video": first, "times": [[0, 1]]}],
    )
    write_video(videos / first, container_format="mp4")
    write_video(videos / "sub" / f"{second}.mp4")
    return Benchmark(anno, videos)


def build_activitynet(root: Path) -> Benchmark:
    """ActivityNet Captions: id lists, ``train.json``/``val_1.json``; files ``<id without v_>.<ext>``."""
    anno, videos = root / "anet_anno", root / "anet_videos"
    _write_json(anno / "train_ids.json", ["v_QOlSCBRmfWY", "v_ehGHCYKzyZ8"])
    _write_json(
        anno / "train.json",
        {
            "v_QOlSCBRmfWY": {
                "duration": 82.73,
                "timestamps": [[0.83, 19.86], [17.37, 60.81], [56.26, 79.42]],
                "sentences": [
                    "A young woman is seen standing in a room and leads into her dancing.",
                    " The girl dances around the room while the camera captures her movements.",
                    " She continues dancing around the room and ends by laying on the floor.",
                ],
            },
            "v_ehGHCYKzyZ8": {"duration": 4.2, "timestamps": [[0.0, 4.2]], "sentences": ["A man waves."]},
        },
    )
    _write_json(anno / "val_ids.json", ["v_AAAAAAAAAAA"])
    _write_json(
        anno / "val_1.json",
        {"v_AAAAAAAAAAA": {"duration": 5.0, "timestamps": [[0, 5]], "sentences": ["One.", " Two."]}},
    )
    write_video(videos / "part1" / "QOlSCBRmfWY.mp4")
    write_video(videos / "ehGHCYKzyZ8.mkv")
    write_video(videos / "AAAAAAAAAAA.mp4")
    return Benchmark(anno, videos)


LSMDC_CLIP = "0001_American_Beauty_00.00.51.926-00.00.54.129"
LSMDC_CLIP_2 = "0001_American_Beauty_00.01.02.000-00.01.05.500"
LSMDC_BROKEN = "0017_Pianist_00.23.28.872-00.23.34.843"


def _lsmdc_row(clip: str, sentence: str) -> str:
    start, end = clip.rsplit("_", 1)[1].split("-")
    return "\t".join([clip, start, end, start, end, sentence])


def build_lsmdc(root: Path) -> Benchmark:
    """LSMDC: headerless 6-field TSVs; files ``<movie>/<CLIP_ID>.avi``."""
    anno, videos = root / "lsmdc_anno", root / "lsmdc_videos"
    _write_csv(
        anno / "LSMDC16_annos_training.csv",
        [
            _lsmdc_row(LSMDC_CLIP, "SOMEONE is flying over a neighborhood."),
            _lsmdc_row(LSMDC_BROKEN, "SOMEONE plays the piano."),
            _lsmdc_row(LSMDC_CLIP_2, "SOMEONE walks in."),
            _lsmdc_row(LSMDC_CLIP, "The neighborhood is quiet."),
        ],
    )
    _write_csv(anno / "LSMDC16_annos_val.csv", [_lsmdc_row(LSMDC_CLIP_2, "SOMEONE sits.")])
    _write_csv(anno / "LSMDC16_challenge_1000_publictect.csv", [_lsmdc_row(LSMDC_CLIP, "SOMEONE flies.")])
    write_video(videos / "0001_American_Beauty" / f"{LSMDC_CLIP}.avi")
    write_video(videos / "0001_American_Beauty" / f"{LSMDC_CLIP_2}.mp4")
    return Benchmark(anno, videos)


def build_custom(root: Path) -> Benchmark:
    """User data: ``captions.csv`` and ``captions.jsonl`` next to a ``clips/`` folder."""
    anno = root / "custom"
    _write_csv(
        anno / "captions.csv",
        ["video,caption", "clips/a.mp4,a red car", "clips/b.mp4,a blue boat", "clips/a.mp4,a car drives"],
    )
    lines = [
        json.dumps({"video": "clips/a.mp4", "caption": "a red car"}),
        "",
        json.dumps({"video": "clips/b.mp4", "captions": ["a blue boat", "a boat sails"]}),
    ]
    (anno / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_video(anno / "clips" / "a.mp4")
    write_video(anno / "clips" / "b.mp4")
    return Benchmark(anno, anno)


@dataclass(frozen=True)
class VideoFiles:
    """Individual good and bad video files."""

    mp4: Path
    mkv: Path
    long: Path
    corrupt: Path
    empty: Path
    audio_only: Path


def build_video_files(root: Path) -> VideoFiles:
    """Good clips (mp4, mkv without a stored frame count, a 30 fps one) and broken files."""
    return VideoFiles(
        mp4=write_video(root / "clip.mp4"),
        mkv=write_video(root / "clip.mkv"),
        long=write_video(root / "long.mp4", num_frames=150, fps=30),
        corrupt=write_corrupt(root / "corrupt.mp4"),
        empty=write_empty(root / "empty.mp4"),
        audio_only=write_audio_only(root / "audio.wav"),
    )
