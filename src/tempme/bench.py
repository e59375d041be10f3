"""Measure the video encoder's inference speed and a LoRA training step's speed and memory.

Everything runs on random weights and random inputs: speed does not depend on the values (token
merging picks *which* tokens merge from the data, but always merges the same number).

Inference casts the model to the chosen dtype, as a deployed model would be; training keeps float32
weights and runs under autocast, as mixed-precision training does. All methods of a call are built
first and timed in alternating rounds in one process, so the ratios against ``none`` compare like
with like even on a machine that other work shares.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from tqdm import tqdm

from .baselines import FrameEncoder, MergeFreeEncoder, PlainViT, timm_encoder
from .config import MERGE_METHODS, get_preset
from .cuda_graph import GraphedForward, graph_for_training
from .devices import resolve_device
from .factory import create_model
from .merging import use_fused_kernels
from .model import INFERENCE_SIZE_ATTENTION, check_size_attention, resolve_size_attention
from .precision import DTYPES
from .progress import progress_bar
from .retrieval import contrastive_loss

BASELINES = ("plain-vit", "timm-vit", "merge-free")
SOT_TOKEN, EOT_TOKEN = 49406, 49407
MIB = 2**20
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
# scaled_dot_product_attention's kernels; "auto" lets torch choose, as the model does outside benchmarks.
ATTENTION_BACKENDS = {
    "auto": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


@dataclass
class Result:
    """One method's measurement. Times are seconds per batch; memory is MiB.

    ``step_memory_mb``: the most tensor memory one step held at once beyond what existed before it
    (weights, inputs and optimizer state excluded), see ``measure_step_memory``. ``weights_mb``: the
    parameters and buffers of the model timed (inference: the video encoder; training: the whole model).
    Their sum is what the method needs at its peak, less the inputs and (training) optimizer state.
    """

    mode: str  # "inference" or "training"
    model: str
    method: str
    frames: int
    batch: int
    device: str
    device_name: str
    threads: int  # torch's intra-op CPU threads
    dtype: str
    compiled: bool
    size_attention: str  # how log(size) entered attention (tempme.model.SIZE_ATTENTION)
    first_call_s: float  # the first call, compilation or graph capture included
    times_s: list[float]
    median_s: float
    videos_per_s: float
    step_memory_mb: float | None
    weights_mb: float
    speedup_vs_none: float | None = None
    memory_vs_none: float | None = None
    cuda_graph: bool = False  # replayed as a CUDA graph (tempme.cuda_graph)
    compile_mode: str = "default"  # torch.compile's mode, when compiled
    attention_backend: str = "auto"  # the only SDPA kernel allowed (ATTENTION_BACKENDS), or torch's choice
    merge_kernels: str = "torch"  # how merges ran (tempme.merging.MERGE_KERNELS)
    # Compiled or CUDA-graph inference: the smallest cosine similarity between its embeddings and the
    # same encoder's run eagerly on the same videos (``cosine_to_eager``); 1.0 is the same directions.
    cosine_vs_eager: float | None = None

    @property
    def execution(self) -> str:
        return "graph" if self.cuda_graph else ("compiled" if self.compiled else "eager")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Setup:
    """What every method of one benchmark call shares."""

    mode: str
    preset: str
    frames: int
    batch: int
    device: torch.device
    dtype: str
    compiled: bool
    size_attention: str = "bias"
    cuda_graph: bool = False
    compile_mode: str = "default"
    attention_backend: str = "auto"
    merge_kernels: str = "torch"


# ----------------------------------------------------------------------------- devices and timing


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo (falling back to ``platform``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    first_call_s: float
    times_s: list[float]

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)


def check_counts(batch: int, repeats: int, warmup: int) -> None:
    """Fail before any model is built."""
    if batch < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need batch >= 1, repeats >= 1 and warmup >= 0; got {batch}, {repeats}, {warmup}")


def time_interleaved(
    steps: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int,
    bar: tqdm | None = None,
) -> dict[str, Timing]:
    """Time several steps in rounds: a first call (compilation, lazy set-up) and ``warmup`` untimed
    calls of each, then ``repeats`` rounds that time every step once. ``bar`` advances once a call.

    Round-robin rather than one method after another: load from other processes on a shared machine
    then falls on all methods alike, so their ratios stay fair even when absolute times drift.
    """

    def call(name: str, step: Callable[[], object], timed: bool) -> float | None:
        if bar is not None:
            bar.set_postfix_str(name, refresh=False)
        seconds = _timed(step, device) if timed else step()
        if bar is not None:
            bar.update()
        return seconds

    first = {name: call(name, step, timed=True) for name, step in steps.items()}
    for _ in range(warmup):
        for name, step in steps.items():
            call(name, step, timed=False)
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(call(name, step, timed=True))
    return {name: Timing(first[name], times[name]) for name in steps}


def _timed(step: Callable[[], object], device: torch.device) -> float:
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- memory


class TensorMemoryTracker(TorchDispatchMode):
    """Peak bytes of tensor storage allocated inside the context and still alive, for CPU runs.

    The process's resident size is no use here: the C allocator keeps freed memory, so a second run
    shows almost no growth. Instead every fresh tensor an aten op returns is counted until its last
    reference (views included) is gone. Kernel scratch space that never becomes a tensor is missed,
    and so is anything inside a ``torch.compile``d graph (its buffers bypass the dispatcher).
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage -> [bytes, live tensors using it]
        self.current = 0
        self.peak = 0
        self._finalizers: list[weakref.finalize] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        if not returns:
            return out
        outputs = (out,) if len(returns) == 1 else out
        for ret, value in zip(returns, outputs):
            # Returns with alias information (views, in-place ops) share an input's storage.
            fresh = ret.alias_info is None
            for tensor in tree_leaves(value):
                if isinstance(tensor, torch.Tensor):
                    self._track(tensor, fresh)
        return out

    def _track(self, tensor: torch.Tensor, fresh: bool) -> None:
        storage = tensor.untyped_storage()
        key, nbytes = storage._cdata, storage.nbytes()
        if key in self.live:
            self.live[key][1] += 1
        elif fresh and nbytes:
            self.live[key] = [nbytes, 1]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        else:
            return  # a view of memory that existed before the context: not ours to count
        self._finalizers.append(weakref.finalize(tensor, self._release, key))

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __exit__(self, *exc):
        for finalizer in self._finalizers:
            finalizer.detach()
        return super().__exit__(*exc)


def measure_step_memory(step: Callable[[], object], device: torch.device, compiled: bool) -> int | None:
    """Bytes of tensor memory ``step`` held at its peak beyond what was allocated before it.

    CUDA: ``max_memory_allocated`` after a reset, less what was allocated before. CPU: counted per
    tensor (``TensorMemoryTracker``); unknown for ``compiled`` steps (any compiled part, FlexAttention
    included), whose buffers it cannot see.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if compiled:
        return None
    with TensorMemoryTracker() as tracker:
        step()
    return tracker.peak


def weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


# ----------------------------------------------------------------------------- inference


def check_methods(methods: Iterable[str], allowed: Iterable[str]) -> tuple[str, ...]:
    methods, allowed = tuple(methods), tuple(allowed)
    unknown = [m for m in methods if m not in allowed]
    if unknown or not methods:
        raise ValueError(f"unknown or no method(s) {unknown}; choose from {', '.join(allowed)}")
    return methods


def resolve_merge_kernels(name: str, device: torch.device) -> str:
    """``torch`` or ``triton``: what ``name`` (one of ``MERGE_KERNELS``) runs on ``device``, as results
    record it. An unknown name, or Triton where it cannot run, fails here, before any model is built."""
    return "triton" if use_fused_kernels(name, device) else "torch"


def build_video_encoder(
    preset: str, method: str, frames: int, size_attention: str = INFERENCE_SIZE_ATTENTION,
    merge_kernels: str = "torch",
) -> nn.Module:
    """``[B, F, 3, H, W]`` -> ``[B, D]``: TempMe's video encoder (optimised for inference) or a baseline.

    ``size_attention`` picks how merged encoders add log(size) to the attention logits (one of
    ``tempme.model.SIZE_ATTENTION``: ``auto``, what ``optimize_for_inference`` picks, ``bias``, ``channels``,
    ``flex`` or ``values``); ``merge_kernels`` how they merge (``tempme.merging.MERGE_KERNELS``).
    """
    check_size_attention(size_attention)
    if method in MERGE_METHODS:
        visual = create_model(preset, method=method, frames=frames).optimize_for_inference().visual
        visual.size_attention, visual.merge_kernels = size_attention, merge_kernels
        return visual
    if method == "merge-free":
        return MergeFreeEncoder(create_model(preset, method="tempme", frames=frames).optimize_for_inference().visual)
    clip = get_preset(preset)
    if method == "plain-vit":
        return FrameEncoder(PlainViT(clip.vision, clip.embed_dim))
    return FrameEncoder(timm_encoder(preset, clip))


def prepare_encoder(
    preset: str, method: str, frames: int, device: torch.device, dtype: torch.dtype, compile: bool,
    size_attention: str = INFERENCE_SIZE_ATTENTION, compile_mode: str = "default", merge_kernels: str = "torch",
) -> nn.Module:
    encoder = build_video_encoder(preset, method, frames, size_attention, merge_kernels)
    encoder = encoder.to(device=device, dtype=dtype).eval()
    return torch.compile(encoder, dynamic=False, mode=compile_mode) if compile else encoder


def check_graph_setup(setup: Setup) -> None:
    if setup.cuda_graph and (setup.device.type != "cuda" or setup.compiled):
        raise ValueError("CUDA graphs need a CUDA device and an uncompiled model (--device cuda, no --compile)")


def inference_step(encoder: nn.Module, video: torch.Tensor, cuda_graph: bool = False) -> Callable[[], torch.Tensor]:
    """One encoder call on ``video``; with ``cuda_graph``, a graph replay, captured in the first call."""
    if not cuda_graph:

        def step() -> torch.Tensor:
            with torch.inference_mode():
                return encoder(video)

        return step
    graphed: list[GraphedForward] = []

    def replay() -> torch.Tensor:
        if not graphed:
            graphed.append(GraphedForward(encoder, video))
        return graphed[0](video)

    return replay


def cosine_to_eager(step: Callable[[], torch.Tensor], encoder: nn.Module, video: torch.Tensor) -> float:
    """The smallest cosine similarity, over the videos of ``video``, between the embeddings ``step``
    gives (a compiled encoder or a CUDA-graph replay of ``encoder``) and ``encoder``'s own eager ones:
    whether the optimised path computes what the reference does, checked where it is timed."""
    optimised = step().clone()  # a graph's or cudagraph tree's output buffer is reused by later calls
    eager = getattr(encoder, "_orig_mod", encoder)  # torch.compile's wrapper keeps the module
    with torch.inference_mode():
        reference = eager(video)
    return torch.nn.functional.cosine_similarity(optimised.float(), reference.float(), dim=-1).min().item()


def with_attention_backend(step: Callable[[], object], backend: str, method: str) -> Callable[[], object]:
    """``step`` run with only ``backend``'s attention kernel allowed (every call, so the first one, which
    compiles or captures, picks that kernel too); ``auto`` leaves the choice to torch."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    if backend == "auto":
        return step

    def restricted() -> object:
        with sdpa_kernel([ATTENTION_BACKENDS[backend]]):
            try:
                return step()
            except RuntimeError as error:
                if not any(text in str(error) for text in ("No available kernel", "No viable backend")):
                    raise
                raise ValueError(
                    f"attention backend {backend!r} cannot run {method!r} here (device, dtype, head size or "
                    "an attention bias rule it out); try auto"
                ) from None

    return restricted


def benchmark_inference(
    preset: str,
    methods: Iterable[str] = MERGE_METHODS,
    frames: int = 12,
    batch: int = 4,
    device: str = "cpu",
    dtype: str = "fp32",
    compile: bool = False,
    repeats: int = 10,
    warmup: int = 3,
    size_attention: str = INFERENCE_SIZE_ATTENTION,
    cuda_graph: bool = False,
    compile_mode: str = "default",
    attention_backend: str = "auto",
    merge_kernels: str = "torch",
    progress: bool = False,
) -> list[Result]:
    """Videos per second and memory of the video encoder, every method on the same random videos.

    Methods: ``none``, ``tome``, ``tempme`` and the baselines ``plain-vit`` (our plain fused-attention
    ViT of the same size), ``timm-vit`` (timm's, where timm imports) and ``merge-free`` (``tempme``'s
    token shapes with merging free, see ``MergeFreeEncoder``). ``compile`` wraps each encoder
    in ``torch.compile(dynamic=False, mode=compile_mode)`` (``reduce-overhead`` adds CUDA graphs);
    compilation falls in ``first_call_s``, not in the timings.
    ``cuda_graph`` replays each encoder as a CUDA graph (``tempme.cuda_graph``), captured in the first
    call. Compiled or graph runs also compare their embeddings with eager ones (``cosine_vs_eager``).
    ``size_attention``: see ``build_video_encoder``. ``attention_backend``: one of
    ``ATTENTION_BACKENDS``, the only attention kernel allowed (``auto``: torch chooses).
    ``merge_kernels``: how tome and tempme merge (``tempme.merging.MERGE_KERNELS``).
    ``progress``: a progress bar on stderr.
    """
    methods = check_methods(methods, MERGE_METHODS + BASELINES)
    check_counts(batch, repeats, warmup)
    device = resolve_device(device)
    merge_kernels = resolve_merge_kernels(merge_kernels, device)
    setup = Setup(
        mode="inference", preset=preset, frames=frames, batch=batch, device=device, dtype=dtype, compiled=compile,
        size_attention=resolve_size_attention(size_attention, device), cuda_graph=cuda_graph, compile_mode=compile_mode,
        attention_backend=attention_backend, merge_kernels=merge_kernels,
    )
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {compile_mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    check_graph_setup(setup)
    torch_dtype = resolve_dtype(dtype)
    size = get_preset(preset).vision.image_size
    video = torch.randn(batch, frames, 3, size, size, device=setup.device, dtype=torch_dtype)
    encoders = {
        m: prepare_encoder(
            preset, m, frames, setup.device, torch_dtype, compile, setup.size_attention, compile_mode, merge_kernels
        )
        for m in methods
    }
    steps = {
        m: with_attention_backend(inference_step(encoder, video, cuda_graph), attention_backend, m)
        for m, encoder in encoders.items()
    }
    results = measure(setup, steps, encoders, repeats, warmup, progress)
    if compile or cuda_graph:
        for result in results:
            result.cosine_vs_eager = cosine_to_eager(steps[result.method], encoders[result.method], video)
    return results


# ----------------------------------------------------------------------------- training


def random_captions(batch: int, length: int, device: torch.device) -> torch.Tensor:
    """Token ids ``[batch, length]``: start token, random ordinary tokens, end token last (no tokenizer
    needed; the text encoder reads its feature at the end token, the largest id)."""
    ids = torch.randint(0, SOT_TOKEN, (batch, length), device=device)
    ids[:, 0], ids[:, -1] = SOT_TOKEN, EOT_TOKEN
    return ids


@dataclass
class TrainingStep:
    """One contrastive step of the paper's fine-tuning: only LoRA and clip positional embeddings
    train (AdamW); float32 weights under autocast, with loss scaling for fp16. ``forward`` is the
    model itself, its ``torch.compile``d wrapper (same parameters) or ``GraphedTrainingForward``."""

    model: nn.Module
    forward: Callable
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    video: torch.Tensor
    captions: torch.Tensor
    dtype: torch.dtype
    autocast_cache: bool = True  # CUDA graphs replay without autocast's cache of cast weights

    def __call__(self) -> torch.Tensor:
        device_type = self.video.device.type
        mixed = self.dtype != torch.float32
        with torch.autocast(device_type, dtype=self.dtype, enabled=mixed, cache_enabled=self.autocast_cache):
            video, text = self.forward(self.video, self.captions)
            loss = contrastive_loss(text, video, self.model.logit_scale)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()


class GraphedTrainingForward:
    """The model's training forward with the video encoder's forward and backward passes replayed as
    CUDA graphs (``graph_for_training``), captured in the first call; the text encoder runs eagerly.
    ``allow_unused``: for an encoder that leaves some trainable parameters unused (merge-free)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, allow_unused: bool = False):
        self.model, self.dtype, self.allow_unused, self.visual = model, dtype, allow_unused, None

    def __call__(self, frames: torch.Tensor, captions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.visual is None:
            self.visual = graph_for_training(self.model.visual, frames, self.dtype, self.allow_unused)
        return self.visual(frames), self.model.encode_text(captions)


def make_training_step(
    preset: str, method: str, frames: int, batch: int, device: torch.device, dtype: torch.dtype,
    size_attention: str = "bias", compile: bool = False, cuda_graph: bool = False, merge_kernels: str = "torch",
) -> TrainingStep:
    check_size_attention(size_attention)
    if compile and cuda_graph:
        raise ValueError("CUDA graphs need an uncompiled model: choose compile or cuda_graph")
    model = create_model(preset, method="tempme" if method == "merge-free" else method, frames=frames, device=device)
    model.train().visual.size_attention = size_attention
    model.visual.merge_kernels = merge_kernels
    if method == "merge-free":
        # The video encoder runs on tempme's token shapes with merging free (its outputs mean nothing).
        model.visual.forward = MergeFreeEncoder(model.visual).forward
    model.set_trainable("lora")
    trainable = [p for p in model.parameters() if p.requires_grad]
    size = model.visual.image_size
    forward = model
    if compile:
        forward = torch.compile(model, dynamic=False)
    elif cuda_graph:
        forward = GraphedTrainingForward(model, dtype, allow_unused=method == "merge-free")
    return TrainingStep(
        model=model,
        forward=forward,
        optimizer=torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.2),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        video=torch.randn(batch, frames, 3, size, size, device=device),
        captions=random_captions(batch, model.config.max_words, device),
        dtype=dtype,
        autocast_cache=not cuda_graph,
    )


def benchmark_training(
    preset: str,
    methods: Iterable[str] = ("none", "tempme"),
    frames: int = 12,
    batch: int = 4,
    device: str = "cpu",
    dtype: str = "fp32",
    repeats: int = 10,
    warmup: int = 3,
    size_attention: str = "bias",
    compile: bool = False,
    cuda_graph: bool = False,
    attention_backend: str = "auto",
    merge_kernels: str = "torch",
    progress: bool = False,
) -> list[Result]:
    """Seconds per training step (video and text forward, symmetric InfoNCE, backward, AdamW on
    LoRA + CPE), and the step's memory (optimizer state created in the first call is excluded).
    ``compile``: the model's forward (and so its backward) through ``torch.compile``. Besides the
    merging methods, ``merge-free`` trains tempme's encoder on its token shapes with merging free.
    ``cuda_graph``: the video encoder's forward and backward passes replayed as CUDA graphs
    (``GraphedTrainingForward``; the step's memory is then not measured).
    ``merge_kernels``: how tome and tempme merge (``tempme.merging.MERGE_KERNELS``).
    ``progress``: a progress bar on stderr."""
    methods = check_methods(methods, MERGE_METHODS + ("merge-free",))
    check_counts(batch, repeats, warmup)
    device = resolve_device(device)
    merge_kernels = resolve_merge_kernels(merge_kernels, device)
    setup = Setup(
        mode="training", preset=preset, frames=frames, batch=batch, device=device, dtype=dtype, compiled=compile,
        size_attention=resolve_size_attention(size_attention, device), cuda_graph=cuda_graph,
        attention_backend=attention_backend, merge_kernels=merge_kernels,
    )
    check_graph_setup(setup)
    steps = {
        m: make_training_step(
            preset, m, frames, batch, setup.device, resolve_dtype(dtype), setup.size_attention, compile, cuda_graph,
            merge_kernels,
        )
        for m in methods
    }
    runs = {m: with_attention_backend(step, attention_backend, m) for m, step in steps.items()}
    return measure(setup, runs, {m: step.model for m, step in steps.items()}, repeats, warmup, progress)


# ----------------------------------------------------------------------------- reporting


def measure(
    setup: Setup, steps: dict[str, Callable[[], object]], models: dict[str, nn.Module], repeats: int, warmup: int,
    progress: bool = False,
) -> list[Result]:
    """Time all steps together, then read each one's memory; ratios are against ``none``.
    ``progress``: a progress bar on stderr, one tick per call."""
    calls = len(steps) * (1 + warmup + repeats + (not setup.cuda_graph))
    with progress_bar(total=calls, desc=f"timing {setup.mode}", unit="call", disable=not progress, leave=False) as bar:
        timings = time_interleaved(steps, setup.device, repeats, warmup, bar)
        partly_compiled = setup.compiled or setup.size_attention == "flex"
        results = []
        for method, step in steps.items():
            # A graph's memory sits in its private pool from the capture on: a replay shows none of it.
            step_bytes = None
            if not setup.cuda_graph:
                bar.set_postfix_str(f"{method} memory", refresh=False)
                step_bytes = measure_step_memory(step, setup.device, partly_compiled)
                bar.update()
            results.append(make_result(setup, method, timings[method], step_bytes, models[method]))
    if "none" in timings:
        add_ratios(results, timings)
    return results


def make_result(setup: Setup, method: str, timing: Timing, step_bytes: int | None, model: nn.Module) -> Result:
    return Result(
        mode=setup.mode,
        model=setup.preset,
        method=method,
        frames=setup.frames,
        batch=setup.batch,
        device=str(setup.device),
        device_name=device_name(setup.device),
        threads=torch.get_num_threads(),
        dtype=setup.dtype,
        compiled=setup.compiled,
        size_attention=setup.size_attention,
        cuda_graph=setup.cuda_graph,
        compile_mode=setup.compile_mode,
        attention_backend=setup.attention_backend,
        merge_kernels=setup.merge_kernels,
        first_call_s=timing.first_call_s,
        times_s=timing.times_s,
        median_s=timing.median_s,
        videos_per_s=setup.batch / timing.median_s,
        step_memory_mb=None if step_bytes is None else round(step_bytes / MIB, 1),
        weights_mb=round(weight_bytes(model) / MIB, 1),
    )


def add_ratios(results: list[Result], timings: dict[str, Timing]) -> None:
    """Speed-up: the median over rounds of ``none``'s time over the method's time in the same round
    (robust to load that changes between rounds). Memory: step memory over ``none``'s."""
    none_times = timings["none"].times_s
    none_memory = next(r.step_memory_mb for r in results if r.method == "none")
    for result in results:
        times = timings[result.method].times_s
        result.speedup_vs_none = statistics.median(n / t for n, t in zip(none_times, times))
        if result.step_memory_mb and none_memory:
            result.memory_vs_none = result.step_memory_mb / none_memory


# How far apart 'vs none' and the ratio of the medians may be before the timings are called unsteady:
# on a steady machine both estimate the same ratio and stay within a few percent of each other.
UNSTEADY_RATIO_GAP = 1.25
# A ratio within this factor of 1 says "as fast as none": timing noise on a steady machine is a few
# percent, so 0.99x beside 1.01x is no disagreement about which is faster.
AS_FAST_AS_NONE = 1.05


def _faster_than_none(ratio: float) -> int:
    """1 where ``ratio`` (none's time over the method's) says faster, -1 slower, 0 as fast."""
    if ratio > AS_FAST_AS_NONE:
        return 1
    return -1 if ratio < 1 / AS_FAST_AS_NONE else 0


def timing_warnings(results: list[Result]) -> list[str]:
    """One warning when, for some method, 'vs none' (a median of per-round ratios) and the ratio of
    the medians disagree about which is faster (beyond ``AS_FAST_AS_NONE``), or differ by over
    ``UNSTEADY_RATIO_GAP``: with few
    rounds, load that came and went during the run decides both, and the table would contradict itself."""
    none = next((r for r in results if r.method == "none"), None)
    if none is None:
        return []
    unsteady = []
    for result in results:
        per_round, of_medians = result.speedup_vs_none, none.median_s / result.median_s
        if per_round is None:
            continue
        opposite = _faster_than_none(per_round) * _faster_than_none(of_medians) < 0
        if opposite or max(per_round, of_medians) > UNSTEADY_RATIO_GAP * min(per_round, of_medians):
            unsteady.append(f"{result.method} {per_round:.2f}x vs {of_medians:.2f}x")
    if not unsteady:
        return []
    return [f"the machine's load varied during the run: 'vs none' and the ratio of the median times disagree "
            f"({', '.join(unsteady)}); time again with more --repeats (and, on a shared CPU, --threads 1)"]


def report(results: list[Result]) -> dict:
    """A JSON-serialisable record of a run: when, with what software, every result, and warnings
    about the timings (:func:`timing_warnings`)."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        # Other processes on the machine skew CPU timings; the load average tells a reader if they did.
        "load_average_1m": os.getloadavg()[0],
        "results": [result.to_dict() for result in results],
        "warnings": timing_warnings(results),
    }


def format_results(results: list[Result]) -> str:
    """A plain-text table, headed by what was measured and where."""
    if not results:
        return "no results"
    first = results[0]
    threads = f", {first.threads} CPU thread{'s' if first.threads > 1 else ''}" if first.device == "cpu" else ""
    settings = f", size attention {first.size_attention}" if first.size_attention != "bias" else ""
    if first.compiled and first.compile_mode != "default":
        settings += f", compile mode {first.compile_mode}"
    if first.attention_backend != "auto":
        settings += f", attention kernel {first.attention_backend}"
    if first.merge_kernels != "torch":
        settings += f", merge kernels {first.merge_kernels}"
    lines = [
        f"{first.mode}: {first.model}, {first.frames} frames, batch {first.batch}, {first.dtype}{settings}, "
        f"{first.device_name} ({first.device}{threads}), torch {torch.__version__}",
    ]
    columns = [  # (heading, format, value)
        ("method", "{:<10}", lambda r: r.method),
        ("run as", "{:>8}", lambda r: r.execution),
        ("first s", "{:>8}", lambda r: f"{r.first_call_s:.2f}"),
        ("median ms", "{:>10}", lambda r: f"{r.median_s * 1e3:.1f}"),
        ("videos/s", "{:>9}", lambda r: f"{r.videos_per_s:.2f}"),
        ("vs none", "{:>8}", lambda r: _ratio(r.speedup_vs_none)),
        ("step MiB", "{:>9}", lambda r: _number(r.step_memory_mb)),
        ("mem vs none", "{:>11}", lambda r: _ratio(r.memory_vs_none)),
        ("weights MiB", "{:>11}", lambda r: f"{r.weights_mb:.0f}"),
    ]
    lines.append(" ".join(fmt.format(heading) for heading, fmt, _ in columns))
    for result in results:
        lines.append(" ".join(fmt.format(value(result)) for _, fmt, value in columns))
    lines.append(
        "vs none: median over rounds of none's time / this method's time; "
        "step MiB: the most tensor memory one call held beyond weights and inputs"
    )
    checked = [r for r in results if r.cosine_vs_eager is not None]
    if checked:
        cosines = ", ".join(f"{r.method} {r.cosine_vs_eager:.5f}" for r in checked)
        lines.append(f"embeddings against the same encoder run eagerly, smallest cosine: {cosines}")
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
