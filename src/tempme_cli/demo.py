"""``tempme demo``: train a tiny CLIP on synthetic videos on the CPU and compare TempMe with the baselines."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from tempme.config import MERGE_METHODS

from tempme.files import atomic_file, check_folder

from .common import DefaultsHelpFormatter, exit_status_help, show_progress, user_path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="offline demo: TempMe vs per-frame CLIP on synthetic videos, a few CPU minutes",
        description="Generate synthetic videos of moving and appearing shapes whose captions differ only in "
        "direction or order, pretrain a tiny CLIP on still images, fine-tune LoRA adapters once per method "
        "and print recall, reversal accuracy, tokens, GFLOPs and speed. Nothing is downloaded.",
        epilog=exit_status_help(),
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and training")
    parser.add_argument("--quick", action="store_true", help="a much smaller run (seconds) that checks the pipeline")
    parser.add_argument(
        "--methods", nargs="+", choices=MERGE_METHODS, default=list(MERGE_METHODS), help="methods to fine-tune (default: none tome tempme)"
    )
    parser.add_argument("--pretrain-steps", type=int, help="pretraining steps (default: 600, --quick: 6)")
    parser.add_argument("--finetune-steps", type=int, help="fine-tuning steps per method (default: 500, --quick: 4)")
    parser.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: PyTorch's choice)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--output", type=lambda text: Path(user_path(text)), help="folder to write results.json to")
    parser.add_argument("--save-dir", type=lambda text: Path(user_path(text)), help="folder to write a few test videos to, as mp4")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # Imported here so that other subcommands do not pay for loading the training package.
    from tempme_train.demo import DemoConfig, explain, format_table, make_test_set, run_demo, save_videos

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if not 0 <= args.seed < 2**32:  # what numpy's and Python's generators, seeded from it, accept
        raise ValueError(f"--seed must be between 0 and 2**32 - 1, got {args.seed}")
    config = DemoConfig.quick(args.seed) if args.quick else DemoConfig(seed=args.seed)
    overrides = {"methods": tuple(dict.fromkeys(args.methods))}
    for name in ("pretrain_steps", "finetune_steps"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
            overrides[name] = value
    config = dataclasses.replace(config, **overrides, progress=show_progress(args))
    # Both are written after minutes of work: refuse unusable ones now.
    for option, folder in (("--output", args.output), ("--save-dir", args.save_dir)):
        if folder is not None:
            check_folder(folder, option)

    if args.save_dir is not None:
        paths = save_videos(make_test_set(config), args.save_dir)
        print(f"wrote {len(paths)} test videos to {args.save_dir}", file=sys.stderr)
    result = run_demo(config)
    if args.output is not None:
        with atomic_file(args.output / "results.json") as temporary:
            temporary.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    if args.json:
        print(json.dumps(result.to_dict()))  # one line, as every --json of tempme
    else:
        print(format_table(result))
        print(explain(result))
        print(f"({result.seconds:.0f} s)")
    return 0
