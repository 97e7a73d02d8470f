"""Process helpers shared by every process Chorus starts, and the restart policy of the
processes it supervises (Triton, the combiner, its workers)."""

from __future__ import annotations

import ctypes
import signal
import time
from collections import deque

__all__ = ["Restarts", "die_with_parent"]

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Run in a child between fork and exec: it gets SIGKILL when its parent dies."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Restarts:
    """When to restart a process that died: at once the first time, then after a delay that
    doubles (up to ``max_delay_s``) while it keeps dying; ``limit`` restarts within
    ``window_s`` seconds is a crash loop, and the next death ends supervision."""

    def __init__(
        self,
        limit: int = 5,
        window_s: float = 60.0,
        first_delay_s: float = 0.1,
        max_delay_s: float = 4.0,
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self._first = first_delay_s
        self._max = max_delay_s
        self._times: deque[float] = deque()

    def next_delay(self, now: float | None = None) -> float | None:
        """Record a death; the seconds to wait before restarting, or None for a crash loop."""
        now = time.monotonic() if now is None else now
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()
        if len(self._times) >= self.limit:
            return None
        self._times.append(now)
        return min(self._max, self._first * 2 ** (len(self._times) - 1))

    def describe(self) -> str:
        return f"{self.limit} restarts within {self.window_s:.0f} s"
