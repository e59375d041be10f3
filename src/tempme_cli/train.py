"""``tempme train``: fine-tune TempMe from a YAML config (see ``tempme_train.config``)."""

from __future__ import annotations

import argparse
import textwrap

from tempme_train.config import TrainConfig, list_configs, load_config, with_settings

from .common import ParagraphHelpFormatter, exit_status_help, finished, user_path

EPILOG = textwrap.dedent(
    """\
    examples:
      tempme train --config msrvtt_b32_tempme data.anno_path=/data/msrvtt/anno data.video_dir=/data/msrvtt/videos
      tempme train --config my_run.yaml optim.batch_size=64 run.stop_after=100
      tempme train --config my_run.yaml --resume
      torchrun --nproc_per_node 4 -m tempme_cli.main train --config msrvtt_b32_tempme

    bundled configs (the paper's main tables): {configs}

    """
) + exit_status_help("missing or undecodable videos", torchrun=True)


def add_config_arguments(
    parser: argparse.ArgumentParser, required: bool = True, example: str = "optim.lr=1e-4 data.num_workers=2"
) -> None:
    """``--config`` and ``KEY=VALUE`` overrides, shared by train, eval and prepare (``example``: settings
    that matter to the command)."""
    parser.add_argument(
        "--config", required=required, metavar="CONFIG", type=user_path,
        help="YAML config file, or the name of a bundled config (e.g. msrvtt_b32_tempme)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help=f"override a config setting, e.g. {example} (values are YAML: lists as [8,9,10])",
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config named by ``args.config`` with the ``KEY=VALUE`` overrides applied."""
    return load_config(args.config, args.overrides)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune TempMe on a retrieval benchmark",
        description="Fine-tune TempMe (LoRA + clip positional embeddings by default) with the paper's recipe. "
        "Every setting is checked and every training and validation annotation and video file looked up "
        "before the first step (the test annotations are read too: a warning if they cannot be). "
        "Writes config.yaml, metrics.jsonl, best.safetensors (best validation text-to-video R@1, ties going to the lower text-to-video mean rank; with "
        "data.val_split=none, no validation and the final weights.safetensors instead) and a "
        "resumable last/ checkpoint to run.output_dir.",
        epilog=EPILOG.format(configs=", ".join(list_configs())),
        formatter_class=ParagraphHelpFormatter,
    )
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue the run in the output folder from its last/ checkpoint (written at each validation "
                        "and on Ctrl-C, SIGTERM or an error); model, optim and sampling settings, training set "
                        "and base weights must be unchanged")
    parser.add_argument("--output", metavar="DIR", type=user_path, help="output folder (overrides run.output_dir)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from tempme_train.distributed import world_from_env
    from tempme_train.train import train

    config = config_from_args(args)
    if args.output:
        # Set as a value rather than a KEY=VALUE text, so any path works without YAML quoting; train()
        # checks the folder (every process waits for that check: under torchrun one failing alone hung).
        config = with_settings(config, {"run.output_dir": args.output}, "--output")
    summary = train(config, resume=args.resume, source=args.config)
    if not world_from_env().is_main:
        return 0
    print(f"steps: {summary.steps}/{summary.total_steps}" + (" (stopped early; continue with --resume)" if summary.stopped_early else ""))
    if summary.best_val_r1 is not None:
        print(f"best validation t2v R@1: {summary.best_val_r1:.1f} at step {summary.best_step} -> {summary.best_weights}")
    if summary.final_weights:
        print(f"final weights: {summary.final_weights}")
    print(f"last checkpoint: {summary.last_checkpoint}")
    for label, videos in (
        ("missing videos", summary.missing_videos),
        ("undecodable (skipped) videos", summary.skipped_videos),
        ("undecodable validation videos (left out of validation)", summary.skipped_val_videos),
    ):
        if videos:
            print(f"{label} ({len(videos)}): {', '.join(videos)}")
    return finished(args.command, {
        "missing video": len(summary.missing_videos), "undecodable video": len(summary.skipped_videos),
        "undecodable validation video": len(summary.skipped_val_videos),
    })
