"""Which metrics folders a starting supervisor removes: those whose lock nobody holds, and no
other (a live owner's, one without a lock file, another user's, a link, one whose lock file is
a link or a FIFO), the lock file last."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import signal
import subprocess
import sys

import pytest

import combiner.metrics_folder as metrics_folder
from combiner.metrics_folder import LOCK_FD_ENV, MetricsFolder, keep_from_children, reclaim_stale


def dead(parent):
    """A folder whose owner is gone (its lock closed, as the owner's death closes it)."""
    folder = MetricsFolder(parent)
    os.close(folder.fd)
    (folder.path / "counter_123.db").write_bytes(b"x" * 64)
    return folder.path


def test_only_the_folders_of_owners_gone_are_removed(tmp_path, capsys):
    live = MetricsFolder(tmp_path)
    gone = dead(tmp_path)
    lockless = tmp_path / "chorus-metrics-older"  # a version before the lock file
    lockless.mkdir()
    (tmp_path / "chorus-metrics-file").touch()
    other = tmp_path / "unrelated"
    other.mkdir()
    (other / "owner.lock").touch()

    assert reclaim_stale(tmp_path) == [gone]
    assert not gone.exists()
    assert live.path.is_dir() and (live.path / "owner.lock").is_file()
    assert lockless.is_dir() and other.is_dir() and (tmp_path / "chorus-metrics-file").exists()
    assert capsys.readouterr().err == ""
    live.remove()
    assert not live.path.exists()


def test_a_link_is_not_followed(tmp_path, capsys):
    """Neither a folder that is a link (to a dead owner's folder elsewhere) nor a lock file
    that is one (to an unlocked file) is taken for a dead owner's folder."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = dead(elsewhere)
    (tmp_path / "chorus-metrics-link").symlink_to(target)
    linked_lock = tmp_path / "chorus-metrics-linkedlock"
    linked_lock.mkdir()
    (linked_lock / "counter_1.db").touch()
    unlocked = tmp_path / "unlocked"
    unlocked.touch()
    (linked_lock / "owner.lock").symlink_to(unlocked)

    assert reclaim_stale(tmp_path) == []
    assert target.is_dir() and (target / "counter_123.db").is_file()
    assert (linked_lock / "counter_1.db").is_file()
    assert capsys.readouterr().err == ""  # not a removal tried and failed


def test_a_fifo_for_a_lock_file_does_not_hang_the_start(tmp_path):
    folder = tmp_path / "chorus-metrics-fifo"
    folder.mkdir()
    os.mkfifo(folder / "owner.lock")

    def hung(*_):
        raise TimeoutError("reclaim_stale blocked on the FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(5)
    try:
        assert reclaim_stale(tmp_path) == []
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert folder.is_dir()


@pytest.mark.skipif(os.getuid() != 0, reason="giving a folder to another user needs root")
def test_another_users_folder_is_left_alone(tmp_path):
    theirs = dead(tmp_path)
    os.chown(theirs, 65534, 65534)
    assert reclaim_stale(tmp_path) == []
    assert theirs.is_dir()


def test_the_lock_file_is_locked_whenever_it_has_its_name(tmp_path, monkeypatch):
    """A supervisor starting meanwhile finds no lock file, or a locked one: never one unlocked
    (which it would take for a dead owner's)."""
    rename = os.rename
    seen = []

    def checked(source, target, *, src_dir_fd=None, dst_dir_fd=None):
        fd = os.open(source, os.O_RDONLY, dir_fd=src_dir_fd)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        seen.append(os.path.basename(target))
        rename(source, target, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    monkeypatch.setattr(metrics_folder.os, "rename", checked)
    folder = MetricsFolder(tmp_path)
    assert seen == ["owner.lock"]
    monkeypatch.undo()
    folder.remove()


def test_a_removal_that_fails_part_way_keeps_the_lock_file_and_is_tried_again(
    tmp_path, monkeypatch, capsys
):
    gone = dead(tmp_path)
    (gone / "sub").mkdir()
    (gone / "sub" / "stuck").touch()
    unlink = os.unlink

    def refusing(path, *args, **kwargs):
        if os.fspath(path).endswith("stuck"):
            raise PermissionError(f"cannot remove {path}")
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refusing)
    assert reclaim_stale(tmp_path) == []
    assert (gone / "owner.lock").is_file() and (gone / "sub" / "stuck").exists()
    assert not (gone / "counter_123.db").exists()  # the rest went
    assert "cannot remove all of 1 metrics folder" in capsys.readouterr().err
    monkeypatch.undo()
    assert reclaim_stale(tmp_path) == [gone]
    assert not gone.exists()


def test_an_exclusive_lock_where_it_needs_a_file_open_for_writing(tmp_path, monkeypatch):
    """Where flock is emulated with byte-range locks (NFS), LOCK_EX on a descriptor open for
    reading only fails with EBADF: the lock file is opened for writing."""
    flock = fcntl.flock

    def as_on_nfs(fd, operation):
        if operation & fcntl.LOCK_EX and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == 0:
            raise OSError(errno.EBADF, "Bad file descriptor")
        return flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", as_on_nfs)
    gone = dead(tmp_path)
    fresh = MetricsFolder(tmp_path)
    assert fresh.reclaimed == [gone]
    fresh.remove()


def test_a_new_folder_removes_the_dead_ones_first(tmp_path):
    gone = dead(tmp_path)
    fresh = MetricsFolder(tmp_path)
    assert fresh.reclaimed == [gone]
    assert {p.name for p in tmp_path.iterdir()} == {fresh.path.name}
    assert {p.name for p in fresh.path.iterdir()} == {"owner.lock"}
    fresh.remove()


def test_a_folder_that_cannot_be_locked_is_not_left_behind(tmp_path, monkeypatch):
    def refuse(fd, operation):
        raise OSError(9, "Bad file descriptor")

    monkeypatch.setattr(fcntl, "flock", refuse)
    with pytest.raises(OSError):
        MetricsFolder(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_two_supervisors_starting_at_once_remove_a_folder_once(tmp_path, monkeypatch):
    """One opens the dead folder's lock file; before it locks it, the other removes the folder:
    the first then holds the lock of a file that is no longer the folder's, and says nothing."""
    gone = dead(tmp_path)
    flock = fcntl.flock
    other: list = []

    def meanwhile(fd, operation):
        if not other:
            monkeypatch.setattr(fcntl, "flock", flock)
            other.append(reclaim_stale(tmp_path))  # the other supervisor, in between
        return flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", meanwhile)
    assert reclaim_stale(tmp_path) == []
    assert other == [[gone]] and not gone.exists()


def test_a_worker_marks_only_the_folders_lock_close_on_exec(tmp_path, monkeypatch):
    owner = MetricsFolder(tmp_path)
    lock = os.dup(owner.fd)  # as a worker inherits it (pass_fds: inheritable)
    os.set_inheritable(lock, True)
    unrelated = os.open(tmp_path, os.O_RDONLY)
    os.set_inheritable(unrelated, True)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(owner.path))
    standard = [os.get_inheritable(fd) for fd in (0, 1, 2)]
    try:
        for value in ("0", "2", "²", "99999999999999999999", "-1", "", str(unrelated)):
            monkeypatch.setenv(LOCK_FD_ENV, value)
            keep_from_children()  # never raises, never touches what is not the lock
            assert LOCK_FD_ENV not in os.environ
        assert [os.get_inheritable(fd) for fd in (0, 1, 2)] == standard
        assert os.get_inheritable(unrelated) and os.get_inheritable(lock)
        monkeypatch.setenv(LOCK_FD_ENV, str(lock))
        keep_from_children()
        assert not os.get_inheritable(lock)
    finally:
        os.close(lock)
        os.close(unrelated)
        owner.remove()


def _victim(parent):
    """A folder of someone's work, which no removal may touch."""
    victim = parent / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "precious.txt").write_text("keep")
    (victim / "sub" / "also.txt").write_text("keep")
    return victim


def _intact(victim):
    return sorted(str(p.relative_to(victim)) for p in victim.rglob("*")) == [
        "precious.txt",
        "sub",
        "sub/also.txt",
    ]


def test_a_stopping_supervisor_empties_its_own_folder_not_a_link_put_in_its_place(tmp_path):
    """The folder's name given to a link while the deployment runs: the stop removes what is
    in the folder it made (wherever it was moved), never what the link points to."""
    victim = _victim(tmp_path)
    folder = MetricsFolder(tmp_path)
    (folder.path / "counter_1.db").touch()
    moved = tmp_path / "moved"
    folder.path.rename(moved)
    folder.path.symlink_to(victim)
    folder.remove()
    assert _intact(victim)
    assert folder.path.is_symlink()  # not ours: left
    assert [p.name for p in moved.iterdir()] == ["owner.lock"]  # ours, emptied but its lock


def test_a_folder_swapped_for_a_link_after_it_was_judged_leaves_the_target_alone(
    tmp_path, monkeypatch
):
    """The race a neighbour with rights on the folder's parent can run: the dead folder's name
    given to a link between the lock's check and the removal."""
    victim = _victim(tmp_path)
    gone = dead(tmp_path)
    samestat = os.path.samestat
    swapped = []

    def then_swap(a, b):
        same = samestat(a, b)
        if not swapped:
            swapped.append(True)
            gone.rename(tmp_path / "moved")
            gone.symlink_to(victim)
        return same

    monkeypatch.setattr(metrics_folder.os.path, "samestat", then_swap)
    reclaim_stale(tmp_path)
    monkeypatch.undo()
    assert swapped and _intact(victim)
    assert gone.is_symlink()
    assert not (tmp_path / "moved" / "counter_123.db").exists()  # the dead folder, emptied


def test_a_folder_too_deep_to_remove_does_not_stop_the_start(tmp_path, capsys):
    """1,200 nested folders (deeper than recursion goes): the start goes on, says it, and the
    rest of the folder is removed."""
    gone = dead(tmp_path)
    path = os.fspath(gone / "d")
    try:
        for _ in range(1200):
            os.mkdir(path)
            path = os.path.join(path, "d")
        fresh = MetricsFolder(tmp_path)
        assert fresh.reclaimed == []
        assert "cannot remove all of 1 metrics folder" in capsys.readouterr().err
        assert (gone / "owner.lock").is_file() and not (gone / "counter_123.db").exists()
        fresh.remove()
    finally:  # (pytest's own clean-up would recurse, and fail every later run)
        subprocess.run(["rm", "-rf", gone], check=True)


def test_removing_twice_touches_nothing_the_second_time(tmp_path):
    """The folder's descriptors are closed by the first removal; their numbers may be another
    folder's by the second."""
    victim = _victim(tmp_path)
    folder = MetricsFolder(tmp_path)
    folder.remove()
    reused = os.open(victim, os.O_RDONLY | os.O_DIRECTORY)
    try:
        folder.remove()
    finally:
        os.close(reused)
    assert _intact(victim)


def test_a_folder_written_to_while_it_is_removed_keeps_its_lock_file(tmp_path, monkeypatch):
    """A process still writing there (a worker's child, say) adds a file after the folder was
    emptied: the folder gets its lock file back, so the next start tries again."""
    gone = dead(tmp_path)
    rmdir = os.rmdir

    def written_first(path, *args, **kwargs):
        if os.fspath(path) == os.fspath(gone):
            (gone / "gauge_7.db").touch()
        return rmdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "rmdir", written_first)
    assert reclaim_stale(tmp_path) == []
    monkeypatch.undo()
    assert (gone / "owner.lock").is_file()
    assert reclaim_stale(tmp_path) == [gone]


def test_a_folder_moved_away_is_not_said_removed(tmp_path, capsys, monkeypatch):
    """Moved while it was emptied: its lock file stays with it, and it is not in the list of
    the folders removed."""
    gone = dead(tmp_path)
    moved = tmp_path / "moved"
    listdir = os.listdir

    def moving(path):  # once emptied (its descriptor listed), the folder is moved
        if isinstance(path, int) and not moved.exists():
            gone.rename(moved)
        return listdir(path)

    monkeypatch.setattr(os, "listdir", moving)
    assert reclaim_stale(tmp_path) == []
    monkeypatch.undo()
    assert (moved / "owner.lock").is_file()
    assert "cannot remove all of 1" in capsys.readouterr().err


UNSHARE = shutil.which("unshare")


@pytest.mark.skipif(UNSHARE is None, reason="needs unshare(1)")
def test_a_file_system_mounted_in_a_dead_folder_is_left_alone(tmp_path):
    """A bind mount (same device: only the mount table tells) in a dead owner's folder."""
    victim = _victim(tmp_path)
    gone = dead(tmp_path)
    (gone / "sub").mkdir()
    script = (
        f"mount --make-rprivate / && mount --bind {victim} {gone / 'sub'} && "
        f"{sys.executable} -c 'import pathlib, combiner.metrics_folder as m; "
        f'print(m.reclaim_stale(pathlib.Path("{tmp_path}")))\''
    )
    run = subprocess.run(
        [UNSHARE, "-m", "sh", "-c", script], capture_output=True, text=True, timeout=60
    )
    if "mount" in run.stderr and run.returncode != 0:
        pytest.skip(f"cannot mount here: {run.stderr.strip()}")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
    assert _intact(victim)
