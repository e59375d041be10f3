"""Warnings that point at the user's code.

A fixed ``stacklevel`` is right for one call path only: the same check runs under ``create_model``,
``load_model`` or a training run, at different depths, and a warning raised inside torch's data
loader would point into torch. ``warn`` attributes a warning to the first frame outside tempme
and torch instead, which is the line of the user's program that led to it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path

import torch

# Where frames are passed over: tempme's three packages (side by side), torch, and contextlib (whose
# frames stand between a context manager's code and the ``with`` that uses it).
_LIBRARY_PATHS = (
    *(str(folder) + os.sep for folder in (
        *(Path(__file__).parent.parent / name for name in ("tempme", "tempme_train", "tempme_cli")),
        Path(torch.__file__).parent,
    )),
    contextlib.__file__,
)


class SharedWarning(UserWarning):
    """A warning that every process of a torchrun run gives alike (about the settings, annotations or
    weights they all read, or the metrics they all compute): only the first process shows it
    (``tempme_cli.main``)."""


class VideoEncoderWarning(SharedWarning):
    """A warning about the video encoder alone (its merge schedule, its clip positional embeddings):
    nothing to say where a model is loaded only to encode text (``tempme search``'s queries)."""


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)``, attributed to the first caller outside tempme and torch
    (the outermost frame when there is none, as in a data-loading worker process)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_LIBRARY_PATHS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
