"""Metrics output: one JSON object per line in ``metrics.jsonl``, optionally mirrored to TensorBoard."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tempme.files import atomic_file

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

    Appending keeps the records of earlier sessions of a resumed run in the same file. ``start_step``
    is the step the run (re)starts from: records of later steps, written by a session that stopped
    before checkpointing them, describe steps that are about to be trained again and are dropped
    first, so every step appears once (TensorBoard drops its own with ``purge_step``). So is an earlier
    session's summary: the run's summary is written once, when it ends.
    """

    def __init__(self, output_dir: Path, tensorboard: bool = False, start_step: int = 0):
        self.path = output_dir / METRICS_FILE
        if self.path.is_symlink():  # appending would write wherever it points (a run folder from elsewhere)
            raise ValueError(f"{self.path} is a symbolic link; the files of a run folder are written by tempme "
                             "train itself: remove it")
        drop_records_after(self.path, start_step)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)

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


def drop_records_after(path: Path, step: int) -> None:
    """Rewrite the metrics file ``path`` (atomically) without the records of steps after ``step``, and
    without summaries (a session that ended, to be continued).

    A last line cut short (the process was killed while writing it) is dropped too; other lines
    that are not JSON are kept as they are. Nothing is written when nothing is dropped.
    """
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except ValueError:
            if number < len(lines):
                kept.append(line)
            continue
        if not isinstance(record, dict):
            kept.append(line)
        elif record.get("kind") != "summary" and not (isinstance(record.get("step"), int) and record["step"] > step):
            kept.append(line)
    if len(kept) == len(lines):
        return
    with atomic_file(path) as temporary:
        temporary.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
