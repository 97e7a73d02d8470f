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
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["LOCK_FD_ENV", "MetricsFolder", "keep_from_children", "reclaim_stale"]

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
                _remove(self.path, self._dir)
                os.close(self._dir)
            else:
                with contextlib.suppress(OSError):
                    self.path.rmdir()
            raise
        self.fd = fd

    def remove(self) -> None:
        assert self._dir is not None
        _remove(self.path, self._dir)
        os.close(self._dir)
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
        names = [n for n in os.listdir(parent) if n.startswith(_PREFIX)]
    except OSError:
        return removed
    for name in names:
        folder = parent / name
        try:
            gone = _reclaim(folder)
        except Exception:  # (a bug here must not stop the combiner's start)
            gone = False
        if gone is True:
            removed.append(folder)
        elif gone is False:
            stuck.append(folder)
    if stuck:
        print(
            f"python -m combiner: cannot remove all of {len(stuck)} metrics folder(s) left by "
            f"combiners that were killed (tried again at the next start): "
            + ", ".join(map(str, stuck[:3]))
            + (f" and {len(stuck) - 3} more" if len(stuck) > 3 else ""),
            file=sys.stderr,
        )
    return removed


def _reclaim(folder: Path) -> bool | None:
    """Remove ``folder`` if it is a dead owner's: whether it is gone then, or None where it is
    not one (a live owner's, another user's, a link, no lock file: not ours to judge)."""
    try:  # the folder itself, held open: not a link, and what is emptied is what was judged
        directory = os.open(folder, _DIR | os.O_NONBLOCK)
    except OSError:
        return None  # a link, a file, gone meanwhile
    try:
        if os.fstat(directory).st_uid != os.getuid():
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
    """Empty the folder open at ``directory``, its lock file last (what is left of a removal
    that fails part way, or is killed, still has it and is tried again), then remove its name
    ``folder`` if that is still it. Nothing is followed through a link, nor removed outside it.
    Whether the name is gone."""
    if _empty(directory, keep=_LOCK):
        with contextlib.suppress(OSError):
            os.unlink(_LOCK, dir_fd=directory)
    with contextlib.suppress(OSError):
        if os.path.samestat(os.lstat(folder), os.fstat(directory)):
            os.rmdir(folder)  # (only if empty: a lock file left keeps it)
    try:
        os.lstat(folder)  # still there (it, or what took its name: then not removed either)
    except FileNotFoundError:
        return True
    return False


def _empty(top: int, keep: str) -> bool:
    """Remove what the folder open at ``top`` holds but ``keep``, through descriptors (never by
    a path a link could redirect), folder by folder without recursion, at most ``_DEPTH`` deep.
    Whether it holds nothing else now."""
    stack: list[tuple[int, list[str], str]] = []  # the folders above the one being emptied
    fd, names = top, [n for n in os.listdir(top) if n != keep]
    whole = True
    try:
        while names or stack:
            if not names:  # this folder is empty: back up, and remove it
                os.close(fd)
                fd, names, name = stack.pop()
                whole &= _gone(os.rmdir, name, fd)
                continue
            name = names.pop()
            try:
                os.unlink(name, dir_fd=fd)
                continue
            except IsADirectoryError:
                pass
            except FileNotFoundError:
                continue
            except OSError:
                whole = False
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
            stack.append((fd, names, name))
            fd = child
            try:
                names = os.listdir(fd)
            except OSError:
                names, whole = [], False
        return whole
    finally:
        for opened in [fd, *(f for f, _, _ in stack)]:
            if opened != top:
                os.close(opened)


def _gone(remove: Callable[..., None], name: str, directory: int) -> bool:
    """``remove(name, dir_fd=directory)``: whether the name is gone."""
    try:
        remove(name, dir_fd=directory)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True
