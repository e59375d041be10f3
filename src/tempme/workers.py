"""How many decoding workers (DataLoader processes, or threads) to start."""

from __future__ import annotations

import os


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def decoding_workers(requested: int, tasks: int) -> int:
    """``requested`` workers (``--workers``, ``data.num_workers``), at most one per task they share out
    and one per available CPU, the CPUs shared among the processes torchrun started on this machine
    (``LOCAL_WORLD_SIZE``), at least one each.

    ``tasks``: what the workers take one at a time (a DataLoader's workers take whole batches;
    ``VideoWindows``' take whole videos): a worker left without one would only cost a process and its
    memory. More workers than CPUs only compete for them (torch warns about it at every loader), and
    what a batch holds does not depend on the number of workers, so either cap changes speed only.
    """
    processes_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(0, min(requested, tasks, max(1, available_cpus() // processes_here)))
