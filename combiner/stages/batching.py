"""The batching stage: concurrent requests gathered into one batch before the fan-out.

Requests wait in a queue only while the members are busy: at most ``max_in_flight`` batches
are out at once (out until a quorum's worth of members are done with them; one more if it is
full already: waiting could not grow it, and it keeps the members fed), and the next batch
takes every compatible request queued meanwhile (same requested outputs, shapes after the
batch dimension, and whether a cascade may answer it early; up to ``max_rows`` rows). A
request that finds a free slot and an empty queue goes straight to the members: an idle
combiner adds no delay and no hop. Under load, a freed
slot lets the next batch fill: up to twice the size of the last one (the requests it answered
tend to come back), while arrivals keep coming (a pause of twice their recent mean interval, at
most ``max_gap_s``, ends it), for ``max_fill_s`` at most. So batches grow with the load and
shrink when it falls; this pays when a batch's round trip to the members is short next to the
time the combiner takes to read the requests that would fill it. Each member then sees one call
per batch instead of one per request, and the answers are split back per request by their rows.

The stage hands each request the batch it joined (a :class:`Flight`: the batch's calls on
Triton, started by the prediction stage) and its rows in it; the request then waits for the
answers itself, until its own deadline. A batch never carries a deadline: one request's deadline
cannot cut short its neighbours'. A request still queued at its deadline leaves the queue on its
own, with DEADLINE_EXCEEDED. A batch slot frees when its flight is settled: a quorum's worth of
members answered or failed (the members the next batch needs are free again; a member that lags
keeps the batch's call in a queue of its own, in the prediction stage, for the requests that
still wait for it), or every request of the batch stopped waiting for it. So neither a hung
member nor a slow one holds back the members a quorum needs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Generic, Protocol, TypeVar

import grpc
import numpy as np

from combiner import metrics
from combiner.errors import RequestError

__all__ = ["Batcher", "Flight", "Placement", "Rows"]


@dataclass(frozen=True)
class Rows:
    """A request's (or a batch's) inputs: per input, the row-major bytes of each request in
    order (joined only if someone asks for ``data``), and the shapes."""

    batch: int
    pieces: dict[str, tuple[bytes | memoryview, ...]]  # a memoryview: a client's shared memory
    shapes: dict[str, tuple[int, ...]]  # with the batch dimension

    @classmethod
    def of(
        cls,
        batch: int,
        data: Mapping[str, bytes | memoryview],
        shapes: dict[str, tuple[int, ...]],
    ) -> Rows:
        """One request's inputs."""
        return cls(batch, {n: (b,) for n, b in data.items()}, shapes)

    @cached_property
    def data(self) -> dict[str, bytes]:
        """Each input's bytes in one piece (a copy only for a batch of several requests, or
        from a client's shared memory)."""
        return {
            n: p[0] if len(p) == 1 and isinstance(p[0], bytes) else b"".join(p)
            for n, p in self.pieces.items()
        }

    def nbytes(self, name: str) -> int:
        return sum(map(len, self.pieces[name]))

    def key(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """Requests with equal keys can share a batch."""
        return tuple((name, shape[1:]) for name, shape in sorted(self.shapes.items()))

    def select(self, index: np.ndarray) -> Rows:
        """The rows at ``index`` (positions in this batch) as a batch of their own (a copy:
        the rows a cascade's next tier answers)."""
        pieces: dict[str, tuple[bytes | memoryview, ...]] = {}
        for name, data in self.data.items():
            rows = np.frombuffer(data, np.uint8).reshape(self.batch, -1)
            pieces[name] = (rows[index].tobytes(),)
        shapes = {n: (len(index), *s[1:]) for n, s in self.shapes.items()}
        return Rows(len(index), pieces, shapes)

    @staticmethod
    def join(parts: list[Rows]) -> Rows:
        """The requests as one batch; their bytes are not copied here."""
        if len(parts) == 1:
            return parts[0]
        batch = sum(p.batch for p in parts)
        first = parts[0]
        return Rows(
            batch,
            {n: tuple(piece for p in parts for piece in p.pieces[n]) for n in first.pieces},
            {n: (batch, *s[1:]) for n, s in first.shapes.items()},
        )


class Flight(Protocol):
    """A batch on its way through the members. ``settled`` is done when it no longer needs
    its slot (a quorum's worth of members are done with it, or nobody waits for it);
    ``expect`` says how many requests wait for it (each calls its ``leave``)."""

    @property
    def settled(self) -> asyncio.Future[None]: ...

    def expect(self, requests: int) -> None: ...


F = TypeVar("F", bound=Flight)
# start(batch, wanted outputs, its requests' deadlines in order (loop time; None: that request
# waits for every member), whether its rows may leave a cascade early) -> the batch's flight
Start = Callable[[Rows, tuple[str, ...], tuple[float | None, ...], bool], F]


@dataclass(frozen=True)
class Placement(Generic[F]):
    """Where a request went: its batch's flight, and its rows there [start, stop)."""

    flight: F
    start: int
    stop: int


@dataclass(eq=False)
class _Waiting(Generic[F]):
    rows: Rows
    wanted: tuple[str, ...]
    deadline_at: float | None  # loop time
    cascade: bool
    placed: asyncio.Future[Placement[F]] = field(repr=False)


class Batcher(Generic[F]):
    def __init__(
        self,
        start: Start[F],
        max_rows: int,
        max_in_flight: int = 2,
        max_fill_s: float = 0.0,
        max_gap_s: float = 0.002,
    ) -> None:
        self._start = start
        self._max_rows = max_rows
        self._max_fill_s = max_fill_s
        self._max_gap_s = max_gap_s
        self._target = 1  # requests in the last batch
        self._last_arrival = 0.0
        self._interval = max_gap_s  # running mean of the time between queued arrivals
        self._limit = max_in_flight
        self._in_flight = 0
        self._queue: deque[_Waiting[F]] = deque()
        self._rows_queued = 0  # the queue's rows, those that gave up included (a bound)
        self._filling = False  # the dispatcher waits for arrivals to fill a batch
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    async def submit(
        self,
        rows: Rows,
        wanted: tuple[str, ...],
        deadline_at: float | None,
        cascade: bool = True,
    ) -> Placement[F]:
        """Put one request in a batch (at once when the combiner is idle); ``deadline_at`` is
        the loop time after which it stops waiting in the queue; ``cascade``: whether its rows
        may be answered by a cascade's first tiers (a batch holds only requests that agree)."""
        loop = asyncio.get_running_loop()
        if not self._queue and self._in_flight < self._limit:
            # idle: no one to batch with, so no hop through the dispatcher
            metrics.BATCHED.observe(1)
            flight = self._launch(rows, wanted, (deadline_at,), cascade)
            return Placement(flight, 0, rows.batch)
        if self._loop_task is None:
            self._loop_task = loop.create_task(self._dispatch_forever())
        now = loop.time()
        since = min(now - self._last_arrival, self._max_gap_s)
        self._interval = 0.9 * self._interval + 0.1 * since
        self._last_arrival = now
        waiting = _Waiting(rows, wanted, deadline_at, cascade, loop.create_future())
        self._queue.append(waiting)
        self._rows_queued += rows.batch
        if self._filling or self._may_go():  # else it waits for a slot: no use waking it
            self._wake.set()
        try:
            if deadline_at is None:
                return await waiting.placed
            async with asyncio.timeout_at(deadline_at):
                return await waiting.placed
        except TimeoutError:
            raise RequestError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no member answered in time: the request was still queued behind "
                f"{self._in_flight} batch(es) at its deadline",
            ) from None
        finally:
            if not waiting.placed.done():  # gave up (deadline, or the client went away):
                waiting.placed.cancel()  # the dispatcher drops it

    async def close(self) -> None:
        """Stop the dispatcher; a request still queued gets UNAVAILABLE."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for w in self._queue:
            if not w.placed.done():
                w.placed.set_exception(
                    RequestError(grpc.StatusCode.UNAVAILABLE, "the endpoint is stopping")
                )
        self._queue.clear()
        self._rows_queued = 0

    def _launch(
        self,
        rows: Rows,
        wanted: tuple[str, ...],
        deadlines: tuple[float | None, ...],
        cascade: bool,
    ) -> F:
        flight = self._start(rows, wanted, deadlines, cascade)
        flight.expect(len(deadlines))
        self._in_flight += 1
        flight.settled.add_done_callback(self._release)
        return flight

    async def _dispatch_forever(self) -> None:
        while True:
            while not (self._queue and self._may_go()):  # meanwhile, the queue fills up
                self._wake.clear()
                await self._wake.wait()
            if self._max_fill_s > 0:
                await self._fill()
            batch = self._take()
            if not batch:
                continue
            self._target = len(batch)
            metrics.BATCHED.observe(len(batch))
            flight = self._launch(
                Rows.join([w.rows for w in batch]),
                batch[0].wanted,
                tuple(w.deadline_at for w in batch),
                batch[0].cascade,
            )
            start = 0
            for w in batch:
                w.placed.set_result(Placement(flight, start, start + w.rows.batch))
                start += w.rows.batch

    def _may_go(self) -> bool:
        """Whether the next batch may go out: while fewer than ``max_in_flight`` are out, or,
        when it is full already (waiting cannot grow it), beside them as one more."""
        if self._in_flight < self._limit:
            return True
        return self._in_flight == self._limit and self._full()

    def _full(self) -> bool:
        """Whether the queue holds ``max_rows`` rows of requests still waiting."""
        if self._rows_queued < self._max_rows:
            return False  # (a bound: no need to look at each)
        return sum(w.rows.batch for w in self._queue if not w.placed.done()) >= self._max_rows

    def _release(self, _: object = None) -> None:
        self._in_flight -= 1
        self._wake.set()

    async def _fill(self) -> None:
        """Let the batch fill while requests keep arriving (see the module's docstring)."""
        loop = asyncio.get_running_loop()
        gap = min(max(2 * self._interval, 0.0001), self._max_gap_s)
        until = loop.time() + self._max_fill_s
        self._filling = True
        try:
            while len(self._queue) < 2 * self._target and not self._full():
                now = loop.time()
                if now - self._last_arrival >= gap or now >= until:
                    return
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(gap):
                        await self._wake.wait()
        finally:
            self._filling = False

    def _take(self) -> list[_Waiting[F]]:
        """The first queued request and every compatible one behind it, up to max_rows;
        requests that gave up are dropped."""
        live = deque(w for w in self._queue if not w.placed.done())
        if not live:
            self._queue, self._rows_queued = live, 0
            return []
        first = live.popleft()
        batch, rows, key = [first], first.rows.batch, _key(first)
        kept: deque[_Waiting[F]] = deque()
        rows_left = 0
        while live:
            w = live.popleft()
            if _key(w) == key and rows + w.rows.batch <= self._max_rows:
                batch.append(w)
                rows += w.rows.batch
            else:
                kept.append(w)
                rows_left += w.rows.batch
        self._queue = kept
        self._rows_queued = rows_left
        return batch


def _key(w: _Waiting[F]) -> tuple[object, ...]:
    """Requests with equal keys can share a batch."""
    return (w.wanted, w.cascade, w.rows.key())
