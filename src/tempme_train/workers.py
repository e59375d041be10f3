"""How many DataLoader worker processes to start."""

from __future__ import annotations

import os


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def loader_workers(requested: int) -> int:
    """``requested`` (``data.num_workers``), at most one per available CPU, the CPUs shared among the
    processes torchrun started on this machine (``LOCAL_WORLD_SIZE``), at least one each.

    More decoding processes than CPUs only compete for them, and torch warns about it at every
    loader (4, the default, is more than a laptop or a small cloud machine has). What a batch holds
    does not depend on the number of workers (see ``data.py``), so the cap changes speed only.
    """
    processes_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return min(requested, max(1, available_cpus() // processes_here))
