"""Atomic file writes (tempme.files)."""

import os
import stat

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
