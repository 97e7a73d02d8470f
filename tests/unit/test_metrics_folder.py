"""Which metrics folders a starting supervisor removes: those whose lock nobody holds, and no
other (a live owner's, one without a lock file, a link, a file)."""

from __future__ import annotations

import os

from combiner.metrics_folder import MetricsFolder, reclaim_stale


def test_only_the_folders_of_owners_gone_are_removed(tmp_path):
    live = MetricsFolder(tmp_path)
    dead = MetricsFolder(tmp_path)
    os.close(dead.fd)  # as its owner's death does
    lockless = tmp_path / "chorus-metrics-older"
    lockless.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "owner.lock").touch()
    (tmp_path / "chorus-metrics-link").symlink_to(elsewhere)
    (tmp_path / "chorus-metrics-file").touch()
    other = tmp_path / "unrelated"
    other.mkdir()
    (other / "owner.lock").touch()

    assert reclaim_stale(tmp_path) == [dead.path]
    assert not dead.path.exists()
    assert live.path.is_dir() and lockless.is_dir() and other.is_dir()
    assert (elsewhere / "owner.lock").exists()  # not through the link
    assert (tmp_path / "chorus-metrics-file").exists()
    live.remove()
    assert not live.path.exists()


def test_a_new_folder_removes_the_dead_ones_first(tmp_path):
    dead = MetricsFolder(tmp_path)
    os.close(dead.fd)
    fresh = MetricsFolder(tmp_path)
    assert fresh.reclaimed == [dead.path]
    assert {p.name for p in tmp_path.iterdir()} == {fresh.path.name}
    assert {p.name for p in fresh.path.iterdir()} == {"owner.lock"}
    fresh.remove()
