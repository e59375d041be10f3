"""``tempme prepare``: decode every video of a config's splits once into the frame cache."""

from __future__ import annotations

import argparse
import textwrap

EPILOG = textwrap.dedent(
    """\
    The cache folder is data.frame_cache; training and evaluation with the same config then read the
    sampled, resized frames from it instead of decoding the videos again. Entries are keyed by each
    video file's path, size and modification time: an edited, replaced or moved video is decoded
    again. Entries written by tempme 0.1 are not reused (0.2 turns frames upright by the video's
    rotation): delete the folder to reclaim their space. Under torchrun (several nodes sharing the
    cache folder), each process decodes its share of the videos.

    example:
      tempme prepare --config msrvtt_b32_tempme data.frame_cache=cache/frames data.anno_path=/data/msrvtt/anno \\
          data.video_dir=/data/msrvtt/videos

    """
)

SPLITS = ("train", "val", "test")


def register(subparsers) -> None:
    from .common import ParagraphHelpFormatter, exit_status_help
    from .train import add_config_arguments

    parser = subparsers.add_parser(
        "prepare",
        help="decode all videos of a config once into its frame cache",
        description="Sample and decode the frames of every video in the config's train, validation and test "
        "splits and store them in data.frame_cache. Videos already cached are skipped; videos that are "
        "missing or cannot be decoded are listed at the end.",
        epilog=EPILOG + exit_status_help("missing or undecodable videos", torchrun=True),
        formatter_class=ParagraphHelpFormatter,
    )
    add_config_arguments(parser, example="data.num_workers=8 data.frame_cache=/data/frames")
    parser.add_argument("--splits", nargs="+", action=SplitsThenOverrides, default=list(SPLITS), metavar="SPLIT",
                        help=f"which splits to cache, of {', '.join(SPLITS)} (default: all of them)")
    parser.add_argument("--workers", type=int,
                        help="decoding threads (default: data.num_workers); never more than the CPUs available, nor "
                        "than the videos to decode")
    parser.set_defaults(handler=run)


class SplitsThenOverrides(argparse.Action):
    """``--splits`` takes every word after it, so KEY=VALUE overrides written after it are handed on
    to the overrides (``--splits val data.frame_cache=/x``) instead of being refused as split names."""

    def __call__(self, parser, namespace, values, option_string=None):
        splits = [value for value in values if "=" not in value]
        for split in splits:
            if split not in SPLITS:
                parser.error(f"argument --splits: invalid choice: {split!r} (choose from {', '.join(SPLITS)})")
        if not splits:
            parser.error("argument --splits: name at least one split")
        setattr(namespace, self.dest, splits)
        namespace.late_overrides = [value for value in values if "=" in value]


def run(args: argparse.Namespace) -> int:
    from tempme.data import check_videos_exist
    from tempme.files import check_folder
    from tempme_train.config import NO_VALIDATION, ConfigError
    from tempme_train.data import frame_cache, split_items
    from tempme_train.distributed import world_from_env

    from .common import count, counts, finished
    from .train import config_from_args

    args.overrides = [*args.overrides, *getattr(args, "late_overrides", [])]
    config = config_from_args(args)
    cache = frame_cache(config.data)
    if cache is None:
        raise ValueError(f"{args.config}: data.frame_cache is not set; say where to store the frames (data.frame_cache=DIR)")
    check_folder(cache.folder, "data.frame_cache")
    workers = config.data.num_workers if args.workers is None else args.workers
    if workers < 0:
        raise ValueError(f"--workers (or data.num_workers) must not be negative, got {workers}")
    # The validation set of a config without one is not there to cache.
    splits = [name for name in args.splits if not (name == "val" and config.data.val_split == NO_VALIDATION)]
    if not splits:
        raise ValueError(f"{args.config}: data.val_split is {NO_VALIDATION}: this config has no validation set to cache")
    items = {}
    try:
        for name in splits:  # a video can belong to several (a held-out validation set is part of train): cached once
            split = config.data.train_split if name == "train" else name
            for item in split_items(config.data, split, args.config):
                items.setdefault((item.video_id, item.start, item.end), item)
    except ConfigError as error:  # named after the override that set the value, if one did
        raise config.blame(error) from None
    missing = check_videos_exist(items.values())
    if len(missing) == len(items):  # as training and evaluation refuse it: most likely the wrong folder
        raise config.blame(ConfigError(args.config, "data.video_dir", config.data.video_dir,
                                       f"none of the {len(items)} videos of {', '.join(splits)} is there"))
    present = [item for item in items.values() if item.path.is_file()]
    world = world_from_env()
    if world.distributed:  # under torchrun, each process decodes every W-th video; missing ones rank 0 lists
        present = present[world.rank :: world.world_size]
        missing = missing if world.is_main else []
    # Under torchrun one bar, rank 0's over its share, stands for all: several would draw over each other.
    summary = cache.prepare(present, num_workers=workers, progress=world.is_main and config.run.progress)
    share = f" (process {world.rank} of {world.world_size})" if world.distributed else ""
    print(f"frame cache {cache.folder}{share}: {summary.ok} videos cached, {len(summary.skipped)} undecodable, "
          f"{len(missing)} missing")
    for skipped in summary.skipped:
        print(f"  undecodable: {skipped.video_id} ({skipped.path}): {skipped.reason}")
    for item in missing:
        print(f"  missing: {item.video_id} ({item.path})")
    if not (summary.ok or world.distributed):  # under torchrun a process knows only its own share
        raise ValueError(f"the {count(len(present), 'video')} there could not be decoded, so none is in {cache.folder}")
    left_out = {"undecodable video": len(summary.skipped), "missing video": len(missing)}
    if config.data.strict and any(left_out.values()):  # as training and evaluation refuse them
        raise ValueError(f"data.strict is set and {counts(left_out)} were found (listed above); the frames of the "
                         "others are cached")
    return finished(args.command, left_out)
