"""``tempme bench``: videos per second and memory of the video encoder, or of a LoRA training step."""

from __future__ import annotations

import argparse
import json
import warnings

import torch

from tempme.baselines import TIMM_MODELS, timm_available
from tempme.bench import (
    ATTENTION_BACKENDS,
    BASELINES,
    COMPILE_MODES,
    benchmark_inference,
    benchmark_training,
    format_results,
    report,
)
from tempme.config import MERGE_METHODS, preset_names
from tempme.merging import MERGE_KERNELS
from tempme.model import INFERENCE_SIZE_ATTENTION, SIZE_ATTENTION
from tempme.precision import PRECISIONS, default_precision

from .common import ParagraphHelpFormatter, check_frames_option, device_option, exit_status_help

EPILOG = """\
examples:
  tempme bench --model ViT-B/32 --frames 12 --batch 4 --device cpu --precision fp32
  tempme bench --model ViT-B/16 --batch 32 --device cuda --precision bf16 --compile --baseline --json
  tempme bench --model ViT-B/16 --batch 32 --device cuda --precision bf16 --cuda-graph --methods none,tempme,merge-free
  tempme bench --model ViT-B/16 --batch 32 --device cuda --precision bf16 --train

Weights and inputs are random (nothing is downloaded); speed does not depend on their values.
Inference: the video encoder alone, optimised for inference (LoRA and QuickGELU's scale folded into
the weights), cast to --precision, under inference_mode. Baselines (--baseline): plain-vit and timm-vit
(unmerged ViTs with fused attention) and merge-free (tempme's token shapes with merging itself free).
Training (--train): video + text forward, symmetric InfoNCE, backward and an AdamW step on LoRA and
clip positional embeddings, float32 weights under autocast to --precision (loss scaling for fp16).
Timing: every method gets a first call ('first s': compilation or graph capture included) and --warmup untimed
calls, then --repeats rounds time each method once in turn, so load from other processes falls on
all alike. 'median ms' is per batch; 'vs none' is the median over rounds of none's time divided by
the method's. On a CPU that other work shares, --threads 1 gives the steadiest figures. Where
'vs none' and the ratio of the median times disagree about which is faster (within 5% of 1 is as
fast) or differ by over 25%, the load changed during the run: a warning says so (JSON: warnings) and more --repeats are needed.
Memory: 'step MiB' is the most tensor memory one call held beyond the weights and inputs (CUDA:
max_memory_allocated minus what was allocated before, not available for CUDA graphs; CPU: counted
per tensor, not the process's resident size, and not available when compiled); 'weights MiB' is the
model's parameters and buffers.
Compiled and CUDA-graph inference runs also compare their embeddings with the same encoder run eagerly
(smallest cosine: the table's last line, cosine_vs_eager in JSON).
See docs/benchmarks.md.

""" + exit_status_help()


def method_list(text: str) -> tuple[str, ...]:
    methods = tuple(part.strip() for part in text.split(",") if part.strip())
    if not methods:
        raise argparse.ArgumentTypeError(f"no method named in {text!r}")
    return methods


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure videos/s and memory of the video encoder (or a training step)",
        description="Time the video encoder of each merging method (and optional plain ViT baselines)\n"
        "on random weights and random videos; report the median time per batch, videos per second,\n"
        "memory, and the ratios against method none.",
        epilog=EPILOG,
        formatter_class=ParagraphHelpFormatter,
    )
    parser.add_argument(
        "--model", default="ViT-B/32", choices=preset_names(), help="architecture preset (default: ViT-B/32)"
    )
    parser.add_argument("--frames", type=int, default=12, help="frames per video (default: 12)")
    parser.add_argument("--batch", "--batch-size", type=int, dest="batch",
                        help="videos per batch (default: 32 on a GPU, 4 on the CPU)")
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda[:N], mps or auto: the GPU where there is one (default: auto)"
    )
    # --dtype, its first name, stays for the scripts and notes that use it.
    parser.add_argument(
        "--precision", "--dtype", choices=("auto", *PRECISIONS), default="auto", dest="precision",
        help="fp32, bf16 or fp16, named as tempme index and optim.precision name them, or auto: bf16 on a CUDA GPU, "
        "else fp32 (default: auto); --dtype is its older name, still taken",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile each encoder (dynamic=False), or with --train the model"
    )
    parser.add_argument(
        "--repeats", type=int, default=10, help="timed calls per method; the median is reported (default: 10)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls after the first one (default: 3)")
    parser.add_argument(
        "--methods",
        type=method_list,
        help=f"comma-separated, from {', '.join(MERGE_METHODS)} and the baselines {', '.join(BASELINES)} "
        "(with --train, merge-free is the only baseline) (default: none,tome,tempme; with --train: none,tempme)",
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also time plain-vit, a plain fused-attention ViT of the same size, timm-vit (timm's CLIP ViT) "
        "where timm imports and the model is a CLIP size, and merge-free, tempme's token shapes with merging "
        "itself free (the ceiling for tempme)",
    )
    parser.add_argument(
        "--size-attention",
        choices=list(SIZE_ATTENTION),
        help="how merged tokens' log(size) enters attention: an additive bias, an extra query/key channel "
        "that keeps bias-free kernels usable, FlexAttention adding it inside its kernel (compiled on first "
        "use; GPU only for --train), values weighted by size with the size as an extra value channel "
        "(the output divided by it; queries and keys keep their width), or auto: channels on a GPU and "
        "bias on a CPU, whichever measured faster there (default: auto for inference, as "
        "optimize_for_inference sets it; bias for --train, as the trainable model has it)",
    )
    parser.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        help="torch.compile mode (implies --compile; reduce-overhead also replays CUDA graphs; default: default)",
    )
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay each encoder as one CUDA graph (captured in the first call; CUDA only, not with --compile); "
        "with --train, the video encoder's forward and backward passes as two graphs",
    )
    parser.add_argument(
        "--attention-backend",
        choices=list(ATTENTION_BACKENDS),
        default="auto",
        help="allow only this scaled_dot_product_attention kernel (default: auto, torch's choice); to see "
        "which kernel suits the size bias or the size channel",
    )
    parser.add_argument(
        "--merge-kernels",
        choices=list(MERGE_KERNELS),
        default="torch",
        help="how tome and tempme plan and apply merges: tensor operations (torch, the default), one fused "
        "Triton kernel for each (triton: CUDA only, needs Triton; the same merges), or auto: triton on a "
        "GPU where Triton is installed, else torch",
    )
    parser.add_argument("--train", action="store_true", help="time a training step instead of inference")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(handler=run)


def chosen_methods(args: argparse.Namespace) -> tuple[str, ...]:
    if args.train and (args.baseline or args.compile_mode):
        raise ValueError("--baseline and --compile-mode apply to inference only, not to --train")
    methods = args.methods or (("none", "tempme") if args.train else MERGE_METHODS)
    if args.baseline:
        with_timm = args.model in TIMM_MODELS and timm_available()
        methods += tuple(name for name in BASELINES if name != "timm-vit" or with_timm)
    return tuple(dict.fromkeys(methods))  # drop repeats, keep order


def run(args: argparse.Namespace) -> int:
    methods = chosen_methods(args)
    check_frames_option(args.frames)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = device_option(args.device)
    on_gpu = device.type == "cuda"
    common = dict(
        merge_kernels=args.merge_kernels,
        frames=args.frames,
        batch=args.batch if args.batch is not None else (32 if on_gpu else 4),
        device=str(device),
        dtype=default_precision(device) if args.precision == "auto" else args.precision,
        repeats=args.repeats,
        warmup=args.warmup,
        progress=not args.json,
    )
    if args.train:
        results = benchmark_training(
            args.model, methods, size_attention=args.size_attention or "bias", compile=args.compile,
            cuda_graph=args.cuda_graph, attention_backend=args.attention_backend, **common,
        )
    else:
        results = benchmark_inference(
            args.model,
            methods,
            compile=args.compile or args.compile_mode is not None,
            compile_mode=args.compile_mode or "default",
            cuda_graph=args.cuda_graph,
            size_attention=args.size_attention or INFERENCE_SIZE_ATTENTION,
            attention_backend=args.attention_backend,
            **common,
        )
    record = report(results)
    print(json.dumps(record) if args.json else format_results(results))
    for warning in record["warnings"]:
        warnings.warn(warning, stacklevel=1)
    return 0
