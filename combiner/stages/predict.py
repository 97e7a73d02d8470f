"""The prediction stage: a batch's calls on Triton, from the first one's start to the last's end.

:meth:`Predictor.start` begins a batch's :class:`Prediction` and returns at once. The prediction
runs in a task the predictor owns, never in a request's: no deadline and no client that goes
away can cancel a call Triton is running. It picks the node each model's calls go to
(:mod:`combiner.triton.nodes`), writes the batch's input once into a shared-memory region (when a
picked node's Triton shares the host), then calls either the rendered fan-out model (one call
returning every member's outputs: when every member must answer and no request of the batch has
a deadline) or each member (in chunks of its batch limit; all at once, or one after another for
the paper's baseline). A member's answer is recorded the moment its calls end, so a request that
stops waiting at its own deadline takes the members that made it by then.

Each model has a queue of its own (a :class:`_Lane`, the paper's queue per DNN): at most
``max_in_flight + 1`` of its batches run on Triton at once (those nobody waits for any more
included: they still hold an instance); a batch's call to a model at its limit waits there, in
batch order, and is dropped without a call if nobody waits for the batch by its turn, or if
every request of the batch has a deadline that the model, busy as it is, cannot meet even at
best (as long as it has lately taken a batch, for a place to free and again for this one: the
requests are then answered at once without it). So a member that lags keeps its own backlog,
bounded, and holds back no other member: the batch is
*settled* (its batching slot frees) as soon as a quorum's worth of members have answered or
failed, or when no request waits for it any more (each stopped at its own deadline, or its
client went away). A request without a deadline still waits for every member: for its turn in
the member's queue and its call, up to the member timeout from the batch's start; then the member
counts as missing for the requests still waiting. Calls still running are left to end, their
answers dropped, and the region they may write to goes back to the pool only when the last of
them has ended.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2
from tritonclient.utils import triton_to_np_dtype

from combiner import metrics
from combiner.config import CombinerConfig, MemberRoute
from combiner.stages.batching import Rows
from combiner.tasks import Owner
from combiner.triton.nodes import Node, Nodes
from combiner.triton.shm import Region
from combiner.triton.upstream import MemberError

__all__ = ["Prediction", "Predictor", "fanout_output"]

log = logging.getLogger("chorus.combiner")
_TIMER_SLACK_S = 0.01  # how early asyncio may run a timer (its clock's resolution)


def fanout_output(member: str, base: str) -> str:
    """The name under which the fan-out model returns a member's output."""
    return f"{member}__{base}"


class Prediction:
    """A batch's answers as they arrive: each member's outputs for the whole batch (base output
    name -> array), or why it is missing. ``finished`` is done when no member is pending;
    ``settled`` when the batch no longer needs its batching slot: a quorum's worth of members
    answered or failed (those the next batch needs are free), it finished, or nobody waits for
    it (``abandoned``)."""

    def __init__(
        self,
        batch: int,
        members: tuple[str, ...],
        bases: tuple[str, ...],
        quorum: int,
        latest: float | None,
        on_abandoned: Callable[[Prediction], None],
    ) -> None:
        self.batch = batch
        self.members = members
        self.bases = bases
        self.answers: dict[str, dict[str, np.ndarray]] = {}
        self.missing: dict[str, str] = {}
        loop = asyncio.get_running_loop()
        self.began = loop.time()
        self.finished: asyncio.Future[None] = loop.create_future()
        self.settled: asyncio.Future[None] = loop.create_future()
        self.gone: asyncio.Future[None] = loop.create_future()  # done once abandoned
        self.combined: dict[tuple[str, ...], Any] = {}  # the combination stage's, per contributors
        self.groups: list[_Group] = []
        self.latest = latest  # the last of its requests' deadlines; None: one has none
        self._quorum = quorum
        self._waiting = 0
        self._on_abandoned = on_abandoned

    @property
    def abandoned(self) -> bool:
        """Every request of the batch stopped waiting before it finished."""
        return self.gone.done()

    def expect(self, requests: int) -> None:
        self._waiting += requests

    def leave(self) -> None:
        """A request of the batch stopped waiting (answered, its deadline, its client gone)."""
        self._waiting -= 1
        if self._waiting <= 0 and not self.finished.done() and not self.gone.done():
            self.gone.set_result(None)
            self._settle()
            self._on_abandoned(self)

    def pending(self) -> list[str]:
        return [m for m in self.members if m not in self.answers and m not in self.missing]

    def miss(self, member: str, reason: str) -> None:
        if member not in self.answers and member not in self.missing:
            self.missing[member] = reason
            self.progress()

    def progress(self) -> None:
        """A member answered or failed: once a quorum's worth have, the slot frees (the
        others' calls go on, in their own queues, for the requests that wait for them)."""
        if len(self.pending()) <= len(self.members) - self._quorum:
            self._settle()

    def finish(self) -> None:
        self.finished.set_result(None)
        self._settle()

    def _settle(self) -> None:
        if not self.settled.done():
            self.settled.set_result(None)


@dataclass(frozen=True)
class _Placed:
    """Where a batch lives in a shared-memory region: each input's offset, and each model
    output placed there, by (model, output): (offset, bytes per row)."""

    region: Region
    inputs: dict[str, int]
    outputs: dict[tuple[str, str], tuple[int, int]]


@dataclass(eq=False)
class _Group:
    """The calls to one model (a member, or the fan-out model) for a batch."""

    route: MemberRoute
    covers: tuple[MemberRoute, ...]  # the members these calls answer for
    node: Node  # where the calls went
    placed: _Placed | None  # the batch's region, when the node shares this host
    tasks: list[asyncio.Task[Any]]
    began: float
    settled: bool = False  # recorded, or given up (member timeout, or nobody waits)
    since: float = 0.0  # when it took its place in the model's lane (loop time)
    # done when its last call has ended (its place in the model's lane is free then)
    ended: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class _Lane:
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


class _BadAnswer(Exception):
    pass


class Predictor:
    def __init__(
        self,
        config: CombinerConfig,
        nodes: Nodes,
    ) -> None:
        self._config = config
        self._nodes = nodes
        self._members = config.members
        self._names = tuple(m.name for m in config.members)
        self._inputs = {t.name: t for t in config.inputs}
        self._base = {t.name: t for t in config.outputs}
        self._fanout = (
            MemberRoute(
                name=config.fanout_model,
                inputs={t.name: t.name for t in config.inputs},
                outputs={},
                max_batch_size=config.fanout_max_batch_size,
            )
            if config.fanout_model
            else None
        )
        self._one_call_allowed = (
            config.quorum_count() == len(config.members) and config.fan_out == "concurrent"
        )
        self._timeout_ms = config.member_timeout_ms
        self._quorum = config.quorum_count()
        # a batch per instance of the scarcest member, and one more (the batcher's most)
        models = [*self._names, *([self._fanout.name] if self._fanout else [])]
        self._lanes = {m: _Lane(config.max_in_flight + 1) for m in models}
        self._tasks = Owner("prediction")

    def start(
        self, rows: Rows, wanted: tuple[str, ...], deadlines: tuple[float | None, ...]
    ) -> Prediction:
        """Begin the batch's calls (``deadlines``: its requests', loop time, None for one that
        waits for every member); returns at once."""
        bases = self._config.bases(wanted)
        latest = None if None in deadlines else max(d for d in deadlines if d is not None)
        prediction = Prediction(rows.batch, self._names, bases, self._quorum, latest, self._abandon)
        has_deadline = any(d is not None for d in deadlines)
        one_call = self._fanout is not None and self._one_call_allowed and not has_deadline
        self._tasks.spawn(self._run(prediction, rows, one_call))
        return prediction

    def _abandon(self, p: Prediction) -> None:
        """Nobody waits for the batch any more: its calls still running are given up."""
        for group in p.groups:
            self._give_up(group)

    async def close(self, drain_s: float) -> None:
        """Wait for the predictions in flight (each ends by the member timeout)."""
        if not await self._tasks.drain(drain_s):
            await self._tasks.cancel()

    async def _run(self, p: Prediction, rows: Rows, one_call: bool) -> None:
        placed = None
        local = self._nodes.local
        routes = (self._fanout,) if one_call and self._fanout else self._members
        where = {r.name: self._nodes.pick(r.name) for r in routes}
        try:
            if local is not None and local in where.values():
                here = [r for r in routes if where[r.name] is local]
                placed = await self._place(rows, p.bases, one_call, here)
            if p.abandoned:  # every request gave up while the region was made: call nobody
                return

            def call(
                route: MemberRoute,
                covers: tuple[MemberRoute, ...],
                names: list[str] | None = None,
                began: float = p.began,  # the member timeout counts from here
            ) -> Coroutine[Any, Any, None]:
                node = where[route.name]
                region = placed if node is local else None
                return self._call(p, route, covers, rows, node, region, names, began)

            if one_call:
                assert self._fanout is not None
                names = [fanout_output(m, b) for m in self._names for b in p.bases]
                await call(self._fanout, self._members, names)
            elif self._config.fan_out == "sequential":  # the paper's baseline
                for member in self._members:
                    if p.abandoned:
                        break
                    now = asyncio.get_running_loop().time()  # each member its own timeout
                    await call(member, (member,), began=now)
            else:
                ends = await asyncio.gather(
                    *(call(m, (m,)) for m in self._members), return_exceptions=True
                )
                for end in ends:  # each ran to its end: the pending ones failed here
                    if isinstance(end, BaseException):
                        raise end
        except MemberError as e:  # no region: Triton is down, or refused it
            assert local is not None
            local.watch.report(e)
            for name in p.pending():
                p.miss(name, e.reason)
        except Exception as e:
            log.exception("a batch failed before its members answered")
            for name in p.pending():
                p.miss(name, f"INTERNAL: {type(e).__name__}: {e}")
        finally:
            for name in p.pending():  # nobody waited for them, or the combiner is stopping
                p.miss(name, "not called: nobody waits for the answer")
            p.finish()
            if placed is not None:
                assert local is not None and local.pool is not None
                local.pool.release(placed.region)

    async def _call(
        self,
        p: Prediction,
        route: MemberRoute,
        covers: tuple[MemberRoute, ...],
        rows: Rows,
        node: Node,
        placed: _Placed | None,
        names: list[str] | None,
        began: float,
    ) -> None:
        """One model's calls for the batch: its turn in the model's lane, the calls, and the
        wait for them, all within the member timeout from ``began`` (loop time)."""
        lane = self._lanes[route.name]
        until = began + self._timeout_ms / 1000
        since = await lane.turn(p, until)
        if since is None:
            if p.abandoned:
                return  # nobody waits: the batch's end marks it
            # the loop runs a timer up to its clock's resolution early: the member timeout is
            # what ended the wait unless the lane judged the batch too late to be answered
            early = asyncio.get_running_loop().time() < until - _TIMER_SLACK_S
            if lane.took is None or not early:
                why = f"none ended within the member timeout ({self._timeout_ms:g} ms)"
            else:
                why = (
                    f"it would not answer by the deadline (a batch takes it about "
                    f"{lane.took * 1000:.0f} ms)"
                )
            for member in covers:  # its requests wait: say why they got nothing from it
                p.miss(
                    member.name,
                    f"not called: it is still running {lane.running} earlier batches, and {why}",
                )
            return
        try:
            group = self._issue(p, route, covers, rows, node, placed, names)
        except BaseException:
            lane.free(since)
            raise
        group.since = since
        if not group.tasks:  # no rows: nothing to call
            group.ended.set_result(None)
            lane.free(since)
        await self._wait(p, group, until)

    async def _place(
        self, rows: Rows, bases: tuple[str, ...], one_call: bool, routes: list[MemberRoute]
    ) -> _Placed:
        """Write the batch's input into a region, and make room there for the outputs of
        ``routes`` (the calls to this host's node) that pay to come back that way (fixed size,
        at least ``output_shared_memory_min_bytes``)."""
        local = self._nodes.local
        assert local is not None and local.pool is not None
        pool = local.pool
        names = list(rows.pieces)
        size = sum(rows.nbytes(n) for n in names)
        outputs = self._placed_outputs(bases, one_call, {r.name for r in routes})
        out_size = rows.batch * sum(outputs.values())
        least = self._config.output_shared_memory_min_bytes
        if least is None or out_size < least:
            outputs, out_size = {}, 0
        region = await pool.acquire(_aligned(size) + out_size)
        try:
            offsets = region.write([rows.pieces[n] for n in names])  # each byte once
        except BaseException:
            pool.release(region)
            raise
        at = _aligned(size)
        where = {}
        for key, row in outputs.items():
            where[key] = (at, row)
            at += rows.batch * row
        metrics.SHARED_BYTES.labels("input").inc(size)
        if out_size:
            metrics.SHARED_BYTES.labels("output").inc(out_size)
        return _Placed(region, dict(zip(names, offsets, strict=True)), where)

    def _placed_outputs(
        self, bases: tuple[str, ...], one_call: bool, models: set[str]
    ) -> dict[tuple[str, str], int]:
        """(model, output) -> bytes per row, for every output the calls to ``models`` return;
        empty if a shape is variable."""
        rows = {}
        for base in bases:
            info = self._base[base]
            if any(d < 0 for d in info.shape):
                return {}
            row = math.prod(info.shape) * np.dtype(triton_to_np_dtype(info.dtype)).itemsize
            for m in self._members:
                if one_call:
                    assert self._fanout is not None
                    if self._fanout.name in models:
                        rows[(self._fanout.name, fanout_output(m.name, base))] = row
                elif m.name in models:
                    rows[(m.name, m.outputs[base])] = row
        return rows

    def _issue(
        self,
        p: Prediction,
        route: MemberRoute,
        covers: tuple[MemberRoute, ...],
        rows: Rows,
        node: Node,
        placed: _Placed | None,
        names: list[str] | None = None,
    ) -> _Group:
        """Start the calls to one model on ``node`` (in chunks of its batch limit)."""
        step = route.max_batch_size or rows.batch
        output_names = names or [route.outputs[b] for b in p.bases]
        requests = [
            self._request(route, rows, start, min(start + step, rows.batch), placed, output_names)
            for start in range(0, rows.batch, step)
        ]
        group = _Group(route, covers, node, placed, [], time.perf_counter())
        p.groups.append(group)
        for request in requests:
            task = node.upstream.infer(request)
            if placed is not None:
                assert node.pool is not None
                node.pool.hold(placed.region)  # until this call has ended
            task.add_done_callback(functools.partial(self._settled, p, group))
            group.tasks.append(task)
        return group

    async def _wait(self, p: Prediction, group: _Group, until: float) -> None:
        """Wait for the group's calls up to ``until`` (the member timeout), or until nobody
        waits for the batch; what is still running then is left to end (its members count as
        missing for whoever still waits)."""
        loop = asyncio.get_running_loop()
        await asyncio.wait(  # never cancels the calls
            (group.ended, p.gone),
            timeout=max(0.0, until - loop.time()),
            return_when=asyncio.FIRST_COMPLETED,
        )
        if self._give_up(group) and not p.abandoned:
            for member in group.covers:
                p.miss(
                    member.name,
                    f"no answer within the member timeout ({self._timeout_ms:g} ms); its "
                    "call is left to finish",
                )

    def _give_up(self, group: _Group) -> bool:
        """Stop waiting for a group still running: its answers will be dropped (its place in
        the model's lane frees when its calls end). Whether it was still running."""
        if group.settled:
            return False
        group.settled = True
        return True

    def _settled(self, p: Prediction, group: _Group, task: asyncio.Task[Any]) -> None:
        """One call ended: when it was the group's last, record its members' answers; then
        let go of the region (after reading it)."""
        try:
            if not task.cancelled():
                task.exception()  # retrieved: a late call's failure is not an unread error
            if all(t.done() for t in group.tasks) and not group.ended.done():
                group.ended.set_result(None)
                self._lanes[group.route.name].ended(group.since, asyncio.get_running_loop().time())
                if not group.settled:
                    group.settled = True
                    metrics.MEMBER_LATENCY.labels(group.route.name).observe(
                        time.perf_counter() - group.began
                    )
                    self._record(p, group)
                    p.progress()
        finally:
            if group.placed is not None:
                assert group.node.pool is not None
                group.node.pool.release(group.placed.region)

    def _record(self, p: Prediction, group: _Group) -> None:
        for task in group.tasks:  # a failure's text is logged, a client gets its code
            error = None if task.cancelled() else task.exception()
            if task.cancelled():
                reason = "CANCELLED: the combiner is stopping"
            elif isinstance(error, MemberError):
                group.node.watch.report(error)
                reason = error.reason
            elif error is not None:
                log.error("a call on %s failed", group.route.name, exc_info=error)
                reason = "INTERNAL: the call failed in the combiner (the error is in its log)"
            else:
                continue
            for member in group.covers:
                p.miss(member.name, reason)
            return
        responses = [t.result() for t in group.tasks]
        for member in group.covers:
            try:
                outputs = {
                    base: self._answer(member, group, responses, base, p.batch) for base in p.bases
                }
            except _BadAnswer as e:
                p.miss(member.name, f"INTERNAL: {e}")
                continue
            if member.name not in p.missing:
                p.answers[member.name] = outputs

    def _answer(
        self,
        member: MemberRoute,
        group: _Group,
        responses: list[Any],
        base: str,
        batch: int,
    ) -> np.ndarray:
        """One member's output for the whole batch, from its responses or the region. Each
        response (one per chunk of rows) must answer its chunk's rows in the output's shape;
        the region is read only then (a short answer there leaves an earlier batch's bytes)."""
        info = self._base[base]
        if group.route is self._fanout:
            name = fanout_output(member.name, base)
        else:
            name = member.outputs[base]
        step = group.route.max_batch_size or batch  # the chunks of _issue
        chunks = [min(step, batch - start) for start in range(0, batch, step)]
        placed = group.placed
        if placed is not None and (group.route.name, name) in placed.outputs:
            for rows, response in zip(chunks, responses, strict=True):
                shape, datatype = _described(response, name)
                if shape != (rows, *info.shape) or datatype != info.dtype:
                    raise _BadAnswer(
                        f"answered {name!r} with shape {list(shape)} of {datatype} in shared "
                        f"memory; expected {[rows, *info.shape]} of {info.dtype}"
                    )
            offset, _ = placed.outputs[(group.route.name, name)]
            dtype = np.dtype(triton_to_np_dtype(info.dtype))
            return placed.region.read(offset, dtype, (batch, *info.shape))
        parts = [_output(r, name) for r in responses]
        for rows, part in zip(chunks, parts, strict=True):
            if part.shape[0] != rows or not _fits(part.shape[1:], info.shape):
                raise _BadAnswer(
                    f"answered {name!r} with shape {list(part.shape)}; expected "
                    f"{[rows, *info.shape]}"
                )
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _request(
        self,
        route: MemberRoute,
        rows: Rows,
        start: int,
        stop: int,
        placed: _Placed | None,
        output_names: list[str],
    ) -> service_pb2.ModelInferRequest:
        """The request for rows [start, stop) of the batch, in the model's tensor names: the
        bytes in the request, or, when ``placed`` in shared memory, pointers to them there
        (and to where its outputs go, for those placed too)."""
        req = service_pb2.ModelInferRequest(model_name=route.name)
        whole = start == 0 and stop == rows.batch
        for ens_name in rows.pieces:
            shape = rows.shapes[ens_name]
            tensor = req.inputs.add(
                name=route.inputs[ens_name],
                datatype=self._inputs[ens_name].dtype,
                shape=(stop - start, *shape[1:]),
            )
            row = rows.nbytes(ens_name) // rows.batch
            if placed is not None:
                _point(
                    tensor.parameters, placed.region.name, placed.inputs[ens_name], row, start, stop
                )
            else:
                content = rows.data[ens_name]
                req.raw_input_contents.append(
                    content if whole else content[start * row : stop * row]
                )
        for name in output_names:
            out = req.outputs.add(name=name)
            key = (route.name, name)
            if placed is not None and key in placed.outputs:
                offset, row = placed.outputs[key]
                _point(out.parameters, placed.region.name, offset, row, start, stop)
        return req


def _point(params: Any, region: str, offset: int, row: int, start: int, stop: int) -> None:
    """Point a tensor at rows [start, stop) of a block at ``offset`` in ``region``."""
    params["shared_memory_region"].string_param = region
    params["shared_memory_offset"].int64_param = offset + start * row
    params["shared_memory_byte_size"].int64_param = (stop - start) * row


def _aligned(size: int) -> int:
    return (size + 63) // 64 * 64


def _fits(shape: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    return len(shape) == len(expected) and all(
        e == -1 or d == e for d, e in zip(shape, expected, strict=True)
    )


def _described(response: service_pb2.ModelInferResponse, name: str) -> tuple[tuple[int, ...], str]:
    """The shape and datatype a response says its output ``name`` has."""
    for out in response.outputs:
        if out.name == name:
            return tuple(out.shape), out.datatype
    raise _BadAnswer(f"its response has no output {name!r}")


def _output(response: service_pb2.ModelInferResponse, name: str) -> np.ndarray:
    for i, out in enumerate(response.outputs):
        if out.name != name:
            continue
        dtype = triton_to_np_dtype(out.datatype)
        if dtype is None or dtype is np.object_ or i >= len(response.raw_output_contents):
            raise _BadAnswer(f"answered {name!r} as {out.datatype}, not raw numbers")
        raw = response.raw_output_contents[i]
        shape = tuple(out.shape)
        if len(raw) != math.prod(shape) * np.dtype(dtype).itemsize:
            raise _BadAnswer(f"answered {name!r} with {len(raw)} bytes for shape {list(shape)}")
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    raise _BadAnswer(f"its response has no output {name!r}")
