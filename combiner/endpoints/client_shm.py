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
* only a file with one name (a hard link to a pool region or to anything else is refused);
* registrations belong to their owner (:class:`Caller`): a *session*, named by a secret the
  client sends as the ``chorus-shm-session`` header (gRPC metadata or HTTP header) with every
  call, or, over HTTP without one, the TCP connection itself. gRPC gives a servicer no
  connection object (only the peer's address, which a later connection may reuse), so over gRPC
  the header is required. Another caller can neither use, list nor unregister them, and
  unregistering "all" means all of the caller's. A session's registrations are dropped once no
  connection it was used from is open any more, a connection's when it closes (checked when a
  client registers or asks their status, at most every few seconds, and at the cap). They are
  capped per owner (count and bytes) and per process (count: each holds a file descriptor);
* a region in use by a request (its output is written at the end) stays open until that request
  ends, even if it is unregistered meanwhile: its file descriptor is closed by its last user, so
  its number can never be reused by another file while a request still writes through it;
* errors name the region, never whether some other file exists.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import re
import stat
import time
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil

from combiner.errors import RequestError
from combiner.sdk.protocol import CLIENT_PREFIX, SESSION_HEADER, UNKNOWN_REGION
from combiner.triton.shm import POOL_NAME

__all__ = ["CLIENT_PREFIX", "NOBODY", "SESSION_HEADER", "Caller", "ClientRegion", "ClientRegions"]

log = logging.getLogger("chorus.combiner.shm")
_KEY = re.compile(r"/?(chorus_client_[A-Za-z0-9_.-]{1,200})")  # (fullmatch: no line break)
_REGION_NAME = re.compile(r"[\x21-\x7e]{1,256}")
_SESSION = re.compile(r"[A-Za-z0-9_-]{32,128}")
_SWEEP_EVERY_S = 2.0


@dataclass(frozen=True)
class Caller:
    """Who makes a call, as far as client shared memory goes: the ``chorus-shm-session``
    header's value if it sent one, its peer address (``ipv4:host:port``, as gRPC names it) and,
    over HTTP, its connection (an object that lives as long as the TCP connection)."""

    session: str | None = None
    peer: str = ""
    connection: asyncio.BaseTransport | None = None

    def owner(self) -> Hashable | None:
        """The key its registrations are kept under; None for a gRPC caller without a session
        (it has none)."""
        if self.session is not None:
            if not _SESSION.fullmatch(self.session):
                raise _invalid(
                    f"header {SESSION_HEADER!r} must be 32-128 letters, digits, '_' or '-' "
                    "(a secret of the client's own, e.g. uuid4().hex)"
                )
            return ("session", self.session)
        if self.connection is not None:
            return ("connection", self.connection)
        return None

    def required_owner(self) -> Hashable:
        owner = self.owner()
        if owner is None:
            raise _invalid(
                f"client shared memory over gRPC needs the header {SESSION_HEADER!r} (32-128 "
                "letters, digits, '_' or '-': a secret of the client's own, e.g. uuid4().hex) "
                "on every call that registers or uses a region; the SDK sends one"
            )
        return owner


NOBODY = Caller()  # a caller with no regions: internal requests, or client shm off


@dataclass(eq=False)
class _Holding:
    """What one owner registered, and the connections it was seen on."""

    regions: dict[str, ClientRegion] = field(default_factory=dict)
    peers: set[str] = field(default_factory=set)
    connection: asyncio.BaseTransport | None = None


@dataclass(eq=False)
class ClientRegion:
    """A region a client registered: an open file descriptor, never a mapping."""

    name: str
    key: str
    offset: int
    byte_size: int
    fd: int
    file: tuple[int, int] = (0, 0)  # (device, inode): one client's file is never another's
    users: int = 0  # requests holding it (see :meth:`held`)
    registered: bool = True

    @contextmanager
    def held(self) -> Iterator[ClientRegion]:
        """Keep the file open while a request uses it, unregistered meanwhile or not."""
        self.users += 1
        try:
            yield self
        finally:
            self.users -= 1
            if not self.registered and self.users == 0:
                os.close(self.fd)

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
        """Unregistered: the file is closed now, or by the last request that holds it."""
        if self.registered:
            self.registered = False
            if self.users == 0:
                os.close(self.fd)


class ClientRegions:
    """The regions each owner (session or connection) registered with this combiner process."""

    def __init__(
        self,
        enabled: bool,
        max_per_connection: int = 64,
        max_bytes_per_connection: int = 1 << 32,
        max_total: int = 1024,
        shm_dir: Path = Path("/dev/shm"),
    ) -> None:
        self.enabled = enabled
        self._max_per_owner = max_per_connection
        self._max_bytes = max_bytes_per_connection
        self._max_total = max_total
        self._dir = shm_dir
        self._owners: dict[Hashable, _Holding] = {}
        self._swept = time.monotonic()

    def __len__(self) -> int:
        return sum(len(h.regions) for h in self._owners.values())

    def register(self, caller: Caller, name: str, key: str, offset: int, byte_size: int) -> None:
        self._check_enabled()
        owner = caller.required_owner()
        self.sweep()
        if not _REGION_NAME.fullmatch(name):
            raise _invalid("a shared-memory region needs a name of 1-256 printable characters")
        mine = self._owners[owner].regions if owner in self._owners else {}
        if name in mine:
            raise RequestError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"shared-memory region {name!r} is already registered; unregister it first",
            )
        match = _KEY.fullmatch(key)
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
        if len(mine) >= self._max_per_owner:
            raise _exhausted(
                f"this client has {len(mine)} shared-memory regions registered, the most "
                "allowed; unregister some first"
            )
        used = sum(r.byte_size for r in mine.values())
        if used + byte_size > self._max_bytes:
            raise _exhausted(
                f"region {name!r}: {byte_size} bytes more would put this client's "
                f"registered shared memory over {self._max_bytes} bytes"
            )
        if len(self) >= self._max_total:
            self.sweep(force=True)
            if len(self) >= self._max_total:
                raise _exhausted(
                    f"this endpoint holds {len(self)} shared-memory regions, the most it "
                    "allows; try again later"
                )
        fd = self._open(name, match.group(1))
        try:
            info = os.fstat(fd)
            if offset + byte_size > info.st_size:
                raise _invalid(
                    f"shared-memory region {name!r}: offset {offset} + byte_size {byte_size} "
                    f"exceed its {info.st_size} bytes"
                )
            file = (info.st_dev, info.st_ino)
            if any(
                r.file == file
                for other, holding in self._owners.items()
                if other != owner
                for r in holding.regions.values()
            ):  # two clients on one file would read and write each other's tensors
                raise _invalid(
                    f"shared-memory region {name!r}: its file is registered by another client; "
                    "use a region of your own"
                )
        except BaseException:
            os.close(fd)
            raise
        connection = caller.connection if caller.session is None else None
        holding = self._owners.setdefault(owner, _Holding(connection=connection))
        holding.peers.add(caller.peer)
        holding.regions[name] = ClientRegion(name, key, offset, byte_size, fd, file)

    def _open(self, name: str, file_name: str) -> int:
        refused = _invalid(
            f"shared-memory region {name!r}: its key names no region this endpoint may open "
            "(a regular file of the combiner's user with no other name, not a link, on this "
            "host)"
        )
        try:  # O_NONBLOCK: a file under another process's lease is refused, not waited for
            # (the open would wait in the event loop until the lease breaks: 45 s by default)
            flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(self._dir / file_name, flags)
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                raise _exhausted(
                    "the combiner has no file descriptor left; try again later"
                ) from None
            if e.errno == errno.EWOULDBLOCK:
                raise _invalid(
                    f"shared-memory region {name!r}: its file is under a lease another process "
                    "holds (fcntl F_SETLEASE); release it and register again"
                ) from None
            raise refused from None
        info = os.fstat(fd)
        # one name only: a hard link could give a client's key to a pool region's file
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_nlink != 1:
            os.close(fd)
            raise refused
        return fd

    def unregister(self, caller: Caller, name: str | None = None) -> None:
        """Forget one of the caller's regions (``name``) or all of them; an unknown name is
        fine, as on Triton."""
        self._drop(caller.owner(), name)

    def _drop(self, owner: Hashable | None, name: str | None = None) -> None:
        holding = self._owners.get(owner) if owner is not None else None
        if holding is None:
            return
        for region_name in [name] if name else list(holding.regions):
            region = holding.regions.pop(region_name, None)
            if region is not None:
                region.close()
        if not holding.regions:
            del self._owners[owner]

    def get(self, caller: Caller, name: str) -> ClientRegion:
        """The caller's region ``name``: use it at once, or hold it (:meth:`ClientRegion.held`)
        across any wait."""
        self._check_enabled()
        holding = self._owners.get(caller.required_owner())
        region = holding.regions.get(name) if holding is not None else None
        if holding is None or region is None:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{UNKNOWN_REGION} {name!r}; register it first (this client's "
                "registrations are gone if its session or connection closed, or another "
                "combiner process answers it now)",
            )
        holding.peers.add(caller.peer)
        return region

    def status(self, caller: Caller, name: str | None = None) -> list[ClientRegion]:
        self._check_enabled()
        self.sweep()
        if name:
            return [self.get(caller, name)]
        owner = caller.owner()
        holding = self._owners.get(owner) if owner is not None else None
        return list(holding.regions.values()) if holding is not None else []

    def close(self) -> None:
        for owner in list(self._owners):
            self._drop(owner)

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise _invalid(
                "client shared memory is off on this endpoint (start it with --allow-client-shm)"
            )

    def sweep(self, force: bool = False) -> None:
        """Drop the registrations of owners whose connections have all closed (at most every
        few seconds, unless ``force``)."""
        now = time.monotonic()
        if not self._owners or (not force and now - self._swept < _SWEEP_EVERY_S):
            return
        self._swept = now
        open_peers: set[tuple[str, int]] | None = None
        for owner, holding in list(self._owners.items()):
            if holding.connection is not None:
                gone = holding.connection.is_closing()
            else:
                if open_peers is None:
                    open_peers = _open_peers()
                gone = not any(peer_address(p) in open_peers for p in holding.peers)
            if gone:
                log.info("dropping the shared-memory registrations of a closed client")
                self._drop(owner)


def _open_peers() -> set[tuple[str, int]]:
    """The remote ends of this process's established TCP connections."""
    return {
        (_host(str(c.raddr.ip)), int(c.raddr.port))
        for c in psutil.Process().net_connections(kind="tcp")
        if c.status == psutil.CONN_ESTABLISHED and c.raddr
    }


def peer_address(peer: str) -> tuple[str, int] | None:
    """(host, port) of a gRPC-style peer, ``ipv4:127.0.0.1:5000`` or ``ipv6:[::1]:5000``."""
    _, _, rest = peer.partition(":")
    host, _, port = rest.rpartition(":")
    if not port.isdigit():
        return None
    return _host(host.strip("[]")), int(port)


def _host(address: str) -> str:
    """One spelling of an address: an IPv4 one mapped into IPv6 (``::ffff:127.0.0.1``, as the
    socket table shows a dual-stack socket's peer where gRPC says ``ipv4:127.0.0.1``) as IPv4."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _exhausted(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
