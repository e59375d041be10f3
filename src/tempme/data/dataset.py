"""PyTorch datasets for text-video retrieval.

:class:`RetrievalPairs` (training) yields one sample per (video, caption) pair;
:class:`RetrievalVideos` (evaluation) yields one sample per video, with
:func:`flatten_captions` giving every caption and the video it belongs to; :class:`VideoWindows`
(``tempme index --segment``) one sample per window of each video.

Undecodable videos: by default a sample whose video raises
:class:`~tempme.data.video.VideoDecodeError` becomes a :class:`SkippedVideo` marker (after a
warning naming the file) that :func:`collate_skip_bad` drops, reporting the video ids in the
batch's ``"skipped"`` list (the one record that works with DataLoader workers too).
With ``strict=True`` the error propagates, also out of a DataLoader worker: the main process gets a
``VideoDecodeError`` with the worker's message (file and reason), not torch's RuntimeError.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ..userwarnings import warn
from .annotations import VideoItem
from .cache import FrameCache
from .randaugment import VideoRandAugment
from .transforms import frames_to_tensor
from .video import SkippedVideo, VideoDecodeError, check_backend, merged_spans, read_frames, read_windows

Tokenize = Callable[[list[str], int], tuple[torch.Tensor, torch.Tensor]]
Sample = dict[str, Any]


class _VideoDataset(Dataset):
    """Frame loading shared by the training and evaluation datasets."""

    def __init__(
        self,
        items: Sequence[VideoItem],
        max_frames: int,
        framerate: float,
        image_size: int,
        augment: bool,
        frame_cache: FrameCache | None,
        backend: str,
        strict: bool,
        warn_skipped: bool = True,
        around_damage: bool = False,
    ):
        check_backend(backend)
        self.items = list(items)
        self.warn_skipped = warn_skipped
        self.around_damage = around_damage
        self.max_frames = max_frames
        self.framerate = framerate
        self.image_size = image_size
        self.augmenter = VideoRandAugment() if augment else None
        self.frame_cache = frame_cache
        self.backend = backend
        self.strict = strict
        if frame_cache is not None:
            _check_cache_matches(frame_cache, max_frames, framerate, image_size, backend)

    def _frames(self, item: VideoItem) -> list[Image.Image]:
        if self.frame_cache is not None:
            return self.frame_cache.get_or_create(item)
        return read_frames(
            item.path, self.max_frames, self.framerate, item.start, item.end, self.backend, self.around_damage
        )

    def _video(self, item: VideoItem) -> Sample | SkippedVideo:
        """``{"video": FloatTensor[F, 3, S, S], "video_mask": LongTensor[F]}``, or a skip marker."""
        try:
            frames = self._frames(item)
        except VideoDecodeError as err:
            if self.strict:
                raise
            if self.warn_skipped:
                warn(f"skipping video {item.video_id!r}: {err}")
            return SkippedVideo(item.video_id, item.path, err.reason)
        if self.augmenter is not None:
            frames = self.augmenter(frames)
        video = frames_to_tensor(frames, self.image_size)
        # Sampling always yields max_frames frames, so every frame is real.
        return {"video": video, "video_mask": torch.ones(video.shape[0], dtype=torch.long)}


def _check_cache_matches(cache: FrameCache, max_frames: int, framerate: float, image_size: int, backend: str) -> None:
    wanted = (max_frames, framerate, image_size, backend)
    cached = (cache.max_frames, cache.framerate, cache.image_size, cache.backend)
    if wanted != cached:
        raise ValueError(
            f"frame cache settings (max_frames, framerate, image_size, backend)={cached} "
            f"differ from the dataset's {wanted}"
        )


class RetrievalPairs(_VideoDataset):
    """Training set: one sample per (video, caption) pair.

    Args:
        items: videos with their captions.
        tokenize: ``(texts, max_words) -> (ids LongTensor[N, L], mask LongTensor[N, L])``,
            e.g. :func:`tempme.tokenizer.tokenize`.
        max_words: token length L.
        max_frames, framerate: frame sampling.
        image_size: side S of the square frames.
        augment: apply :class:`~tempme.data.randaugment.VideoRandAugment` before the transform.
        frame_cache: optional :class:`~tempme.data.cache.FrameCache` with the same settings.
        backend: ``"pyav"`` or ``"decord"``.
        strict: re-raise decoding errors instead of skipping the sample.
        warn_skipped: warn about each sample skipped. Off for callers that warn themselves: this
            warns at every read, once per caption and epoch (and loader workers remember nothing).

    A sample is ``{"video": FloatTensor[F, 3, S, S], "video_mask": LongTensor[F],
    "text_ids": LongTensor[L], "text_mask": LongTensor[L], "index": int, "video_id": str}``.
    """

    def __init__(
        self,
        items: Sequence[VideoItem],
        tokenize: Tokenize,
        max_words: int = 32,
        max_frames: int = 12,
        framerate: float = 1.0,
        image_size: int = 224,
        augment: bool = False,
        frame_cache: FrameCache | None = None,
        backend: str = "pyav",
        strict: bool = False,
        warn_skipped: bool = True,
    ):
        super().__init__(items, max_frames, framerate, image_size, augment, frame_cache, backend, strict, warn_skipped)
        self.tokenize = tokenize
        self.max_words = max_words
        self.pairs = [(v, caption) for v, item in enumerate(self.items) for caption in item.captions]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Sample | SkippedVideo:
        video_index, caption = self.pairs[index]
        item = self.items[video_index]
        sample = self._video(item)
        if isinstance(sample, SkippedVideo):
            return sample
        ids, mask = self.tokenize([caption], self.max_words)
        sample.update(text_ids=ids[0], text_mask=mask[0], index=index, video_id=item.video_id)
        return sample


class RetrievalVideos(_VideoDataset):
    """Evaluation set: one sample per video, without augmentation.

    A sample is ``{"video": FloatTensor[F, 3, S, S], "video_mask": LongTensor[F], "index": int,
    "video_id": str}``. Drop missing videos beforehand (:func:`~tempme.data.annotations.require_videos`):
    a video skipped here leaves its captions without a match in the similarity matrix.
    ``around_damage``: see :func:`~tempme.data.video.read_frames` (for users' own videos, not benchmarks).
    """

    def __init__(
        self,
        items: Sequence[VideoItem],
        max_frames: int = 12,
        framerate: float = 1.0,
        image_size: int = 224,
        frame_cache: FrameCache | None = None,
        backend: str = "pyav",
        strict: bool = False,
        warn_skipped: bool = True,
        around_damage: bool = False,
    ):
        super().__init__(
            items, max_frames, framerate, image_size, False, frame_cache, backend, strict, warn_skipped, around_damage
        )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample | SkippedVideo:
        item = self.items[index]
        sample = self._video(item)
        if isinstance(sample, SkippedVideo):
            return sample
        sample.update(index=index, video_id=item.video_id)
        return sample

    def captions(self) -> tuple[list[str], list[int]]:
        """See :func:`flatten_captions`."""
        return flatten_captions(self.items)


class VideoWindows(IterableDataset):
    """The windows of videos (``read_windows``), one sample per window, each video read once.

    A sample is ``{"video": FloatTensor[F, 3, S, S], "video_mask": LongTensor[F], "video_id": str,
    "start": float, "end": float, "final": int, "left_out": list}``: ``start`` and ``end`` in seconds,
    ``final`` 1 on a video's last window, whose ``left_out`` lists the ``[start, end]`` spans of the
    video's windows left out as damaged (``around_damage``; touching ones joined). A video that cannot be read gives one ``SkippedVideo`` instead of its
    remaining windows (which the consumer then drops with those it already has); ``around_damage``:
    see :func:`~tempme.data.video.read_windows`. Under a
    ``DataLoader`` with workers, each worker reads every ``num_workers``-th video whole, so the
    windows of a video arrive in order.
    """

    def __init__(
        self,
        videos: Sequence[str | os.PathLike],
        window_s: float,
        max_frames: int = 12,
        framerate: float = 1.0,
        image_size: int = 224,
        backend: str = "pyav",
        warn_skipped: bool = True,
        around_damage: bool = False,
    ):
        check_backend(backend)
        self.videos = [Path(video) for video in videos]
        self.around_damage = around_damage
        self.warn_skipped = warn_skipped
        self.window_s = window_s
        self.max_frames = max_frames
        self.framerate = framerate
        self.image_size = image_size
        self.backend = backend

    def __iter__(self) -> Iterator[Sample | SkippedVideo]:
        worker = get_worker_info()
        videos = self.videos if worker is None else self.videos[worker.id :: worker.num_workers]
        for video in videos:
            yield from self._windows(video)

    def _windows(self, video: Path) -> Iterator[Sample | SkippedVideo]:
        previous = None  # held back one window, to mark the last
        left_out: list[list[float]] = []  # windows that do not decode (around_damage)
        try:
            for window, frames in read_windows(
                video, self.max_frames, self.framerate, self.window_s, self.backend, self.around_damage
            ):
                if frames is None:
                    left_out.append([window.start, window.end])
                    continue
                if previous is not None:
                    yield previous
                frames = frames_to_tensor(frames, self.image_size)
                previous = {"video": frames, "video_mask": torch.ones(frames.shape[0], dtype=torch.long),
                            "video_id": str(video), "start": window.start, "end": window.end, "final": 0,
                            "left_out": []}
        except VideoDecodeError as error:
            where = "" if previous is None else f" (after {previous['end']:.1f} s)"
            if self.warn_skipped:
                warn(f"skipping video {str(video)!r}: {error}{where}")
            yield SkippedVideo(str(video), video, f"{error.reason}{where}")
            return
        previous["final"], previous["left_out"] = 1, merged_spans(left_out)
        yield previous


def flatten_captions(items: Sequence[VideoItem]) -> tuple[list[str], list[int]]:
    """Every caption in order, and for each the index of its video in ``items``.

    Returns:
        ``(captions, caption_to_video)``, both of length N_captions.
    """
    captions = [caption for item in items for caption in item.captions]
    caption_to_video = [v for v, item in enumerate(items) for _ in item.captions]
    return captions, caption_to_video


def quiet_worker_init(worker_id: int) -> None:
    """``worker_init_fn`` for DataLoaders: workers leave stops to the main process.

    Ctrl-C and a stop sent to the whole process group (``kill -TERM -PGID``, torchrun, a batch
    scheduler) reach the decoding workers too. Killed or stopped by it, a worker is reported by torch
    as failed (with a traceback) while the main process saves its work; and a training run that holds
    the stop until the end of its step (several processes) would find no batch for that step. So a
    worker ignores Ctrl-C and the first SIGTERM, goes on until the main process shuts the loader down,
    and leaves at a second SIGTERM (the one that shutdown sends to a worker slow to finish), or
    ``SIGTERM_GRACE_S`` after the first: Python's exit sends one SIGTERM to workers still running and
    waits for them, which would otherwise be forever.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _leave_at_second_sigterm)


@contextmanager
def loader_batches(loader: DataLoader) -> Iterator[Iterator[Any]]:
    """``iter(loader)``, whose worker processes are stopped on leaving the block (done, an error or
    Ctrl-C) by :func:`stop_workers`."""
    batches = iter(loader)
    try:
        yield batches
    finally:
        stop_workers(batches)


def stop_workers(batches: Iterator[Any]) -> None:
    """Stop the worker processes of a DataLoader iterator now, as torch does when the iterator is
    deleted (which a traceback holding it can put off until exit), and kill those still running then:
    a worker stuck in a decoder's C code runs no signal handler, so neither torch's SIGTERM nor
    Python's exit, which waits for it, would ever end."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch's own, run when it is deleted
    if shutdown is None:
        return
    shutdown()
    for worker in getattr(batches, "_workers", ()):
        if worker.is_alive():
            worker.kill()
            worker.join()


SIGTERM_GRACE_S = 60  # long enough to deliver the batch a held stop waits for
_sigterms_received: list[int] = []  # in a worker process


def _leave_at_second_sigterm(signum, frame) -> None:
    if _sigterms_received:
        _leave(signum, frame)
    _sigterms_received.append(signum)
    signal.signal(signal.SIGALRM, _leave)
    signal.alarm(SIGTERM_GRACE_S)


def _leave(signum, frame) -> None:
    os._exit(0)  # no cleanup to run in a worker; exit code 0 is not a failure to torch


def collate_skip_bad(batch: Sequence[Sample | SkippedVideo | None]) -> dict[str, Any] | None:
    """Collate samples, dropping skipped ones.

    Tensors are stacked along a new first dimension, ints become a LongTensor and other values
    are gathered in lists. ``"skipped"`` lists the video ids of the dropped samples.

    Returns:
        The batch, or ``None`` when every sample was skipped (those ids are then not reported).
    """
    good = [sample for sample in batch if isinstance(sample, dict)]
    if not good:
        return None
    collated: dict[str, Any] = {key: _stack([sample[key] for sample in good]) for key in good[0]}
    collated["skipped"] = [sample.video_id for sample in batch if isinstance(sample, SkippedVideo)]
    return collated


def _stack(values: list[Any]) -> Any:
    if isinstance(values[0], torch.Tensor):
        return torch.stack(values)
    if isinstance(values[0], int):
        return torch.tensor(values, dtype=torch.long)
    return values


def physical_memory() -> int | None:
    """Bytes of memory this machine has, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows), or no such name
        return None


def check_batch_fits_in_memory(frames: int, image_size: int, batch_size: int) -> None:
    """Refuse a batch whose decoded frames alone (float32) exceed the machine's memory.

    The process would otherwise be killed for memory part-way, with no message (``--frames 100000``).
    """
    needed = batch_size * frames * 3 * image_size * image_size * 4
    available = physical_memory()
    if available is not None and needed > available:
        raise ValueError(
            f"{frames} frames of {image_size}x{image_size} pixels for each of {batch_size} videos take "
            f"{_readable_size(needed)} as one batch, more than this machine's {_readable_size(available)}; "
            "use fewer frames or a smaller batch"
        )


def _readable_size(size: int) -> str:
    return f"{size / 2**30:.0f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"
