"""Whether Triton is there: the combiner's view of its upstream, kept current.

A probe asks Triton whether it and every model the combiner calls are ready, every
``interval_s`` while they are and every ``retry_s`` while they are not; a member call that finds
Triton unreachable (UNAVAILABLE) or missing the combiner's shared memory marks it down at once.
While down, the endpoint reports not ready and answers UNAVAILABLE at once instead of queueing
requests for a server that is not there. When Triton is back (``chorus up`` restarts it; so do
compose and Kubernetes), the pool's shared-memory regions are registered with it again before
the first request goes through: Triton forgets them when it restarts. A Triton on this host
is ready only if its port is held by the combiner's own user (:mod:`combiner.triton.listener`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from combiner.triton.listener import foreign_listener
from combiner.triton.shm import ShmPool
from combiner.triton.upstream import MemberError, Upstream

__all__ = ["TritonWatch"]

log = logging.getLogger("chorus.combiner")


class TritonWatch:
    def __init__(
        self,
        upstream: Upstream,
        models: list[str],
        pool: ShmPool | None = None,
        interval_s: float = 1.0,
        retry_s: float = 0.1,
    ) -> None:
        self._upstream = upstream
        self._models = models
        self._pool = pool
        self._interval_s = interval_s
        self._retry_s = retry_s
        self.ready = False
        self.reason = "Triton has not been asked yet"
        self._wake = asyncio.Event()

    async def check(self) -> bool:
        """Probe once; whether Triton is ready now (regions registered again if needed)."""
        reason = None
        if not self.ready:  # whom it is about to trust again (a probe would tell it nothing)
            reason = await asyncio.to_thread(foreign_listener, self._upstream.url)
        if reason is None:
            reason = await self._upstream.readiness(self._models)
        if reason is None and self._pool is not None:
            try:
                await self._pool.register_missing()
            except MemberError as e:
                reason = f"cannot register shared memory with Triton ({e.code.name}: {e.details})"
        if reason is None and not self.ready:
            log.info("Triton and the members are ready")
        elif reason is not None and reason != self.reason:
            log.warning("Triton is not ready: %s", reason)
        self.ready, self.reason = reason is None, reason or ""
        return self.ready

    def report(self, error: MemberError) -> None:
        """A member call failed: if Triton looks gone, or has lost our shared memory, stop
        sending it requests until the probe finds it back."""
        lost_shm = "shared memory" in error.details.lower()
        if error.code == grpc.StatusCode.UNAVAILABLE or lost_shm:
            if self.ready:
                log.warning("Triton is not ready: %s", error)
            self.ready = False
            self.reason = f"{error.code.name}: {error.details}"
            self._wake.set()

    async def run(self) -> None:
        """Probe forever (cancelled when the combiner stops)."""
        while True:
            self._wake.clear()
            try:
                await self.check()
            except Exception:  # never let the watch die: it is how the service comes back
                log.exception("probing Triton failed")
                self.ready, self.reason = False, "probing Triton failed"
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval_s if self.ready else self._retry_s):
                    await self._wake.wait()
