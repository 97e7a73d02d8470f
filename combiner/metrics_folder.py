"""The folder a combiner's workers write their Prometheus metrics to (prometheus_client's
multiprocess mode), one per supervisor, in the temporary folder (``$TMPDIR``, which must be on a
local file system: ``flock`` on a network one may not be seen by other hosts).

A supervisor that is killed (kill -9, the OOM killer) cannot remove its folder; the next one to
start on the host, as the same user with the same ``$TMPDIR``, does. A folder's owner is alive
exactly while the folder's lock file (``owner.lock``) is locked (``flock``): the supervisor
locks it before it takes that name, and its workers inherit it (each keeps it from its own
children), so the kernel ends the lock when the last of them dies, however it dies (a pid could
not tell: one given again, or in another PID namespace). At its start a supervisor removes every
folder of this form that is its user's and whose lock nobody holds, the lock file last (a folder
removed in part is tried again at the next start). A folder with no lock file (made by a version
before this one), another user's, or a link is left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

__all__ = ["LOCK_FD_ENV", "MetricsFolder", "keep_from_children", "reclaim_stale"]

_PREFIX = "chorus-metrics-"
_LOCK = "owner.lock"
LOCK_FD_ENV = "CHORUS_METRICS_LOCK_FD"  # tells a worker which of its descriptors is the lock


class MetricsFolder:
    """A fresh metrics folder, owned (locked) by this process until :meth:`remove`; ``fd``,
    its lock, is what the workers inherit (``pass_fds``); ``reclaimed``: the folders of killed
    supervisors removed first."""

    def __init__(self, parent: Path | None = None) -> None:
        parent = Path(parent or tempfile.gettempdir())
        self.reclaimed = reclaim_stale(parent)
        self.path = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=parent))  # 0700: ours alone
        fd = None
        try:
            taking = self.path / f".{_LOCK}"
            # read-write: where flock is emulated with byte-range locks (NFS), an exclusive
            # lock needs a file open for writing
            fd = os.open(taking, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            # the lock file appears under its name locked already: a supervisor starting
            # meanwhile never finds it unlocked and takes the folder for a dead one's
            os.rename(taking, self.path / _LOCK)
        except BaseException:
            if fd is not None:
                os.close(fd)
            shutil.rmtree(self.path, ignore_errors=True)
            raise
        self.fd = fd

    def remove(self) -> None:
        _remove(self.path)
        os.close(self.fd)


def keep_from_children() -> None:
    """In a worker: the inherited lock is not passed on to what the worker may start (a child
    that outlived it would keep a dead deployment's folder). Only a descriptor open on the
    metrics folder's lock file is touched, whatever the variable says."""
    value = os.environ.pop(LOCK_FD_ENV, "")
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not (value.isascii() and value.isdigit() and len(value) < 10) or not folder:
        return
    fd = int(value)
    with contextlib.suppress(OSError):
        if os.path.samestat(os.fstat(fd), os.stat(Path(folder) / _LOCK)):
            os.set_inheritable(fd, False)


def reclaim_stale(parent: Path) -> list[Path]:
    """Remove the metrics folders in ``parent`` whose owners are gone; returns them."""
    removed: list[Path] = []
    stuck: list[Path] = []
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
        try:  # (not blocking on a FIFO; not through a link)
            fd = os.open(folder / _LOCK, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue  # no lock file: another version's, or a folder being made
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # still the folder's lock file: another starting supervisor may have removed the
            # folder between our open and our lock
            if not os.path.samestat(os.fstat(fd), os.lstat(folder / _LOCK)):
                continue
        except OSError:
            continue  # its supervisor, or one of its workers, lives (or it is gone)
        else:  # removed under the lock: nobody can take it meanwhile
            if _remove(folder):
                removed.append(folder)
            else:
                stuck.append(folder)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
    if stuck:
        print(
            f"python -m combiner: cannot remove all of {len(stuck)} metrics folder(s) left by "
            f"combiners that were killed (tried again at the next start): "
            + ", ".join(map(str, stuck[:3]))
            + (f" and {len(stuck) - 3} more" if len(stuck) > 3 else ""),
            file=sys.stderr,
        )
    return removed


def _remove(folder: Path) -> bool:
    """Remove ``folder``, its lock file last: what is left of a removal that fails part way
    (or is killed) still has it, and is tried again. Whether it is gone."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return not folder.exists()
    for entry in entries:
        if entry.name == _LOCK:
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    with contextlib.suppress(OSError):
        if [e.name for e in folder.iterdir()] == [_LOCK]:
            (folder / _LOCK).unlink()
        folder.rmdir()
    return not os.path.lexists(folder)
