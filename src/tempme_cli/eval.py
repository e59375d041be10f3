"""``tempme eval``: text-video retrieval metrics of a trained checkpoint or of plain CLIP weights."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path
from typing import Any

from tempme_train.config import TrainConfig, apply_overrides, load_config, with_settings

EPILOG = textwrap.dedent(
    """\
    what is evaluated:
      --checkpoint PATH   a trained run: its folder (best.safetensors), a checkpoint folder (last/) or a
                          weights file written by tempme train. Adapters are applied on top of the base
                          weights named in the training config stored with them.
      --weights W         CLIP or tempme weights (a file or a preset name such as ViT-B/32): zero-shot.
      --config CONFIG     the model and data of a training config (its model.weights, zero-shot unless
                          --checkpoint is given too; then CONFIG replaces the stored config).

    examples:
      tempme eval --checkpoint runs/msrvtt_b32_tempme
      tempme eval --checkpoint runs/msrvtt_b32_tempme data.anno_path=/data/anno data.video_dir=/data/videos
      tempme eval --weights ViT-B/32 --dataset msrvtt --anno-path /data/anno --video-dir /data/videos --json
    """
)


def register(subparsers) -> None:
    from .train import add_config_arguments

    parser = subparsers.add_parser(
        "eval",
        help="retrieval metrics (R@1/5/10/50, MdR, MnR, RSum) on a benchmark split",
        description="Embed every caption and video of a split and report text-to-video and video-to-text "
        "retrieval metrics. Embeddings are cached on disk, keyed by a hash of the weights, the model config "
        "and the data, and reused when present.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser, required=False)
    parser.add_argument("--checkpoint", metavar="PATH", help="trained run folder, checkpoint folder or weights file")
    parser.add_argument("--weights", metavar="W", help="CLIP/tempme weights file or preset name (sets model.weights)")
    parser.add_argument("--dataset", help="msrvtt, didemo, activitynet, lsmdc or custom (sets data.dataset)")
    parser.add_argument("--anno-path", metavar="PATH", help="annotation folder or file (sets data.anno_path)")
    parser.add_argument("--video-dir", metavar="DIR", help="video folder (sets data.video_dir)")
    parser.add_argument("--method", choices=("none", "tome", "tempme"), help="merging method (sets model.method)")
    parser.add_argument("--frames", type=int, help="frames per video (sets model.frames and data.max_frames)")
    parser.add_argument("--split", default="test", help="test (the config's test split), val (its validation split) or a split name")
    parser.add_argument("--batch-size", type=int, help="videos per forward pass (default: run.eval_batch_size)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: run.device)")
    parser.add_argument("--cache-dir", metavar="DIR", help="embedding cache (default: embeddings/ in $TEMPME_CACHE, else in ~/.cache/tempme)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write cached embeddings")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(handler=run)


def option_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Config settings given as options (applied before the KEY=VALUE overrides)."""
    settings = {
        "model.weights": args.weights,
        "model.method": args.method,
        "data.dataset": args.dataset,
        "data.anno_path": args.anno_path,
        "data.video_dir": args.video_dir,
        "model.frames": args.frames,
        "data.max_frames": args.frames,
        "run.eval_batch_size": args.batch_size,
        "run.device": args.device,
    }
    return {key: value for key, value in settings.items() if value is not None}


def resolve_config(args: argparse.Namespace, trained: Path | None) -> TrainConfig:
    """--config, else the config stored with the checkpoint, else defaults; then options and overrides."""
    from tempme_train.modeling import train_config_of

    if args.config is not None:
        config = load_config(args.config)
    elif trained is not None:
        config = train_config_of(trained)
    else:
        config = load_config(None)
    config = with_settings(config, option_settings(args), "command-line options")
    return apply_overrides(config, args.overrides)


def embedding_cache(args: argparse.Namespace) -> Path | None:
    """--cache-dir, else ``embeddings/`` in the weights cache (``cache_dir()``); None with --no-cache."""
    from tempme.weights import cache_dir

    if args.no_cache:
        return None
    return Path(args.cache_dir) if args.cache_dir else cache_dir() / "embeddings"


def run(args: argparse.Namespace) -> int:
    from tempme.retrieval import format_metrics_table
    from tempme_train.data import drop_missing_videos, frame_cache, split_items
    from tempme_train.distributed import WorldInfo
    from tempme_train.evaluate import EvalSet, evaluate
    from tempme_train.modeling import build_model, find_trained_weights, load_trained_weights
    from tempme_train.train import resolve_device

    if not (args.config or args.checkpoint or args.weights):
        raise ValueError("say what to evaluate: --checkpoint PATH, --weights W or --config CONFIG")
    trained = find_trained_weights(args.checkpoint) if args.checkpoint else None
    config = resolve_config(args, trained)
    source = args.config or str(trained or "command line")

    items = split_items(config.data, args.split, source)
    items, missing = drop_missing_videos(items, config.data.strict, args.split, source)
    eval_set = EvalSet.from_items(items, config.data, f"{config.data.dataset}/{args.split}", frame_cache(config.data))
    model = build_model(config, source)
    if trained is not None:
        load_trained_weights(model, trained)
    model.optimize_for_inference()  # the same embeddings, faster; this model is not trained further
    device = resolve_device(config.run.device, WorldInfo())
    results = evaluate(
        model.to(device), eval_set, config.run.eval_batch_size, device, config.optim.precision,
        config.data.num_workers, cache_dir=embedding_cache(args), progress=not args.json,
    )
    results.update(
        split=args.split, dataset=config.data.dataset, missing=missing,
        weights=str(trained) if trained else config.model.weights or f"random {config.model.preset}",
        paper={"t2v": config.paper.t2v, "v2t": config.paper.v2t},
    )
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"{results['dataset']} {args.split}: {results['num_captions']} captions, {results['num_videos']} videos; "
          f"weights: {results['weights']}")
    print(format_metrics_table(results["t2v"], results["v2t"]))
    if config.paper.t2v:
        print("paper t2v: " + ", ".join(f"{key} {value}" for key, value in config.paper.t2v.items()))
    for label, videos in (("missing", missing), ("undecodable (left out)", results["skipped"])):
        if videos:
            print(f"{len(videos)} {label} videos: {', '.join(videos)}")
    return 0
