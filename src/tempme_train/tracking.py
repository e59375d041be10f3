"""Metrics output: one JSON object per line in ``metrics.jsonl``, optionally mirrored to TensorBoard."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .config import ConfigError

METRICS_FILE = "metrics.jsonl"


def require_tensorboard(source: str) -> None:
    """Fail before training starts when TensorBoard logging is requested but not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as error:
        raise ConfigError(
            source, "run.tensorboard", True,
            "the tensorboard package is not installed (pip install 'tempme[tensorboard]', or set run.tensorboard=false)",
        ) from error


class MetricsLog:
    """Appends records like ``{"kind": "train", "step": 10, "loss": 2.1, ...}`` (rank 0 only).

    Appending keeps the records of earlier sessions of a resumed run in the same file.
    """

    def __init__(self, output_dir: Path, tensorboard: bool = False):
        self.path = output_dir / METRICS_FILE
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"))

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for name, value in _flatten(values).items():
                self.writer.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested dicts, keyed ``t2v/R1``."""
    flat: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat
