"""Progress bars that suit a terminal and a log file alike."""

from __future__ import annotations

import sys
from typing import Iterable

from tqdm import tqdm

# In a log file every redraw is kept: a batch job's output would gather thousands per epoch.
LOG_FILE_INTERVAL_S = 30.0


class LogLines:
    """A log file as a progress bar's output: each redraw a line of its own. tqdm starts a redraw with
    a carriage return, which a file keeps, so the next redraw, or a warning printed meanwhile, would
    continue the last one's line (and a ``grep -v`` for the bar would drop the warning with it)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip(" \n")
        if text:  # tqdm also writes blanks to clear its line, and a lone newline when it closes
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()

    @property
    def encoding(self) -> str | None:
        return getattr(self.stream, "encoding", None)


def progress_bar(iterable: Iterable | None = None, **options) -> tqdm:
    """A tqdm bar on stderr (``options`` are tqdm's). On a terminal it redraws up to ten times a
    second; when stderr is a file or a pipe, at most every ``LOG_FILE_INTERVAL_S`` seconds, each
    redraw on a line of its own."""
    if not sys.stderr.isatty():
        options.setdefault("mininterval", LOG_FILE_INTERVAL_S)
        # A second bar would be drawn below the first with cursor-up codes: garbage in a log file.
        options.setdefault("position", 0)
        options.setdefault("file", LogLines(sys.stderr))
    return tqdm(iterable, **options)


def print_above_bars(message: str) -> None:
    """Print a line to stderr above any progress bar, which is drawn again below it."""
    tqdm.write(message, file=sys.stderr)
