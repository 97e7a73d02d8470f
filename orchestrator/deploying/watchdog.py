"""What kills a child's process group when Chorus dies without stopping the child.

A child of Chorus dies with it (``PR_SET_PDEATHSIG``), but what the child started does not:
Python-backend stubs that were still starting when Triton was killed outlive it for good. So
each child Chorus starts has one of these beside it, in a session of its own (no terminal's
signal reaches it), run by path with only the standard library (``python -I watchdog.py``):

    watchdog.py PIDFD GROUP GRACE_S

Its standard input is the read end of a pipe whose write end only Chorus holds. A byte on it
means that Chorus stopped the child itself: nothing to do. The end of the pipe with no byte
means that Chorus is gone. The child then has ``GRACE_S`` to end on its death signal (the
combiner drains), then it is killed, and so is every process left in its session (the child
started it: its id is the child's pid, so its group's too). The Python backend's shared-memory
regions that those processes name on their command lines (a stub's region, which Triton made
for it and, killed, could not unlink) are unlinked once they are killed.

``PIDFD`` (a pidfd of the child, inherited) names the child whatever becomes of its pid.
``GROUP`` is the child's pid: its session's and its group's id. Chorus stands the watchdog
down before it reaps the child, so while the watchdog watches the id is the child's, and
then its session's for as long as a member is left (the kernel gives a pid that is a
session's or a group's id to no new process)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys


def watch(pidfd: int, group: int, grace_s: float) -> None:
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
    regions: set[str] = set()
    for pid, argv in _session(group):
        regions.update(a for a in argv if a.startswith(REGION) and "/" not in a)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):  # (empty: nothing left)
        os.killpg(group, signal.SIGKILL)
    for name in regions:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join("/dev/shm", name))


REGION = "triton_python_backend_shm_region_"


def _session(sid: int) -> list[tuple[int, list[str]]]:
    """The processes of session ``sid`` (from /proc): their pids and command lines."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            fields = stat[stat.rindex(b")") + 2 :].split()  # (the name may hold spaces)
            if int(fields[3]) != sid:  # state, ppid, pgrp, session
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
        found.append((int(entry), argv))
    return found


if __name__ == "__main__":
    watch(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))
