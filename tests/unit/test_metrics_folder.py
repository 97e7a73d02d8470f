"""Which metrics folders a starting supervisor removes: those whose lock nobody holds, and no
other (a live owner's, one without a lock file, another user's, a link, one whose lock file is
a link or a FIFO), the lock file last."""

from __future__ import annotations

import fcntl
import os
import shutil

import pytest

import combiner.metrics_folder as metrics_folder
from combiner.metrics_folder import MetricsFolder, reclaim_stale


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
    assert reclaim_stale(tmp_path) == []
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

    def checked(source, target):
        fd = os.open(source, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        seen.append(os.path.basename(target))
        rename(source, target)

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
    (gone / "sub" / "f").touch()

    def refuse(path, *args, **kwargs):
        raise PermissionError(f"cannot remove {path}")

    monkeypatch.setattr(shutil, "rmtree", refuse)
    assert reclaim_stale(tmp_path) == []
    assert (gone / "owner.lock").is_file() and (gone / "sub" / "f").exists()
    assert "cannot remove all of" in capsys.readouterr().err
    monkeypatch.undo()
    assert reclaim_stale(tmp_path) == [gone]
    assert not gone.exists()


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
