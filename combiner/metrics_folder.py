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
before this one), another user's, or a link is left alone. A folder is judged and emptied through
a descriptor held open on it, and what it holds through descriptors too, never by a path: a name
given meanwhile to a link (or to another folder) leads nowhere else; its name is removed last,
and only while it is still that folder. A start never fails for a folder it cannot remove.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["LOCK_FD_ENV", "MetricsFolder", "keep_from_children", "reclaim_stale", "shown"]

_PREFIX = "chorus-metrics-"
_LOCK = "owner.lock"
LOCK_FD_ENV = "CHORUS_METRICS_LOCK_FD"  # tells a worker which of its descriptors is the lock
_DEPTH = 16  # the folders a removal goes down into, at most (prometheus_client writes none)
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC  # never through a link


class MetricsFolder:
    """A fresh metrics folder, owned (locked) by this process until :meth:`remove`; ``fd``,
    its lock, is what the workers inherit (``pass_fds``); ``reclaimed``: the folders of killed
    supervisors removed first."""

    def __init__(self, parent: Path | None = None) -> None:
        parent = Path(parent or tempfile.gettempdir())
        self.reclaimed = reclaim_stale(parent)
        self.path = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=parent))  # 0700: ours alone
        self._dir = fd = None
        try:
            # the folder held open: what is removed at the end is this folder's content, even
            # if its name is given meanwhile to a link or to another folder
            self._dir = os.open(self.path, _DIR)
            # read-write: where flock is emulated with byte-range locks (NFS), an exclusive
            # lock needs a file open for writing
            fd = os.open(
                f".{_LOCK}",
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                0o600,
                dir_fd=self._dir,
            )
            fcntl.flock(fd, fcntl.LOCK_EX)
            # the lock file appears under its name locked already: a supervisor starting
            # meanwhile never finds it unlocked and takes the folder for a dead one's
            os.rename(f".{_LOCK}", _LOCK, src_dir_fd=self._dir, dst_dir_fd=self._dir)
        except BaseException:
            if fd is not None:
                os.close(fd)
            if self._dir is not None:
                try:
                    _remove(self.path, self._dir)
                finally:
                    os.close(self._dir)
            else:
                with contextlib.suppress(OSError):
                    self.path.rmdir()
            raise
        self.fd = fd

    def remove(self) -> None:
        """Remove the folder (its lock last) and let go of it; once: a second call does
        nothing (its descriptors' numbers may be another file's by then)."""
        directory, self._dir = self._dir, None
        if directory is None:
            return
        try:
            _remove(self.path, directory)
        finally:
            os.close(directory)
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
    """Remove the metrics folders in ``parent`` whose owners are gone; returns them. Never
    raises: a folder it cannot judge or remove is left (and said, when removing it failed)."""
    removed: list[Path] = []
    stuck: list[Path] = []
    try:
        device = os.stat(parent).st_dev
        names = [n for n in os.listdir(parent) if n.startswith(_PREFIX)]
    except OSError:
        return removed
    for name in names:
        folder = parent / name
        try:
            gone = _reclaim(folder, device)
        except Exception:  # (a bug here must not stop the combiner's start)
            gone = False
        if gone is True:
            removed.append(folder)
        elif gone is False:
            stuck.append(folder)
    if stuck:
        with contextlib.suppress(OSError, ValueError):  # (no stderr to say it on)
            print(
                f"python -m combiner: cannot remove all of {len(stuck)} metrics folder(s) left "
                f"by combiners that were killed (tried again at the next start): " + shown(stuck),
                file=sys.stderr,
            )
    return removed


def shown(folders: list[Path]) -> str:
    """The first three of ``folders``, quoted (a name may hold a line break), and how many more."""
    more = len(folders) - 3
    return ", ".join(repr(str(f)) for f in folders[:3]) + (f" and {more} more" if more > 0 else "")


def _reclaim(folder: Path, device: int) -> bool | None:
    """Remove ``folder`` if it is a dead owner's: whether it is gone then, or None where it is
    not one (a live owner's, another user's, a link, another file system mounted there, no lock
    file: not ours to judge)."""
    try:  # the folder itself, held open: not a link, and what is emptied is what was judged
        directory = os.open(folder, _DIR | os.O_NONBLOCK)
    except OSError:
        return None  # a link, a file, gone meanwhile
    try:
        info = os.fstat(directory)
        if info.st_uid != os.getuid() or info.st_dev != device:
            return None
        try:  # (not blocking on a FIFO; not through a link)
            fd = os.open(
                _LOCK, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=directory
            )
        except OSError:
            return None  # no lock file: another version's, or a folder being made
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # still the folder's lock file: another starting supervisor may have removed it
            # between our open and our lock
            here = os.stat(_LOCK, dir_fd=directory, follow_symlinks=False)
            if not os.path.samestat(os.fstat(fd), here):
                return None
        except OSError:
            return None  # its supervisor, or one of its workers, lives (or it is gone)
        else:  # removed under the lock: another supervisor starting meanwhile leaves it
            return _remove(folder, directory)
        finally:
            os.close(fd)
    finally:
        os.close(directory)


def _remove(folder: Path, directory: int) -> bool:
    """Empty the folder open at ``directory``, then remove its lock file and its name
    ``folder``, while that name is still it. Nothing is followed through a link, nor removed
    outside it (another file system mounted in it included). Whether the folder is gone. What is
    left of a removal that fails part way (or is killed) still has its lock file, and is tried
    again at the next start: the lock file goes only when nothing else is left, and comes back
    if something was made meanwhile."""
    if _mounted_in(folder) or not _empty(directory, keep=_LOCK):
        return False
    try:
        left = os.listdir(directory)
        if left not in ([], [_LOCK]) or not _is(folder, directory):
            return False
        if left:
            os.unlink(_LOCK, dir_fd=directory)
    except OSError:
        return False
    try:
        os.rmdir(folder)
    except OSError:  # filled meanwhile (a leftover writer): the lock file back, unlocked
        with contextlib.suppress(OSError):
            os.close(
                os.open(_LOCK, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600, dir_fd=directory)
            )
        return False
    return True


def _mounted_in(folder: Path) -> bool:
    """Whether a file system is mounted in ``folder`` (or at it), as /proc/self/mountinfo says
    (a bind mount of the same file system shows no other device); True where /proc is but that
    cannot be read, False without /proc (the device check alone, then)."""
    inside = os.path.realpath(folder)
    try:
        with open("/proc/self/mountinfo", "rb") as table:
            points = [line.split()[4] for line in table if len(line.split()) > 4]
    except OSError:
        return not os.path.exists("/proc/self")  # no /proc at all: the device check alone
    for point in points:
        # (spaces and the like are written in octal, as \040)
        where = os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), point))
        if where == inside or where.startswith(inside + os.sep):
            return True
    return False


def _is(name: Path, directory: int) -> bool:
    """Whether ``name`` is the folder open at ``directory`` (not a link, nor one put there)."""
    try:
        return os.path.samestat(os.lstat(name), os.fstat(directory))
    except FileNotFoundError:
        return False


def _empty(top: int, keep: str) -> bool:
    """Remove what the folder open at ``top`` holds but ``keep``, through descriptors (never by
    a path a link could redirect), folder by folder without recursion, at most ``_DEPTH`` deep,
    on its file system only. Whether it holds nothing else now."""
    device = os.fstat(top).st_dev
    stack: list[tuple[int, list[tuple[str, bool]], str]] = []  # the folders above this one
    fd, entries = top, [e for e in _entries(top) if e[0] != keep]
    whole = True
    try:
        while entries or stack:
            if not entries:  # this folder is empty: back up, and remove it
                emptied = fd
                fd, entries, name = stack.pop()
                os.close(emptied)
                whole &= _gone(os.rmdir, name, fd)
                continue
            name, is_dir = entries.pop()
            if not is_dir:
                whole &= _gone(os.unlink, name, fd)
                continue
            if len(stack) >= _DEPTH:
                whole = False
                continue
            try:
                child = os.open(name, _DIR, dir_fd=fd)
            except FileNotFoundError:
                continue
            except OSError:
                whole = False
                continue
            try:
                listed = _entries(child) if os.fstat(child).st_dev == device else None
            except OSError:
                listed = None
            if listed is None:  # another file system mounted here, or not readable: left
                os.close(child)
                whole = False
                continue
            stack.append((fd, entries, name))
            fd, entries = child, listed
        return whole
    finally:
        for opened in [fd, *(f for f, _, _ in stack)]:
            if opened != top:
                os.close(opened)


def _entries(directory: int) -> list[tuple[str, bool]]:
    """The names in the folder open at ``directory``, and whether each is a folder (a link
    is not)."""
    with os.scandir(directory) as found:
        return [(e.name, e.is_dir(follow_symlinks=False)) for e in found]


def _gone(remove: Callable[..., None], name: str, directory: int) -> bool:
    """``remove(name, dir_fd=directory)``: whether the name is gone."""
    try:
        remove(name, dir_fd=directory)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True
