"""What ends a child's session when Chorus dies without stopping the child.

A child of Chorus dies with it (``PR_SET_PDEATHSIG``), but what the child started does not:
Python-backend stubs that were still starting when Triton was killed outlive it for good. So
each child Chorus starts has one of these beside it, in a session of its own (no terminal's
signal reaches it), run by path with only the standard library (``python -I watchdog.py``):

    watchdog.py PIDFD SESSION SINCE GRACE_S

Its standard input is the read end of a pipe whose write end only Chorus holds. A byte on it
means that Chorus has seen to the child itself: nothing to do. The end of the pipe with no
byte means that Chorus is gone. The child then has ``GRACE_S`` to end on its death signal (the
combiner drains), then it is killed, and the session it leads is ended (:func:`end_session`,
which Chorus uses too once it sees a child end).

``PIDFD`` (a pidfd of the child, inherited) names the child whatever becomes of its pid.
``SESSION`` is the child's pid, its session's id; ``SINCE`` the child's start time. Chorus
stands the watchdog down before it reaps the child, and the kernel gives no new process an id
that a session still holds; but a watchdog that acts late (Chorus gone, the session empty, the
id given again) must not end another's session: see :func:`end_session`."""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import sys

# the Python backend's shared memory, one region a stub, named on the stub's command line
REGION = re.compile(r"triton_python_backend_shm_region_[0-9a-f-]+")


def watch(pidfd: int, session: int, since: int, grace_s: float) -> None:
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    try:
        word = os.read(0, 1)
    except OSError:
        word = b""
    if word:
        return  # stood down
    if not select.select([pidfd], [], [], grace_s)[0]:  # readable once the child has ended
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        select.select([pidfd], [], [], 5.0)
    end_session(session, since)


def end_session(session: int, since: int, naming: str | None = None) -> list[int]:
    """Kill the processes of ``session`` (the id of its leader, who started at ``since``)
    that started at ``since`` or later (and whose command line names the folder ``naming``,
    if given), and unlink the shared-memory regions their command lines name (a stub's,
    which its Triton, killed, could not unlink); the pids killed.

    Nothing, where a process of that id runs that started at another time: the id was given
    again, so the session is another's. Where none runs, a member that started before its
    leader is not of it. (Left: a new session of that id whose own leader already ended.)"""
    leader = started(session)
    if leader is not None and leader != since:
        return []
    killed: list[int] = []
    regions: set[str] = set()
    for _ in range(3):  # (a member may start one more as it is killed)
        found = [
            (p, argv)
            for p, start, argv in _session(session)
            if start >= since and (naming is None or any(_names(w, naming) for w in argv))
        ]
        for pid, argv in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):  # gone, or not ours to kill
                continue
            killed.append(pid)
            regions.update(w for w in argv if REGION.fullmatch(w))
        if not found:
            break
    for name in regions:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join("/dev/shm", name))
    return killed


def _names(word: str, folder: str) -> bool:
    """Whether a command line's word names ``folder`` or a path in it (not ``folder2/``)."""
    return (word + "/").find(folder.rstrip("/") + "/") >= 0


def started(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), or None if there is none."""
    try:
        return _stat(pid)[1]
    except (OSError, ValueError, IndexError):
        return None


def _stat(pid: int) -> tuple[int, int]:
    """Process ``pid``'s session and start time, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2 :].split()  # from field 3 on (the name may hold spaces)
    return int(fields[3]), int(fields[19])  # fields 6 (session) and 22 (starttime)


def _session(session: int) -> list[tuple[int, int, list[str]]]:
    """The processes of ``session`` but this one: their pids, start times and command lines."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            sid, start = _stat(int(entry))
            if sid != session:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
        found.append((int(entry), start, argv))
    return found


if __name__ == "__main__":
    watch(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
