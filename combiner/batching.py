"""The batching stage: concurrent requests gathered into one batch before the fan-out.

Requests wait in a queue only while the members are busy: at most ``max_in_flight`` batches
are out at once (one more if it is full already: waiting could not grow it, and it keeps the
members fed), and the next batch takes every compatible request queued meanwhile (same
requested outputs and shapes after the batch dimension, up to ``max_rows`` rows). A request
that finds a free slot and an empty queue goes straight to the members, in its own task: an
idle combiner adds no delay and no hop. Under load, a freed slot lets the next batch fill: up
to twice the size of the last one (the requests it answered tend to come back), while arrivals
keep coming (a pause of twice their recent mean interval, at most ``max_gap_s``, ends it), for
``max_fill_s`` at most. So batches grow with the load and shrink when it falls; this pays when
a batch's round trip to the members is short next to the time the combiner takes to read the
requests that would fill it. Each member then sees one call per batch instead of one per
request, and the answers are split back per request by their rows.

A request's deadline runs from its arrival: a batch is given the earliest deadline among its
requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from . import metrics

__all__ = ["Batcher", "Rows"]


@dataclass(frozen=True)
class Rows:
    """A request's (or a batch's) inputs: per input, the row-major bytes of each request in
    order (joined only if someone asks for ``data``), and the shapes."""

    batch: int
    pieces: dict[str, tuple[bytes | memoryview, ...]]  # a memoryview: a client's shared memory
    shapes: dict[str, tuple[int, ...]]  # with the batch dimension

    @classmethod
    def of(
        cls, batch: int, data: dict[str, bytes | memoryview], shapes: dict[str, tuple[int, ...]]
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


Result = tuple[dict[str, np.ndarray], list[str], dict[str, str]]  # outputs, contributors, missing
Run = Callable[[Rows, list[str], float | None], Awaitable[Result]]


@dataclass
class _Waiting:
    rows: Rows
    wanted: tuple[str, ...]
    deadline_at: float | None
    answer: asyncio.Future[Result] = field(repr=False)


class Batcher:
    def __init__(
        self,
        run: Run,
        max_rows: int,
        max_in_flight: int = 2,
        max_fill_s: float = 0.0,
        max_gap_s: float = 0.002,
    ) -> None:
        self._run = run
        self._max_rows = max_rows
        self._max_fill_s = max_fill_s
        self._max_gap_s = max_gap_s
        self._target = 1  # requests in the last batch
        self._last_arrival = 0.0
        self._interval = max_gap_s  # running mean of the time between queued arrivals
        self._limit = max_in_flight
        self._in_flight = 0
        self._queue: deque[_Waiting] = deque()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    async def submit(self, rows: Rows, wanted: list[str], deadline: float | None) -> Result:
        """The answer to one request, computed in whatever batch it joins."""
        if not self._queue and self._in_flight < self._limit:
            # idle: no one to batch with, so no hop through the dispatcher
            self._in_flight += 1
            try:
                return await self._run(rows, wanted, deadline)
            finally:
                metrics.BATCHED.observe(1)
                self._release()
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._dispatch_forever())
        now = time.monotonic()
        since = min(now - self._last_arrival, self._max_gap_s)
        self._interval = 0.9 * self._interval + 0.1 * since
        self._last_arrival = now
        waiting = _Waiting(
            rows,
            tuple(wanted),
            None if deadline is None else now + deadline,
            asyncio.get_running_loop().create_future(),
        )
        self._queue.append(waiting)
        self._wake.set()
        return await waiting.answer

    async def close(self) -> None:
        tasks = [t for t in (self._loop_task, *self._running) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _dispatch_forever(self) -> None:
        while True:
            while not (self._queue and self._may_go()):  # meanwhile, the queue fills up
                self._wake.clear()
                await self._wake.wait()
            if self._max_fill_s > 0:
                await self._fill()
            batch = self._take()
            self._target = len(batch)
            self._in_flight += 1
            task = asyncio.create_task(self._dispatch(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _may_go(self) -> bool:
        """Whether the next batch may go out: while fewer than ``max_in_flight`` are out, or,
        when it is full already (waiting cannot grow it), beside them as one more."""
        full = sum(w.rows.batch for w in self._queue) >= self._max_rows
        return self._in_flight < self._limit + (1 if full else 0)

    def _release(self) -> None:
        self._in_flight -= 1
        self._wake.set()

    async def _fill(self) -> None:
        """Let the batch fill while requests keep arriving (see the module's docstring)."""
        gap = min(max(2 * self._interval, 0.0001), self._max_gap_s)
        until = time.monotonic() + self._max_fill_s
        while (
            len(self._queue) < 2 * self._target
            and sum(w.rows.batch for w in self._queue) < self._max_rows
        ):
            now = time.monotonic()
            if now - self._last_arrival >= gap or now >= until:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), gap)

    def _take(self) -> list[_Waiting]:
        """The first queued request and every compatible one behind it, up to max_rows."""
        first = self._queue.popleft()
        batch, rows, key = [first], first.rows.batch, (first.wanted, first.rows.key())
        kept: deque[_Waiting] = deque()
        while self._queue:
            w = self._queue.popleft()
            if (w.wanted, w.rows.key()) == key and rows + w.rows.batch <= self._max_rows:
                batch.append(w)
                rows += w.rows.batch
            else:
                kept.append(w)
        self._queue = kept
        return batch

    async def _dispatch(self, batch: list[_Waiting]) -> None:
        metrics.BATCHED.observe(len(batch))
        try:
            deadlines = [w.deadline_at for w in batch if w.deadline_at is not None]
            deadline = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            try:
                outputs, contributors, missing = await self._run(
                    Rows.join([w.rows for w in batch]), list(batch[0].wanted), deadline
                )
            except Exception as e:  # every request of the batch gets the same error
                for w in batch:
                    if not w.answer.done():
                        w.answer.set_exception(e)
                return
            start = 0
            for w in batch:
                stop = start + w.rows.batch
                part = {name: array[start:stop] for name, array in outputs.items()}
                if not w.answer.done():
                    w.answer.set_result((part, contributors, missing))
                start = stop
        finally:
            self._release()
