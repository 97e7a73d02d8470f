"""One model's calls for a batch, from its turn in the model's queue to its answers' record.

:meth:`Caller.call` waits for the batch's turn in the model's :class:`~combiner.stages.lanes.Lane`,
starts the calls on the picked node (in chunks of the model's batch limit), and waits for them
up to the member timeout, or until nobody waits for the batch; then the members they answer for
count as missing for the requests still waiting. A call is never cancelled: one still running
is left to end, its answers dropped, its place in the lane freed only then (it still holds an
instance), and the shared-memory region it may write to goes back to the pool only when the
last call holding it has ended. When a group's last call ends its members' answers are recorded
at once (:meth:`Prediction.progress <combiner.stages.prediction.Prediction.progress>` may then
settle the batch).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

import numpy as np

from combiner import metrics
from combiner.config import CombinerConfig, MemberRoute
from combiner.stages.batch_shm import Placed
from combiner.stages.batching import Rows
from combiner.stages.lanes import Lane
from combiner.stages.messages import BadAnswer, answer, chunks, fanout_output, request
from combiner.stages.prediction import Group, Prediction
from combiner.triton.nodes import Node
from combiner.triton.upstream import MemberError

__all__ = ["Caller"]

log = logging.getLogger("chorus.combiner")
_TIMER_SLACK_S = 0.01  # how early asyncio may run a timer (its clock's resolution)


class Caller:
    """Calls the models of an ensemble (its members, and its fan-out model if ``fanout``), each
    through its own lane."""

    def __init__(self, config: CombinerConfig, fanout: MemberRoute | None) -> None:
        self._inputs = {t.name: t for t in config.inputs}
        self._base = {t.name: t for t in config.outputs}
        self._fanout = fanout
        self._timeout_ms = config.member_timeout_ms
        # a batch per instance of the scarcest member, and one more (the batcher's most)
        models = [*(m.name for m in config.members), *([fanout.name] if fanout else [])]
        self._lanes = {m: Lane(config.max_in_flight + 1) for m in models}

    async def call(
        self,
        p: Prediction,
        route: MemberRoute,
        covers: tuple[MemberRoute, ...],
        rows: Rows,
        node: Node,
        placed: Placed | None,
        names: list[str] | None,
        began: float,
        index: np.ndarray | None = None,
    ) -> None:
        """One model's calls for ``rows``: its turn in the model's lane, the calls, and the
        wait for them, all within the member timeout from ``began`` (loop time). ``index``:
        the rows' positions in the batch, when they are some of its rows (a cascade's later
        tier); the answers are kept at those places."""
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
            group = self._issue(p, route, covers, rows, node, placed, names, index)
        except BaseException:
            lane.free(since)
            raise
        group.since = since
        if not group.tasks:  # no rows: nothing to call
            group.ended.set_result(None)
            lane.free(since)
        await self._wait(p, group, until)

    def _issue(
        self,
        p: Prediction,
        route: MemberRoute,
        covers: tuple[MemberRoute, ...],
        rows: Rows,
        node: Node,
        placed: Placed | None,
        names: list[str] | None = None,
        index: np.ndarray | None = None,
    ) -> Group:
        """Start the calls to one model on ``node`` (in chunks of its batch limit)."""
        output_names = names or [route.outputs[b] for b in p.bases]
        requests = [
            request(route, self._inputs, rows, start, stop, placed, output_names)
            for start, stop in chunks(route, rows.batch)
        ]
        group = Group(route, covers, node, placed, [], time.perf_counter(), rows.batch, index)
        p.groups.append(group)
        for req in requests:
            task = node.upstream.infer(req)
            if placed is not None:
                assert node.pool is not None
                node.pool.hold(placed.region)  # until this call has ended
            task.add_done_callback(functools.partial(self._settled, p, group))
            group.tasks.append(task)
        return group

    async def _wait(self, p: Prediction, group: Group, until: float) -> None:
        """Wait for the group's calls up to ``until`` (the member timeout), or until nobody
        waits for the batch; what is still running then is left to end (its members count as
        missing for whoever still waits)."""
        loop = asyncio.get_running_loop()
        await asyncio.wait(  # never cancels the calls
            (group.ended, p.gone),
            timeout=max(0.0, until - loop.time()),
            return_when=asyncio.FIRST_COMPLETED,
        )
        if group.give_up() and not p.abandoned:
            for member in group.covers:
                p.miss(
                    member.name,
                    f"no answer within the member timeout ({self._timeout_ms:g} ms); its "
                    "call is left to finish",
                )

    def _settled(self, p: Prediction, group: Group, task: asyncio.Task[Any]) -> None:
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

    def _record(self, p: Prediction, group: Group) -> None:
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
                    base: answer(
                        group.route,
                        group.placed,
                        responses,
                        self._name(group.route, member, base),
                        self._base[base],
                        group.rows,
                    )
                    for base in p.bases
                }
            except BadAnswer as e:
                p.miss(member.name, f"INTERNAL: {e}")
                continue
            if member.name not in p.missing:
                p.answers[member.name] = _in_place(outputs, group.index, p.batch)

    def _name(self, route: MemberRoute, member: MemberRoute, base: str) -> str:
        """The name under which the calls to ``route`` return ``member``'s output ``base``."""
        return fanout_output(member.name, base) if route is self._fanout else member.outputs[base]


def _in_place(
    outputs: dict[str, np.ndarray], index: np.ndarray | None, batch: int
) -> dict[str, np.ndarray]:
    """A member's outputs at their rows' places in the batch (zeros elsewhere: rows it did not
    answer, which no combination reads), when it answered only some rows."""
    if index is None:
        return outputs
    placed = {}
    for base, array in outputs.items():
        full = np.zeros((batch, *array.shape[1:]), array.dtype)
        full[index] = array
        placed[base] = full
    return placed
