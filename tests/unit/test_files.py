"""Atomic file writes (tempme.files)."""

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tempme import files
from tempme.files import atomic_file, current_umask, temporary_directory_for


def test_a_finished_write_replaces_the_file(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_file(target) as temporary:
        temporary.write_text("new")
        assert not target.exists()  # nothing visible until the block ends
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_file(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    """Run the test under this umask (two, so a mode cannot match by coincidence)."""
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path) -> int:
    # Modes are compared, not tried out: the tests may run as root, who can read any file.
    return stat.S_IMODE(os.stat(path).st_mode)


def test_the_umask_is_read_without_changing_it(umask, monkeypatch):
    assert current_umask() == umask
    # Without /proc (not Linux) it is read by setting it and setting it back.
    def no_proc(*args, **kwargs):
        raise FileNotFoundError("/proc/self/status")

    monkeypatch.setattr(files, "open", no_proc, raising=False)
    assert current_umask() == umask
    assert os.umask(umask) == umask  # left as it was


def test_a_new_file_gets_the_mode_a_plain_write_gives(tmp_path, umask):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    with atomic_file(tmp_path / "atomic.txt") as temporary:
        temporary.write_text("x")
    expected = {0o022: 0o644, 0o027: 0o640}[umask]
    assert mode(tmp_path / "atomic.txt") == mode(plain) == expected


def test_a_replaced_file_keeps_its_mode(tmp_path, umask):
    target = tmp_path / "out.index"
    target.write_text("old")
    os.chmod(target, 0o604)  # more open than the umask allows: kept all the same
    with atomic_file(target) as temporary:
        temporary.write_text("new")
    assert target.read_text() == "new" and mode(target) == 0o604


def test_a_writer_that_creates_its_own_file_still_gets_the_mode(tmp_path, umask):
    target = tmp_path / "out.bin"
    with atomic_file(target) as temporary:
        temporary.unlink()  # as a writer that removes the path and creates it anew may do
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
    assert mode(target) == {0o022: 0o644, 0o027: 0o640}[umask]


def test_a_temporary_directory_gets_the_mode_of_mkdir_or_of_its_target(tmp_path, umask):
    target = tmp_path / "runs" / "last"
    fresh = temporary_directory_for(target)
    assert fresh.parent == target.parent and list(fresh.iterdir()) == []
    assert mode(fresh) == {0o022: 0o755, 0o027: 0o750}[umask]
    target.mkdir()
    os.chmod(target, 0o705)
    assert mode(temporary_directory_for(target)) == 0o705


def test_exclusive_lock_refuses_a_second_holder_until_released(tmp_path):
    from tempme.files import LockHeld, exclusive_lock

    target = tmp_path / "out" / "videos.index"  # its folder is made for the lock file
    with exclusive_lock(target):
        with pytest.raises(LockHeld):
            with exclusive_lock(target):
                pass
    with exclusive_lock(target):  # released when the block ended
        pass
    assert not target.exists() and (tmp_path / "out" / ".videos.index.lock").exists()


@pytest.mark.parametrize("released", [True, False])
def test_a_forked_child_releasing_the_lock_keeps_no_one_out_once_its_parent_is_killed(tmp_path, released):
    # DataLoader workers fork while `tempme index` holds its lock and outlive a killed parent for a moment.
    from tempme.files import lock_held

    target = tmp_path / "videos.index"
    script = textwrap.dedent(f"""
        import os, time
        from tempme.files import exclusive_lock
        with exclusive_lock({str(target)!r}) as lock:
            if os.fork() == 0:
                if {released}:
                    lock.release_in_child()
                time.sleep(3)
                os._exit(0)
            print("held", flush=True)
            time.sleep(60)
    """)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert parent.stdout.readline().strip() == "held"
        assert lock_held(target)
    finally:
        parent.kill()
        parent.wait()
    assert lock_held(target) is not released  # the child, still asleep, holds it unless it let go


def test_exclusive_lock_goes_on_unlocked_where_the_file_system_has_no_locks(tmp_path, monkeypatch):
    import errno
    import fcntl

    from tempme.files import exclusive_lock

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with pytest.warns(UserWarning, match=r"cannot lock .*\.videos\.index\.lock \(No locks available\): nothing "
                                         r"stops two runs"):
        with exclusive_lock(tmp_path / "videos.index"):
            ran.append(True)
    assert ran == [True]


def test_lock_held_says_whether_another_holds_it_and_creates_nothing(tmp_path):
    from tempme.files import exclusive_lock, lock_held

    target = tmp_path / "new" / "videos.index"
    assert not lock_held(target) and not (tmp_path / "new").exists()
    with exclusive_lock(target):
        assert lock_held(target)
    assert not lock_held(target)


def test_a_failed_atomic_write_names_the_file_it_was_for(tmp_path):
    import errno

    target = tmp_path / "videos.index"
    with pytest.raises(OSError) as caught:
        with atomic_file(target) as temporary:
            raise OSError(errno.ENOSPC, "No space left on device", str(temporary))
    assert (caught.value.errno, caught.value.filename) == (errno.ENOSPC, str(target))
    assert os.listdir(tmp_path) == []


def test_write_failed_says_which_file_why_and_the_space_left(tmp_path):
    from tempme.files import write_failed

    target = tmp_path / "run" / "last"  # a folder not made yet: its parent's disk
    error = write_failed(target, RuntimeError("[enforce fail at inline_container.cc:672]"))
    assert error.filename == str(target) and str(error) == error.strerror
    assert error.strerror.startswith(f"cannot write {target} ([enforce fail at inline_container.cc:672]; ")
    assert error.strerror.endswith(" MiB free on that disk)")
    # A file written inside the target failed: its reason once, not wrapped twice.
    again = write_failed(target, write_failed(target / "weights.safetensors", RuntimeError("full"), then="kept"))
    assert again.strerror.startswith(f"cannot write {target} (full; ") and again.strerror.count("MiB free") == 1
    # A reason that says what is wrong needs no disk space figure.
    denied = write_failed(target, PermissionError(13, "Permission denied", str(target)))
    assert str(denied) == f"cannot write {target} (Permission denied)" and isinstance(denied, OSError)


def test_stale_temporaries_of_a_target_are_removed_and_nothing_else(tmp_path):
    from tempme.files import remove_stale_temporaries

    target = tmp_path / "v[1].index"  # glob's special characters taken as they are
    stale = [tmp_path / ".v[1].index.abc123.tmp", tmp_path / ".v[1].index.tmp-xyz"]
    stale[0].write_bytes(b"half")
    stale[1].mkdir()
    (stale[1] / "part").write_bytes(b"half")
    kept = [target, tmp_path / ".v1.index.abc.tmp", tmp_path / ".other.index.abc.tmp"]
    for path in kept:
        path.write_bytes(b"x")
    remove_stale_temporaries(target)
    assert not any(path.exists() for path in stale) and all(path.exists() for path in kept)
