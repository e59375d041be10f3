"""Training data: splits from the config, checked up front, and a resumable, seeded batch order.

Reproducibility: batch order and augmentation depend only on ``optim.seed``, the epoch and the
position in the epoch. :class:`EpochSampler` shuffles with a generator seeded by ``seed + epoch``
and can start part-way through an epoch; :class:`SeededSamples` reseeds Python's ``random`` (which
video RandAugment draws from) for every sample. So a resumed run, a run with a different number of
DataLoader workers and a run on a different number of processes all see the same global batches.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from tempme.data import (
    AnnotationError,
    FrameCache,
    RetrievalPairs,
    SkippedVideo,
    VideoItem,
    check_videos_exist,
    collate_skip_bad,
    load_dataset,
    quiet_worker_init,
)
from tempme.data.annotations import UnknownSplit, dataset_split_name
from tempme.tokenizer import tokenize
from tempme.userwarnings import SharedWarning, warn
from tempme.workers import decoding_workers

from .config import HOLDOUT, NO_VALIDATION, ConfigError, DataSettings, TrainConfig
from .evaluate import EvalSet

_LISTED = 10  # missing videos named in a message
FEW_VALIDATION_CAPTIONS = 50  # below this, R@1 moves in steps of more than 2%


@dataclass
class TrainData:
    """What :func:`tempme_train.train.train` trains and validates on.

    ``train`` yields samples like :class:`tempme.data.RetrievalPairs`: ``{"video": [F, 3, S, S],
    "video_mask": [F], "text_ids": [L], "text_mask": [L], ...}``. Tests may pass any such dataset.
    """

    train: Dataset
    val: EvalSet | None
    missing_videos: list[str] = field(default_factory=list)  # left out because the file does not exist


def frame_cache(data: DataSettings) -> FrameCache | None:
    """The decoded-frame cache of ``data.frame_cache`` (filled by ``tempme prepare``), if set."""
    if not data.frame_cache:
        return None
    return FrameCache(data.frame_cache, data.max_frames, data.framerate, data.image_size, data.backend)


def load_split(data: DataSettings, split: str, source: str, split_key: str = "split") -> list[VideoItem]:
    """Parse one split's annotations; problems become a ConfigError naming the setting (``split_key``:
    the one that named ``split``, such as ``data.val_split``)."""
    # An empty path would name the working directory, which exists: say it is missing instead.
    if not data.anno_path:
        raise ConfigError(source, "data.anno_path", data.anno_path, "not set: the annotation folder (or file) is needed")
    if data.dataset != "custom" and not data.video_dir:
        raise ConfigError(source, "data.video_dir", data.video_dir, f"not set: {data.dataset} needs its video folder")
    if not Path(data.anno_path).exists():
        raise ConfigError(source, "data.anno_path", data.anno_path, "no such file or folder")
    if data.video_dir and not Path(data.video_dir).is_dir():
        hint = ("; with data.video_dir= (empty), the video paths of a custom annotation file are relative to its folder"
                if data.dataset == "custom" else "")
        raise ConfigError(source, "data.video_dir", data.video_dir, f"no such folder{hint}")
    try:
        items = load_dataset(data.dataset, data.anno_path, data.video_dir or None, split)
    except UnknownSplit as error:
        hint = ""
        if split_key == "data.val_split":
            hint = f"; or data.val_split={HOLDOUT} with data.holdout_videos=N to validate on N training videos held out"
        raise ConfigError(source, split_key, split, f"{error}{hint}", show_value=False) from error
    except AnnotationError as error:
        # The error names the file, field and value already; the folder would read as the bad value.
        raise ConfigError(
            source, "data.anno_path", data.anno_path, f"bad {split} annotations: {error}", show_value=False
        ) from error
    except FileNotFoundError as error:
        raise ConfigError(source, "data.anno_path", data.anno_path, str(error)) from error
    except ValueError as error:  # unknown dataset name
        raise ConfigError(source, "data.dataset", data.dataset, str(error)) from error
    if not items:
        raise ConfigError(source, "data.anno_path", data.anno_path, f"the {split} split has no videos")
    return items


def train_and_val_items(data: DataSettings, source: str) -> tuple[list[VideoItem], list[VideoItem]]:
    """The training videos and the validation videos (a split, or held out from training).

    The custom format has no splits: its one file serves every split name, so a validation "split"
    would be the training pairs. That is warned about (once per call), naming the file.
    """
    train_items = load_split(data, data.train_split, source, "data.train_split")
    if data.val_split == NO_VALIDATION:
        return train_items, []
    if data.val_split == data.test_split and data.dataset != "custom":
        warn(
            f"data.val_split={data.val_split} is the test split: choosing best.safetensors on it reports test "
            f"numbers that were selected on the test set; use data.val_split={HOLDOUT} with "
            f"data.holdout_videos=N, or data.val_split={NO_VALIDATION} to keep the final weights",
            SharedWarning,
        )
    if data.val_split != HOLDOUT:
        if data.dataset == "custom":
            warn(
                f"data.dataset=custom has no splits: validation reads the training pairs of {data.anno_path}, "
                "so validation R@1 (and the choice of best.safetensors) measures fit, not generalisation; "
                "set data.val_split=holdout and data.holdout_videos=N to validate on N videos kept out of training",
                SharedWarning,
            )
        return train_items, load_split(data, data.val_split, source, "data.val_split")
    if data.holdout_videos >= len(train_items):
        raise ConfigError(
            source, "data.holdout_videos", data.holdout_videos,
            f"must be smaller than the {len(train_items)} videos of the {data.train_split} split",
        )
    # The last videos of the file, so the held-out set does not depend on the seed.
    return train_items[: -data.holdout_videos], train_items[-data.holdout_videos :]


def drop_missing_videos(
    items: list[VideoItem], data: DataSettings, split: str, source: str, none_there_is_an_error: bool = True
) -> tuple[list[VideoItem], list[str]]:
    """Keep the items whose file exists; name the missing ones (an error when ``data.strict``). With
    ``none_there_is_an_error``, finding none of the videos is an error that names ``data.video_dir``:
    most likely the wrong folder (a validation set, which may be a few held-out videos, says more
    itself: see ``check_validation_items``)."""
    missing = check_videos_exist(items)
    if not missing:
        return items, []
    names = [str(item.path) for item in missing]
    shown = ", ".join(names[:_LISTED]) + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")
    message = f"{len(missing)} of {len(items)} {split} videos are missing: {shown}"
    if none_there_is_an_error and len(missing) == len(items):
        where = ("the video paths of data.anno_path are relative to data.video_dir, or to the annotation "
                 "file's folder when it is ''" if data.dataset == "custom"
                 else f"data.video_dir must hold the {data.dataset} videos (in subfolders too)")
        raise ConfigError(source, "data.video_dir", data.video_dir, f"{message}; {where}")
    if data.strict:
        raise ConfigError(source, "data.video_dir", data.video_dir, message)
    warn(message + "; leaving them out", SharedWarning)
    absent = {id(item) for item in missing}
    return [item for item in items if id(item) not in absent], [item.video_id for item in missing]


def prepare_training_data(config: TrainConfig, source: str = "config") -> TrainData:
    """Check and load everything the run reads, before the first step.

    Raises ConfigError for missing folders, unparsable annotations and (with ``data.strict``)
    missing videos; without ``strict`` missing videos are reported and left out.
    """
    data = config.data
    validating = data.val_split != NO_VALIDATION
    try:
        train_items, val_items = train_and_val_items(data, source)
        train_items, missing_train = drop_missing_videos(train_items, data, "training", source)
        val_items, missing_val = drop_missing_videos(val_items, data, "validation", source, none_there_is_an_error=False)
        if validating:
            check_validation_items(val_items, len(missing_val), data, source)
        pairs = sum(len(item.captions) for item in train_items)
        if train_items and pairs < config.optim.batch_size:
            raise ConfigError(
                source, "optim.batch_size", config.optim.batch_size,
                f"the training set has {pairs} (video, caption) pairs, fewer than one global batch: lower "
                "optim.batch_size",
            )
    except ConfigError as error:  # named after the override that set the value, if one did
        raise config.blame(error) from None
    warn_if_test_split_unreadable(config, source)
    cache = frame_cache(data)
    train_set = RetrievalPairs(
        train_items, tokenize, data.max_words, data.max_frames, data.framerate, data.image_size,
        augment=data.augment, frame_cache=cache, backend=data.backend, strict=data.strict,
        warn_skipped=False,  # the Trainer warns, once per video and run
    )
    val_name = f"{data.dataset}/{data.val_split}" + (str(data.holdout_videos) if data.val_split == HOLDOUT else "")
    val_set = EvalSet.from_items(val_items, data, val_name, cache) if validating else None
    return TrainData(train_set, val_set, list(dict.fromkeys(missing_train + missing_val)))  # a video of both once


def warn_if_test_split_unreadable(config: TrainConfig, source: str) -> None:
    """Read the test split's annotations (not its videos) now: a broken or missing test file found only
    by ``tempme eval``, after training, would be news late. A warning: training does not need it."""
    try:
        split_items(config.data, "test", source)
    except ConfigError as error:
        warn(f"the test split cannot be read, so `tempme eval` will fail until it is fixed: "
             f"{config.blame(error)}", SharedWarning)


def check_validation_items(items: list[VideoItem], missing: int, data: DataSettings, source: str) -> None:
    """Refuse a validation set with no video or no caption left, before the first step.

    Found only at the first epoch end it would cost that epoch and stop the run without a
    checkpoint (evaluation cannot rank an empty set).
    """
    if not items:
        # load_split refuses an empty split and train_and_val_items an empty hold-out, so an empty
        # set here means every video of it is missing (the warning above names them).
        if data.val_split == HOLDOUT:
            raise ConfigError(
                source, "data.holdout_videos", data.holdout_videos,
                f"nothing to validate on: all {missing} held-out videos (the last of the "
                f"{data.train_split} split in {data.anno_path}) are missing; restore them or hold out more",
            )
        raise ConfigError(
            source, "data.val_split", data.val_split,
            f"nothing to validate on: all {missing} videos of that split in {data.anno_path} are missing",
        )
    where = "the held-out videos" if data.val_split == HOLDOUT else f"the {data.val_split} split"
    if not any(item.captions for item in items):
        raise ConfigError(
            source, "data.anno_path", data.anno_path,
            f"nothing to validate on: the {len(items)} videos of {where} have no captions in {data.anno_path}",
            show_value=False,
        )
    captions = sum(len(item.captions) for item in items)
    if captions < FEW_VALIDATION_CAPTIONS:
        more = " (data.holdout_videos)" if data.val_split == HOLDOUT else ""
        warn(f"validation has {captions} captions ({where}): its text-to-video R@1 moves in steps of "
             f"{100 / captions:.3g}%, so best.safetensors is chosen coarsely (ties go to the lower mean rank); "
             f"validate on more videos{more} for a finer choice", SharedWarning)


def training_set_identity(dataset: Dataset) -> tuple[int, str | None]:
    """``(number of samples, digest of their video ids)`` recorded in checkpoints.

    The digest needs a dataset that lists its samples like :class:`tempme.data.RetrievalPairs`
    (``items`` and ``pairs``); for other datasets (tests, custom pipelines) it is ``None`` and only
    the size is compared on resume.
    """
    items, pairs = getattr(dataset, "items", None), getattr(dataset, "pairs", None)
    if items is None or pairs is None:
        return len(dataset), None
    ids = [items[video_index].video_id for video_index, _ in pairs]
    return len(dataset), hashlib.sha256(json.dumps(ids).encode("utf-8")).hexdigest()[:16]


def training_captions_digest(dataset: Dataset) -> str | None:
    """A digest of the captions of the samples, in order, where the dataset lists them (see
    :func:`training_set_identity`): the same videos with edited captions are another training set."""
    pairs = getattr(dataset, "pairs", None)
    if getattr(dataset, "items", None) is None or pairs is None:
        return None
    captions = [caption for _, caption in pairs]
    # repr for what JSON cannot write (a custom dataset's caption objects).
    return hashlib.sha256(json.dumps(captions, default=repr).encode("utf-8")).hexdigest()[:16]


def collate_train(samples: list[Any]) -> dict[str, Any]:
    """:func:`tempme.data.collate_skip_bad`, except that ``"skipped"`` holds the undecodable videos'
    :class:`SkippedVideo` records (their reasons, for the Trainer's one warning about each), and that a
    batch of only undecodable videos still names them: ``{"skipped": [...]}`` with no tensors
    (collate_skip_bad returns None, and the videos would never be reported)."""
    batch = collate_skip_bad(samples) or {}
    batch["skipped"] = [sample for sample in samples if isinstance(sample, SkippedVideo)]
    return batch


class SeededSamples(Dataset):
    """Wraps a dataset so that item ``(index, seed)`` is ``dataset[index]`` drawn with ``random.seed(seed)``.

    The seeds come from :class:`EpochSampler`; the augmentation of a sample is then the same in every
    worker process and after a resume.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        random.seed(seed)
        return self.dataset[index]


class EpochSampler(Sampler[tuple[int, int]]):
    """This process's share of each global batch, in a shuffled order fixed by ``(seed, epoch)``.

    Every epoch is a permutation of the dataset cut into ``len // global_batch`` global batches (the
    rest is dropped, like ``drop_last``). Global batch k is split into ``world_size`` contiguous
    slices of ``global_batch / world_size`` samples; this process takes slice ``rank``. So the union
    over processes of step k's batches is the same set of samples in the same order as a single
    process would use, which keeps multi-process runs equal to single-process ones. It yields
    ``(index, sample_seed)`` pairs for :class:`SeededSamples`.
    """

    def __init__(self, size: int, global_batch: int, world_size: int = 1, rank: int = 0, seed: int = 0):
        if global_batch % world_size:
            raise ValueError(f"the global batch {global_batch} does not split evenly over {world_size} processes")
        if size < global_batch:
            raise ValueError(f"the training set has {size} samples, fewer than one global batch of {global_batch}")
        self.size, self.global_batch, self.world_size, self.rank, self.seed = size, global_batch, world_size, rank, seed
        self.local_batch = global_batch // world_size
        self.epoch = 0
        self.start_batch = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.size // self.global_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order and skip its first ``start_batch`` batches (already trained on)."""
        self.epoch, self.start_batch = epoch, start_batch

    def _sample_seed(self, position: int) -> int:
        # Distinct for every (seed, epoch, position in the epoch) while staying a plain int.
        return (self.seed * 1_000_003 + self.epoch) * 100_000_007 + position

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        for batch in range(self.start_batch, self.steps_per_epoch):
            start = batch * self.global_batch + self.rank * self.local_batch
            for position in range(start, start + self.local_batch):
                yield order[position], self._sample_seed(position)

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_batch) * self.local_batch


def make_train_loader(dataset: Dataset, sampler: EpochSampler, num_workers: int, pin_memory: bool) -> DataLoader:
    """Batches of ``sampler.local_batch`` samples; undecodable videos are dropped by the collate function
    (see :func:`collate_train`: a batch may hold no sample, only ``"skipped"``)."""
    return DataLoader(
        SeededSamples(dataset),
        batch_size=sampler.local_batch,
        sampler=sampler,
        num_workers=decoding_workers(num_workers, sampler.steps_per_epoch),
        collate_fn=collate_train,
        pin_memory=pin_memory,
        drop_last=True,
        worker_init_fn=quiet_worker_init,
    )


def annotation_split(data: DataSettings, split: str) -> str:
    """Which annotations :func:`split_items` reads for ``split``, in the dataset's own words: ``test``
    and ``val`` are the config's (ActivityNet's test split is its val_1, and a held-out validation set
    is no split of the dataset at all), which a report naming only ``split`` would hide."""
    if split == "val":
        if data.val_split == HOLDOUT:
            videos = f"{data.holdout_videos} video{'s' if data.holdout_videos != 1 else ''}"
            return f"{videos} held out of {annotation_split(data, data.train_split)}"
        split = data.val_split
    elif split == "test":
        split = data.test_split
    if data.dataset == "custom":  # no splits: every name reads the one file
        return Path(data.anno_path).name
    return dataset_split_name(data.dataset, split)


def split_items(data: DataSettings, split: str, source: str, split_key: str = "split") -> list[VideoItem]:
    """Videos of ``split``: ``val`` is the config's validation set (held out or not), ``test`` the
    config's test split, anything else a split name of the dataset (given by ``split_key``)."""
    if split == "val":
        if data.val_split == NO_VALIDATION:
            raise ConfigError(source, "data.val_split", data.val_split,
                              "this config has no validation set; evaluate another split (test, or a split name)")
        return train_and_val_items(data, source)[1]
    if split == "test":
        return load_split(data, data.test_split, source, "data.test_split")
    return load_split(data, split, source, split_key)

