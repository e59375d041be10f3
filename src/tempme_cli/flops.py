"""``tempme flops``: per-layer token counts and the video encoder's GFLOPs (random weights, no download)."""

from __future__ import annotations

import argparse
import json

from tempme.config import MERGE_METHODS, preset_names, settings_ignored_by
from tempme.factory import build_config
from tempme.flops import FlopReport, count_video_flops

from .common import (
    DefaultsHelpFormatter, add_schedule_arguments, check_frames_option, exit_status_help, schedule_overrides, user_path,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "flops",
        help="per-layer tokens and GFLOPs of the video encoder",
        description="Build the video encoder with random weights (LoRA folded), run one video through a "
        "multiply-accumulate counter (fvcore convention: the paper's GFLOPs) and print the per-layer token "
        "counts. Nothing is downloaded.",
        epilog=exit_status_help(),
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--config", metavar="CONFIG", type=user_path,
                        help="take the model of a training config (a bundled name such as didemo_b32_tempme, or a "
                        "file): its preset, frames, method and schedule; the options below change them")
    parser.add_argument("--model", choices=preset_names(), help="architecture preset (default: the config's, else ViT-B/32)")
    parser.add_argument("--frames", type=int, help="frames per video (default: the config's, else 12)")
    parser.add_argument("--method", choices=MERGE_METHODS, help="merging method (default: the config's, else tempme; "
                        "another than the config's starts from the paper's schedule for it, which the schedule "
                        "options and KEY=VALUE settings then change)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="change a model setting of the config as tempme train takes it (values are YAML: "
                        "lists as [8,9,10]), e.g. model.schedule.tome_r=3 or model.frames=8; --model, --frames "
                        "and the schedule options win over them")
    add_schedule_arguments(parser)
    parser.set_defaults(handler=run)


def format_report(report: FlopReport) -> str:
    lines = [
        f"{report.preset}, {report.frames} frames, method {report.method}",
        f"{'layer':>5} {'kind':<7} {'attn (clips x tokens)':>22} {'out (clips x tokens)':>21} {'r0':>4} {'r':>4}",
    ]
    clips_in = report.frames
    for row in report.layers:
        attn_clips = clips_in if row.kind != "clipme" else row.clips
        lines.append(
            f"{row.layer:>5} {row.kind:<7} {f'{attn_clips} x {row.attn_tokens}':>22} "
            f"{f'{row.clips} x {row.out_tokens}':>21} {row.r_cross or '':>4} {row.r or '':>4}"
        )
        clips_in = row.clips
    lines.append(f"tokens per video at the output: {report.tokens}")
    lines.append(f"video encoder GFLOPs (multiply-accumulates, LoRA folded): {report.gflops:.2f}")
    return "\n".join(lines)


def resolve_model(args: argparse.Namespace) -> dict:
    """``args.model``, ``frames`` and ``method`` and the schedule overrides, completed from ``--config``'s
    model settings and the ``KEY=VALUE`` overrides where given, else from the defaults. Another method
    than the config's starts from the paper's schedule for it (the overrides apply after that)."""
    model, schedule = {"preset": "ViT-B/32", "frames": 12, "method": "tempme"}, {}
    if args.config or args.overrides:
        from tempme_train.config import apply_overrides, load_config, with_settings

        others = [item for item in args.overrides if not item.startswith("model.")]
        if others:
            raise ValueError(f"{others[0]}: tempme flops reads only the model's settings (model.*)")
        # One video, not the config's batches: their memory check would refuse frames flops can count.
        config = load_config(args.config, settings={"optim.batch_size": 1, "run.eval_batch_size": 1})
        if args.method and args.method != config.model.method:
            config = with_settings(config, {"model.method": args.method, "model.schedule": {}}, "--method")
        settings = apply_overrides(config, args.overrides).model
        model = {"preset": settings.preset, "frames": settings.frames, "method": settings.method}
        schedule = settings.schedule.as_kwargs()
    args.model = args.model or model["preset"]
    args.frames = model["frames"] if args.frames is None else args.frames
    args.method = args.method or model["method"]
    return {**schedule, **schedule_overrides(args)}


def run(args: argparse.Namespace) -> int:
    check_frames_option(args.frames)  # given; the config's model.frames is checked as a config setting
    overrides = resolve_model(args)
    unused = settings_ignored_by(args.method, overrides)  # they would change nothing, without a word
    if unused:
        flags = {"clip_pos_embed": "--no-clip-pos-embed", "prop_attn": "--no-prop-attn"}
        given_as_options = schedule_overrides(args)
        options = ", ".join(flags.get(name, "--" + name.replace("_", "-")) if name in given_as_options
                            else f"model.schedule.{name}" for name in unused)
        raise ValueError(f"{options}: no effect with method {args.method} (it does not read that setting)")
    config = build_config(args.model, method=args.method, frames=args.frames, **overrides)
    report = count_video_flops(config, preset=args.model)
    if args.json:
        print(json.dumps({
            "model": args.model,
            "method": args.method,
            "frames": args.frames,
            "gflops": round(report.gflops, 4),
            "tokens": report.tokens,
            "gflops_by_op": {k: round(v, 4) for k, v in report.by_op.items()},
            "layers": [row.__dict__ for row in report.layers],
        }))
    else:
        print(format_report(report))
    return 0
