"""Resumable training checkpoints.

A checkpoint is a directory::

    last/
      weights.safetensors   trained parameters (tempme weights file, see modeling.save_trained_weights)
      state.pt              optimizer, scheduler, GradScaler, progress, RNG states
      config.yaml           the resolved training config

It is written to a temporary directory next to it and then renamed into place, so a crash never
leaves a half-written ``last``. (A directory cannot replace a non-empty one in a single rename, so
the old one is first renamed to ``.last.old``; :func:`find_checkpoint` falls back to it if a crash
happened between the two renames.)
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tempme import TempMe
from tempme.files import first_line, sync_file, temporary_directory_for, write_failed
from tempme.pickle_scan import PickleWorkError
from tempme.weights import zip_entries

from .config import TrainConfig, save_config
from .modeling import LAST, WEIGHTS, load_trained_weights, save_trained_weights

# What torch.load raises for a truncated or otherwise damaged file (it names no single type).
_DAMAGED_FILE_ERRORS = (
    RuntimeError, EOFError, OSError, pickle.UnpicklingError, KeyError, TypeError, ValueError, zipfile.BadZipFile,
)

STATE = "state.pt"
CONFIG = "config.yaml"


@dataclass
class Progress:
    """Where a run stands. The epoch and the position inside it follow from ``step``."""

    step: int = 0  # optimizer steps done
    best_r1: float | None = None  # best validation t2v R@1 so far
    # Its t2v mean rank, which breaks ties of R@1 (frequent on a small validation set). None: not
    # recorded (a checkpoint from before this field): ties then keep the earlier best, as before.
    best_mean_rank: float | None = None
    best_step: int | None = None
    skipped_videos: list[str] = field(default_factory=list)  # undecodable videos seen so far
    # The validation (and checkpoint) that falls due at ``step`` has not finished: set when it starts,
    # cleared when it ends, so a run stopped during it (Ctrl-C) runs it on --resume instead of
    # finishing without it.
    validation_due: bool = False
    # Steps whose global batch held at least one decodable sample: 0 after a whole epoch means
    # nothing can be trained. None: not recorded (a checkpoint from before this field).
    steps_with_data: int | None = 0
    # Which training set the steps index into: the number of (video, caption) pairs and, where the
    # dataset lists its videos, a digest of the pairs' video ids. A resumed run must see the same
    # set, or the epochs, the batch order and the learning-rate schedule silently change.
    train_size: int | None = None
    train_digest: str | None = None
    # And of their captions, in order (None: not listed, or a checkpoint from before this field).
    train_captions_digest: str | None = None

    def epoch(self, steps_per_epoch: int) -> int:
        return self.step // steps_per_epoch

    def batch_in_epoch(self, steps_per_epoch: int) -> int:
        return self.step % steps_per_epoch


def rng_states() -> dict[str, Any]:
    """The random generators of Python, NumPy and torch (CPU and CUDA)."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


class _PickledDtype:
    """Stands in for ``numpy.dtype`` while a checkpoint is read: NumPy's own classes would take the
    state a file gives them (a crafted file can set a dtype's internal flags), these only keep it."""

    name: Any = None
    state: Any = None

    def __init__(self, name: Any, *_):
        self.name = name

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _PickledArray:
    """Stands in for a NumPy array while a checkpoint is read (see :class:`_PickledDtype`)."""

    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def to_numpy(self) -> np.ndarray:
        """The array, if it is what NumPy's RNG state holds (624 unsigned 32-bit words); else ValueError."""
        _, shape, dtype, _, data = self.state
        order = dtype.state[1] if isinstance(getattr(dtype, "state", None), tuple) else "<"
        if not (isinstance(dtype, _PickledDtype) and dtype.name == "u4" and order in ("<", "=", "|")
                and isinstance(data, bytes) and shape == (624,) and len(data) == 4 * 624):
            raise ValueError("the NumPy random state holds another array than NumPy's")
        return np.frombuffer(data, dtype="<u4").reshape(shape).copy()


def _reconstruct_array(*_) -> _PickledArray:
    return _PickledArray()


# What a pickled NumPy array names (NumPy 2 and NumPy 1 spell its module differently), read as stand-ins.
_NUMPY_STAND_INS = [
    (_reconstruct_array, "numpy._core.multiarray._reconstruct"),
    (_reconstruct_array, "numpy.core.multiarray._reconstruct"),
    (_PickledArray, "numpy.ndarray"),
    (_PickledDtype, "numpy.dtype"),
]


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    if isinstance(numpy_state[1], _PickledArray):  # as read from a checkpoint
        numpy_state = (numpy_state[0], numpy_state[1].to_numpy(), *numpy_state[2:])
    np.random.set_state(numpy_state)
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        # One state per GPU the saving process saw; a resumed run may see fewer (or more).
        for device, state in enumerate(states["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)


def write_directory_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Fill a fresh temporary directory with ``write(tmp)``, then move it to ``target``."""
    temp = temporary_directory_for(target)
    try:
        write(temp)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old")
    if old.exists() and not target.exists():
        # A save stopped between its two renames: ``old`` is the only copy (find_checkpoint reads it there).
        os.replace(old, target)
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(temp, target)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(output_dir: str | Path) -> Path | None:
    """The run's ``last`` checkpoint, or ``None`` when it has none."""
    output_dir = Path(output_dir)
    for candidate in (output_dir / LAST, output_dir / f".{LAST}.old"):
        if (candidate / STATE).is_file():
            return candidate
    return None


def save_checkpoint(
    directory: Path,
    model: TempMe,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    progress: Progress,
    steps_per_epoch: int,
    base_fingerprint: str | None = None,
) -> None:
    """Write a resumable checkpoint to ``directory`` (atomically).

    ``base_fingerprint``: see :func:`tempme_train.modeling.save_trained_weights`.
    """
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "progress": asdict(progress),
        # Recorded for people reading the file; resuming derives both from progress.step.
        "sampler_epoch": progress.epoch(steps_per_epoch),
        "batch_in_epoch": progress.batch_in_epoch(steps_per_epoch),
        "rng": rng_states(),
    }

    def write(temp: Path) -> None:
        save_trained_weights(model, temp / WEIGHTS, config, base_fingerprint)
        torch.save(state, temp / STATE)
        sync_file(temp / STATE)  # (the other two are written by atomic_file, which flushes them)
        save_config(config, temp / CONFIG)

    try:
        write_directory_atomically(directory, write)
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
        raise write_failed(directory, error) from error


def load_checkpoint(
    directory: Path,
    model: TempMe,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
) -> Progress:
    """Restore everything :func:`save_checkpoint` wrote; returns the run's progress.

    Each failure is a ValueError that names the file and says which it is: unreadable weights, a
    damaged state file (truncated by a full disk or a copy cut short), or a state that does not fit
    this run (other trainable parameters). The number of processes may differ: batches are drawn by
    the global batch's seeds, so any count that divides ``optim.batch_size`` goes on alike.
    """
    remedy = (
        f"resume from an earlier copy of {directory} (put it in its place), or start over "
        "in a new output folder"
    )
    try:
        load_trained_weights(model, directory / WEIGHTS)
    except ValueError as error:  # tempme.weights.WeightsError: it says whether unreadable or another model's
        raise ValueError(f"cannot resume from {directory / WEIGHTS}: {error}; {remedy}") from None
    try:
        # Not the full unpickler, which runs whatever a file names (a run folder may come from someone
        # else): tensors, plain values, and the NumPy array of NumPy's RNG state.
        # torch's reader would unpack overlapping entries to any size, and some pickles take hours to unpickle.
        zip_entries(directory / STATE)
        with torch.serialization.safe_globals(_NUMPY_STAND_INS):
            state = torch.load(directory / STATE, map_location="cpu", weights_only=True)
    except PickleWorkError as error:  # it says what is wrong with which pickle of the file
        raise ValueError(f"cannot resume: {directory / STATE}: {error}; {remedy}") from None
    except pickle.UnpicklingError as error:
        if "global" not in str(error).lower():
            # Not torch's words: they suggest weights_only=False, which would run whatever the file names.
            raise ValueError(f"cannot resume: {directory / STATE} is damaged (not a checkpoint tempme train "
                             f"wrote, or cut short); {remedy}") from None
        raise ValueError(f"cannot resume: {directory / STATE} holds Python objects that tempme train does not save "
                         f"(so it is not read: unpickling them could run any code); {remedy}") from None
    except _DAMAGED_FILE_ERRORS as error:
        raise ValueError(f"cannot resume: {directory / STATE} is damaged ({first_line(error)}); {remedy}") from None
    try:
        optimizer.load_state_dict(state["optimizer"])
        # The scheduler takes every key it is given as an attribute: none may replace one it has
        # besides its state (its optimizer, its methods). Keys it does not know (an older torch's) are harmless.
        foreign = [key for key in state["scheduler"]
                   if key not in scheduler.state_dict() and (not isinstance(key, str) or hasattr(scheduler, key))]
        if foreign:
            raise KeyError(f"scheduler settings {sorted(map(str, foreign))[:3]}")
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        restore_rng_states(state["rng"])
        # Fields a checkpoint written before they existed lacks: unknown, not zero.
        return checked_progress({"steps_with_data": None, **state["progress"]})
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as error:
        raise ValueError(
            f"cannot resume from {directory}: its saved state does not fit this run ({first_line(error)}); "
            "resume with the settings it was saved with, or start over in a new "
            "output folder"
        ) from None


def checked_progress(recorded: dict[str, Any]) -> Progress:
    """A :class:`Progress` from its saved fields, each of the type it is written with (TypeError
    otherwise): they are hashed, compared and printed, which a crafted value could make endless."""
    progress = Progress(**recorded)

    def number(value: Any, kinds: tuple[type, ...], optional: bool = True) -> bool:
        return (optional and value is None) or (isinstance(value, kinds) and not isinstance(value, bool))

    valid = (
        number(progress.step, (int,), optional=False)
        and all(number(getattr(progress, name), (int,)) for name in ("best_step", "steps_with_data", "train_size"))
        and all(number(getattr(progress, name), (int, float)) for name in ("best_r1", "best_mean_rank"))
        and isinstance(progress.validation_due, bool)
        and isinstance(progress.skipped_videos, list) and all(isinstance(v, str) for v in progress.skipped_videos)
        and all(isinstance(getattr(progress, name), (str, type(None))) for name in ("train_digest", "train_captions_digest"))
    )
    if not valid:
        raise TypeError("its progress record holds values of other types than tempme train writes")
    return progress
