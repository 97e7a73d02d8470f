"""Bounds on what clients can hold open: connections, idle time, file descriptors.

A worker's file descriptors are finite (1024 under many shells and systemd units), and every
client connection holds one: without a bound, a neighbour opening idle connections exhausts
them and the worker can accept nothing, not even a health check. So:

* at start, the worker raises its soft file limit to the hard one (:func:`raise_file_limit`);
* each protocol keeps at most :func:`connection_limit` connections: the configured
  ``max_connections``, and at most a share of the descriptors left after a reserve for the
  worker's own files (shared memory, Triton's channel, logs);
* gRPC enforces its share itself (``grpc.max_allowed_incoming_connections``: a connection past
  it is closed at once), closes connections idle for ``idle_timeout_s`` and gives a client 10 s
  to finish its handshake;
* HTTP (:class:`BoundedSite`): at the limit, a new connection closes the newest idle one (no
  request in progress: a flood is recent, a client keeping its connection is not); if every
  connection is busy, the newcomer is answered 503 and closed (after reading its request, for
  at most a second). A TLS handshake has 10 s.
  aiohttp closes a connection with no request for ``idle_timeout_s`` (its keep-alive timeout,
  which also runs from the connection's start).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import typing

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

__all__ = ["BoundedSite", "add_busy_tracking", "connection_limit", "raise_file_limit"]

_RESERVE = 128  # descriptors kept for the worker's own files
_HANDSHAKE_S = 10.0
_PROTOCOLS = 2  # gRPC and HTTP share what is left


def raise_file_limit() -> int:
    """Raise the soft limit on open files to the hard one; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):  # not ours to raise: keep the soft one
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connection_limit(configured: int) -> int:
    """Connections one protocol of this worker may hold."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, (soft - _RESERVE) // _PROTOCOLS))


_BUSY: web.AppKey[set[RequestHandler]] = web.AppKey("busy", set)


@web.middleware
async def track_busy(request: web.Request, handler):  # type: ignore[no-untyped-def]
    """Mark the request's connection busy while it is handled."""
    busy = request.app[_BUSY]
    protocol = request.protocol
    busy.add(protocol)
    try:
        return await handler(request)
    finally:
        busy.discard(protocol)


def add_busy_tracking(app: web.Application) -> None:
    app[_BUSY] = set()
    app.middlewares.insert(0, track_busy)


_REFUSAL = json.dumps({"error": "this endpoint has all the connections it takes; retry"}).encode()


class _Refused(asyncio.Protocol):
    """A connection past the limit while every other is busy: 503, then closed once the client
    has sent its request (closing with it unread would reset the connection, and the client
    might read the reset instead of the 503), or after a second, or past 64 KiB of it."""

    _LINGER_S = 1.0
    _LINGER_BYTES = 64 * 1024

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport instances: no isinstance check here;
        # an assert on one made every refusal fail, leaving the client without an answer)
        transport = typing.cast(asyncio.Transport, transport)
        self._transport, self._read = transport, 0
        transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(_REFUSAL)}\r\nConnection: close\r\n\r\n".encode()
            + _REFUSAL
        )
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(self._LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:  # read and dropped
        self._read += len(data)
        if self._read > self._LINGER_BYTES:
            self._transport.close()

    def eof_received(self) -> bool:
        self._transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()


class BoundedSite(web.TCPSite):
    """aiohttp's TCP site, holding at most ``limit`` connections (see the module's
    docstring). The app must have busy tracking (:func:`add_busy_tracking`)."""

    def __init__(self, runner: web.AppRunner, *args, limit: int, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(runner, *args, **kwargs)
        self._limit = limit
        self._busy = runner.app[_BUSY]

    def _protocol(self) -> asyncio.Protocol:
        server = self._runner.server
        assert server is not None
        open_ = [h for h in server.connections if h.transport is not None]  # oldest first
        if len(open_) >= self._limit:
            # the newest idle one: a flood is recent, a client that keeps its connection is not
            idle = next((h for h in reversed(open_) if h not in self._busy), None)
            if idle is None:
                return _Refused()
            idle.force_close()
        return server()

    async def start(self) -> None:  # TCPSite.start, with the bounded protocol factory
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
            # a TLS handshake that never ends holds a descriptor no handler counts yet
            ssl_handshake_timeout=_HANDSHAKE_S if self._ssl_context else None,
        )
