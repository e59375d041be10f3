"""Time matching and merging alone, at the token shapes of a real encoder, in several implementations.

    python3 scripts/bench_merging.py --model ViT-B/16 --frames 12 --batch 32 --device cuda --dtype bf16
    python3 scripts/bench_merging.py --model tiny-B/32 --batch 1 --device cpu --dtype fp32 --repeats 3

One forward pass of the tempme encoder (random weights) records every merge it makes: the shapes of
its metric and tokens, r and the CLS count. Those merges then run back to back on random tensors of
the same shapes, with nothing around them, once per variant:

- ``library``: ``tempme.merging`` as it is (``x_b + sum share (x_a - x_b)`` on the moved rows only);
- ``rescale-b``: the merge arithmetic of run 4 (every B token rescaled in place, shares cast to the
  tokens' dtype), for comparison with its profile;
- ``float32-scores``: the library's merges, but matching normalises a half-precision metric to
  float32 and multiplies in float32, as run 4 did (on a GPU the library keeps the metric's half
  dtype and takes a tensor-core product with float32 output);
- ``fused``: the library's fused Triton kernels (``--merge-kernels triton``), one to plan a merge and
  one to apply it (Triton and a CUDA device, or ``TRITON_INTERPRET=1`` on a CPU).

For each variant: the time per batch of all matchings, of all merges (plans made beforehand), and of
both. On CUDA every sequence is captured as a CUDA graph and replayed, as the encoder runs in the
benchmarks, so launch gaps do not count; the figure is the median of ``--repeats`` replays. Needs
src/ on PYTHONPATH or the package installed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

import tempme.model
from tempme.bench import DTYPES, prepare_encoder, synchronize
from tempme.devices import resolve_device
from tempme.config import get_preset
from tempme.merging import (
    add_rows_,
    gather_rows,
    match_patches,
    merge_weighted,
    normalized_patches,
    split_sets,
)


@dataclass
class MergeShape:
    """One merge of the encoder: its metric ``[B, N, C_metric]``, its tokens ``[B, N, C]``, r, CLS count."""

    metric: tuple[int, ...]
    tokens: tuple[int, ...]
    r: int
    num_cls: int
    sized: bool  # whether tokens carry sizes yet (the first merge starts from size 1 everywhere)


def record_merges(encoder: torch.nn.Module, video: torch.Tensor) -> list[MergeShape]:
    """The merges one forward pass makes, in order (their metrics as matched, joined for ClipMe)."""
    metrics: list[tuple[tuple[int, ...], int, int]] = []
    merges: list[MergeShape] = []
    originals = {name: getattr(tempme.model, name) for name in ("bipartite_soft_matching", "match_patches",
                                                                 "merge_weighted")}

    def matching(metric, r, num_cls, fused=False):
        metrics.append((tuple(metric.shape), r, num_cls))
        return originals["bipartite_soft_matching"](metric, r, num_cls, fused)

    def matching_joined(patches, r, num_cls, fused=False):  # ClipMe: normalised patches, CLS rows not included
        batch, num_patches, channels = patches.shape
        metrics.append(((batch, num_cls + num_patches, channels), r, num_cls))
        return originals["match_patches"](patches, r, num_cls, fused)

    def merging(plan, x, size, source=None):
        metric, r, num_cls = metrics[-1]
        merges.append(MergeShape(metric, tuple(x.shape), r, num_cls, size is not None))
        return originals["merge_weighted"](plan, x, size, source)

    replacements = {"bipartite_soft_matching": matching, "match_patches": matching_joined, "merge_weighted": merging}
    try:
        for name, function in replacements.items():
            setattr(tempme.model, name, function)
        with torch.inference_mode():
            encoder(video)
    finally:
        for name, function in originals.items():
            setattr(tempme.model, name, function)
    return merges


def merge_library(plan, x, size, shape: MergeShape):
    return merge_weighted(plan, x, size)[:2]


def merge_rescale_b(plan, x, size, shape: MergeShape):
    """Run 4's arithmetic: kept rows copied, every B token rescaled, moved rows scaled and added."""
    kept_size, moved_size = gather_rows(size, plan.keep_rows), gather_rows(size, plan.src_rows)
    new_size = add_rows_(kept_size.clone(), plan.dst_rows, moved_size)
    a_start, _ = split_sets(shape.num_cls)
    b_first = shape.num_cls + len(range(shape.num_cls + a_start, plan.tokens_in, 2)) - shape.r  # CLS, unmerged A
    b_share = (kept_size[:, b_first:] / new_size[:, b_first:]).to(x.dtype)
    moved_share = (moved_size / gather_rows(new_size, plan.dst_rows)).to(x.dtype)
    merged = gather_rows(x, plan.keep_rows)
    merged[:, b_first:] *= b_share
    return add_rows_(merged, plan.dst_rows, gather_rows(x, plan.src_rows) * moved_share), new_size


def match_library(metric, r, num_cls):
    return match_patches(normalized_patches(metric, num_cls), r, num_cls)


def match_float32(metric, r, num_cls):
    return match_patches(normalized_patches(metric, num_cls, dtype=torch.float32), r, num_cls)


def match_fused(metric, r, num_cls):
    return match_patches(normalized_patches(metric, num_cls), r, num_cls, fused=True)


@dataclass(frozen=True)
class Variant:
    merge: Callable
    match: Callable = match_library
    needs_gpu: bool = False  # timed only where it runs natively (interpreted Triton times nothing real)


VARIANTS = {
    "library": Variant(merge_library),
    "rescale-b": Variant(merge_rescale_b),
    "float32-scores": Variant(merge_library, match=match_float32),
    "fused": Variant(merge_library, match=match_fused, needs_gpu=True),  # a fused plan is applied fused
}


@dataclass
class Inputs:
    metrics: list[torch.Tensor]
    tokens: list[torch.Tensor]
    sizes: list[torch.Tensor]


def make_inputs(merges: list[MergeShape], device, dtype) -> Inputs:
    generator = torch.Generator(device="cpu").manual_seed(0)

    def random(shape, tensor_dtype):
        return torch.randn(shape, generator=generator).to(device=device, dtype=tensor_dtype)

    sizes = []
    for merge in merges:
        batch, tokens = merge.tokens[:2]
        size = torch.rand(batch, tokens, 1, generator=generator) * 3 + 1 if merge.sized else torch.ones(batch, tokens, 1)
        sizes.append(size.to(device))
    return Inputs([random(m.metric, dtype) for m in merges], [random(m.tokens, dtype) for m in merges], sizes)


def sequences(merges: list[MergeShape], inputs: Inputs, variant: Variant) -> dict[str, Callable[[], object]]:
    """The three timed sequences of one variant: matching only, merging only (plans made now), both."""
    merge = variant.merge

    def match(i: int):
        return variant.match(inputs.metrics[i], merges[i].r, merges[i].num_cls)

    with torch.inference_mode():
        plans = [match(i) for i in range(len(merges))]

    def matching():
        return [match(i) for i in range(len(merges))]

    def merging():
        return [merge(plans[i], inputs.tokens[i], inputs.sizes[i], merges[i]) for i in range(len(merges))]

    def both():
        return [merge(match(i), inputs.tokens[i], inputs.sizes[i], merges[i]) for i in range(len(merges))]

    return {"matching": matching, "merging": merging, "both": both}


def time_sequence(sequence: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of one call of ``sequence``, replayed as a CUDA graph on a GPU."""
    with torch.inference_mode():
        for _ in range(2):
            sequence()
        synchronize(device)
        run = sequence
        if device.type == "cuda":
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                sequence()
            run = graph.replay
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B/16")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--variants", help="comma-separated, of: " + ", ".join(VARIANTS)
                        + " (default: all, fused on a GPU only)")
    args = parser.parse_args()

    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    size = get_preset(args.model).vision.image_size
    encoder = prepare_encoder(args.model, "tempme", args.frames, device, dtype, False, "bias")
    video = torch.randn(args.batch, args.frames, 3, size, size, device=device, dtype=dtype)
    merges = record_merges(encoder, video)
    del encoder
    print(f"{len(merges)} merges of tempme {args.model}, {args.frames} frames, batch {args.batch}, {args.dtype}, "
          f"{device}{' (CUDA graphs)' if device.type == 'cuda' else ''}: ms per batch, median of {args.repeats}")
    print(f"  {'variant':14s} {'matching':>9s} {'merging':>9s} {'both':>9s}")
    names = args.variants.split(",") if args.variants else [
        name for name, variant in VARIANTS.items() if device.type == "cuda" or not variant.needs_gpu
    ]
    for name in names:
        variant = VARIANTS[name]
        inputs = make_inputs(merges, device, dtype)
        timed = {part: 1e3 * time_sequence(run, device, args.repeats)
                 for part, run in sequences(merges, inputs, variant).items()}
        print(f"  {name:14s} {timed['matching']:9.3f} {timed['merging']:9.3f} {timed['both']:9.3f}")


if __name__ == "__main__":
    main()
