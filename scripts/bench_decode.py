"""Time frame sampling of tempme.data.read_frames: seeking to keyframes against decoding in order.

    python scripts/bench_decode.py                       # writes test videos to a temporary folder
    python scripts/bench_decode.py my.mp4 other.mkv      # your own videos

For each video: seconds to read ``--frames`` sampled frames (median of ``--repeats``) by seeking (the
default path) and by decoding in order (the fallback), both in this process, and whether they gave
the same pixels. Generated videos are 320x240 noise scrolling sideways, 30 fps, encoded with their
codec's default keyframe interval (x264: at most 250 frames).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from tempme.data import video as video_module

GENERATED = (("15s_x264.mp4", "libx264", 15), ("120s_x264.mp4", "libx264", 120), ("300s_x264.mp4", "libx264", 300),
             ("60s_vp9.webm", "libvpx-vp9", 60))


def write_noise_video(path: Path, codec: str, seconds: int, fps: int = 30) -> Path:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for index in range(seconds * fps):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.roll(base, index, axis=1), format="rgb24")))
        container.mux(stream.encode(None))
    return path


def time_read(path: Path, frames: int, repeats: int, in_order: bool) -> tuple[float, list]:
    packet_times = video_module._packet_times
    if in_order:
        video_module._packet_times = lambda container, stream: None
    try:
        times, images = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            images = video_module.read_frames(path, frames)
            times.append(time.perf_counter() - start)
    finally:
        video_module._packet_times = packet_times
    return statistics.median(times), images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("videos", nargs="*", type=Path, help="videos to time (default: generated ones)")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        videos = args.videos
        if not videos:
            print("writing test videos ...", flush=True)
            videos = [write_noise_video(Path(folder) / name, codec, seconds) for name, codec, seconds in GENERATED]
        print(f"{'video':<20} {'in order s':>10} {'seeking s':>10} {'speed-up':>9}  same pixels")
        for path in videos:
            ordered, ordered_images = time_read(path, args.frames, args.repeats, in_order=True)
            seeking, seeking_images = time_read(path, args.frames, args.repeats, in_order=False)
            same = all(a.tobytes() == b.tobytes() for a, b in zip(ordered_images, seeking_images))
            print(f"{path.name:<20} {ordered:>10.3f} {seeking:>10.3f} {ordered / seeking:>8.1f}x  {same}")


if __name__ == "__main__":
    main()
