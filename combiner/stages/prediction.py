"""A batch's prediction as it happens: :class:`Prediction`, what the combination stage reads,
and :class:`Group`, the calls to one model for it.

A member's answer is recorded the moment its calls end, so a request that stops waiting at its
own deadline takes the members that made it by then. The batch is *settled* (its batching slot
frees) as soon as a quorum's worth of members have answered or failed, or when no request waits
for it any more (each stopped at its own deadline, or its client went away): a member that lags
holds back no other.
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

__all__ = ["Group", "Prediction"]


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
        self.groups: list[Group] = []
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


@dataclass(eq=False)
class Group:
    """The calls to one model (a member, or the fan-out model) for a batch."""

    route: MemberRoute
    covers: tuple[MemberRoute, ...]  # the members these calls answer for
    node: Node  # where the calls went
    placed: Placed | None  # the batch's region, when the node shares this host
    tasks: list[asyncio.Task[Any]]
    began: float
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
