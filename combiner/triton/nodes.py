"""Where the members run: one Triton per node, and which node each member's calls go to.

A plan over several nodes is served by one Triton per node, each holding the members' instances
placed there. The combiner keeps a channel (:class:`~combiner.triton.upstream.Upstream`) and a watch
(:class:`~combiner.triton.watch.TritonWatch`) per node, and sends each member's calls for a batch to
one of the nodes holding it, in proportion to its instances there: a smooth weighted round
robin, so that over any run of batches each node's share stays within one call of its weight.
A node that is down is skipped while another holding the member is up. Shared memory is used
with the node that shares this host only (at most one); calls to the others carry their bytes.

The service is ready when every member has a ready node.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from combiner.config import CombinerConfig
from combiner.tasks import Owner
from combiner.triton.shm import ShmPool, reclaim_stale
from combiner.triton.upstream import MemberError, Upstream
from combiner.triton.watch import TritonWatch

__all__ = ["Node", "Nodes", "Rotation"]

log = logging.getLogger("chorus.combiner")


@dataclass(eq=False)
class Node:
    name: str
    upstream: Upstream
    watch: TritonWatch
    pool: ShmPool | None  # this host's node: inputs (and outputs) through shared memory


class Rotation:
    """Smooth weighted round robin over nodes (nginx's): each pick adds every candidate's
    weight to its credit and takes the one with the most, which pays the candidates' total."""

    def __init__(self, weights: dict[str, int]) -> None:
        self._weights = dict(weights)
        self._credit = dict.fromkeys(weights, 0)

    def pick(self, up: set[str]) -> str:
        """The next node, among those ``up`` (all of them if none is)."""
        candidates = [n for n in self._weights if n in up] or list(self._weights)
        for n in candidates:
            self._credit[n] += self._weights[n]
        best = max(candidates, key=lambda n: self._credit[n])
        self._credit[best] -= sum(self._weights[n] for n in candidates)
        return best


class Nodes:
    """The Tritons of the deployment, their watches, and the routing of each model's calls."""

    def __init__(self, config: CombinerConfig, key: str | None) -> None:
        routes = config.node_routes()
        every = {r.name: 1 for r in routes}
        placed = {m.name: dict(m.nodes) or every for m in config.members}
        if config.fanout_model:  # rendered for a single node only
            placed[config.fanout_model] = every
        self.nodes: dict[str, Node] = {}
        for r in routes:
            upstream = Upstream(r.url, key)
            pool = ShmPool(upstream) if r.shared_memory else None
            models = [m for m, where in placed.items() if r.name in where]
            self.nodes[r.name] = Node(r.name, upstream, TritonWatch(upstream, models, pool), pool)
        self._placed = placed
        self._rotations = {m: Rotation(where) for m, where in placed.items()}
        self._members = [m.name for m in config.members]
        self._tasks = Owner("node watch")

    @property
    def local(self) -> Node | None:
        """The node sharing this host's memory, if any."""
        return next((n for n in self.nodes.values() if n.pool is not None), None)

    def pick(self, model: str) -> Node:
        """The node for a model's next call."""
        up = {n for n in self._placed[model] if self.nodes[n].watch.ready}
        return self.nodes[self._rotations[model].pick(up)]

    @property
    def ready(self) -> bool:
        return not self.stranded

    @property
    def stranded(self) -> list[str]:
        """The members no ready node runs; none, the usual case, on every request. (Why: each
        watch logs it, in gRPC's words, which name Triton's address: not for clients.)"""
        if all(n.watch.ready for n in self.nodes.values()):
            return []
        return [
            m for m in self._members if not any(self.nodes[n].watch.ready for n in self._placed[m])
        ]

    async def start(self) -> None:
        """Reclaim what stopped combiners left in shared memory; probe every node once, then
        keep watching them."""
        local = self.local
        if local is not None:
            try:
                await reclaim_stale(local.upstream)
            except MemberError as e:  # Triton is not there yet: the watch waits for it
                log.warning("could not reclaim stale shared memory: %s", e)
        await asyncio.gather(*(n.watch.check() for n in self.nodes.values()))
        for n in self.nodes.values():
            self._tasks.spawn(n.watch.run())

    async def drain_calls(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the calls still running on every node."""
        await asyncio.gather(*(n.upstream.calls.drain(timeout) for n in self.nodes.values()))

    async def close(self, calls_s: float) -> None:
        """Stop watching; wait up to ``calls_s`` for the calls still running on every node (a
        channel closed with calls on it cancels them, which can crash Triton 2.51); give the
        shared memory back (a region still written into is kept registered) and close the
        channels."""
        await self._tasks.cancel()
        await self.drain_calls(calls_s)
        for n in self.nodes.values():
            if n.pool is not None:
                await n.pool.close()
            await n.upstream.close(drain_s=0.0)  # drained above, as far as the timeout allows
