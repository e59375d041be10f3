"""Warnings that point at the user's code.

A fixed ``stacklevel`` is right for one call path only: the same check runs under ``create_model``,
``load_model`` or a training run, at different depths, and a warning raised inside torch's data
loader would point into torch. ``warn`` attributes a warning to the first frame outside tempme
and torch instead, which is the line of the user's program that led to it.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

# The package folders whose frames are passed over: tempme's three packages (side by side) and torch.
_LIBRARY_FOLDERS = tuple(
    str(folder) + os.sep
    for folder in (
        *(Path(__file__).parent.parent / name for name in ("tempme", "tempme_train", "tempme_cli")),
        Path(torch.__file__).parent,
    )
)


class SettingsWarning(UserWarning):
    """A warning about settings, annotations or weights: the same for every process of a torchrun
    run, so only its first process shows it (``tempme_cli.main``)."""


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)``, attributed to the first caller outside tempme and torch
    (the outermost frame when there is none, as in a data-loading worker process)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_LIBRARY_FOLDERS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
