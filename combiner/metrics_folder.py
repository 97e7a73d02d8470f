"""The folder a combiner's workers write their Prometheus metrics to (prometheus_client's
multiprocess mode), one per supervisor, in the temporary folder (``$TMPDIR``).

A supervisor that is killed (kill -9, the OOM killer) cannot remove its folder; the next one to
start on the host does. A folder's owner is alive exactly while the folder's lock file
(``owner.lock``) is locked (``flock``): the supervisor locks it before it takes that name, and
its workers inherit it, so the kernel ends the lock when the last of them dies, however it dies
(a pid could not tell: one given again, or in another PID namespace). At its start a supervisor
removes every folder of this form that is its user's and whose lock nobody holds; a folder with
no lock file (another version's) or another user's is left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

__all__ = ["MetricsFolder", "reclaim_stale"]

log = logging.getLogger("chorus.combiner")
_PREFIX = "chorus-metrics-"
_LOCK = "owner.lock"


class MetricsFolder:
    """A fresh metrics folder, owned (locked) by this process until :meth:`remove`; ``fd``,
    its lock, is what the workers inherit (``pass_fds``); ``reclaimed``: the folders of killed
    supervisors removed first."""

    def __init__(self, parent: Path | None = None) -> None:
        parent = Path(parent or tempfile.gettempdir())
        self.reclaimed = reclaim_stale(parent)
        self.path = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=parent))  # 0700: ours alone
        taking = self.path / f".{_LOCK}"
        self.fd = os.open(taking, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        # the lock file appears under its name locked already: a supervisor starting meanwhile
        # never finds it unlocked and takes the folder for a dead one's
        os.rename(taking, self.path / _LOCK)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self.fd)


def reclaim_stale(parent: Path) -> list[Path]:
    """Remove the metrics folders in ``parent`` whose owners are gone; returns them."""
    removed: list[Path] = []
    try:
        candidates = [p for p in parent.iterdir() if p.name.startswith(_PREFIX)]
    except OSError:
        return removed
    for folder in candidates:
        try:
            info = os.lstat(folder)
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            continue  # a link, a file, another user's: not ours to judge
        try:
            fd = os.open(folder / _LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # no lock file: another version's, or a folder being made
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its supervisor, or one of its workers, lives
        else:  # removed under the lock: nobody can take it meanwhile
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                removed.append(folder)
            else:
                log.warning("cannot remove %s, left by a combiner that was killed", folder)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
    return removed
