"""On-disk cache of decoded, sampled frames.

Decoding long videos dominates data loading; the cache decodes each video once and stores
its sampled frames as ``uint8 [F, H, W, 3]`` ``.npy`` files, resized so the short side is
``image_size`` (bicubic) but not cropped. Loading them back and applying the usual transform
gives exactly the uncached test-time tensors (resizing to the same size is an identity and the
centre crop is unchanged). In training, RandAugment then runs on the resized frames instead
of the raw ones, a close approximation: its translations are relative to the frame size and
its other ops act the same at any resolution, up to resampling detail.

Files live in ``root/m{max_frames}_r{framerate:g}_s{image_size}/`` (``..._decord/`` for decord's
frames) so different sampling settings and decoders never share entries, and are written
atomically (temporary file + ``os.replace``), so concurrent DataLoader workers or an interrupted
run never leave a partial file behind.

An entry belongs to one video *file*, not to a video id: its name hashes the id, the file's
resolved path, size and modification time, and the sampling window. So two annotation files that
list the same id for different files, an edited or replaced video, or another ``data.video_dir``
all decode again instead of reusing frames of another file. Entries written by older versions (keyed
by id and window only) are simply never found again; delete the cache folder to reclaim their space.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..files import atomic_file, file_stamp
from ..progress import progress_bar
from ..workers import decoding_workers
from .annotations import VideoItem
from .transforms import resize_short_side
from .video import DECODING_VERSION, SkippedVideo, VideoDecodeError, read_frames

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def file_state(path: str | os.PathLike) -> str:
    """``"<resolved path>|<size>|<mtime in ns>"`` of a file; for a file that cannot be looked at
    (missing, or in a folder it may not read), the resolved path and a marker instead.

    Two calls give the same text only for the same file, unchanged in between (as far as its size
    and modification time tell): what caches of decoded or embedded videos are keyed by.
    """
    resolved = Path(path).expanduser().resolve()
    stamp = file_stamp(resolved)
    if stamp is None:  # missing, or unreadable: decoding will say which
        return f"{resolved}|unavailable"
    return f"{resolved}|{stamp[0]}|{stamp[1]}"


@dataclass
class CacheSummary:
    """Outcome of :meth:`FrameCache.prepare`: cached videos and the ones that failed to decode."""

    ok: int = 0
    skipped: list[SkippedVideo] = field(default_factory=list)


class FrameCache:
    """Decode-once store of sampled frames.

    Args:
        root: cache folder (created on demand).
        max_frames, framerate: frame sampling, see :func:`~tempme.data.video.sample_frame_indices`.
        image_size: short side of the stored frames.
        backend: video decoder, ``"pyav"`` or ``"decord"``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        max_frames: int = 12,
        framerate: float = 1.0,
        image_size: int = 224,
        backend: str = "pyav",
    ):
        self.root = Path(root)
        self.max_frames = max_frames
        self.framerate = framerate
        self.image_size = image_size
        self.backend = backend
        # Decoders can differ in a frame's exact pixels (colour conversion, seeking): one folder each.
        decoder = "" if backend == "pyav" else f"_{backend}"
        self.folder = self.root / f"m{max_frames}_r{framerate:g}_s{image_size}{decoder}"

    def path_for(self, item: VideoItem) -> Path:
        """Cache file of an item: a readable, file-system-safe id plus a hash of the full key.

        The key holds the video file's state (see :func:`file_state`), so the entry of a file that
        changed since, or of another file under the same id, is not this one.
        """
        key = f"{item.video_id}|{file_state(item.path)}|{item.start}|{item.end}|{DECODING_VERSION}"
        digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]
        readable = _UNSAFE.sub("_", item.video_id)[:80]
        return self.folder / f"{readable}-{digest}.npy"

    def get(self, item: VideoItem) -> list[Image.Image] | None:
        """The cached frames of ``item``, or ``None`` when they are not cached (or unreadable)."""
        return self._load(self.path_for(item))

    @staticmethod
    def _load(path: Path) -> list[Image.Image] | None:
        try:
            array = np.load(path)
        except FileNotFoundError:
            return None
        except PermissionError:
            # Not damaged: someone else's entry (e.g. written before files got group/other read
            # permission). Deleting and rebuilding it would hide the problem, or fail halfway.
            raise
        except (OSError, ValueError, EOFError):
            # Atomic writes make this rare (e.g. a damaged disk); dropping the entry lets it be rebuilt.
            path.unlink(missing_ok=True)
            return None
        return [Image.fromarray(frame) for frame in array]

    def get_or_create(self, item: VideoItem) -> list[Image.Image]:
        """Cached frames, decoding and storing them first if needed.

        Raises:
            VideoDecodeError: the video cannot be decoded.
        """
        # The key is taken before decoding: if the file changes while it is decoded, the entry is
        # stored under the old state and the next read decodes the new file again.
        path = self.path_for(item)
        frames = self._load(path)
        if frames is None:
            frames = self._decode(item)
            self._write(path, np.stack([np.asarray(frame) for frame in frames]))
        return frames

    def prepare(
        self, items: Sequence[VideoItem], num_workers: int = 0, progress: bool = True
    ) -> CacheSummary:
        """Cache every item, skipping videos that are already cached.

        Args:
            items: videos to cache.
            num_workers: decoding threads (0 = in this thread), at most one per item and per
                available CPU (``decoding_workers``). PyAV and PIL release the GIL while decoding
                and resizing, so threads scale without pickling frames.
            progress: show a tqdm bar.

        Returns:
            A :class:`CacheSummary`; undecodable videos are listed, not raised.
        """
        summary = CacheSummary()
        num_workers = decoding_workers(num_workers, len(items))
        with progress_bar(total=len(items), desc="caching frames", unit="video", disable=not progress) as bar:
            if num_workers > 0:
                with ThreadPoolExecutor(max_workers=num_workers) as pool:
                    outcomes = pool.map(self._prepare_one, items)
                    self._collect(outcomes, summary, bar)
            else:
                self._collect(map(self._prepare_one, items), summary, bar)
        return summary

    def _prepare_one(self, item: VideoItem) -> SkippedVideo | None:
        if self.path_for(item).is_file():
            return None
        try:
            self.get_or_create(item)
        except VideoDecodeError as err:
            return SkippedVideo(item.video_id, item.path, err.reason)
        return None

    @staticmethod
    def _collect(outcomes, summary: CacheSummary, bar: tqdm) -> None:
        for outcome in outcomes:
            if outcome is None:
                summary.ok += 1
            else:
                summary.skipped.append(outcome)
            bar.update(1)

    def _decode(self, item: VideoItem) -> list[Image.Image]:
        """Sampled frames resized to the cache's short side."""
        frames = read_frames(item.path, self.max_frames, self.framerate, item.start, item.end, self.backend)
        # Repeated indices share one decoded image: resize each distinct image once.
        resized: dict[int, Image.Image] = {}
        for frame in frames:
            if id(frame) not in resized:
                resized[id(frame)] = resize_short_side(frame, self.image_size)
        return [resized[id(frame)] for frame in frames]

    def _write(self, path: Path, array: np.ndarray) -> None:
        """Write ``array`` to ``path`` atomically: readers see the old state or the whole file. Not
        flushed to the disk first: an entry a power cut left empty is rebuilt when read (``_load``)."""
        with atomic_file(path, durable=False) as temporary, open(temporary, "wb") as stream:
            np.save(stream, array)
