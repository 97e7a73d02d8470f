"""What kills a child's process group when Chorus dies without stopping the child.

A child of Chorus dies with it (``PR_SET_PDEATHSIG``), but what the child started does not:
Python-backend stubs that were still starting when Triton was killed outlive it for good. So
each child Chorus starts has one of these beside it, in a session of its own (no terminal's
signal reaches it), run by path with only the standard library (``python -I watchdog.py``):

    watchdog.py PIDFD GROUP GRACE_S

Its standard input is the read end of a pipe whose write end only Chorus holds. A byte on it
means that Chorus stopped the child itself: nothing to do. The end of the pipe with no byte
means that Chorus is gone. The child then has ``GRACE_S`` to end on its death signal (the
combiner drains), then it is killed, and so is every process left in its group.

``PIDFD`` (a pidfd of the child, inherited) names the child whatever becomes of its pid.
``GROUP`` is the child's pid, which is its group's id: the group outlives the child while any
member is left, and the kernel gives no new process that id until the group is empty."""

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
    with contextlib.suppress(ProcessLookupError, PermissionError):  # (empty: nothing left)
        os.killpg(group, signal.SIGKILL)


if __name__ == "__main__":
    watch(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))
