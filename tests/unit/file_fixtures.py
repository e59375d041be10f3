"""Test helpers for files the process may not read."""

from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path


def deny_reading(path: Path, monkeypatch) -> None:
    """Make ``path`` unreadable: by its mode, or for root (who reads any file) by failing ``open`` on it."""
    if os.geteuid() != 0:
        path.chmod(0)
        return
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if os.fspath(file) == os.fspath(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    monkeypatch.setattr(io, "open", refusing_open)  # what Path.open calls
