"""Helpers for training and evaluating in several processes (torchrun); in a single process every
function runs its local work only.

How gradients are combined (and why it is exact)
-------------------------------------------------
Each of the W processes encodes its share of the global batch, then all features are gathered and
*every* process computes the same global loss L over the full batch (``all_gather_with_grad``). The
gather's backward keeps only the slice of the gradient that belongs to this process's own features,
so backpropagation on process r yields g_r, the part of dL/dθ that flows through r's samples.
The full gradient is dL/dθ = Σ_r g_r, so :func:`all_reduce_gradients` *sums* the parameter gradients
over processes. Every process then holds exactly the gradient one process would compute on the whole
global batch, and all processes take the same optimizer step.

The reference instead lets DistributedDataParallel *average* the g_r, which gives dL/dθ / W (SPEC
section 6); Adam is almost invariant to that scale, but gradient clipping and epsilon are not, so the
results would depend on the number of GPUs. (To train as the paper's 4 GPUs did, the trainer divides
the exact gradient by ``optim.gradient_divisor``, 4 by default, whatever W is.) We do not wrap the model in DDP: a plain summed
all-reduce after backward is simpler, gives the exact global gradient, and has no trouble with
parameters that a batch leaves unused (a clip positional embedding is skipped when its layer merges
nothing).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

if dist.is_available():
    # Before any process group exists, on purpose: torch.distributed.nn.functional takes the default
    # group as default arguments when first imported, and torch imports it lazily (building the
    # optimizer reaches it), after init_process_group. Those defaults would keep the Gloo group and
    # its threads alive past destroy_process_group() into interpreter shutdown, where a thread
    # freeing the last collective's tensor aborts the process ("terminate called without an
    # active exception") after a run that finished well.
    import torch.distributed.nn  # noqa: F401

COLLECTIVE_TIMEOUT_MINUTES = 60


@dataclass(frozen=True)
class WorldInfo:
    """This process's place among the training processes (torchrun sets the environment)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs and writes the checkpoints and metrics."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world_from_env() -> WorldInfo:
    """Read ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` (set by torchrun); defaults to one process."""
    return WorldInfo(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


def init_distributed(use_cuda: bool) -> WorldInfo:
    """Join the process group when there are several processes (NCCL on GPUs, Gloo on CPUs).

    ``MASTER_ADDR``/``MASTER_PORT`` come from the environment (torchrun sets them).
    """
    world = world_from_env()
    if world.distributed and not dist.is_initialized():
        if use_cuda:
            # NCCL barriers and object collectives run on the current device: make it this process's GPU.
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=world.rank,
            world_size=world.world_size,
            # The others wait while rank 0 writes checkpoints, and a slow node's decoding can hold all up.
            timeout=datetime.timedelta(minutes=COLLECTIVE_TIMEOUT_MINUTES),
        )
    return world


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(use_cuda: bool) -> Iterator[WorldInfo]:
    """:func:`init_distributed` for the block; the group is closed after it unless it existed before
    (a caller, e.g. a test harness, that created it closes it)."""
    existed = dist.is_available() and dist.is_initialized()
    world = init_distributed(use_cuda)
    try:
        yield world
    finally:
        if world.distributed and not existed:
            shutdown()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    """Where tensors for a collective must be: this process's GPU with NCCL, the CPU with Gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def is_main_process() -> bool:
    """Rank 0, or the only process."""
    return not _active() or dist.get_rank() == 0


def rank_and_size() -> tuple[int, int]:
    """This process's rank and the number of processes: ``(0, 1)`` alone."""
    return (dist.get_rank(), dist.get_world_size()) if _active() else (0, 1)


def share(count: int) -> range:
    """This process's share of ``count`` items: every W-th from its rank (``range(count)`` alone)."""
    if not _active():
        return range(count)
    return range(dist.get_rank(), count, dist.get_world_size())


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of every process's ``tensor`` (same shape everywhere), on its own device.

    Joins results computed over :func:`share`: each process fills its rows, leaving the others zero.
    Booleans are summed as integers and come back as booleans (any process's True).
    """
    if not _active():
        return tensor
    summed = tensor.to(_collective_device(), torch.int32 if tensor.dtype == torch.bool else tensor.dtype, copy=True)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return (summed > 0 if tensor.dtype == torch.bool else summed).to(tensor.device)


# How gloo and NCCL say that the other end of a collective went away (killed, out of host memory,
# its node down) or stopped answering; errors of this process's own (NCCL out of memory, say) do not count.
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "remote process exited or there was a network error")


def lost_another_process(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another process went away."""
    if not isinstance(error, RuntimeError) or isinstance(error, FailedElsewhere):
        return False
    text = str(error)
    network_error = getattr(torch.distributed, "DistNetworkError", ())
    return (isinstance(error, network_error) or any(words in text for words in _PEER_LOST)
            or ("gloo/transport" in text and "Timed out waiting" in text))


class FailedElsewhere(RuntimeError):
    """Another process failed in a block of :func:`failures_shared`; the message names it and its error.
    A process of rank 1 or more does not print it (``tempme_cli.main``): the failed process does, and so does rank 0."""


class BadInputElsewhere(FailedElsewhere, ValueError):
    """As :class:`FailedElsewhere`, for bad input there (a ValueError, TypeError or OSError, which the command
    line prints as one line)."""


@dataclass
class SharedEnd:
    """What every process learnt at the end of a :func:`failures_shared` block."""

    stop_requested: bool = False  # some process asked to stop (see failures_shared)


@contextlib.contextmanager
def failures_shared(stop_requested: bool = False) -> Iterator[SharedEnd]:
    """Run a block of this process's own work, then stop every process if any of them failed in it.

    The block's end is a collective (it also serves as a barrier): every process learns whether
    another one raised an Exception in its block. The failed process raises its own error, unless a
    lower rank failed with the same one; the others raise :class:`FailedElsewhere` (or
    :class:`BadInputElsewhere`) naming the lowest rank that failed (with their error) and its error. Without
    this an error on one process (a video it alone reads, a full disk on rank 0) leaves the others
    waiting in their next collective for one that has gone: with NCCL, until the collective timeout.
    A KeyboardInterrupt in the block is not shared: it stops this process at once (in a training
    loop under torchrun, signals are held and shared instead: ``stop_requested``).

    ``stop_requested`` (a signal this process holds back, see ``tempme_train.train.stops_held``)
    travels with the same collective: the yielded :class:`SharedEnd` says afterwards whether any
    process asked, so that all of them stop after the same step.
    """
    # Made before the block: after a GPU out-of-memory error, allocating it could fail too.
    failed = torch.zeros(1, device=_collective_device()) if _active() else None
    end = SharedEnd()
    error: Exception | None = None
    try:
        yield end
    except Exception as raised:  # noqa: BLE001 - raised again below, on this process or as the others' cause
        error = raised
    if failed is None:
        if error is not None:
            raise error
        end.stop_requested = stop_requested
        return
    failed.fill_(2.0 if error is not None else float(stop_requested))
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    state = failed.item()
    if state < 2:
        end.stop_requested = state == 1
        return
    # Bad input as the command line prints it (one line): ValueError, TypeError, OSError.
    bad_input = isinstance(error, (ValueError, TypeError, OSError))
    described = None if error is None else (f"{type(error).__name__}: {error}", bad_input)
    reports = all_gather_objects(described)
    # A process whose error a lower rank also had (a bad setting all of them read) names that rank
    # instead: the command line prints each error once, from the lowest rank that had it.
    rank, (message, bad_input) = next((rank, report) for rank, report in enumerate(reports)
                                      if report is not None and (error is None or report == described))
    if rank == dist.get_rank():
        raise error
    kind = BadInputElsewhere if bad_input else FailedElsewhere
    raise kind(f"process {rank} of {len(reports)} failed: {message}") from error


class _GatherWithGrad(torch.autograd.Function):
    """Concatenate every process's rows; the backward returns this process's rows of the gradient."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        counts = _gather_counts(local.shape[0], local.device)
        largest = max(counts)
        # all_gather needs equal shapes; batches can differ when undecodable videos were dropped.
        padded = local.new_zeros((largest, *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous())
        rank = dist.get_rank()
        ctx.start = sum(counts[:rank])
        ctx.count = counts[rank]
        return torch.cat([part[:count] for part, count in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad[ctx.start : ctx.start + ctx.count]


def _gather_counts(count: int, device: torch.device) -> list[int]:
    local = torch.tensor([count], device=device)
    counts = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, local)
    return [int(c.item()) for c in counts]


def all_gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    """``[n_r, ...]`` on each process -> ``[Σ n_r, ...]`` in rank order, differentiable.

    Gradients flow back only into this process's rows (see the module docstring for why that,
    plus :func:`all_reduce_gradients`, gives the exact global gradient).
    """
    if not _active():
        return local
    return _GatherWithGrad.apply(local)


def all_reduce_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over processes, in one flat buffer.

    A parameter without a gradient on some process contributes zeros; one that no process used
    keeps ``grad = None``, so the optimizer skips it exactly as it would in a single process.
    """
    if not _active():
        return
    params = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    used = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device, dtype=grads[0].dtype)
    flat = torch.cat([g.reshape(-1) for g in grads] + [used])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for param, used_anywhere in zip(params, flat[-len(params) :].tolist()):
        count = param.numel()
        param.grad = flat[offset : offset + count].view_as(param).clone() if used_anywhere else None
        offset += count


def broadcast_parameters(params: Iterable[torch.nn.Parameter], src: int = 0) -> None:
    """Copy rank ``src``'s values into every process (identical starting points)."""
    if not _active():
        return
    for param in params:
        dist.broadcast(param.data, src=src)


def all_gather_objects(value: Any) -> list[Any]:
    """Every process's ``value`` (picklable), in rank order; ``[value]`` in a single process."""
    if not _active():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered

