"""Where one video encoder's inference (or training) time goes: torch.profiler's busiest operators.

    python3 scripts/profile_encoder.py --model ViT-B/16 --batch 32 --device cuda --dtype bf16
    python3 scripts/profile_encoder.py --model ViT-B/32 --batch 4 --device cpu --dtype fp32 --method none
    python3 scripts/profile_encoder.py --model ViT-B/16 --batch 32 --device cuda --dtype bf16 --train

Builds the encoder as ``tempme bench`` does (random weights, optimised for inference), runs a few
warm-up calls, profiles ``--calls`` calls and prints the operators that took the most time on the
device (the GPU, or the CPU for a CPU run), and roughly the share of that time in the operators
token merging uses (sorting, gathering, scattering ...; a few of them also run elsewhere, so this
overstates merging a little: ``tempme bench --methods tempme,merge-free`` measures its real cost).
Then the time of each part of the encoder: matching (the merge metric's normalisation included),
applying merges, joining clips, attention, MLP, layer norms (ranges that this script alone adds
around those functions; the library carries no profiling code; none with ``--compile``). With
``--train``, whole training steps as ``tempme bench --train`` runs them (video and text forward,
contrastive loss, backward, AdamW), the parts' ranges covering the video encoder's forward pass, and
then the backward functions autograd ran, by their time. Needs src/ on PYTHONPATH or the package
installed.
"""

from __future__ import annotations

import argparse
import functools

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

import tempme.model
from tempme.merging import MERGE_KERNELS
from tempme.model import SIZE_ATTENTION, resolve_size_attention
from tempme.bench import DTYPES, make_training_step, prepare_encoder, synchronize
from tempme.devices import resolve_device
from tempme.config import get_preset

# Operators that token merging issues; attention, MLP and norms use none of them (cat and div appear
# in the embedding and the final normalisation too).
MERGE_OPERATORS = ("sort", "argsort", "gather", "index_select", "index_add_", "max", "arange",
                   "linalg_vector_norm", "clamp_min", "div", "sub_", "mul_", "cat", "bmm", "log")


# The encoder's parts, each timed as one range: model-level functions of tempme.model, and modules.
REGION_FUNCTIONS = {"bipartite_soft_matching": "matching", "normalized_patches": "matching",
                    "match_patches": "matching", "merge_weighted": "apply merge", "join_clips": "join clips"}
REGION_MODULES = {"attn": "attention", "mlp": "mlp", "ln_1": "layer norm", "ln_2": "layer norm"}
REGION_PREFIX = "part: "
BACKWARD_PREFIX = "autograd::engine::evaluate_function: "


def in_range(name: str, function):
    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        with record_function(REGION_PREFIX + name):
            return function(*args, **kwargs)

    return wrapped


def annotate_regions(encoder: nn.Module) -> None:
    """Wrap the encoder's parts in profiler ranges (this process only)."""
    for function, name in REGION_FUNCTIONS.items():
        if hasattr(tempme.model, function):
            setattr(tempme.model, function, in_range(name, getattr(tempme.model, function)))
    for module in encoder.modules():
        for child, name in REGION_MODULES.items():
            part = getattr(module, child, None)
            if isinstance(part, nn.Module):
                part.forward = in_range(name, part.forward)


def print_regions(events, calls: int, on_device: bool) -> None:
    """Time per part and call. On the GPU each part has two figures: ``kernels``, the time of the
    kernels it launched, and ``span``, how long it lasted on the GPU's timeline (kernels plus the gaps
    between them, which CUDA graphs shrink). On the CPU, its wall time."""
    rows: dict[str, dict[str, float]] = {}
    for event in events:
        if not event.key.startswith(REGION_PREFIX):
            continue
        row = rows.setdefault(event.key.removeprefix(REGION_PREFIX), {"count": event.count // calls})
        if not on_device:
            row["cpu"] = event.cpu_time_total / 1e3 / calls
        elif event.device_type == DeviceType.CPU:  # the range as the CPU saw it: its kernels' time
            row["kernels"] = event.device_time_total / 1e3 / calls
        else:  # the same range as the GPU ran it
            row["span"] = event.device_time_total / 1e3 / calls
    if not rows:
        return
    if on_device:
        print("device time per call, by part of the encoder (kernels / span on the GPU's timeline):")
        for name, row in sorted(rows.items(), key=lambda item: -item[1].get("kernels", 0)):
            print(f"  {name:14s} {row.get('kernels', 0):7.2f} ms / {row.get('span', 0):7.2f} ms  ({row['count']} per call)")
    else:
        print("CPU time per call, by part of the encoder:")
        for name, row in sorted(rows.items(), key=lambda item: -item[1]["cpu"]):
            print(f"  {name:14s} {row['cpu']:7.2f} ms  ({row['count']} per call)")


def print_backward(events, calls: int, on_device: bool, rows: int) -> None:
    """Time per call of each backward function autograd ran (its kernels on the GPU, else CPU time)."""
    timed = [
        (event.key.removeprefix(BACKWARD_PREFIX), event.count // calls,
         (event.device_time_total if on_device else event.cpu_time_total) / 1e3 / calls)
        for event in events if event.key.startswith(BACKWARD_PREFIX)
    ]
    if not timed:
        return
    total = sum(ms for _, _, ms in timed)
    print(f"backward functions, {'device' if on_device else 'CPU'} time per call ({total:.2f} ms in all):")
    for name, count, ms in sorted(timed, key=lambda row: -row[2])[:rows]:
        print(f"  {name:40s} {ms:7.2f} ms  ({count} per call)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B/16")
    parser.add_argument("--method", default="tempme")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--size-attention", choices=list(SIZE_ATTENTION),
                        help="how log(size) enters attention (default: auto, as optimize_for_inference sets "
                        "it; bias with --train, as the trainable model has it)")
    parser.add_argument("--merge-kernels", choices=list(MERGE_KERNELS), default="torch",
                        help="how merges run (triton: fused kernels, which the aten share below leaves out; "
                        "the parts' times include them)")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--compile", action="store_true",
                        help="profile the torch.compile'd encoder (its fused kernels; no per-part figures)")
    parser.add_argument("--train", action="store_true",
                        help="profile training steps (forward, backward, AdamW) instead of inference")
    args = parser.parse_args()

    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    form = args.size_attention or ("bias" if args.train else "auto")
    if args.train:
        step = make_training_step(args.model, args.method, args.frames, args.batch, device, dtype, form, args.compile,
                                  merge_kernels=args.merge_kernels)
        encoder, call, mode = step.model.visual, step, torch.enable_grad
    else:
        size = get_preset(args.model).vision.image_size
        encoder = prepare_encoder(args.model, args.method, args.frames, device, dtype, args.compile, form,
                                  merge_kernels=args.merge_kernels)
        video = torch.randn(args.batch, args.frames, 3, size, size, device=device, dtype=dtype)
        call, mode = functools.partial(encoder, video), torch.inference_mode
    if not args.compile:  # the parts' ranges would split a compiled graph
        annotate_regions(encoder)
    with mode():
        for _ in range(3):
            call()
        synchronize(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as profiler:
            for _ in range(args.calls):
                call()
            synchronize(device)

    events = profiler.key_averages()
    on_device = device.type == "cuda"
    sort_key = "self_device_time_total" if on_device else "self_cpu_time_total"

    def self_time(event) -> float:
        return getattr(event, sort_key)

    total = sum(self_time(e) for e in events if e.key.startswith("aten::")) or 1.0
    merging = sum(
        self_time(e) for e in events
        if e.key.startswith("aten::") and e.key.removeprefix("aten::") in MERGE_OPERATORS
    )
    what = f"{args.method}{' compiled' if args.compile else ''}{' training' if args.train else ''}"
    what += f", merge kernels {args.merge_kernels}" if args.merge_kernels != "torch" else ""
    print(f"{what} {args.model}, size attention {resolve_size_attention(form, device)}, {args.frames} frames, batch {args.batch}, {args.dtype}, {device}: "
          f"{args.calls} calls, {total / 1e3 / args.calls:.1f} ms of {'device' if on_device else 'CPU'} "
          f"time per call in aten operators; merging's operators about {100 * merging / total:.1f}%")
    # Wide enough for CUDA kernel names: at 60 characters run 4's gather, index and copy kernels
    # all read "at::native::elementwise_kernel<128, 4, at::native::g...".
    print(events.table(sort_by=sort_key, row_limit=args.rows, max_name_column_width=140))
    print_regions(events, args.calls, on_device)
    print_backward(events, args.calls, on_device, args.rows)


if __name__ == "__main__":
    main()
