"""Mixed precision for running the encoders: ``fp32``, or ``bf16`` / ``fp16`` autocast."""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = tuple(DTYPES)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to ``precision`` on ``device``'s type; does nothing for ``fp32``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def default_precision(device: torch.device) -> str:
    """bf16 on a GPU (tensor cores, no loss scaling needed), fp32 on the CPU."""
    return "bf16" if device.type == "cuda" else "fp32"
