"""Which torch device a setting names, checked against this machine before any work starts.

torch itself accepts ``cuda:9`` on a one-GPU machine, or ``cuda`` on a CPU-only build, and fails only
at the first tensor moved there, with an assertion that names no setting.
"""

from __future__ import annotations

import torch


class DeviceUnavailable(ValueError):
    """The device asked for does not exist here; the message says why and what to use instead."""


class NoDeviceForProcess(DeviceUnavailable):
    """The machine has the device, but no GPU is left for this process (its LOCAL_RANK)."""


def resolve_device(name: str, local_rank: int = 0, kinds: tuple[str, ...] = ("cpu", "cuda")) -> torch.device:
    """The device ``name`` names: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` (or another of ``kinds``).

    ``auto`` is this process's GPU when CUDA is available, else the CPU. A bare ``cuda`` is this
    process's GPU: ``cuda:local_rank`` (torchrun starts one process per GPU).

    Raises:
        DeviceUnavailable: an unknown name, a kind not in ``kinds``, CUDA or MPS where this torch
            has none, or a GPU index beyond the machine's GPUs.
    """
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        device = torch.device("cuda", local_rank)
    else:
        choices = " or ".join(("auto", *kinds))
        try:
            device = torch.device(name)
        except RuntimeError:
            raise DeviceUnavailable(f"unknown device {name!r}; use {choices}") from None
        if device.type not in kinds:
            raise DeviceUnavailable(f"unsupported device {name!r}; use {choices}")
        if device.type == "cuda" and not torch.cuda.is_available():
            build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise DeviceUnavailable(f"CUDA is not available (torch {torch.__version__}, {build}); use cpu or auto")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise DeviceUnavailable("MPS (Apple GPU) is not available here; use cpu or auto")
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    gpus = f"this machine has {count} GPU{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})"
    if device.index is None or name == "auto":
        if local_rank >= count:
            raise NoDeviceForProcess(
                f"{gpus}, none left for process {local_rank} on it (LOCAL_RANK); start at most {count} "
                "processes per machine (torchrun --nproc_per_node)"
            )
        return torch.device("cuda", local_rank)
    if device.index >= count:
        raise DeviceUnavailable(f"{gpus}; {device} does not exist")
    return device


DEVICE_KINDS = ("cpu", "cuda", "mps", "meta")  # meta: shapes without data (FLOP counts)


def checked_device(device: str | torch.device) -> torch.device:
    """``device`` as torch reads it (a bare ``cuda`` is the current GPU; ``auto``: a GPU where there is
    one), refused at once with a message that says why where this machine has no such GPU (torch
    would assert deep inside the first move of a tensor)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        named = torch.device(device)
    except RuntimeError:
        named = None
    if named is None or named.type not in DEVICE_KINDS:
        raise DeviceUnavailable(f"unknown or unsupported device {device!r}; use auto or {' or '.join(DEVICE_KINDS)}")
    if named.type in ("cuda", "mps"):
        resolve_device(str(named), kinds=("cuda", "mps"))  # raises, saying why, where there is none
    return named
