"""A batch's prediction as it happens: :class:`Prediction`, what the combination stage reads,
and :class:`Group`, the calls to one model for it.

A member's answer is recorded the moment its calls end, so a request that stops waiting at its
own deadline takes the members that made it by then. The batch is *settled* (its batching slot
frees) as soon as a quorum's worth of members have answered or failed, or when no request waits
for it any more (each stopped at its own deadline, or its client went away): a member that lags
holds back no other.

With a cascade (:class:`Tiers`), the members are called tier by tier, and each row of the batch
is *decided* at the tier whose members answer it (``tier_of``); a later tier's members answer
only the rows that reached it (their outputs are kept at those rows' places in the batch). The
batch settles when its first tier is decided: the first tier's members are free for the next
batch while the later tiers answer the rows left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from combiner.config import MemberRoute
from combiner.stages.batch_shm import Placed
from combiner.triton.nodes import Node

__all__ = ["Group", "Part", "Prediction", "Tiers", "is_late"]


@dataclass(frozen=True)
class Tiers:
    """A batch's cascade: member names per tier, in order."""

    names: tuple[tuple[str, ...], ...]


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
        tiers: Tiers | None = None,
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
        self.finite: dict[tuple[str, ...], bool] = {}  # ... and whether that is finite
        self.groups: list[Group] = []
        self.latest = latest  # the last of its requests' deadlines; None: one has none
        self._quorum = quorum
        self._waiting = 0
        self._on_abandoned = on_abandoned
        # the cascade, when this batch's rows may leave it early (None: every member, every row)
        self.tiers = tiers
        self.unneeded: set[str] = set()  # members of tiers no row reached
        # per row: the tier that answered it (-1: not yet), and how many tiers it reached
        self.tier_of = np.full(batch, -1, dtype=np.int16)
        self.depth = np.full(batch, 1 if tiers else 0, dtype=np.int16)
        self.decided = [loop.create_future() for _ in tiers.names] if tiers else []

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
        return [
            m
            for m in self.members
            if m not in self.answers and m not in self.missing and m not in self.unneeded
        ]

    def miss(self, member: str, reason: str) -> None:
        if member not in self.answers and member not in self.missing:
            self.missing[member] = reason
            self.progress()

    def progress(self) -> None:
        """A member answered or failed: once a quorum's worth have, the slot frees (the
        others' calls go on, in their own queues, for the requests that wait for them). A
        cascade's batch settles when its first tier is decided instead."""
        if self.tiers is None and len(self.pending()) <= len(self.members) - self._quorum:
            self._settle()

    # -- a cascade's rows, tier by tier

    def reach(self, tier: int, rows: np.ndarray) -> None:
        """``rows`` (positions in the batch) go to ``tier``."""
        self.depth[rows] = tier + 1

    def decide(self, tier: int, rows: np.ndarray) -> None:
        """``tier`` answers ``rows``; the others it reached go on. Tier 0 decided: the batch's
        slot frees."""
        assert self.tiers is not None
        self.tier_of[rows] = tier
        if not self.decided[tier].done():
            self.decided[tier].set_result(None)
        if tier == 0:
            self._settle()

    def close_tiers(self, after: int) -> None:
        """No row goes past tier ``after``: the later tiers' members are not needed."""
        assert self.tiers is not None
        for k in range(after + 1, len(self.tiers.names)):
            self.unneeded.update(self.tiers.names[k])
            if not self.decided[k].done():
                self.decided[k].set_result(None)

    def parts(self, start: int, stop: int, late: str | None) -> list[Part]:
        """Rows [start, stop) of the batch by the members that answer them, for a request that
        stops waiting now (``late``: why a member still pending is missing, e.g. its deadline).

        Without a cascade, one part: the members that made it, the quorum counted over all.
        With one, a row combines the members that answered it in the tiers it reached, and
        the quorum counts over the tiers before its first late one (a member missing for lack
        of time: the request's deadline, the member timeout, a queue that would not answer by
        the deadline): a later tier that is late leaves the row to the earlier tiers' answer,
        while a member's error counts as it does without a cascade. A row caught before its
        exit decision has not exited: the next tier's members are missing from its answer,
        not left out of it."""
        reasons = dict(self.missing)
        for name in self.pending():
            reasons[name] = late or "no answer yet"
        if self.tiers is None:
            groups = [(self.members, np.arange(start, stop), len(self.members))]
        else:
            depth = self.depth[start:stop]
            groups = []
            for d in np.unique(depth).tolist():
                rows = start + np.flatnonzero(depth == d)
                reached = self._in_tiers(d)
                if (
                    (self.tier_of[rows] < 0).any()
                    and d < len(self.tiers.names)
                    and not any(m in self.pending() for m in reached)
                ):  # its tier answered, its exit not decided yet: it needs the next tier
                    reached = self._in_tiers(d + 1)
                groups.append((reached, rows, self._in_time(reached, reasons)))
        parts = []
        for names, rows, counted in groups:
            lost = {m: reasons[m] for m in names if m not in self.answers and m in reasons}
            contributors = tuple(m for m in names if m in self.answers)
            parts.append(Part(names, contributors, rows, lost, min(self._quorum, counted)))
        return parts

    def _in_tiers(self, tiers: int) -> tuple[str, ...]:
        """The members of the first ``tiers`` tiers of the cascade, in the ensemble's order."""
        assert self.tiers is not None
        first = {m for tier in self.tiers.names[:tiers] for m in tier}
        return tuple(m for m in self.members if m in first)

    def _in_time(self, names: tuple[str, ...], reasons: dict[str, str]) -> int:
        """How many of ``names`` (a cascade's first tiers) the quorum counts: the members of
        the tiers before the first later one with a member late (the first tier always)."""
        assert self.tiers is not None
        counted = 0
        for k, tier in enumerate(self.tiers.names):
            in_reach = [m for m in tier if m in names]
            if not in_reach or (k > 0 and any(is_late(reasons.get(m, "")) for m in in_reach)):
                break
            counted += len(in_reach)
        return counted

    async def rows_decided(self, start: int, stop: int) -> None:
        """Wait until rows [start, stop) are each answered by a tier (or the batch finished:
        its members failed, or the combiner is stopping); never cancels what it waits for."""
        while not self.finished.done() and (self.tier_of[start:stop] < 0).any():
            tier = int(self.depth[start:stop].max()) - 1  # the deepest tier they are in
            waits = {self.finished, self.decided[max(tier, 0)]}
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)

    def finish(self) -> None:
        self.finished.set_result(None)
        self._settle()

    def _settle(self) -> None:
        if not self.settled.done():
            self.settled.set_result(None)


def is_late(reason: str) -> bool:
    """Whether a member is missing for lack of time (not for an error)."""
    return reason.startswith(("no answer", "not called"))


@dataclass(frozen=True, eq=False)
class Part:
    """Some rows of a request and the members that answer them: ``names`` those they needed
    (``lost``: those of them missing, with why), ``needed`` how many must have answered."""

    names: tuple[str, ...]
    contributors: tuple[str, ...]
    rows: np.ndarray  # positions in the batch
    lost: dict[str, str]
    needed: int


@dataclass(eq=False)
class Group:
    """The calls to one model (a member, or the fan-out model) for a batch."""

    route: MemberRoute
    covers: tuple[MemberRoute, ...]  # the members these calls answer for
    node: Node  # where the calls went
    placed: Placed | None  # the batch's region, when the node shares this host
    tasks: list[asyncio.Task[Any]]
    began: float
    rows: int  # rows the calls answer
    index: np.ndarray | None = None  # their positions in the batch (None: the whole batch)
    settled: bool = False  # recorded, or given up (member timeout, or nobody waits)
    since: float = 0.0  # when it took its place in the model's lane (loop time)
    # done when its last call has ended (its place in the model's lane is free then)
    ended: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def give_up(self) -> bool:
        """Stop waiting for the calls if still running: their answers will be dropped (the
        place in the model's lane frees when they end). Whether they were still running."""
        if self.settled:
            return False
        self.settled = True
        return True
