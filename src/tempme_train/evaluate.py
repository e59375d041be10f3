"""Retrieval evaluation: embed every caption and video once, then rank (SPEC section 8).

A video may have several captions (MSRVTT training videos have 20); text-to-video ranks all videos for
each caption, video-to-text counts the best-ranked of the video's captions. Videos that cannot be
decoded are left out together with their captions, and listed in the result.

Under torchrun every process embeds its share of the captions and videos (every W-th, see
``distributed.share``) and all of them end with the whole set, so validating during a multi-GPU run,
or ``tempme eval`` on several GPUs, splits the work W ways.

Embeddings can be cached on disk: the file name is a hash of the model's weights and config, of the
evaluated data (ids, captions, and each video file's path, size and modification time) and of the
settings that turn files into frames, so a cached file is reused only for exactly the same model,
split and video files. While the videos are embedded, those done so far are written beside it every
minute and when the run stops (a ``.partial`` file per process), so that an interrupted evaluation
carries on where it stopped.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Subset

from tempme import TempMe
from tempme.data import (
    FrameCache,
    RetrievalVideos,
    VideoItem,
    collate_skip_bad,
    flatten_captions,
    loader_batches,
    quiet_worker_init,
)
from tempme.data.cache import file_state
from tempme.data.video import DECODING_VERSION
from tempme.files import atomic_file
from tempme.precision import autocast
from tempme.progress import progress_bar
from tempme.retrieval import similarity, text_to_video_metrics, video_to_text_metrics
from tempme.search import encode_texts
from tempme.userwarnings import warn
from tempme.weights import model_fingerprint
from tempme.workers import decoding_workers

from .config import DataSettings
from .distributed import (
    all_gather_objects,
    failures_shared,
    is_main_process,
    rank_and_size,
    share,
    sum_over_processes,
)


@dataclass
class EvalSet:
    """The videos and captions of one split.

    ``videos[i]`` is ``{"video": [F, 3, S, S], "video_mask": [F], "index": i, ...}`` for video
    ``video_ids[i]``; caption ``j`` describes video ``caption_to_video[j]``. ``name``,
    ``fingerprint`` (the preprocessing settings) and ``items`` (the video files and sampling
    windows; empty when the videos are not read from files) enter the embedding-cache key.
    """

    name: str
    videos: Dataset
    video_ids: list[str]
    captions: list[str]
    caption_to_video: list[int]
    fingerprint: str = ""
    items: list[VideoItem] = field(default_factory=list)

    @classmethod
    def from_items(
        cls, items: Sequence[VideoItem], data: DataSettings, name: str, frame_cache: FrameCache | None = None
    ) -> "EvalSet":
        """Decode ``items`` with the config's sampling and test-time transform (no augmentation)."""
        videos = RetrievalVideos(
            items, data.max_frames, data.framerate, data.image_size,
            frame_cache=frame_cache, backend=data.backend, strict=data.strict,
        )
        captions, caption_to_video = flatten_captions(items)
        # Everything besides the files that changes what comes out: the decoder, where frames come
        # from (a frame cache stores resized frames), and strict mode (which raises where a
        # non-strict run skips: a cached result with skipped videos must not stand in for it).
        cache = str(frame_cache.folder.resolve()) if frame_cache is not None else "none"
        fingerprint = (
            f"frames={data.max_frames} rate={data.framerate} size={data.image_size} words={data.max_words} "
            f"backend={data.backend} strict={data.strict} frame_cache={cache}"
        )
        ids = [item.video_id for item in items]
        return cls(name, videos, ids, captions, caption_to_video, fingerprint, list(items))


@dataclass
class Embeddings:
    """``text [N_captions, D]``; ``video [N_videos, D]`` with zero rows where ``present`` is False."""

    text: torch.Tensor
    video: torch.Tensor
    present: torch.Tensor  # [N_videos] bool: the video could be decoded


@dataclass
class VideoProgress:
    """The videos embedded so far: ``video [N, D]`` embeddings, ``present [N]`` (decodable) and
    ``done [N]`` (embedded, or found undecodable), over all ``N`` videos of the set."""

    video: torch.Tensor
    present: torch.Tensor
    done: torch.Tensor

    @classmethod
    def empty(cls, count: int, dim: int) -> "VideoProgress":
        return cls(torch.zeros(count, dim), torch.zeros(count, dtype=torch.bool), torch.zeros(count, dtype=torch.bool))

    def save(self, path: Path) -> None:
        with atomic_file(path) as temporary:
            save_file({"video": self.video, "present": self.present, "done": self.done}, str(temporary))

    @classmethod
    def load(cls, path: Path, count: int, dim: int) -> "VideoProgress | None":
        """What an interrupted run saved at ``path``, or None (none, damaged, or another shape)."""
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
            progress = cls(tensors["video"], tensors["present"].bool(), tensors["done"].bool())
        except Exception as error:  # noqa: BLE001 - safetensors' own errors, OS errors, a missing key
            warn(f"ignoring the damaged partial embeddings {path} ({error}); embedding those videos again")
            return None
        if progress.video.shape != (count, dim) or progress.done.shape != (count,):
            return None
        return progress


@torch.no_grad()
def encode_videos(
    model: TempMe, eval_set: EvalSet, batch_size: int, device: torch.device, precision: str,
    num_workers: int, progress: bool, partial: Path | None = None, save_every_s: float = 60.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N_videos, D]`` float32 embeddings and the ``[N_videos]`` mask of decodable videos, filled in
    this process's share of the rows only (zeros elsewhere).

    ``partial``: where the videos embedded so far are kept (every ``save_every_s`` seconds, and when
    the loop stops, Ctrl-C and errors included), and read back from, so that an interrupted run
    carries on; the caller removes it once the whole set is embedded.
    """
    count, dim = len(eval_set.video_ids), model.config.clip.embed_dim
    done_before = VideoProgress.load(partial, count, dim) if partial is not None else None
    state = done_before or VideoProgress.empty(count, dim)
    rows = [row for row in share(count) if not state.done[row]]
    _, processes = rank_and_size()
    videos = f"the {len(share(count))} videos of this process's share" if processes > 1 else f"{count} videos"
    if done_before is not None and progress:
        print(f"carrying on from {partial}: {len(share(count)) - len(rows)} of {videos} embedded before", file=sys.stderr)
    # Samples carry their own "index", so the rows they fill are right whatever the subset.
    loader = DataLoader(
        Subset(eval_set.videos, rows), batch_size=batch_size,
        num_workers=decoding_workers(num_workers, math.ceil(len(rows) / batch_size)),
        collate_fn=collate_skip_bad, worker_init_fn=quiet_worker_init,
    )
    last_save, interrupted = time.monotonic(), False
    with loader_batches(loader) as batches:
        try:
            for number, batch in enumerate(
                progress_bar(batches, total=len(loader), desc="encoding videos", disable=not progress)
            ):
                if batch is not None:  # None: every video of the batch was undecodable
                    with autocast(device, precision):
                        features = model.encode_video(batch["video"].to(device), batch["video_mask"].to(device))
                    state.video[batch["index"]] = features.float().cpu()
                    state.present[batch["index"]] = True
                # Batches come in order: this one's rows are done, undecodable ones included.
                state.done[rows[number * batch_size : (number + 1) * batch_size]] = True
                if partial is not None and time.monotonic() - last_save >= save_every_s:
                    if not _save_partial(state, partial):
                        partial = None  # said once; the evaluation goes on without
                    last_save = time.monotonic()
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            if partial is not None and state.done.any() and not state.done[rows].all():
                if _save_partial(state, partial) and interrupted and progress:
                    done = int(state.done[share(count)].sum())
                    print(f"{done} of {videos} embedded are kept in {partial}: the same command carries on from "
                          "there" + (" (with as many processes)" if processes > 1 else ""), file=sys.stderr)
    return state.video, state.present


def _warn_of_other_partials(cache_dir: Path, key: str, size: int) -> None:
    """Say when the videos embedded by an interrupted evaluation on another number of processes are
    there: each process keeps its own share, which only the same number reads back."""
    others = sorted(path.name for path in cache_dir.glob(f"{glob.escape(key)}.*-of-*.partial")
                    if not path.name.endswith(f"-of-{size}.partial"))
    if others:
        counts = sorted({name.rsplit("-of-", 1)[1].split(".")[0] for name in others}, key=int)
        warn(f"{cache_dir} holds the videos embedded so far by an interrupted evaluation on {' or '.join(counts)} "
             f"processes ({', '.join(others)}), which {size} cannot read: this run embeds them again (run it on "
             f"{' or '.join(counts)} processes to carry on from there instead)")


def _remove_partials(cache_dir: Path, key: str) -> None:
    """Remove the partial embeddings of ``key`` once its cache is written; this process's only, bar
    the main one, which also removes those of runs with another number of processes."""
    rank, size = rank_and_size()
    pattern = f"{glob.escape(key)}.*.partial" if rank == 0 else f"{key}.{rank}-of-{size}.partial"
    for path in cache_dir.glob(pattern):
        with contextlib.suppress(OSError):
            path.unlink()


def _save_partial(state: VideoProgress, path: Path) -> bool:
    """Keep what was embedded; whether it was. A failure to (a full disk, a read-only cache) is a
    warning: the metrics, or the error that stopped the run, matter more."""
    try:
        state.save(path)
    except (OSError, SafetensorError) as error:
        warn(f"could not keep the videos embedded so far in {path} ({error}); an interrupted run embeds "
             "them again")
        return False
    return True


def embed(
    model: TempMe, eval_set: EvalSet, batch_size: int = 16, device: torch.device | str = "cpu",
    precision: str = "fp32", num_workers: int = 0, progress: bool = True, partial: Path | None = None,
) -> Embeddings:
    """Embed every caption and video of ``eval_set`` (the model is put in eval mode).

    Where a process group is set up, every process must call it (it ends with collectives): each
    embeds its share and every one returns the whole set. ``partial``: see :func:`encode_videos`.
    """
    device = torch.device(device)
    model.eval()
    progress = progress and is_main_process()
    captions = share(len(eval_set.captions))
    with failures_shared():  # a video only this process reads can fail (data.strict): stop them all
        own_text = encode_texts(
            model, [eval_set.captions[i] for i in captions], device, batch_size * 8, precision, progress,
            "encoding captions",
        )
        video, present = encode_videos(model, eval_set, batch_size, device, precision, num_workers, progress, partial)
    text = torch.zeros(len(eval_set.captions), model.config.clip.embed_dim)
    text[list(captions)] = own_text
    return Embeddings(sum_over_processes(text), sum_over_processes(video), sum_over_processes(present))


def eval_set_identity(eval_set: EvalSet) -> tuple[int, int, str]:
    """``(videos, captions, digest)`` of the ids, captions and which video each caption describes.

    Processes that split a set between them must hold the same one: a video missing on one node's
    disk (left out, unless ``data.strict``) would shift every row after it.
    """
    data = [eval_set.video_ids, eval_set.captions, eval_set.caption_to_video]
    digest = hashlib.sha256(json.dumps(data).encode("utf-8")).hexdigest()[:16]
    return len(eval_set.video_ids), len(eval_set.captions), digest


def _check_same_set_everywhere(eval_set: EvalSet, identities: list[tuple[int, int, str]]) -> None:
    if any(identity != identities[0] for identity in identities):
        described = "; ".join(
            f"rank {rank}: {videos} videos, {captions} captions" for rank, (videos, captions, _) in enumerate(identities)
        )
        raise ValueError(
            f"{eval_set.name}: the processes do not see the same videos and captions ({described}); every "
            "node must have the same annotation files and videos"
        )


def cache_key(model: TempMe, eval_set: EvalSet, precision: str) -> str:
    """Hex digest of everything the embeddings depend on: weights, model config, data and precision.

    The data includes each video file as it is now (resolved path, size, modification time, or a
    marker for a missing file) and its sampling window: another ``data.video_dir``, or a video
    mended or edited since, gives another key, so skipped videos and embeddings are never reused
    from other files. The files are looked at when the key is taken, before any decoding.
    """
    digest = hashlib.sha256(model_fingerprint(model).encode("utf-8"))
    for part in (eval_set.name, eval_set.fingerprint, precision, f"decoding {DECODING_VERSION}"):
        digest.update(part.encode("utf-8"))
    files = [[file_state(item.path), item.start, item.end] for item in eval_set.items]
    data = [eval_set.video_ids, eval_set.captions, eval_set.caption_to_video, files]
    digest.update(json.dumps(data).encode("utf-8"))
    return digest.hexdigest()[:32]


def load_cached(path: Path) -> Embeddings | None:
    """The cached embeddings, or None when there are none (or the file is damaged: recomputed)."""
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
        return Embeddings(tensors["text"], tensors["video"], tensors["present"])
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error type, OS errors, KeyError
        warn(f"ignoring the damaged embedding cache file {path} ({error}); computing the embeddings again")
        return None


def save_cached(path: Path, embeddings: Embeddings) -> None:
    """Write atomically, so a concurrent or interrupted evaluation never leaves a partial file."""
    tensors = {"text": embeddings.text, "video": embeddings.video, "present": embeddings.present}
    with atomic_file(path) as temporary:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(temporary))


def retrieval_results(embeddings: Embeddings, eval_set: EvalSet) -> dict[str, Any]:
    """t2v and v2t metrics over the decodable videos and their captions.

    Returns ``{"t2v": {...}, "v2t": {...}, "skipped": [video ids], "num_videos": int,
    "num_captions": int}``; metric dicts hold R1/R5/R10/R50 (percent), MdR, MnR, RSum.
    """
    present = embeddings.present.tolist()
    kept_videos = [v for v, ok in enumerate(present) if ok]
    if not kept_videos:
        raise ValueError(f"{eval_set.name}: none of the {len(present)} videos could be decoded")
    new_index = {old: new for new, old in enumerate(kept_videos)}
    kept_captions = [c for c, v in enumerate(eval_set.caption_to_video) if present[v]]
    caption_to_video = [new_index[eval_set.caption_to_video[c]] for c in kept_captions]
    sim = similarity(embeddings.text[kept_captions], embeddings.video[kept_videos])
    return {
        "t2v": text_to_video_metrics(sim, caption_to_video),
        "v2t": video_to_text_metrics(sim, caption_to_video),
        "skipped": [eval_set.video_ids[v] for v, ok in enumerate(present) if not ok],
        "num_videos": len(kept_videos),
        "num_captions": len(kept_captions),
    }


def evaluate(
    model: TempMe,
    eval_set: EvalSet,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    num_workers: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Text-to-video and video-to-text retrieval metrics of ``model`` on ``eval_set``.

    Where a process group is set up, every process must call it, with the same ``eval_set`` (checked):
    each embeds its share (see :func:`embed`) and every one returns the metrics.

    Args:
        batch_size: videos per forward pass (captions go 8x as many at a time).
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast for the encoders.
        cache_dir: reuse or store the embeddings here (keyed by :func:`cache_key`); ``None``: no cache.
            With several processes, they all read it (or all embed, if one lacks it) and rank 0 writes it.

    Returns:
        See :func:`retrieval_results`; also ``"cache"``: the cache file used, if any.
    """
    if not eval_set.video_ids or not eval_set.captions:
        # Found here, not as an empty torch.cat deep in the encoding.
        raise ValueError(
            f"{eval_set.name}: nothing to evaluate ({len(eval_set.video_ids)} videos, "
            f"{len(eval_set.captions)} captions)"
        )
    cache_path = partial = None
    embeddings = None
    if cache_dir is not None:
        key = cache_key(model, eval_set, precision)
        cache_path = Path(cache_dir) / f"{key}.safetensors"
        embeddings = load_cached(cache_path)
        rank, size = rank_and_size()  # each process keeps the videos of its own share
        partial = Path(cache_dir) / f"{key}.{rank}-of-{size}.partial"
    states = all_gather_objects((eval_set_identity(eval_set), embeddings is not None))
    _check_same_set_everywhere(eval_set, [identity for identity, _ in states])
    # Every process embeds its share, or none does: a cache on one node's own disk can differ.
    if not all(cached for _, cached in states):
        embeddings = None
    if embeddings is None:
        if partial is not None and is_main_process():
            _warn_of_other_partials(Path(cache_dir), key, size)
        embeddings = embed(model, eval_set, batch_size, device, precision, num_workers, progress, partial)
        if cache_path is not None and is_main_process():
            try:
                save_cached(cache_path, embeddings)
            except (OSError, SafetensorError) as error:  # safetensors reports a full disk as its own error
                # The cache only saves time next run: losing it must not cost the metrics just computed.
                warn(
                    f"could not write the embedding cache {cache_path} ({error}); the metrics are not affected"
                )
                cache_path = None
        if cache_dir is not None:
            # Also a barrier: no process goes on (say, to the next evaluation, looking for this cache)
            # before the main one has written the file; and every one reports what it wrote.
            written = all_gather_objects(cache_path is not None if is_main_process() else None)[0]
            cache_path = cache_path if written else None
            if written:  # the cache replaces the partial files (of any number of processes)
                _remove_partials(Path(cache_dir), key)
    elif cache_path is not None:
        _remove_partials(Path(cache_dir), key)  # left by an earlier run that another one finished
    results = retrieval_results(embeddings, eval_set)
    results["cache"] = str(cache_path) if cache_path else None
    return results
