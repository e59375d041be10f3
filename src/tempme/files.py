"""Writing files so that a reader never sees half of one, with the permissions a plain write would give."""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .userwarnings import warn


def current_umask() -> int:
    """The process's umask (e.g. ``0o022``).

    Linux shows it in ``/proc/self/status``. Elsewhere the only way to read it is to set it and set it
    back (``os.umask``), and a file another thread creates in between gets the wrong permissions; so
    that is the fallback only.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path: Path, fresh: int) -> int:
    """The permissions ``path`` keeps when replaced, or ``fresh & ~umask`` for a new one."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return fresh & ~current_umask()


def check_readable(path: str | os.PathLike) -> None:
    """Raise the OS's own error (``PermissionError``, ``IsADirectoryError`` ...) if ``path`` cannot be opened.

    For readers whose libraries lose it: safetensors reports every file it cannot open as
    "No such file or directory", which sends a user looking for a file that is there.
    """
    with open(path, "rb"):
        pass


class WriteError(OSError):
    """A file that could not be written (``write_failed``). Its ``strerror`` is the whole message, the
    file named in it; ``reason`` is why, as the failing library said it."""

    def __init__(self, number: int | None, message: str, filename: str, reason: str):
        super().__init__(number, message, filename)
        self.reason = reason

    def __str__(self) -> str:
        return self.strerror


def describe_os_error(error: OSError) -> str:
    """'Permission denied: /some/file' rather than "[Errno 13] Permission denied: '/some/file'"; a
    message that names its file already (``WriteError``) as it is."""
    if error.strerror and error.filename and str(error.filename) not in error.strerror:
        return f"{error.strerror}: {error.filename}"
    return str(error)  # a WriteError's is its message


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message, or its type's name where it has none: for a message of one line."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def write_failed(target: str | os.PathLike, error: BaseException, then: str = "") -> WriteError:
    """An OSError naming ``target`` for a write that failed with ``error``, which may name a temporary
    file instead, or none (torch.save's RuntimeError, safetensors' SafetensorError): one line saying
    which file could not be written and why; where the library's words do not say why (or say the
    disk is full), how much space that disk has left; ``then`` (what became of the file) after it.
    A ``WriteError`` (of a file written inside ``target``, say) gives its reason once, not wrapped twice."""
    target = Path(target)
    if isinstance(error, WriteError):
        reason, number = error.reason, error.errno
    elif isinstance(error, OSError):
        reason, number = error.strerror or str(error), error.errno
    else:
        reason, number = str(error) or type(error).__name__, None
    free = ""
    if number in (None, errno.ENOSPC, errno.EDQUOT):
        folder = target.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        with contextlib.suppress(OSError):
            free = f"; {shutil.disk_usage(folder).free / 2**20:.1f} MiB free on that disk"
    after = f"; {then}" if then else ""
    return WriteError(number, f"cannot write {target} ({reason}{free}){after}", str(target), reason)


def _naming_target(error: OSError, temporary: str, target: Path) -> OSError:
    """``error`` again, naming ``target`` where it named the temporary file written in its place."""
    if error.filename is None or not str(error.filename).startswith(temporary):
        return error
    return OSError(error.errno, error.strerror, str(target))


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; when the block ends without error, it replaces
    ``path`` in one rename. ``durable``: its contents flushed to the disk first, so that a power cut
    leaves the old file or the new one, not an empty one (a cache that checks what it reads may
    skip the cost). An interrupted or failed write leaves ``path`` as it was and no temporary file;
    an OSError names ``path``, not the temporary file.

    Permissions: a new file gets what ``open(path, "w")`` would give (``0o666`` less the umask), not the
    owner-only ``0o600`` of a temporary file. A replaced file keeps its own permissions, as text
    editors do, so a file the user made readable to others stays readable. Its owner and group are
    those of whoever writes it (only root could keep another user's).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = str(path.parent / f".{path.name}.")
    try:
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise _naming_target(error, prefix, path) from None
    os.close(handle)
    try:
        yield Path(temporary)
        if durable:
            sync_file(temporary)
        # Read just before the rename, so a mode changed while writing is the one kept.
        os.chmod(temporary, _mode_for(path, 0o666))
        os.replace(temporary, path)
    except OSError as error:
        raise _naming_target(error, prefix, path) from None
    finally:
        Path(temporary).unlink(missing_ok=True)


def sync_file(path: str | os.PathLike) -> None:
    """Flush a written file's contents to the disk (``fsync``), before a rename puts it in place."""
    with open(path, "r+b") as file:  # Windows flushes only what is open for writing
        os.fsync(file.fileno())


def remove_stale_temporaries(target: str | os.PathLike, older_than_s: float = 0.0) -> None:
    """Remove what atomic writes of ``target`` left beside it when a killed process could not clean
    up (``.NAME.*.tmp`` files of ``atomic_file``, ``.NAME.tmp-*`` folders of
    ``temporary_directory_for``), last changed more than ``older_than_s`` seconds ago. For a caller
    that alone writes ``target`` now (it holds its lock); otherwise an age that no write in flight
    reaches keeps another writer's temporary. What cannot be removed stays."""
    target = Path(target)
    name = glob.escape(target.name)
    now = time.time()
    for stale in [*target.parent.glob(f".{name}.*.tmp"), *target.parent.glob(f".{name}.tmp-*")]:
        with contextlib.suppress(OSError):
            if now - stale.lstat().st_mtime < older_than_s:
                continue
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def temporary_directory_for(target: str | os.PathLike) -> Path:
    """A new, empty directory beside ``target``, to fill and then rename onto it (an atomic directory write).

    It gets the permissions ``target`` has, or for a new one those of ``mkdir`` (``0o777`` less the
    umask), instead of the owner-only ``0o700`` of ``tempfile.mkdtemp``, which would otherwise stay
    on ``target`` after the rename. The caller renames it into place, or removes it on failure.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        temporary = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    except OSError as error:
        raise _naming_target(error, str(target.parent / f".{target.name}.tmp-"), target) from None
    # The owner keeps full access even if ``target`` had less: the caller must be able to fill it.
    os.chmod(temporary, _mode_for(target, 0o777) | stat.S_IRWXU)
    return temporary


def check_folder(path: str | os.PathLike, what: str, writable: bool = True) -> None:
    """Raise ValueError (``what``, the path and the reason, one line) unless ``path`` is a folder or
    can be created as one, and, with ``writable``, files can be written in it.

    Run before any work, so that an unusable output folder fails in a second rather than after the
    run. Creates nothing that stays: the write test is a temporary file in the nearest existing folder.
    """
    path = Path(path).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        if existing == path:
            raise ValueError(f"{what} {path}: exists and is not a folder")
        raise ValueError(f"{what} {path}: cannot be created, {existing} is a file")
    if not writable:
        return
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        where = "" if existing == path else f" (cannot create it in {existing})"
        raise ValueError(f"{what} {path}: not writable{where}: {error.strerror or error}") from None


def file_stamp(path: str | os.PathLike) -> list[int] | None:
    """``[size, mtime in ns]`` of a file: what tells a changed file from the one a cache or an index
    saw. None when it cannot be looked at (missing, unreadable folder, a drive not mounted)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns]


def lock_file_of(target: str | os.PathLike) -> Path:
    """The hidden file beside ``target`` that ``exclusive_lock`` locks."""
    target = Path(target)
    return target.parent / f".{target.name}.lock"


def lock_held(target: str | os.PathLike) -> bool:
    """Whether another process (or another open in this one) holds ``exclusive_lock(target)`` now.
    Creates nothing: where there is no lock file, no one holds the lock."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        with open(lock_file_of(target), "r") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(handle, fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except OSError:  # no lock file, unreadable, or no locks on this file system
        return False
    return False


class LockHeld(Exception):
    """Another process holds the lock that ``exclusive_lock`` asked for."""


@dataclass(frozen=True)
class HeldLock:
    """The open lock file behind ``exclusive_lock``: its descriptor, and the file it is (device, inode)."""

    fd: int
    device: int
    inode: int

    def release_in_child(self) -> None:
        """In a process forked while the lock was held (a DataLoader worker), close the descriptor it
        inherited: the lock lasts while any process holds one, so a worker left running for a moment
        after its parent was killed would keep the next run out. (A process started otherwise, which
        inherited no descriptor, may hold another file under the same number: it is left alone.)"""
        try:
            info = os.fstat(self.fd)
        except OSError:
            return
        if (info.st_dev, info.st_ino) == (self.device, self.inode):
            os.close(self.fd)


@contextlib.contextmanager
def exclusive_lock(target: str | os.PathLike) -> Iterator[HeldLock | None]:
    """Hold an advisory lock for writing ``target`` during the block, or raise ``LockHeld`` at once if
    another process (or another open of it in this one) holds it. Yields the ``HeldLock`` (None where
    nothing is locked), for processes forked within the block to release (``HeldLock.release_in_child``).

    The lock is on a hidden file beside ``target`` (``.NAME.lock``), not on ``target`` itself, which
    atomic writes replace. The operating system releases it when its holder exits, even when killed,
    so no stale lock outlives a crash; the empty lock file stays. Where ``fcntl`` is missing
    (Windows) or the file system has no locks, nothing is locked (the latter with a warning).
    """
    try:
        import fcntl
    except ImportError:
        yield None
        return
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_file = lock_file_of(target)
    with open(lock_file, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld(str(target)) from None
        except OSError as error:  # a file system without locks (some NFS, CIFS, FUSE): go on unlocked
            warn(f"cannot lock {lock_file} ({error.strerror or error}): nothing stops two runs writing "
                 f"{target} at once")
            yield None
            return
        info = os.fstat(handle.fileno())
        try:
            yield HeldLock(handle.fileno(), info.st_dev, info.st_ino)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
