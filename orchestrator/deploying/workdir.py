"""One live owner per working directory.

A deployment writes its repository, its plan, the combiner's config and Triton's key into its
working directory, and takes the processes a session file there names for what a killed run
left. A second one in the same folder would overwrite the first's files (its combiner, restarted,
would read a key its Triton does not have) and kill its processes. So a process that deploys or
measures there (``chorus up``, :class:`~orchestrator.deploying.up.Deployment`, a profile or a
calibration) holds an exclusive ``flock`` on ``WORKDIR/owner.lock`` for as long as it runs, and
another process that finds it held is refused before it writes anything (exit code 2, naming the
folder and who holds it). Within one process holds are counted, not refused (``chorus up``
holds the folder, then profiles and deploys in it): two deployments of one process in one
folder are the caller's to avoid. The kernel lets go of the lock
when its holder dies, however it dies; the lock is this process's alone (close-on-exec), so what
a killed ``chorus up`` left running does not hold it, and the next run in that folder still
stops it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shlex
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

from orchestrator.errors import ChorusError

__all__ = ["WorkdirInUse", "WorkdirUnusable", "hold", "owning", "release"]

_LOCK = "owner.lock"
_held: dict[Path, list[int]] = {}  # the folders this process holds: [descriptor, holds]


class WorkdirUnusable(ChorusError):
    """The working directory cannot be made, or its path would break Triton's models."""

    exit_code = 2


# what a shell splits or expands in a path it is given unquoted
_SHELL_READS = re.compile(r"""[\s'"\\$`;&|<>()*?\[\]]""", re.ASCII)


class WorkdirInUse(ChorusError):
    """Another live process deploys in this working directory."""

    exit_code = 2


def hold(workdir: Path) -> Path:
    """Own ``workdir`` (made if missing) until :func:`release` of what this returns (the
    folder, resolved); again in the same process only counts (each hold wants its release: the
    guard is between processes, not between two deployments of one process)."""
    folder = workdir.resolve()
    if folder in _held:
        _held[folder][1] += 1
        return folder
    unsafe = sorted(set(_SHELL_READS.findall(str(folder))))
    if unsafe:
        raise WorkdirUnusable(
            f"cannot use the working directory {str(folder)!r}: its path holds "
            f"{', '.join(map(repr, unsafe))}, and Triton's Python backend starts its models "
            "through a shell that would split or read it (they would never start); "
            "choose a path without them (--workdir)"
        )
    if folder.exists() and not folder.is_dir():
        raise WorkdirUnusable(f"cannot use the working directory {folder}: it is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkdirUnusable(
            f"cannot make the working directory {folder} ({e.strerror}: {e.filename})"
        ) from None
    lock = folder / _LOCK
    try:  # (read-write: an exclusive lock where flock is emulated, NFS, needs it; not waiting
        # on a FIFO, nor through a link)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(lock, flags, 0o600)
    except OSError as e:
        raise ChorusError(
            f"cannot use the working directory {folder} ({lock}: {e.strerror})"
        ) from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ChorusError(f"cannot use the working directory {folder}: {lock} is not a file")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = ""
        with contextlib.suppress(OSError):
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip()
        os.close(fd)
        raise WorkdirInUse(
            f"the working directory {folder} is in use by another deployment"
            + (f" ({holder})" if holder else "")
            + ": stop it first, or give this one a folder of its own (--workdir)"
        ) from None
    except OSError:  # no locks on this file system: serve unguarded rather than not at all
        pass
    with contextlib.suppress(OSError):  # who holds it, for the one refused
        command = shlex.join(sys.argv)
        said = f"pid {os.getpid()}: {command[:300]}{'...' if len(command) > 300 else ''}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, said.encode(errors="replace"), 0)
    _held[folder] = [fd, 1]
    return folder


def release(folder: Path) -> None:
    """Let go of one hold of ``folder`` (as :func:`hold` returned it); the lock goes with the
    last."""
    entry = _held.get(folder)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[folder]
        os.close(entry[0])


@contextlib.contextmanager
def owning(workdir: Path) -> Iterator[None]:
    """Hold ``workdir`` for the block."""
    folder = hold(workdir)
    try:
        yield
    finally:
        release(folder)
