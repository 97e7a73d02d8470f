"""A co-located client's own shared memory (KServe's system shared-memory extension), opt-in.

A client on the combiner's host may keep a request's inputs and outputs in a POSIX shared-memory
region it made, registered with the endpoint. Because the combiner opens a file on the client's
word, it opens only what a client may rightly hand it:

* only when the endpoint was started with client shared memory allowed (``--allow-client-shm``);
* only keys ``/chorus_client_*`` (the SDK's names): never the combiner's own pool regions, nor
  Triton's, nor any other file in ``/dev/shm``; opened with ``O_NOFOLLOW`` (no symlink), and
  only a regular file owned by the combiner's user;
* the region is never mapped: inputs are copied out with ``pread`` and outputs in with
  ``pwrite`` after checking the file's size, so a region truncated after registration gives
  INVALID_ARGUMENT, never a SIGBUS;
* registrations belong to the connection that made them (gRPC's peer address; HTTP's remote
  address): another connection can neither use, list nor unregister them, and unregistering
  "all" means all of the caller's. They are capped per connection (count and bytes) and per
  process (count: each holds a file descriptor); at the cap, the registrations of connections
  that have closed are dropped first;
* errors name the region, never whether some other file exists.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil

from .errors import RequestError
from .shm import POOL_NAME

__all__ = ["CLIENT_PREFIX", "ClientRegion", "ClientRegions"]

log = logging.getLogger("chorus.combiner.shm")
CLIENT_PREFIX = "chorus_client_"
_KEY = re.compile(r"^/?(chorus_client_[A-Za-z0-9_.-]{1,200})$")
_REGION_NAME = re.compile(r"^[\x21-\x7e]{1,256}$")


@dataclass(eq=False)
class ClientRegion:
    """A region a client registered: an open file descriptor, never a mapping."""

    name: str
    key: str
    offset: int
    byte_size: int
    fd: int

    def _span(self, offset: int, size: int, what: str) -> int:
        """The file position of ``size`` bytes at ``offset``, checked against the region as
        registered and against the file as it is now."""
        if offset < 0 or size < 0 or offset + size > self.byte_size:
            raise _invalid(
                f"{what}: {size} bytes at offset {offset} do not fit shared-memory region "
                f"{self.name!r} of {self.byte_size} bytes"
            )
        position = self.offset + offset
        now = os.fstat(self.fd).st_size
        if position + size > now:
            raise _invalid(
                f"{what}: shared-memory region {self.name!r} shrank to {now} bytes after it was "
                "registered; register it again"
            )
        return position

    def read(self, offset: int, size: int, what: str) -> bytes:
        position = self._span(offset, size, what)
        data = os.pread(self.fd, size, position)
        if len(data) != size:  # truncated between the check and the read
            raise _invalid(f"{what}: shared-memory region {self.name!r} shrank while being read")
        return data

    def write(self, offset: int, data: bytes | memoryview, what: str) -> None:
        position = self._span(offset, len(data), what)
        view = memoryview(data).cast("B")
        while view:
            written = os.pwrite(self.fd, view, position)
            view, position = view[written:], position + written

    def check(self, offset: int, size: int, what: str) -> None:
        """Raise INVALID_ARGUMENT unless ``size`` bytes at ``offset`` fit the region now."""
        self._span(offset, size, what)

    def close(self) -> None:
        os.close(self.fd)


class ClientRegions:
    """The regions each connection registered with this combiner process."""

    def __init__(
        self,
        enabled: bool,
        max_per_connection: int = 64,
        max_bytes_per_connection: int = 1 << 32,
        max_total: int = 1024,
        shm_dir: Path = Path("/dev/shm"),
    ) -> None:
        self.enabled = enabled
        self._max_per_connection = max_per_connection
        self._max_bytes = max_bytes_per_connection
        self._max_total = max_total
        self._dir = shm_dir
        self._by_peer: dict[str, dict[str, ClientRegion]] = {}

    def __len__(self) -> int:
        return sum(map(len, self._by_peer.values()))

    def register(self, peer: str, name: str, key: str, offset: int, byte_size: int) -> None:
        self._check_enabled()
        if not _REGION_NAME.match(name):
            raise _invalid("a shared-memory region needs a name of 1-256 printable characters")
        mine = self._by_peer.get(peer, {})
        if name in mine:
            raise RequestError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"shared-memory region {name!r} is already registered; unregister it first",
            )
        match = _KEY.match(key)
        if match is None or POOL_NAME.match(match.group(1)):
            raise _invalid(
                f"shared-memory region {name!r}: this endpoint opens only keys "
                f"'/{CLIENT_PREFIX}<name>' (letters, digits, '_', '.', '-')"
            )
        if offset < 0 or byte_size <= 0:
            raise _invalid(
                f"shared-memory region {name!r}: offset must be >= 0 and byte_size > 0, "
                f"got {offset} and {byte_size}"
            )
        if len(mine) >= self._max_per_connection:
            raise _exhausted(
                f"this connection has {len(mine)} shared-memory regions registered, the most "
                "allowed; unregister some first"
            )
        used = sum(r.byte_size for r in mine.values())
        if used + byte_size > self._max_bytes:
            raise _exhausted(
                f"region {name!r}: {byte_size} bytes more would put this connection's "
                f"registered shared memory over {self._max_bytes} bytes"
            )
        if len(self) >= self._max_total:
            self._forget_closed_connections()
            if len(self) >= self._max_total:
                raise _exhausted(
                    f"this endpoint holds {len(self)} shared-memory regions, the most it "
                    "allows; try again later"
                )
        fd = self._open(name, match.group(1))
        try:
            size = os.fstat(fd).st_size
            if offset + byte_size > size:
                raise _invalid(
                    f"shared-memory region {name!r}: offset {offset} + byte_size {byte_size} "
                    f"exceed its {size} bytes"
                )
        except BaseException:
            os.close(fd)
            raise
        self._by_peer.setdefault(peer, {})[name] = ClientRegion(name, key, offset, byte_size, fd)

    def _open(self, name: str, file_name: str) -> int:
        refused = _invalid(
            f"shared-memory region {name!r}: its key names no region this endpoint may open "
            "(a regular file of the combiner's user, not a link, on this host)"
        )
        try:
            fd = os.open(self._dir / file_name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                raise _exhausted(
                    "the combiner has no file descriptor left; try again later"
                ) from None
            raise refused from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            os.close(fd)
            raise refused
        return fd

    def unregister(self, peer: str, name: str | None = None) -> None:
        """Forget one of the caller's regions (``name``) or all of them; an unknown name is
        fine, as on Triton."""
        mine = self._by_peer.get(peer, {})
        for region_name in [name] if name else list(mine):
            region = mine.pop(region_name, None)
            if region is not None:
                region.close()
        if not mine:
            self._by_peer.pop(peer, None)

    def get(self, peer: str, name: str) -> ClientRegion:
        self._check_enabled()
        region = self._by_peer.get(peer, {}).get(name)
        if region is None:
            raise _invalid(
                f"unknown shared-memory region {name!r}; register it first, on this connection"
            )
        return region

    def status(self, peer: str, name: str | None = None) -> list[ClientRegion]:
        self._check_enabled()
        if name:
            return [self.get(peer, name)]
        return list(self._by_peer.get(peer, {}).values())

    def close(self) -> None:
        for peer in list(self._by_peer):
            self.unregister(peer)

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise _invalid(
                "client shared memory is off on this endpoint (start it with --allow-client-shm)"
            )

    def _forget_closed_connections(self) -> None:
        """Drop the registrations of connections that no longer exist."""
        established = [
            c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_ESTABLISHED
        ]
        open_ends = {_address(c.laddr) for c in established} | {
            _address(c.raddr) for c in established
        }
        for peer in [p for p in self._by_peer if peer_address(p) not in open_ends]:
            log.info("dropping the shared-memory registrations of closed connection %s", peer)
            self.unregister(peer)


def peer_address(peer: str) -> tuple[str, int] | None:
    """(host, port) of a gRPC-style peer, ``ipv4:127.0.0.1:5000`` or ``ipv6:[::1]:5000``."""
    _, _, rest = peer.partition(":")
    host, _, port = rest.rpartition(":")
    if not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _address(addr: object) -> tuple[str, int] | None:
    if not addr:
        return None
    return str(addr.ip), int(addr.port)  # type: ignore[attr-defined]


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _exhausted(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
