"""The client's own shared-memory regions and their bookkeeping: one region per call in flight,
reused by later calls; one whose call ended without an answer is never reused (the server may
still write into it)."""

from __future__ import annotations

import itertools
import os
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

import tritonclient.utils.shared_memory as shm

from combiner.sdk.errors import EnsembleError
from combiner.sdk.protocol import CLIENT_PREFIX

__all__ = ["Region", "Regions", "aligned"]

_NAMES = itertools.count()
_SMALLEST = 1 << 16


def aligned(size: int) -> int:
    """``size`` rounded up to the 64 bytes each tensor of a region starts on."""
    return (size + 63) // 64 * 64


@dataclass
class Region:
    name: str
    size: int
    handle: Any
    # the outputs asked into it by its current call: name -> offset, shape, Triton datatype
    outputs: dict[str, tuple[int, tuple[int, ...], str]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return "/" + self.name

    @classmethod
    def create(cls, size: int) -> Region:
        """A new segment of this client's own of at least ``size`` bytes: a random name, and
        never one that exists (a pid is no identity across PID namespaces sharing /dev/shm)."""
        size = max(_SMALLEST, 1 << (size - 1).bit_length())
        for _ in range(8):
            name = f"{CLIENT_PREFIX}{os.getpid()}_{secrets.token_hex(8)}_{next(_NAMES)}"
            try:
                handle = shm.create_shared_memory_region(name, "/" + name, size, create_only=True)
            except shm.SharedMemoryException:
                continue  # the name exists: another one
            return cls(name, size, handle)
        raise EnsembleError("could not create a shared-memory region of the client's own")

    def destroy(self) -> None:
        """Unmap and unlink it (once: a cancelled close() comes to it again)."""
        handle, self.handle = self.handle, None
        if handle is not None:
            shm.destroy_shared_memory_region(handle)


class Regions:
    """Every region of a client's (``every``), and those free for the next call (thread-safe:
    the blocking client's ``predict_all`` calls from several threads)."""

    def __init__(self) -> None:
        self.free: list[Region] = []
        self.every: list[Region] = []
        self.pending: set[str] = set()  # names whose unregistering did not end (cancelled)
        self.closed = False
        self._lock = threading.Lock()

    def take(self, size: int) -> Region | None:
        """The smallest free region of at least ``size`` bytes, taken; or None."""
        with self._lock:
            if self.closed:
                return None
            fitting = [r for r in self.free if r.size >= size]
            if not fitting:
                return None
            region = min(fitting, key=lambda r: r.size)
            self.free.remove(region)
            return region

    def add(self, region: Region) -> None:
        """A new region, registered, in use by its first call."""
        with self._lock:
            self.every.append(region)

    def give_back(self, region: Region) -> bool:
        """Its call ended with an answer: free for the next one; False once the client is
        closed (its call unlinks it)."""
        region.outputs = {}
        with self._lock:
            if self.closed or region not in self.every:
                return False
            self.free.append(region)
            return True

    def close(self) -> list[Region]:
        """No region is reused from now on: the free ones, taken (the client's close() unlinks
        them); those in use are left to their calls, which unlink them as they end (unmapped
        under a call, a region had crashed the process)."""
        with self._lock:
            self.closed = True
            return list(self.free)  # (kept until unlinked: a cancelled close() is done again)

    def discard(self, region: Region) -> None:
        """Its call ended without an answer: the server may still write into it."""
        with self._lock:
            if region in self.every:  # (close() may have come first)
                self.every.remove(region)
            if region in self.free:
                self.free.remove(region)
