"""Data pipeline: annotations, frame sampling and decoding, transforms, augmentation, datasets, cache."""

from .annotations import (
    AnnotationError,
    MissingVideosError,
    VideoItem,
    check_videos_exist,
    load_activitynet,
    load_custom,
    load_dataset,
    load_didemo,
    load_lsmdc,
    load_msrvtt,
    require_videos,
)
from .cache import CacheSummary, FrameCache
from .dataset import (
    RetrievalPairs,
    RetrievalVideos,
    VideoWindows,
    check_batch_fits_in_memory,
    collate_skip_bad,
    flatten_captions,
    physical_memory,
    quiet_worker_init,
)
from .randaugment import AugmentStep, VideoRandAugment
from .transforms import CLIP_MEAN, CLIP_STD, clip_preprocess, frames_to_tensor
from .video import SkippedVideo, VideoDecodeError, Window, plan_windows, read_frames, read_windows, sample_frame_indices

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "AnnotationError",
    "AugmentStep",
    "CacheSummary",
    "FrameCache",
    "MissingVideosError",
    "RetrievalPairs",
    "RetrievalVideos",
    "SkippedVideo",
    "VideoDecodeError",
    "VideoItem",
    "VideoRandAugment",
    "VideoWindows",
    "Window",
    "check_batch_fits_in_memory",
    "check_videos_exist",
    "clip_preprocess",
    "collate_skip_bad",
    "flatten_captions",
    "frames_to_tensor",
    "load_activitynet",
    "load_custom",
    "load_dataset",
    "load_didemo",
    "load_lsmdc",
    "load_msrvtt",
    "physical_memory",
    "plan_windows",
    "quiet_worker_init",
    "read_frames",
    "read_windows",
    "require_videos",
    "sample_frame_indices",
]
