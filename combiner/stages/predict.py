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

import numpy as np

from combiner import metrics
from combiner.config import CombinerConfig, MemberRoute
from combiner.stages.batch_shm import Placed, place
from combiner.stages.batching import Rows
from combiner.stages.calls import Caller
from combiner.stages.cascade import exits
from combiner.stages.messages import fanout_output, placed_outputs
from combiner.stages.prediction import Prediction, Tiers
from combiner.stages.rules import load_rule
from combiner.tasks import Owner
from combiner.triton.nodes import Nodes
from combiner.triton.upstream import MemberError

__all__ = ["Exit", "Prediction", "Predictor", "fanout_output"]

log = logging.getLogger("chorus.combiner")


class Predictor:
    """Runs each batch's prediction: places its input, picks the nodes, and chooses the one
    call to the fan-out model or the calls to each member (together, or in turn; with a
    cascade, tier by tier)."""

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
        self._cascade = config.cascade
        self._tiers = Tiers(config.cascade.tiers) if config.cascade else None
        self._exit = Exit(config) if config.cascade else None

    def start(
        self,
        rows: Rows,
        wanted: tuple[str, ...],
        deadlines: tuple[float | None, ...],
        cascade: bool = True,
    ) -> Prediction:
        """Begin the batch's calls (``deadlines``: its requests', loop time, None for one that
        waits for every member; ``cascade``: whether its rows may be answered by the cascade's
        first tiers, if the ensemble has one); returns at once."""
        tiers = self._tiers if cascade else None
        bases = self._config.bases(wanted)
        if tiers is not None and self._cascade is not None:  # the exit rule reads its output
            bases = tuple(dict.fromkeys((*bases, self._cascade.output)))
        latest = None if None in deadlines else max(d for d in deadlines if d is not None)
        prediction = Prediction(
            rows.batch, self._names, bases, self._quorum, latest, self._abandon, tiers
        )
        has_deadline = any(d is not None for d in deadlines)
        one_call = (
            self._fanout is not None
            and self._one_call_allowed
            and not has_deadline
            and tiers is None
        )
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
        try:
            if one_call:
                assert self._fanout is not None
                await self._call(p, rows, (self._fanout,), one_call=True)
            elif p.tiers is None:
                await self._call(p, rows, self._members)
            else:
                await self._run_tiers(p, rows)
        except Exception as e:
            log.exception("a batch failed before its members answered")
            for name in p.pending():
                p.miss(name, f"INTERNAL: {type(e).__name__}: {e}")
        finally:
            for name in p.pending():  # nobody waited for them, or the combiner is stopping
                p.miss(name, "not called: nobody waits for the answer")
            p.finish()

    async def _run_tiers(self, p: Prediction, rows: Rows) -> None:
        """The cascade: each tier's members on the rows left, then the exit rule on what the
        members so far answered; the rows it passes are decided, the others go on (as a
        smaller batch, written into shared memory again). The last tier decides the rest."""
        assert p.tiers is not None and self._exit is not None
        loop = asyncio.get_running_loop()
        left = np.arange(rows.batch)
        last = len(p.tiers.names) - 1
        for k, names in enumerate(p.tiers.names):
            p.reach(k, left)
            if p.abandoned:
                return
            routes = tuple(m for m in self._members if m.name in names)
            index = None if k == 0 else left
            part = rows if k == 0 else rows.select(left)
            await self._call(p, part, routes, began=loop.time(), index=index)
            leaving = left if k == last else left[self._exit.passes(p, k, left)]
            going = np.setdiff1d(left, leaving, assume_unique=True)
            if len(going):
                p.reach(k + 1, going)  # before the decision wakes the requests
            else:
                p.close_tiers(k)
            p.decide(k, leaving)
            metrics.CASCADE_ROWS.labels(str(k)).inc(len(leaving))
            if not len(going):
                return
            left = going

    async def _call(
        self,
        p: Prediction,
        rows: Rows,
        routes: tuple[MemberRoute, ...],
        one_call: bool = False,
        began: float | None = None,
        index: np.ndarray | None = None,
    ) -> None:
        """Call ``routes`` on ``rows`` (``index``: their positions in the batch, when they are
        some of its rows), each member's timeout counting from ``began`` (default: the
        batch's start): the input written once into a region where a picked node shares this
        host, given back when the last call that may write to it has ended."""
        placed = None
        local = self._nodes.local
        where = {r.name: self._nodes.pick(r.name) for r in routes}
        covers = self._members if one_call else None
        started = p.began if began is None else began
        try:
            if local is not None and local in where.values():
                here = [r for r in routes if where[r.name] is local]
                placed = await self._place(rows, p.bases, one_call, here)
            if p.abandoned:  # every request gave up while the region was made: call nobody
                return

            def call(
                route: MemberRoute,
                names: list[str] | None = None,
                since: float = started,  # the member timeout counts from here
            ) -> Coroutine[Any, Any, None]:
                node = where[route.name]
                region = placed if node is local else None
                return self._caller.call(
                    p, route, covers or (route,), rows, node, region, names, since, index
                )

            if one_call:
                names = [fanout_output(m, b) for m in self._names for b in p.bases]
                await call(routes[0], names)
            elif self._config.fan_out == "sequential":  # the paper's baseline
                for member in routes:
                    if p.abandoned:
                        break
                    now = asyncio.get_running_loop().time()  # each member its own timeout
                    await call(member, since=now)
            else:
                ends = await asyncio.gather(*(call(m) for m in routes), return_exceptions=True)
                for end in ends:  # each ran to its end: the pending ones failed here
                    if isinstance(end, BaseException):
                        raise end
        except MemberError as e:  # no region: Triton is down, or refused it
            assert local is not None
            local.watch.report(e)
            for route in covers or routes:
                p.miss(route.name, e.reason)
        finally:
            if placed is not None:
                assert local is not None and local.pool is not None
                local.pool.release(placed.region)

    async def _place(
        self, rows: Rows, bases: tuple[str, ...], one_call: bool, routes: list[MemberRoute]
    ) -> Placed:
        """Write the rows' input into a region of this host's pool, and make room there for
        the outputs of ``routes`` (the calls to this host's node) that pay to come back that way
        (fixed size, at least ``output_shared_memory_min_bytes``)."""
        local = self._nodes.local
        assert local is not None and local.pool is not None
        models = {r.name for r in routes}
        outputs = placed_outputs(self._base, self._members, self._fanout, bases, one_call, models)
        return await place(local.pool, rows, outputs, self._config.output_shared_memory_min_bytes)


class Exit:
    """A cascade's exit rule on a batch's rows (:mod:`combiner.stages.cascade`): which of the
    rows in tier ``k`` its members and the earlier tiers' answer on their own."""

    def __init__(self, config: CombinerConfig) -> None:
        assert config.cascade is not None
        self._cascade = config.cascade
        self._rule = load_rule(config.rule, config.rule_path)
        self._softmax = config.softmax
        self._weights = {m.name: m.weight for m in config.members}
        self._members = [m.name for m in config.members]
        self._quorum = config.quorum_count()

    def passes(self, p: Prediction, k: int, rows: np.ndarray) -> np.ndarray:
        """(len(rows),) bool. A row passes only if the members of tiers 0..k that answered
        meet the quorum among them (a member that failed leaves its rows to the later tiers)."""
        first = {m for tier in self._cascade.tiers[: k + 1] for m in tier}
        names = [m for m in self._members if m in first]  # the ensemble's order, as calibration
        answered = [m for m in names if m in p.answers]
        if not answered or len(answered) < min(self._quorum, len(names)):
            return np.zeros(len(rows), dtype=bool)
        output = self._cascade.output
        stacked = np.stack([p.answers[m][output][rows] for m in answered])
        weights = [self._weights[m] for m in answered]
        return exits(
            stacked, self._rule, weights, self._softmax, self._cascade.exit, self._cascade.threshold
        )
