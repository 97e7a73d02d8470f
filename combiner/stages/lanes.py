"""Each model's queue of batches (the paper's queue per DNN): :class:`Lane`.

At most ``max_in_flight + 1`` of a model's batches run on Triton at once (those nobody waits
for any more included: they still hold an instance); a batch's call to a model at its limit
waits in the lane, in batch order, and is dropped without a call if nobody waits for the batch
by its turn, or if every request of the batch has a deadline that the model, busy as it is,
cannot meet even at best (as long as it has lately taken a batch, for a place to free and again
for this one: the requests are then answered at once without it). So a member that lags keeps
its own backlog, bounded, and holds back no other member.
"""

from __future__ import annotations

import asyncio
from collections import deque

from combiner.stages.prediction import Prediction

__all__ = ["Lane"]


class Lane:
    """One model's queue: at most ``limit`` of its batches' calls run on Triton at once; the
    batches after them wait their turn here, in order. A place is taken when a batch's calls
    start and freed when the last of them ends (a call nobody waits for any more too: it still
    holds an instance of the model). The lane also keeps how long the model takes a batch (from
    its calls' start, or the end of the batch before, to their end), so that a batch whose every
    request has a deadline does not queue for a model that cannot answer it by then even at
    best (a free place only when its oldest call has taken that long, and as long again)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._running: list[float] = []  # when each running batch took its place (loop time)
        self._turns: deque[asyncio.Future[float]] = deque()
        self.took: float | None = None  # running mean of a batch's time on the model (s)
        self._last_end = 0.0

    @property
    def running(self) -> int:
        return len(self._running)

    async def turn(self, p: Prediction, until: float) -> float | None:
        """Wait for a place for ``p``'s calls: when it was taken (loop time), or None if none
        came before ``until`` (loop time) while somebody still waits for ``p`` and could still
        get the model's answer in time."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._turns and self._turns[0].done():  # turns given up before they came
            self._turns.popleft()
        if self.running < self.limit and not any(not t.done() for t in self._turns):
            self._running.append(now)  # free: called even if it was slow lately (it may not be)
            return now
        if self.too_late(p, now):
            return None
        ticket: asyncio.Future[float] = loop.create_future()
        self._turns.append(ticket)
        timer = loop.call_at(until, _cancel, ticket)
        try:
            await asyncio.wait((ticket, p.gone), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the process is stopping
            if ticket.done() and not ticket.cancelled():
                self.free(ticket.result())
            ticket.cancel()
            raise
        finally:
            timer.cancel()
        if ticket.done() and not ticket.cancelled():
            since = ticket.result()
            if not p.gone.done() and not self.too_late(p, loop.time()):
                return since  # its place was taken for it
            self.free(since)  # its turn came too late for it: to the next in line
        ticket.cancel()  # out of the line (dropped when its turn comes)
        return None

    def too_late(self, p: Prediction, now: float) -> bool:
        """Whether the model's answer for ``p`` cannot come by the last of its requests'
        deadlines (never so when one of them has none), as the model has run lately."""
        if p.latest is None or self.took is None:
            return False
        free_at = now
        if self.running >= self.limit:
            free_at = max(now, min(self._running) + self.took)
        return free_at + self.took > p.latest

    def ended(self, since: float, now: float) -> None:
        """The calls of the batch that took its place at ``since`` ended."""
        took = now - max(since, self._last_end)
        self._last_end = now
        self.took = took if self.took is None else 0.8 * self.took + 0.2 * took
        self.free(since)

    def free(self, since: float) -> None:
        """Give back the place taken at ``since``: to the next live turn in line."""
        self._running.remove(since)
        while self._turns:
            ticket = self._turns.popleft()
            if not ticket.done():
                now = asyncio.get_running_loop().time()
                self._running.append(now)
                ticket.set_result(now)
                return


def _cancel(future: asyncio.Future[float]) -> None:
    future.cancel()
