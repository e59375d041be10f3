"""Text search over your own videos: embed every video once into an index file, then rank it for any text.

An index is one safetensors file: the L2-normalised video embeddings ``[N, D]`` and, in its metadata,
the video paths, the decoding settings, and a fingerprint of the model that embedded them, so that
queries are always encoded by that same model. A row is a whole video, or with ``segment_s`` one
window of about that many seconds of a video (each window sampled as a whole video would be), so
that a search finds moments in long videos.

Building is incremental: run it again on the same folder and only videos not yet in the index, or
whose file changed since it was embedded (another size or modification time), are decoded. It writes
the index every ``save_every_s`` seconds and when stopped (Ctrl-C included), so an interrupted run
loses at most the batch in flight (with segments, the videos in flight) and the next run carries
on. (By time, not by count: each write is the whole file, and on a GPU hundreds of videos a second
would otherwise mean as many writes.) Videos that cannot be decoded are recorded with the reason and
tried again on the next run. Windows left out of a damaged video are recorded too, and reported by
every later run (without decoding the video again) until its file changes or it leaves the index.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from .data import (
    RetrievalVideos,
    SkippedVideo,
    VideoItem,
    VideoWindows,
    check_batch_fits_in_memory,
    collate_skip_bad,
    loader_batches,
    quiet_worker_init,
)
from .data.video import DECODING_VERSION, check_backend
from .devices import checked_device
from .files import (
    HeldLock,
    LockHeld,
    atomic_file,
    exclusive_lock,
    file_stamp,
    lock_held,
    remove_stale_temporaries,
    write_failed,
)
from .model import TempMe
from .precision import autocast, default_precision
from .progress import progress_bar
from .userwarnings import warn
from .weights import model_fingerprint, safetensors_metadata
from .workers import decoding_workers

# Containers FFmpeg (so PyAV) reads; .m2ts/.mts are AVCHD camera files (MPEG transport streams).
VIDEO_EXTENSIONS = frozenset(
    ".mp4 .m4v .mov .mkv .webm .avi .mpg .mpeg .m2v .vob .wmv .flv .3gp .3g2 .ts .mts .m2ts .ogv".split()
)
INDEX_FORMAT = "tempme-video-index"
# Version 2: an index of video segments. Its header lists each video once ("videos"); which video and
# which time span each row holds are tensors beside the embeddings ("row_video", "spans"), since a
# path repeated for every segment could outgrow the 100 MB that safetensors allows a header. An
# index of whole videos is still written as version 1 (a "paths" list), which older tempme versions read.
INDEX_VERSIONS = (1, 2)
PathLike = str | os.PathLike
# Shorter windows hold too few frames to sample (12 frames from 1 fps candidates already repeat frames).
MIN_SEGMENT_S = 1.0


class VideoIndexError(ValueError):
    """An index file that cannot be read, or that does not fit the model or settings it is used with."""


# What to do about an index this version cannot use: its embeddings cannot be trusted or read, and
# building a new one from the videos is always possible.
_REBUILD = "index the videos again into a new file (tempme index FOLDER ... --out NEW.index)"


def _walk_videos(folder: Path) -> Iterable[Path]:
    """Files with a video extension under ``folder``, following symbolic links to folders.

    A folder is entered once however many links lead to it (by device and inode), so a link to one
    of its own parents ends instead of looping forever. Hidden files and folders are left out.
    """
    seen: set[tuple[int, int]] = set()
    dangling: list[Path] = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        try:
            info = os.stat(root)
        except OSError:  # vanished or unreadable while walking: os.walk skips it too
            dirs[:] = []
            continue
        if (info.st_dev, info.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        for name in files:
            candidate = Path(root) / name
            if name.startswith(".") or candidate.suffix.lower() not in VIDEO_EXTENSIONS:
                continue
            if candidate.is_file():
                if candidate.suffix.lower() == ".ts" and not _transport_stream(candidate):
                    continue  # TypeScript source, most likely: not worth a failed decode on every run
                yield candidate
            elif candidate.is_symlink() and not candidate.exists():
                dangling.append(candidate)
    if dangling:
        shown = ", ".join(str(link) for link in dangling[:3]) + (" ..." if len(dangling) > 3 else "")
        warn(f"{len(dangling)} link(s) to videos in {folder} lead to no file and are passed over: {shown}")


def _transport_stream(path: Path) -> bool:
    """Whether a ``.ts`` file starts as an MPEG transport stream does: the sync byte 0x47 opens its
    first two 188-byte packets (or follows the 4-byte timestamp of 192-byte ones). An empty file, or
    one that cannot be read, counts as one, for decoding to say what is wrong with it."""
    try:
        with open(path, "rb") as file:
            start = file.read(4 + 192 + 1)
    except OSError:
        return True
    sync = 0x47
    return not start or start[0::188][:2] == bytes([sync, sync]) or start[4::192][:2] == bytes([sync, sync])


def _as_paths(paths: PathLike | Iterable[PathLike]) -> list[PathLike]:
    """A list of paths; one path given as a string is one path, not its characters."""
    return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)


def find_videos(
    sources: PathLike | Iterable[PathLike], allow_empty: bool = False, resolve_links: bool = True
) -> list[Path]:
    """The video files among ``sources``, absolute (symbolic links resolved), sorted and without repeats.

    A file is taken as given, whatever its extension; a directory is searched recursively for files
    with one of ``VIDEO_EXTENSIONS`` (any case), following links to folders. Hidden files and folders
    are left out, and so are ``.ts`` files that do not start as an MPEG transport stream (TypeScript).
    Finding none is an error unless ``allow_empty``.

    ``resolve_links=False``: the paths as found, with the links in them left as they are (those inside
    a given folder, and a given file's own), so that a file reached through links appears once per path
    that leads to it; the given folders themselves, and a given file's folder, are resolved.
    :func:`update_index` takes these too: it indexes each file once, under its resolved path, and
    records the links that led to it, so that the video leaves the index when they are removed.
    """
    sources = _as_paths(sources)
    found: set[Path] = set()
    for source in sources:
        path = Path(source).expanduser()
        if path.is_file():
            found.add(path.resolve() if resolve_links else path.parent.resolve() / path.name)
        elif path.is_dir():
            root = path.resolve()
            found.update(candidate.resolve() if resolve_links else root / candidate.relative_to(path)
                         for candidate in _walk_videos(path))
        elif path.exists():
            raise ValueError(f"{source}: not a regular file or folder (a pipe, socket or device?)")
        else:
            raise FileNotFoundError(f"{source}: no such file or directory")
    if not found and not allow_empty:
        shown = ", ".join(str(source) for source in sources)
        raise ValueError(f"no video files in {shown} (looked for {', '.join(sorted(VIDEO_EXTENSIONS))})")
    return sorted(found)


@dataclass(frozen=True)
class SearchHit:
    rank: int  # 1 = best
    path: str
    score: float  # cosine similarity of text and video embeddings
    start: float | None = None  # the segment's span in seconds, in an index of segments
    end: float | None = None


@dataclass
class VideoIndex:
    """Embedded videos. ``embeddings[i]`` (L2-normalised, float32) is the video at ``paths[i]``.

    ``model``: the fingerprint of the model that embedded them (``"fingerprint"``) and how to load it
    again (free-form, e.g. its weights file). ``settings``: how the videos were decoded and encoded
    (frames, framerate, image size, precision); a run that adds videos must use the same.
    ``skipped``: path -> why that video could not be decoded. ``files``: path -> ``[size, mtime_ns]``
    of the file when it was embedded, so that a changed file is embedded again. Indexes written before
    this was recorded lack it (and older tempme versions adding to an index leave it out): a video
    without an entry counts as changed, so it is embedded once more and recorded.
    ``spans``: in an index of segments (``settings["segment_s"]``), ``[start, end]`` in seconds of
    each row, whose path then repeats once per segment; None in an index of whole videos.
    ``links``: path -> the symbolic-link paths it was found through (a linked file, or a file in a
    linked folder), for videos found only that way; the video leaves the index when they are gone
    (see :func:`deleted`). Indexes written before this was recorded lack it.
    ``partial``: in an index of segments, path -> the ``[start, end]`` spans (seconds) of the windows
    left out of that video when it was embedded (fewer than half their frames decode), for the
    videos that have such windows; kept until the video is embedded again or leaves the index.
    Indexes written before this was recorded lack it, and older tempme versions adding to an index
    leave it out: their damaged windows are then not reported until the file changes.
    """

    paths: list[str]
    embeddings: torch.Tensor
    model: dict[str, Any]
    settings: dict[str, Any]
    skipped: dict[str, str] = field(default_factory=dict)
    files: dict[str, list[int]] = field(default_factory=dict)
    spans: list[list[float]] | None = None
    links: dict[str, list[str]] = field(default_factory=dict)
    partial: dict[str, list[list[float]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.embeddings.dim() != 2 or self.embeddings.shape[0] != len(self.paths):
            raise VideoIndexError(
                f"{len(self.paths)} paths but embeddings of shape {tuple(self.embeddings.shape)}"
            )
        if self.spans is not None and len(self.spans) != len(self.paths):
            raise VideoIndexError(f"{len(self.paths)} paths but {len(self.spans)} segment spans")

    @property
    def videos(self) -> int:
        """How many videos the index holds (rows, unless it holds segments)."""
        return len(self.paths) if self.spans is None else len(set(self.paths))

    @property
    def segments(self) -> int | None:
        """How many segments an index of segments holds (its rows); None for one of whole videos."""
        return None if self.spans is None else len(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def save(self, path: PathLike) -> Path:
        """Write the index to ``path`` atomically: a reader sees the old file or the new one."""
        header = {"version": 1, "paths": self.paths}  # whole videos: the format older versions read
        tensors = {"embeddings": self.embeddings.float().contiguous()}
        if self.spans is not None:
            number = {video: i for i, video in enumerate(dict.fromkeys(self.paths))}
            header = {"version": 2, "videos": list(number)}
            tensors["row_video"] = torch.tensor([number[video] for video in self.paths], dtype=torch.int64)
            tensors["spans"] = torch.tensor(self.spans, dtype=torch.float64).reshape(-1, 2)
        indexed = set(self.paths)
        links = {video: paths for video, paths in self.links.items() if video in indexed}
        partial = {video: spans for video, spans in self.partial.items() if video in indexed}
        header.update(model=self.model, settings=self.settings, skipped=self.skipped, files=self.files, links=links,
                      partial=partial)
        metadata = {"format": INDEX_FORMAT, "index": json.dumps(header)}
        with atomic_file(path) as temporary:
            try:
                save_file(tensors, str(temporary), metadata=metadata)
            except SafetensorError as error:  # a full disk, say: its message names no file
                raise write_failed(path, error, then="the index there is as it was before") from None
        return Path(path)

    @classmethod
    def load(cls, path: PathLike) -> "VideoIndex":
        path = Path(path)
        header = read_index_header(path)
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise VideoIndexError(f"{path}: not a tempme video index ({error})") from None
        if "embeddings" not in tensors:
            raise VideoIndexError(f"{path}: not a tempme video index (written by something else)")
        embeddings = tensors["embeddings"]
        if embeddings.dtype != torch.float32 or not bool(embeddings.isfinite().all()):
            raise VideoIndexError(f"{path}: the index is damaged (its embeddings are not all finite float32 numbers); "
                                  f"{_REBUILD}")
        try:
            paths, spans = header.get("paths"), None
            if header["version"] == 2:
                paths, spans = _segment_rows(header["videos"], tensors)
            return cls(
                paths, tensors["embeddings"], header["model"], header["settings"], header["skipped"], header["files"],
                spans, header["links"], header["partial"],
            )
        except VideoIndexError as error:  # e.g. the paths and embeddings disagree in number
            raise VideoIndexError(f"{path}: {error}; {_REBUILD}") from None

    def search(self, text_features: torch.Tensor, k: int = 10, per_video: bool = False) -> list[list[SearchHit]]:
        """The ``k`` best rows (videos, or segments) for each query of ``text_features [Q, D]``, best first.

        ``per_video``: in an index of segments, only the best segment of each video (so ``k`` videos).
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if len(self) == 0:
            return [[] for _ in range(text_features.shape[0])]
        if text_features.dim() != 2 or text_features.shape[1] != self.embeddings.shape[1]:
            raise VideoIndexError(
                f"query features of shape {tuple(text_features.shape)} do not fit this index "
                f"(D={self.embeddings.shape[1]})"
            )
        scores = F.normalize(text_features.float(), dim=-1) @ self.embeddings.T
        if per_video and self.spans is not None:
            return [self._best_per_video(row_scores, k) for row_scores in scores]
        best = scores.topk(min(k, len(self)), dim=1)
        return [
            [self._hit(rank + 1, i, score) for rank, (score, i) in enumerate(zip(row_scores, row_ids))]
            for row_scores, row_ids in zip(best.values.tolist(), best.indices.tolist())
        ]

    def _best_per_video(self, scores: torch.Tensor, k: int) -> list[SearchHit]:
        """The best row of each of the ``k`` best videos, by ``scores [rows]``."""
        hits: list[SearchHit] = []
        seen: set[str] = set()
        order = scores.argsort(descending=True, stable=True)
        for row in order.tolist():  # stops after k videos: a few rows each, not the whole index
            if self.paths[row] not in seen:
                seen.add(self.paths[row])
                hits.append(self._hit(len(hits) + 1, row, scores[row].item()))
                if len(hits) == k:
                    break
        return hits

    def _hit(self, rank: int, row: int, score: float) -> SearchHit:
        span = (None, None) if self.spans is None else self.spans[row]
        return SearchHit(rank, self.paths[row], score, *span)


def _segment_rows(videos: list[str], tensors: dict[str, torch.Tensor]) -> tuple[list[str], list[list[float]]]:
    """The path and ``[start, end]`` of each row of a version-2 index, from its tensors."""
    row_video, spans = tensors.get("row_video"), tensors.get("spans")
    if row_video is None or spans is None:
        raise VideoIndexError("the index has no row_video or spans tensor")
    rows = len(tensors["embeddings"])
    if row_video.shape != (rows,) or spans.shape != (rows, 2):
        raise VideoIndexError(f"{rows} rows but row_video {tuple(row_video.shape)} and spans {tuple(spans.shape)}")
    if row_video.dtype.is_floating_point or row_video.dtype == torch.bool:
        raise VideoIndexError("its row_video tensor does not hold video numbers")
    numbers = row_video.tolist()
    if numbers and not 0 <= min(numbers) <= max(numbers) < len(videos):
        raise VideoIndexError(f"row_video points past the {len(videos)} videos listed")
    if not spans.dtype.is_floating_point or not bool(spans.isfinite().all()):
        raise VideoIndexError("its segment spans are not all finite numbers")
    return [videos[i] for i in numbers], spans.tolist()


def read_index_header(path: PathLike) -> dict[str, Any]:
    """The header of the index at ``path``, checked, without reading its embeddings: ``model``,
    ``settings``, ``skipped``, ``files``, ``links``, ``partial``, and ``paths`` (one per row; version 1)
    or ``videos`` (each once; version 2, an index of segments)."""
    path = Path(path)
    if path.is_dir():
        raise VideoIndexError(f"{path} is a folder, not an index file (`tempme index` writes those)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such index file (build one with `tempme index`)")
    try:
        metadata = safetensors_metadata(path)
    except OSError as error:
        raise VideoIndexError(f"{path}: cannot read the index ({error.strerror or error})") from None
    except ValueError:  # safetensors' own words ("header too large") say nothing to a user here
        raise VideoIndexError(f"{path}: not a tempme video index (not even a safetensors file; "
                              "build one with `tempme index`)") from None
    if metadata.get("format") != INDEX_FORMAT:
        raise VideoIndexError(f"{path}: not a tempme video index (written by something else)")
    try:
        header = json.loads(metadata["index"])
    except (KeyError, ValueError) as error:
        raise VideoIndexError(f"{path}: the index header is damaged ({error})") from None
    if not isinstance(header, dict):
        raise VideoIndexError(f"{path}: the index header is damaged (not a JSON object); {_REBUILD}") from None
    if header.get("version") not in INDEX_VERSIONS:
        raise VideoIndexError(
            f"{path}: index version {header.get('version')!r}; this tempme reads versions "
            f"{', '.join(map(str, INDEX_VERSIONS))}: {_REBUILD}"
        )
    header.setdefault("files", {})  # not recorded by older versions: see VideoIndex
    header.setdefault("links", {})
    header.setdefault("partial", {})
    rows = ("paths", list) if header["version"] == 1 else ("videos", list)
    entries = (rows, ("model", dict), ("settings", dict), ("skipped", dict), ("files", dict), ("links", dict),
               ("partial", dict))
    for key, kind in entries:
        if key not in header:
            raise VideoIndexError(f"{path}: the index header is damaged (no {key!r} entry); {_REBUILD}")
        if not isinstance(header[key], kind):
            shape = "list" if kind is list else "object"
            raise VideoIndexError(f"{path}: the index header is damaged ({key!r} is not a JSON {shape}); {_REBUILD}")
    if not all(isinstance(links, list) and all(isinstance(link, str) for link in links)
               for links in header["links"].values()):
        raise VideoIndexError(f"{path}: the index header is damaged ('links' holds other than lists of paths); {_REBUILD}")
    if not all(_is_span_list(spans) for spans in header["partial"].values()):
        raise VideoIndexError(f"{path}: the index header is damaged ('partial' holds other than lists of "
                              f"[start, end] spans); {_REBUILD}")
    return header


def _is_span_list(spans: Any) -> bool:
    """Whether ``spans`` is a list of ``[start, end]`` pairs of finite numbers (seconds)."""
    def is_time(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    return isinstance(spans, list) and all(
        isinstance(span, list) and len(span) == 2 and all(map(is_time, span)) for span in spans
    )


@dataclass
class IndexUpdate:
    """What one :func:`update_index` call did."""

    added: int  # videos new to the index, embedded by this call
    skipped: dict[str, str]  # path -> reason, for videos of this call that could not be decoded
    removed: list[str]  # indexed videos whose files were deleted (see ``deleted``), dropped from the index
    total: int  # videos in the index afterwards
    # Indexed videos whose file changed (size or modification time), embedded again by this call. One
    # that no longer decodes leaves the index: it is listed in ``skipped`` and in ``dropped`` instead.
    updated: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # indexed videos that changed and no longer decode
    # Videos this call embedded in windows with some left out, as fewer than half of their frames
    # decode (a damaged stretch): the ``[start, end]`` spans (seconds) that search cannot find.
    partial: dict[str, list[list[float]]] = field(default_factory=dict)
    # The same for the indexed videos this call did not embed: spans an earlier call left out, as the
    # index records them (``VideoIndex.partial``; the videos are not decoded again to find them).
    # No video is in both; together they are every indexed video that search cannot find whole.
    partial_earlier: dict[str, list[list[float]]] = field(default_factory=dict)
    segments: int | None = None  # rows of an index of segments afterwards; None for whole videos
    # The ``sources`` that are not there, passed over: a mistyped path, or a folder not there now (an
    # unmounted drive) whose indexed videos stay. Not those whose videos left the index (``prune``; a
    # deleted file given by name): they are in ``removed``.
    missing_sources: list[str] = field(default_factory=list)


def index_settings(
    model: TempMe, framerate: float, precision: str, segment_s: float | None = None, backend: str = "pyav"
) -> dict[str, Any]:
    settings = {
        "frames": model.config.frames,
        "framerate": framerate,
        "image_size": model.visual.image_size,
        "precision": precision,
        "decoding": DECODING_VERSION,  # absent from indexes of tempme 0.1
    }
    if segment_s is not None:  # absent from an index of whole videos, as in those written before segments
        settings["segment_s"] = segment_s
    if backend != "pyav":  # absent for PyAV, as in those written before this was recorded
        settings["backend"] = backend
    return settings


def _setting_text(key: str, value: Any) -> str:
    if key == "segment_s":
        return "whole videos" if value is None else f"segments of {value:.10g} s"
    if key == "backend":
        return f"the {value or 'pyav'} decoder"
    return f"{key}={value!r}"


def open_index(path: PathLike, model_info: dict[str, Any], settings: dict[str, Any], dim: int) -> VideoIndex:
    """The index at ``path`` if it exists and fits this model and these settings, else a new empty one."""
    path = Path(path)
    if not path.exists():
        return VideoIndex([], torch.empty(0, dim), model_info, settings, spans=[] if "segment_s" in settings else None)
    index = VideoIndex.load(path)
    if index.model.get("fingerprint") != model_info["fingerprint"]:
        rewritten = rewritten_weights(index.model, model_info)
        if rewritten:
            raise VideoIndexError(
                f"{path} was built by {rewritten} as they were then; they changed since (other weights were written "
                "there), and embeddings of the old and the new weights cannot be ranked together: write a new "
                "index, or delete this one"
            )
        built_by = {key: value for key, value in index.model.items() if key not in ("fingerprint", "weights_stamps")}
        differing = [f"{key}={model_info[key]!r}" for key in ("method", "frames")
                     if key in model_info and key in built_by and model_info[key] != built_by[key]]
        this_run = f" (this run's model has {', '.join(differing)})" if differing else ""
        raise VideoIndexError(
            f"{path} was built by another model ({json.dumps(built_by)}){this_run}; "
            "embeddings of two models cannot be ranked together: write a new index or delete this one"
        )
    keys = dict.fromkeys([*settings, *index.settings])
    if "decoding" not in index.settings:
        del keys["decoding"]  # embeddings of tempme 0.1's decoding: the same but for rotated videos
        warn(f"{path} was built by tempme 0.1, which read videos stored with a rotation (portrait phone videos) "
             "sideways: touch such files to have them embedded again, or build a new index (which ends this warning)")
    check_same_settings(path, index.settings, settings, keys)
    return index


def weights_stamps(model_info: Mapping[str, Any]) -> dict[str, list[int]]:
    """:func:`file_stamp` of each file or folder ``model_info`` loads its model from (``checkpoint``,
    ``weights``): recorded in an index, they tell weights written over since from a model that
    differs otherwise (another tempme, another schedule). Presets, named not by path, have none."""
    sources = (model_info.get(key) for key in ("checkpoint", "weights"))
    return {source: stamp for source in sources if source and (stamp := file_stamp(source)) is not None}


def rewritten_weights(recorded: Mapping[str, Any], model_info: Mapping[str, Any]) -> str | None:
    """``"the weights at PATH"`` (a checkpoint's base weights named too) when the model described by
    ``model_info`` was loaded from the very files, and as the very method and frames, that the model
    an index ``recorded`` was, and those files changed since the index recorded their
    :func:`weights_stamps`: if the fingerprints differ, other weights were written there. None
    otherwise (other files, a preset, another method or frame count, files as they were, or an index
    that recorded no stamps: then something else differs, which the caller's message covers)."""
    source = model_info.get("checkpoint") or model_info.get("weights")
    if not source or not Path(source).exists():
        return None
    if any(model_info.get(key) != recorded.get(key) for key in ("weights", "checkpoint")):
        return None
    if any(key in model_info and key in recorded and model_info[key] != recorded[key] for key in ("method", "frames")):
        return None
    stamps = recorded.get("weights_stamps")
    if not stamps or stamps == weights_stamps(model_info):
        return None
    if model_info.get("checkpoint") and model_info.get("weights"):
        return f"the weights at {source} (on the base weights at {model_info['weights']})"
    return f"the weights at {source}"


def check_same_settings(path: PathLike, recorded: dict[str, Any], settings: dict[str, Any], keys: Iterable[str]) -> None:
    """Raise VideoIndexError naming the first of ``keys`` whose value in ``settings`` differs from the
    index's ``recorded`` one (an absent ``segment_s`` is whole videos). Callers that know some settings
    before the model loads check those then."""
    for key in keys:
        if recorded.get(key) != settings.get(key):
            raise VideoIndexError(
                f"{path} was built with {_setting_text(key, recorded.get(key))}, this run has "
                f"{_setting_text(key, settings.get(key))}; use the same setting or write a new index"
            )


def deleted(
    video: str, sources: Sequence[PathLike] | None = None, prune: bool = False, absent: Iterable[Path] = ()
) -> bool:
    """Whether an indexed video's file was deleted, so that it leaves the index.

    ``prune``: every missing file counts as deleted, wherever it was (a folder moved or removed for
    good). Otherwise:

    ``sources``: the files and folders this run was given (``tempme index FOLDER ...``). A missing
    video inside a source folder that exists was deleted, however deep: a deleted subfolder takes its
    videos with it. A missing source folder may be a drive that is not mounted now: its videos stay
    in the index rather than be dropped and embedded all over again. So do those of the folders in
    ``absent`` (resolved), which exist but hold no video now: an unmounted drive often leaves its
    mount point behind as an empty folder (see :func:`absent_sources`).

    Videos outside every source folder (indexed by an earlier run from other folders, or reached
    through a symlinked subfolder: indexed paths are resolved), and all videos when ``sources`` is
    None, only go when the file is gone but its own folder is there, as a missing folder there may
    equally be an unmounted drive. A video found only through symbolic links (``VideoIndex.links``)
    also goes, while its file is there, once this run did not find it and every link that led to it
    is deleted by these rules or leads elsewhere now (see :func:`_drop_deleted_videos`).
    """
    path = Path(video)
    if path.exists():
        return False
    if prune:
        return True
    for source in sources or ():
        # Indexed paths are resolved (find_videos resolves links), so the source must be too.
        root = Path(source).expanduser().resolve()
        if path.is_relative_to(root) and root != path:
            return root.is_dir() and root not in absent  # a folder not there (now) keeps its videos
    return path.parent.is_dir()


def absent_sources(
    index: VideoIndex, sources: Sequence[PathLike], videos: Sequence[PathLike], prune: bool
) -> tuple[set[Path], list[str]]:
    """The source folders, resolved, that hold videos of ``index`` but where this run found none
    (``videos``, as found and resolved): missing, or empty now. Their videos stay (see :func:`deleted`), each such folder
    warned about, unless ``prune`` (none then: their videos leave the index as deleted). A missing
    source that nothing in the index came from (a mistyped path?) is warned about too. Second: the
    sources passed over as missing, as given (``IndexUpdate.missing_sources``)."""
    found = [Path(video) for video in videos]
    videos_indexed = set(index.paths) | {link for links in index.links.values() for link in links}
    absent, missing = set(), []
    for source in sources:
        root = Path(source).expanduser().resolve()
        indexed = sum(1 for video in dict.fromkeys(index.paths)
                      if any(_within(Path(path), root) for path in [video, *index.links.get(video, [])]))
        if not indexed and not root.exists() and str(root) not in videos_indexed:  # (a deleted file given by name is)
            warn(f"{source}: no such file or folder, passed over (nothing in the index came from it)")
            missing.append(str(source))
            continue
        if prune or not indexed or any(video.is_relative_to(root) for video in found):
            continue  # pruned, or a deleted file given by name: reported as deleted, not warned about
        why = "holds no videos now (an empty mount point?)" if root.is_dir() else "is not there (now)"
        warn(f"{source} {why}: the {indexed} video(s) indexed from it stay in the index "
             "(--prune drops them)")
        absent.add(root)
        if not root.exists():
            missing.append(str(source))
    return absent, missing


@dataclass(frozen=True)
class IndexOptions:
    """How the videos of an index are read and embedded (see :func:`update_index`)."""

    framerate: float
    segment_s: float | None  # None: whole videos
    backend: str
    precision: str | None  # None: the device's default (``default_precision``: bf16 on a GPU, fp32 on a CPU)

    @classmethod
    def resolve(
        cls,
        recorded: Mapping[str, Any],
        *,
        framerate: float | None = None,
        segment_s: float | None = None,
        backend: str | None = None,
        precision: str | None = None,
    ) -> "IndexOptions":
        """The options given, and for those left None the ``recorded`` ones (an index header's
        ``settings``; empty for a new index), else the defaults: 1 frame per second, whole videos,
        PyAV, the device's precision."""
        return cls(
            framerate=recorded.get("framerate", 1.0) if framerate is None else framerate,
            segment_s=recorded.get("segment_s") if segment_s is None else segment_s,
            backend=recorded.get("backend", "pyav") if backend is None else backend,
            precision=recorded.get("precision") if precision is None else precision,
        )


def resolve_index_options(
    path: PathLike,
    *,
    framerate: float | None = None,
    segment_s: float | None = None,
    backend: str | None = None,
    precision: str | None = None,
) -> IndexOptions:
    """The options given, and for those left None the index's own where ``path`` holds one (so that
    updating an index needs no more options than building it did), else the defaults (see
    :meth:`IndexOptions.resolve`). Reads the index's header only."""
    path = Path(path).expanduser()
    recorded = read_index_header(path)["settings"] if path.is_file() else {}
    return IndexOptions.resolve(recorded, framerate=framerate, segment_s=segment_s, backend=backend,
                                precision=precision)


def check_index_options(
    *,
    batch_size: int,
    framerate: float,
    num_workers: int,
    save_every_s: float,
    segment_s: float | None = None,
    backend: str = "pyav",
    names: Mapping[str, str] | None = None,
) -> None:
    """Refuse settings :func:`update_index` cannot work with, raising ValueError (an unknown video
    backend, or one not installed, too).

    ``names``: what to call each setting in the message, by keyword (e.g. ``{"batch_size":
    "--batch-size"}``), so that a command can check its options before loading a model; settings not
    in it are called by their keyword.
    """
    def name(keyword: str) -> str:
        return (names or {}).get(keyword, keyword)

    if batch_size < 1:
        raise ValueError(f"{name('batch_size')} must be at least 1, got {batch_size}")
    if not save_every_s >= 0:  # nan included
        raise ValueError(f"{name('save_every_s')} must be a number >= 0, got {save_every_s}")
    if not 0 < framerate < math.inf:
        raise ValueError(f"{name('framerate')} must be a positive number, got {framerate}")
    if num_workers < 0:
        raise ValueError(f"{name('num_workers')} must not be negative, got {num_workers}")
    if segment_s is not None and not MIN_SEGMENT_S <= segment_s < math.inf:
        raise ValueError(f"{name('segment_s')} must be at least {MIN_SEGMENT_S:g} second(s), got {segment_s}")
    check_backend(backend)


def _drop_videos(index: VideoIndex, videos: set[str]) -> None:
    """Take ``videos`` out of ``index``: their rows, paths, file stamps, links and damaged windows. The
    other rows keep their order."""
    if not videos:
        return
    _drop_rows(index, {row for row, video in enumerate(index.paths) if video in videos})
    for video in videos:
        index.files.pop(video, None)
        index.links.pop(video, None)
        index.partial.pop(video, None)


def _drop_rows(index: VideoIndex, rows: set[int]) -> None:
    """Take the rows numbered ``rows`` out of ``index``; the others keep their order."""
    if not rows:
        return
    keep = [row for row in range(len(index.paths)) if row not in rows]
    index.paths = [index.paths[row] for row in keep]
    index.embeddings = index.embeddings[keep]
    if index.spans is not None:
        index.spans = [index.spans[row] for row in keep]


def _within(path: Path, root: Path) -> bool:
    return path.is_relative_to(root) and path != root


def _link_gone(link: str, video: str, sources: Sequence[PathLike] | None, prune: bool, absent: set[Path]) -> bool:
    """Whether the symbolic-link path ``link`` that led to ``video`` no longer does: it leads elsewhere
    now, or it is missing and counts as deleted (:func:`deleted`, whose rules apply to it as to a video:
    link paths lie under resolved source folders, as indexed paths do)."""
    path = Path(link)
    if path.exists():
        return path.resolve() != Path(video)
    return deleted(link, sources, prune, absent)


def _drop_deleted_videos(
    index: VideoIndex, sources: Sequence[PathLike] | None, prune: bool, absent: set[Path], found: set[str]
) -> list[str]:
    """Take the videos whose files were deleted (see :func:`deleted`) out of ``index``, and those found
    only through links that are all gone (``_link_gone``) while this run did not find them (``found``:
    resolved paths); returns their paths, in index order. Missing videos that stay (their folder is
    missing too) are warned about, but for those under the ``absent`` sources, which were."""
    removed, kept = [], 0
    for video in dict.fromkeys(index.paths):
        if Path(video).exists():  # looked at once here: most videos are there
            links = index.links.get(video)
            if links and video not in found and all(_link_gone(link, video, sources, prune, absent) for link in links):
                removed.append(video)
            continue
        if deleted(video, sources, prune, absent):
            removed.append(video)
        elif not any(Path(video).is_relative_to(root) for root in absent):
            kept += 1
    if kept:
        warn(
            f"{kept} indexed video(s) are missing and stay in the index, as their folders are missing too (a "
            "drive not mounted, or the target of a linked folder; --prune drops them)"
        )
    _drop_videos(index, set(removed))
    return removed


def found_through_links(videos: Sequence[PathLike]) -> dict[str, list[str]]:
    """Resolved path -> the paths among ``videos`` (as given, made absolute) that are symbolic links
    to it or lie in linked folders; an empty list for a video also given by a path without links."""
    links: dict[str, set[str]] = {}  # in the given order
    direct: set[str] = set()
    for video in videos:
        given = Path(video).expanduser().absolute()
        resolved = str(given.resolve())
        through = links.setdefault(resolved, set())
        if os.path.normpath(given) == resolved:  # no link on the way ("..", if any, aside)
            direct.add(resolved)
        else:
            through.add(str(given))
    return {video: [] if video in direct else sorted(through) for video, through in links.items()}


def _videos_to_embed(
    index: VideoIndex, videos: Sequence[PathLike]
) -> tuple[list[Path], list[str], dict[str, list[int] | None]]:
    """``(new, changed, stamps)``: what this run embeds, and the file stamps to record once it has.

    ``new``: the ``videos`` not in ``index``, resolved, without repeats, in the given order.
    ``changed``: indexed videos whose file's ``[size, mtime_ns]`` differs from the one recorded when
    they were embedded (or none was recorded), in index order. ``stamps``: path -> :func:`file_stamp`
    of every indexed and new video (None: the file cannot be looked at now).
    """
    # Stamped before decoding: a file that changes while it is decoded is seen as changed next run.
    stamps = {video: file_stamp(video) for video in dict.fromkeys(index.paths)}
    # A file that cannot be looked at now (stamp None: e.g. an unmounted drive) keeps its embedding.
    changed = [video for video, stamp in stamps.items() if stamp is not None and index.files.get(video) != stamp]
    indexed = set(stamps)
    new = [video for video in dict.fromkeys(Path(v).resolve() for v in videos) if str(video) not in indexed]
    stamps.update({str(video): file_stamp(video) for video in new})
    return new, changed, stamps


class _PendingResults:
    """The results of the batches run since the index was last written, until :meth:`apply_to` puts
    them in it: embeddings of new and changed videos, and changed videos that no longer decode.

    A video goes into the index once all its rows are embedded (one, or one per segment), with its
    file stamp and the windows left out of it: a run interrupted before that leaves the video looking
    changed (or new), and the next run embeds it again.
    """

    def __init__(self, stamps: dict[str, list[int] | None]) -> None:
        self.stamps = stamps  # path -> [size, mtime_ns] taken before decoding (see _videos_to_embed)
        # path -> ([start, end] or None, [D] L2-normalised float32 CPU embedding) of each row embedded
        self.rows: dict[str, list[tuple[list[float] | None, torch.Tensor]]] = {}
        self.complete: list[str] = []  # videos whose every row is embedded, not yet in the index
        self.left_out: dict[str, list[list[float]]] = {}  # of complete videos: their windows that did not decode
        self.failed: set[str] = set()  # videos that did not decode: windows of theirs still in flight are dropped
        self.indexed_to_drop: list[str] = []  # indexed videos that no longer decode (see add_failed)

    def add_embedded(
        self, paths: Sequence[str], spans: Sequence[list[float] | None], last: Sequence[bool], embeddings: torch.Tensor,
        left_out: Mapping[str, list[list[float]]],
    ) -> list[str]:
        """Keep ``embeddings [len(paths), D]``: row ``i`` is that of the window ``spans[i]`` (None: the
        whole video) of ``paths[i]``, its video's final row where ``last[i]``. A video's rows come in
        order. ``left_out``: the spans of windows that did not decode, of the videos that have some
        and whose final row is here. Returns the videos this completes, in order."""
        completed = []
        for path, span, final, embedding in zip(paths, spans, last, embeddings):
            self.rows.setdefault(path, []).append((span, embedding))
            if final:
                self.complete.append(path)
                self.left_out[path] = left_out.get(path, [])
                completed.append(path)
        return completed

    def add_failed(self, path: str, indexed: bool) -> None:
        """A video that did not decode (maybe after some of its windows did): none of its rows go into
        the index, and if it is ``indexed`` (its file changed), its old rows, embeddings of what the file
        used to hold, go."""
        self.failed.add(path)
        self.rows.pop(path, None)
        if indexed:
            self.indexed_to_drop.append(path)

    def apply_to(self, index: VideoIndex) -> None:
        """Write the pending results of complete videos into ``index``, then forget them.

        An indexed (changed) video's new rows replace its old ones in place when they are as many, so
        the order stays as it was; otherwise, as a new video's, they are appended. Its windows left out
        before are forgotten, and those left out now recorded. Undecodable videos leave the index.
        """
        if not (self.complete or self.indexed_to_drop):
            return
        embeddings = index.embeddings.clone()
        spans = None if index.spans is None else list(index.spans)
        rows_of: dict[str, list[int]] = {}
        for row, video in enumerate(index.paths):
            rows_of.setdefault(video, []).append(row)
        dropped: set[int] = set()
        appended: list[tuple[str, list[float] | None, torch.Tensor]] = []
        for video in self.complete:
            fresh = self.rows.pop(video)
            old = rows_of.get(video, [])
            if len(old) == len(fresh):
                for row, (span, embedding) in zip(old, fresh):
                    embeddings[row] = embedding
                    if spans is not None:
                        spans[row] = span
            else:
                dropped.update(old)
                appended.extend((video, span, embedding) for span, embedding in fresh)
            index.files[video] = self.stamps[video]
            _record_left_out(index, video, self.left_out.pop(video))
        for video in self.indexed_to_drop:
            dropped.update(rows_of.get(video, []))
            index.files.pop(video, None)
            index.partial.pop(video, None)
        index.embeddings, index.spans = embeddings, spans
        _drop_rows(index, dropped)
        if appended:
            index.paths = index.paths + [video for video, _, _ in appended]
            index.embeddings = torch.cat([index.embeddings, torch.stack([e for _, _, e in appended])])
            if index.spans is not None:
                index.spans = index.spans + [span for _, span, _ in appended]
        self.complete, self.indexed_to_drop = [], []


def _record_left_out(index: VideoIndex, video: str, spans: list[list[float]]) -> None:
    """Record in ``index`` the windows of ``video`` left out as it was just embedded (none: it has no
    record, so that a clean file's earlier damage is not reported again)."""
    if spans:
        index.partial[video] = spans
    else:
        index.partial.pop(video, None)


def check_index_free(path: PathLike) -> None:
    """Raise VideoIndexError now if another process is updating the index at ``path``: for a command
    that has a model to load first. Creates nothing. (``update_index`` locks it for its own work.)"""
    if lock_held(path):
        raise _busy(path)


@contextmanager
def _index_lock(path: PathLike) -> Iterator[HeldLock | None]:
    if Path(path).is_dir():  # refused before a lock file is made beside it
        raise VideoIndexError(f"{path} is a folder; name the index file to write (e.g. {Path(path) / 'videos.index'})")
    try:
        with exclusive_lock(path) as lock:
            yield lock
    except LockHeld:
        raise _busy(path) from None


def _index_worker_init(lock: HeldLock | None, worker_id: int) -> None:
    quiet_worker_init(worker_id)
    if lock is not None:
        lock.release_in_child()


def _busy(path: PathLike) -> VideoIndexError:
    return VideoIndexError(
        f"{path} is being updated by another process (another `tempme index` run?); run this again once it "
        "has finished"
    )


@torch.no_grad()  # a trainable model (as load_model gives it) would record a graph
def _embed_batch(model: TempMe, batch: dict[str, Any], device: torch.device, precision: str) -> torch.Tensor:
    """``[B, D]`` L2-normalised float32 embeddings, on the CPU, of a batch from ``collate_skip_bad``."""
    with autocast(device, precision):
        features = model.encode_video(batch["video"].to(device), batch["video_mask"].to(device))
    return F.normalize(features.float(), dim=-1).cpu()


def _reconcile_files(
    index: VideoIndex, videos: list[Path], sources: list[Path] | None, prune: bool
) -> tuple[list[str], bool, list[str]]:
    """Bring ``index`` up to date with the files as they are, before anything is embedded: drop the
    videos deleted (see :func:`deleted`), and record the links that lead to each video found.
    Returns the videos dropped, whether the links of an indexed video changed, and the sources
    passed over as missing (:func:`absent_sources`)."""
    found = found_through_links(videos)
    absent, missing = absent_sources(index, sources or (), [*videos, *found], prune)  # links as found, and resolved
    removed = _drop_deleted_videos(index, sources, prune, absent, set(found))
    links_before = dict(index.links)
    for video, links in found.items():  # saved with the videos that are in the index
        if links:
            index.links[video] = links
        else:
            index.links.pop(video, None)
    relinked = any(index.links.get(video) != links_before.get(video) for video in index.paths)
    return removed, relinked, missing


def _video_samples(
    videos: list[Path], settings: dict[str, Any], segment_s: float | None, framerate: float, backend: str
) -> RetrievalVideos | VideoWindows:
    """The samples to embed: one per video, or one per window of each (``segment_s``). Undecodable
    videos come as ``SkippedVideo`` and are reported in the result, not warned about; one damaged
    stretch does not leave a user's video out (``around_damage``)."""
    if segment_s is None:
        items = [VideoItem(str(video), video) for video in videos]  # the id is the path: it names skipped videos
        return RetrievalVideos(items, settings["frames"], framerate, settings["image_size"], backend=backend,
                               warn_skipped=False, around_damage=True)
    return VideoWindows(videos, segment_s, settings["frames"], framerate, settings["image_size"], backend,
                        warn_skipped=False, around_damage=True)


def _worker_tasks(dataset: RetrievalVideos | VideoWindows, batch_size: int) -> int:
    """What the loader's workers share out, one at a time: whole videos, each with all its windows
    (``VideoWindows``), else batches."""
    if isinstance(dataset, VideoWindows):
        return len(dataset.videos)
    return math.ceil(len(dataset) / batch_size)


class _BatchTaker:
    """What :func:`update_index` does with each batch of samples: records its undecodable videos and
    embeds the rest, into ``pending`` (a video joins the index once all its samples, its windows,
    are embedded), counting both in ``update`` (windows left out as damaged too) and beside the
    progress bar."""

    def __init__(self, model: TempMe, index: VideoIndex, update: IndexUpdate, pending: _PendingResults,
                 changed: set[str], device: torch.device, precision: str):
        self.model, self.index, self.update, self.pending = model, index, update, pending
        self.changed, self.device, self.precision = changed, device, precision
        self.shown: dict[str, int] = {}  # beside the bar

    def take(self, samples: list, bar) -> None:
        failed = [sample for sample in samples if isinstance(sample, SkippedVideo)]
        for sample in failed:
            self._record_undecodable(sample, bar)
        # Windows of a video that failed later in this batch: not worth encoding.
        batch = collate_skip_bad(
            [s for s in samples if not isinstance(s, SkippedVideo) and s["video_id"] not in self.pending.failed]
        )
        if batch is not None:
            self._embed(batch, bar)
        if failed:
            self.shown["undecodable"] = len(self.update.skipped)
        bar.set_postfix(self.shown, refresh=False)
        bar.update(0)  # redraws the counts at the bar's own pace, within a long video too

    def _record_undecodable(self, sample: SkippedVideo, bar) -> None:
        video = sample.video_id
        self.index.skipped[video] = self.update.skipped[video] = sample.reason
        self.pending.add_failed(video, indexed=video in self.changed)
        if video in self.changed:
            self.update.dropped.append(video)
        bar.update(1)

    def _embed(self, batch: dict[str, Any], bar) -> None:
        left_out: dict[str, list[list[float]]] = {}  # of the videos whose last window is here
        if "start" not in batch:  # whole videos (only windows carry their times)
            spans, last = [None] * len(batch["video_id"]), [True] * len(batch["video_id"])
        else:  # the bar counts whole videos: show the windows too
            spans = [list(span) for span in zip(batch["start"], batch["end"])]
            last = batch["final"].bool().tolist()
            self.shown["windows"] = self.shown.get("windows", 0) + len(spans)
            left_out = {video: lost for video, lost, final in zip(batch["video_id"], batch["left_out"], last)
                        if final and lost}
        embeddings = _embed_batch(self.model, batch, self.device, self.precision)
        for video in self.pending.add_embedded(batch["video_id"], spans, last, embeddings, left_out):
            if video in left_out:
                self.update.partial[video] = left_out[video]
            if video in self.changed:
                self.update.updated.append(video)
            else:
                self.update.added += 1
            bar.update(1)


def update_index(
    model: TempMe,
    videos: PathLike | Sequence[PathLike],
    path: PathLike,
    *,
    fingerprint: str | None = None,
    model_info: dict[str, Any] | None = None,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    precision: str | None = None,
    framerate: float | None = None,
    num_workers: int = 0,
    backend: str | None = None,
    save_every_s: float = 60.0,
    progress: bool = True,
    sources: PathLike | Sequence[PathLike] | None = None,
    prune: bool = False,
    segment_s: float | None = None,
) -> IndexUpdate:
    """Embed the ``videos`` not yet in the index at ``path`` (created if missing) and save it.

    Indexed videos whose file changed since they were embedded (another size or modification time,
    or none recorded: an index written by an older tempme) are embedded again, whether or not they are
    among ``videos``: the index must not rank a file by what it used to hold. Indexed videos whose
    file was deleted are dropped (see :func:`deleted`). Undecodable videos are reported in the
    result's ``skipped`` (and recorded in the index, to be tried again next time), not warned about.

    Args:
        model: encodes the videos, as it is (``optimize_for_inference`` first makes it faster).
        fingerprint: :func:`model_fingerprint` of the model as loaded; computed from ``model`` when
            None (refused if the model was optimised since: its weights changed).
        model_info: how to load the model again for queries (stored in the index): ``weights`` (a file
            or preset, as ``tempme.load_model`` takes it) or ``checkpoint`` (a ``tempme train`` run).
            The method and frame count are recorded from ``model``, and the files' :func:`weights_stamps`
            (which tell weights written over since). Without it, ``tempme search`` needs
            ``--weights`` or ``--checkpoint`` to find the model.
        precision, framerate, backend, segment_s: left None, the index's own when it exists, else the
            defaults (see :func:`resolve_index_options`); given, they must be the index's. Precision
            is ``fp32``, ``bf16`` or ``fp16`` autocast.
        num_workers: decoding processes, at most one per available CPU and per batch (with
            ``segment_s``, per video) to decode (see ``decoding_workers``).
        save_every_s: write the index when this many seconds have passed since it was last written.
        sources: the folders (and files) ``videos`` were found in, as given to :func:`find_videos`;
            they decide which missing videos were deleted (see :func:`deleted`).
        prune: drop every indexed video whose file is missing, wherever it was (see :func:`deleted`).
        segment_s: embed windows of about this many seconds (at least 1; see ``plan_windows``) of each
            video, each sampled as a whole video would be, instead of whole videos: search then finds
            moments in long videos. An index holds whole videos or windows of one length, as it was built.
    """
    path = Path(path).expanduser()
    options = resolve_index_options(path, framerate=framerate, segment_s=segment_s, backend=backend,
                                    precision=precision)
    framerate, segment_s, backend = options.framerate, options.segment_s, options.backend
    check_index_options(batch_size=batch_size, framerate=framerate, num_workers=num_workers,
                        save_every_s=save_every_s, segment_s=segment_s, backend=backend)
    videos, sources = _as_paths(videos), None if sources is None else _as_paths(sources)
    folders = [video for video in videos if Path(video).expanduser().is_dir()]
    if folders:
        raise ValueError(f"{folders[0]} is a folder: update_index takes video files (find_videos lists a folder's)")
    if fingerprint is None and model.weights_folded:
        raise ValueError(
            "the model was optimised (optimize_for_inference or fold_lora), which changes its weights' "
            "fingerprint: take fingerprint=model_fingerprint(model) before optimising and pass it, so that "
            "`tempme search` can tell the weights it loads are these"
        )
    device = checked_device(device)
    precision = options.precision or default_precision(device)
    autocast(device, precision)  # refuses an unknown precision before any work
    model_info = {
        **(model_info or {}),
        "method": model.config.merge.method,  # what the model is, whatever the caller passed
        "frames": model.config.frames,
        "fingerprint": fingerprint or model_fingerprint(model),
    }
    settings = index_settings(model, framerate, precision, segment_s, backend)
    # Two runs on one index would each write what they embedded over the other's: the second waits
    # for no one and stops at once.
    with _index_lock(path) as lock:
        if lock is not None:  # what a killed run left: no one else writes the index while this run holds the lock
            remove_stale_temporaries(path)
        index = open_index(path, model_info, settings, model.config.clip.embed_dim)
        if not {"weights", "checkpoint"} & model_info.keys():  # not said this time: still what the index says
            model_info = {**{key: index.model[key] for key in ("weights", "checkpoint") if key in index.model},
                          **model_info}
        model_info["weights_stamps"] = weights_stamps(model_info)
        # The same weights (the fingerprint matched); the way to load them may have changed (a moved file).
        relocated = index.model != model_info
        index.model = model_info

        removed, relinked, missing = _reconcile_files(index, videos, sources, prune)
        new, changed, stamps = _videos_to_embed(index, videos)
        todo = new + [Path(video) for video in changed]
        retried = {str(video) for video in todo}
        # A deleted video's reason goes with it; a retried video's is recorded again below if it still fails.
        index.skipped = {
            video: reason for video, reason in index.skipped.items() if Path(video).exists() and video not in retried
        }
        # Windows an earlier run left out of videos this run does not read again: the index still lacks them.
        earlier = {video: spans for video, spans in index.partial.items() if video not in retried}
        update = IndexUpdate(added=0, skipped={}, removed=removed, total=index.videos, segments=index.segments,
                             partial_earlier=earlier, missing_sources=missing)
        if not todo:
            if removed or relocated or relinked:
                index.save(path)
            return update

        # A batch of whole videos holds at most those to embed; one of windows, batch_size of them all
        # the same, as a video's windows are known only once it is opened.
        most = batch_size if segment_s is not None else min(batch_size, len(todo))
        check_batch_fits_in_memory(settings["frames"], settings["image_size"], most)
        pending = _PendingResults(stamps)
        dataset = _video_samples(todo, settings, segment_s, framerate, backend)
        workers = decoding_workers(num_workers, _worker_tasks(dataset, batch_size))
        loader = DataLoader(
            dataset, batch_size=batch_size, num_workers=workers, collate_fn=list,
            worker_init_fn=functools.partial(_index_worker_init, lock)
        )
        model.eval().to(device)
        batches_taken = _BatchTaker(model, index, update, pending, set(changed), device, precision)
        last_save = time.monotonic()
        # Workers stop once the index is saved: a second Ctrl-C while they stop loses nothing.
        with loader_batches(loader) as batches:
            try:
                # miniters=0: a bar of whole videos still redraws the window counts within a long one.
                with progress_bar(total=len(todo), desc="indexing videos", unit="video", disable=not progress,
                                  miniters=0) as bar:
                    for samples in batches:
                        batches_taken.take(samples, bar)
                        if time.monotonic() - last_save >= save_every_s:
                            pending.apply_to(index)
                            index.save(path)
                            last_save = time.monotonic()
            finally:
                # Also on Ctrl-C or an error: every finished video is kept, and the next run carries on.
                # A new index with nothing in it is not written: its settings would bind the next run.
                pending.apply_to(index)
                if index.paths or index.skipped or path.exists():
                    index.save(path)
        update.total, update.segments = index.videos, index.segments
        return update


def encode_texts(
    model: TempMe, texts: Sequence[str], device: torch.device | str = "cpu", batch_size: int = 256,
    precision: str = "fp32", progress: bool = False, desc: str = "encoding texts",
) -> torch.Tensor:
    """``[N, D]`` float32 text features of ``texts``, ``batch_size`` at a time (the model's ``max_words``)."""
    device = torch.device(device)
    chunks = []
    with torch.no_grad():
        for start in progress_bar(range(0, len(texts), batch_size), desc=desc, disable=not progress):
            ids, mask = model.tokenize(list(texts[start : start + batch_size]))
            with autocast(device, precision):
                chunks.append(model.encode_text(ids.to(device), mask.to(device)).float().cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0, model.config.clip.embed_dim)


def encode_queries(
    model: TempMe, queries: str | Sequence[str], device: torch.device | str = "cpu", batch_size: int = 256
) -> torch.Tensor:
    """``[Q, D]`` float32 text features of ``queries`` (one text: ``Q = 1``). Puts ``model`` in eval
    mode on ``device``."""
    if isinstance(queries, str):
        queries = [queries]  # not one query per character
    if not queries:
        raise ValueError("no query to encode")
    for number, query in enumerate(queries, 1):
        if not isinstance(query, str) or not query.strip():
            which = f"query {number} of {len(queries)}" if len(queries) > 1 else "the query"
            raise ValueError(f"every query must be a non-empty text; {which} is {query!r}")
    model.eval().to(device)
    return encode_texts(model, queries, device, batch_size)
