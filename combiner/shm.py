"""One copy of the input: system shared-memory regions registered with a Triton on this host.

Each batch's input bytes are written once into a region of a pool, and every member's request
points at them (offset and size) instead of carrying them. Regions are reused across batches
and a larger one is made when a batch does not fit. A region goes back to the pool only when
every call that may read or write it has ended (:meth:`ShmPool.hold` / :meth:`ShmPool.release`
count them): a call left to finish past a deadline may still write its outputs there.

They are named ``chorus_<pid>_<n>`` (the POSIX key is ``/chorus_<pid>_<n>``), so that those of a
process that died without cleaning up (``kill -9``) can be told apart: :func:`reclaim_stale`
unregisters them from Triton and unlinks them at the next start, skipping (with a warning) what
it may not remove. A clean stop unregisters and unlinks every region of the pool. After Triton
restarts, :meth:`ShmPool.register_missing` registers the pool's regions with it again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import service_pb2

from .upstream import MemberError, Upstream

__all__ = ["POOL_NAME", "Region", "ShmPool", "reclaim_stale", "unlink_stale"]

log = logging.getLogger("chorus.combiner.shm")
_PREFIX = "chorus_"
POOL_NAME = re.compile(r"^chorus_(\d+)_\d+$")  # a combiner's own region; never a client's
_MIN_SIZE = 1 << 16


@dataclass(eq=False)
class Region:
    name: str
    size: int
    handle: shm.SharedMemoryRegion
    holds: int = 0  # calls (and the batch being written) that still use it

    def write(self, tensors: list[tuple[bytes | memoryview, ...]]) -> list[int]:
        """Write each tensor (given in pieces, e.g. one per batched request) one after another
        from offset 0, each byte once; returns the offset of each tensor."""
        offsets, offset = [], 0
        arrays = []
        for pieces in tensors:
            offsets.append(offset)
            for piece in pieces:
                arrays.append(np.frombuffer(piece, dtype=np.uint8))
                offset += len(piece)
        shm.set_shared_memory_region(self.handle, arrays)
        return offsets

    def read(self, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """A copy of what a member wrote at ``offset``."""
        view = shm.get_contents_as_numpy(self.handle, dtype, shape, offset)
        return np.array(view)


class ShmPool:
    """Regions of this process, registered with Triton, lent out one batch at a time."""

    def __init__(self, upstream: Upstream) -> None:
        self._upstream = upstream
        self._free: list[Region] = []
        self._all: list[Region] = []
        self._count = 0
        self._lock = asyncio.Lock()

    async def acquire(self, size: int) -> Region:
        """A region of at least ``size`` bytes, held once by the caller."""
        async with self._lock:
            fitting = [r for r in self._free if r.size >= size]
            if fitting:
                region = min(fitting, key=lambda r: r.size)
                self._free.remove(region)
            else:
                region = await self._create(max(_MIN_SIZE, 1 << (size - 1).bit_length()))
            region.holds = 1
            return region

    async def _create(self, size: int) -> Region:
        name = f"{_PREFIX}{os.getpid()}_{self._count}"
        self._count += 1
        handle = shm.create_shared_memory_region(name, "/" + name, size)
        region = Region(name, size, handle)
        try:
            await self._upstream.register_shm(name, "/" + name, size)
        except BaseException:
            shm.destroy_shared_memory_region(handle)
            raise
        self._all.append(region)
        return region

    @staticmethod
    def hold(region: Region) -> None:
        region.holds += 1

    def release(self, region: Region) -> None:
        """One user of the region is done with it; the last one returns it to the pool."""
        region.holds -= 1
        if region.holds == 0 and region in self._all:
            self._free.append(region)

    async def register_missing(self) -> list[str]:
        """Register again the regions Triton does not know (it restarted); returns them."""
        if not self._all:
            return []
        known = set((await self._upstream.shm_status()).regions)
        missing = [r for r in self._all if r.name not in known]
        for region in missing:
            await self._upstream.register_shm(region.name, "/" + region.name, region.size)
        if missing:
            log.info(
                "registered shared memory with Triton again: %s", ", ".join(r.name for r in missing)
            )
        return [r.name for r in missing]

    async def close(self) -> None:
        """Unregister every region from Triton and unlink it. A region that a call still
        running may write to stays registered (Triton would wait for the call, or worse) and is
        only unlinked: Triton keeps its mapping, and the next combiner reclaims the name."""
        for region in self._all:
            if region.holds > 0:
                log.warning(
                    "%s is still in use by %d call(s) on Triton: unlinked, left registered",
                    region.name,
                    region.holds,
                )
            else:
                try:
                    await self._upstream.unregister_shm(region.name)
                except MemberError as e:  # Triton may be gone already: still unlink
                    log.warning("could not unregister %s from Triton: %s", region.name, e)
            shm.destroy_shared_memory_region(region.handle)
        self._all.clear()
        self._free.clear()


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


async def reclaim_stale(upstream: Upstream, shm_dir: Path = Path("/dev/shm")) -> list[str]:
    """Unregister from Triton and unlink the regions of Chorus processes that are gone;
    what cannot be removed (another user's) is skipped with a warning."""
    reclaimed = []
    status: service_pb2.SystemSharedMemoryStatusResponse = await upstream.shm_status()
    for name in status.regions:
        match = POOL_NAME.match(name)
        if match and not _alive(int(match.group(1))):
            await upstream.unregister_shm(name)
            reclaimed.append(name)
    reclaimed += [name for name in unlink_stale(shm_dir) if name not in reclaimed]
    if reclaimed:
        log.info("reclaimed shared memory left by stopped processes: %s", ", ".join(reclaimed))
    return reclaimed


def unlink_stale(shm_dir: Path = Path("/dev/shm")) -> list[str]:
    """Unlink the pool regions of Chorus processes that are gone; skip, with a warning, what
    cannot be removed. Returns the names removed."""
    removed = []
    for path in shm_dir.glob(f"{_PREFIX}*"):
        match = POOL_NAME.match(path.name)
        if match and not _alive(int(match.group(1))):
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                log.warning("cannot remove stale shared memory %s (%s); skipped", path, e)
                continue
            removed.append(path.name)
    return removed
