"""Progress bars that suit a terminal and a log file alike."""

from __future__ import annotations

import sys
from typing import Iterable

from tqdm import tqdm

# In a log file every redraw is kept: a batch job's output would gather thousands per epoch.
LOG_FILE_INTERVAL_S = 30.0


def progress_bar(iterable: Iterable | None = None, **options) -> tqdm:
    """A tqdm bar on stderr (``options`` are tqdm's). On a terminal it redraws up to ten times a
    second; when stderr is a file or a pipe, at most every ``LOG_FILE_INTERVAL_S`` seconds."""
    if not sys.stderr.isatty():
        options.setdefault("mininterval", LOG_FILE_INTERVAL_S)
        # A second bar would be drawn below the first with cursor-up codes: garbage in a log file.
        options.setdefault("position", 0)
    return tqdm(iterable, **options)


def print_above_bars(message: str) -> None:
    """Print a line to stderr above any progress bar, which is drawn again below it."""
    tqdm.write(message, file=sys.stderr)
