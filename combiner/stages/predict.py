"""The prediction stage: a batch's calls on Triton, from the first one's start to the last's end.

:meth:`Predictor.start` begins a batch's :class:`Prediction` and returns at once. The prediction
runs in a task the predictor owns, never in a request's: no deadline and no client that goes
away can cancel a call Triton is running. It picks the node each model's calls go to
(:mod:`combiner.triton.nodes`), writes the batch's input once into a shared-memory region (when a
picked node's Triton shares the host: :mod:`combiner.stages.batch_shm`), then calls either the
rendered fan-out model (one call returning every member's outputs: when every member must answer
and no request of the batch has a deadline) or each member (all at once, or one after another
for the paper's baseline). A member's answer is recorded the moment its calls end, so a request
that stops waiting at its own deadline takes the members that made it by then.

The parts, each in its own module: the batch's record, settled at quorum
(:mod:`combiner.stages.prediction`); one model's calls for it, within the member timeout and
never cancelled (:mod:`combiner.stages.calls`), each model through its own queue, bounded, which
drops a batch nobody waits for or that it cannot answer by its deadline
(:mod:`combiner.stages.lanes`); and the calls' requests and the answers read back from the
responses or the region, checked (:mod:`combiner.stages.messages`). A request without a deadline
still waits for every member: for its turn in the member's queue and its call, up to the member
timeout from the batch's start; then the member counts as missing for the requests still
waiting. Calls still running are left to end, their answers dropped, and the region they may
write to goes back to the pool only when the last of them has ended.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from combiner.config import CombinerConfig, MemberRoute
from combiner.stages.batch_shm import Placed, place
from combiner.stages.batching import Rows
from combiner.stages.calls import Caller
from combiner.stages.messages import fanout_output, placed_outputs
from combiner.stages.prediction import Prediction
from combiner.tasks import Owner
from combiner.triton.nodes import Nodes
from combiner.triton.upstream import MemberError

__all__ = ["Prediction", "Predictor", "fanout_output"]

log = logging.getLogger("chorus.combiner")


class Predictor:
    """Runs each batch's prediction: places its input, picks the nodes, and chooses the one
    call to the fan-out model or the calls to each member (together, or in turn)."""

    def __init__(
        self,
        config: CombinerConfig,
        nodes: Nodes,
    ) -> None:
        self._config = config
        self._nodes = nodes
        self._members = config.members
        self._names = tuple(m.name for m in config.members)
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
        self._quorum = config.quorum_count()
        self._caller = Caller(config, self._fanout)
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
            group.give_up()

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
                return self._caller.call(p, route, covers, rows, node, region, names, began)

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

    async def _place(
        self, rows: Rows, bases: tuple[str, ...], one_call: bool, routes: list[MemberRoute]
    ) -> Placed:
        """Write the batch's input into a region of this host's pool, and make room there for
        the outputs of ``routes`` (the calls to this host's node) that pay to come back that way
        (fixed size, at least ``output_shared_memory_min_bytes``)."""
        local = self._nodes.local
        assert local is not None and local.pool is not None
        models = {r.name for r in routes}
        outputs = placed_outputs(self._base, self._members, self._fanout, bases, one_call, models)
        return await place(local.pool, rows, outputs, self._config.output_shared_memory_min_bytes)
