"""Stop signals as exceptions, so that a command saves what it has done on the way out.

Ctrl-C raises KeyboardInterrupt by itself; SIGTERM (``kill``, a service manager or batch scheduler)
kills a process at once unless a handler turns it into :class:`Terminated`, a KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM during a command: handled like Ctrl-C (its command exits as SIGTERM's, 143)."""


@contextlib.contextmanager
def handlers_replaced(handler, signums: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """While the block runs, ``handler`` handles each of ``signums``; the previous handlers come back
    after it. Left as they are: ignored signals (SIGINT under `torchrun ... &` in a script), handlers
    not set from Python, and everything off the main thread (no handlers can be set there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in signums}
    replaced = [signum for signum, old in previous.items() if old not in (None, signal.SIG_IGN)]
    for signum in replaced:
        signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum in replaced:
            signal.signal(signum, previous[signum])


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` where the program is, so that the
    handlers on the way out run (see :func:`handlers_replaced` for when it is left alone)."""

    def terminate(signum, frame):
        raise Terminated("SIGTERM")

    with handlers_replaced(terminate, (signal.SIGTERM,)):
        yield
