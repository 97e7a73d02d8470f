"""Process helpers shared by every process Chorus starts, and the restart policy of the
processes it supervises (Triton, the combiner, its workers)."""

from __future__ import annotations

import ctypes
import errno
import signal
import socket
import time
from collections import deque
from collections.abc import Iterable

import psutil

__all__ = ["PortInUse", "Restarts", "claim_ports", "die_with_parent"]

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Run in a child between fork and exec: it gets ``sig`` when its parent dies (the
    thread that started it, in fact: start children from a thread that lives as long)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)


class PortInUse(OSError):
    """Another process (another deployment, or anything else) has a port we were to serve on."""


def claim_ports(host: str, ports: Iterable[int], hold: bool = True) -> list[socket.socket]:
    """Take ``ports`` on ``host`` for one deployment, or raise :class:`PortInUse` naming the
    first that is taken.

    Each is probed with a socket that sets neither SO_REUSEADDR nor SO_REUSEPORT: its bind
    fails while any socket is bound there, whoever made it (a second ``chorus up`` on the same
    port included, though its workers would set SO_REUSEPORT). A failure is "in use" only when
    something listens on the port: the ends of connections closed a moment ago (TIME_WAIT,
    FIN_WAIT2, left by a deployment that just stopped) fail the probe too, and are no one's.
    With ``hold``, a socket that sets SO_REUSEPORT is then bound in its place and kept, never
    listening (so it takes no connection): the deployment's own workers (same user,
    SO_REUSEPORT) bind beside it, including a reload's new set and a worker restarted while the
    others are gone, and no other user can (the kernel shares a port between sockets of one user
    only). While closed connections linger the keeper also needs SO_REUSEADDR, and then a
    process that sets SO_REUSEADDR could bind the port while no worker listens. Close the
    returned sockets to give the ports up."""
    ports = list(ports)
    twice = next((p for p in ports if p and ports.count(p) > 1), None)  # (0: any free one)
    if twice is not None:  # (gRPC and HTTP would both listen, one family each: half answer)
        raise PortInUse(
            errno.EINVAL, f"port {twice} is given twice: each endpoint needs a port of its own"
        )
    held: list[socket.socket] = []
    try:
        for port in ports:
            for family, kind, proto, _, address in _addresses(host, port):
                lingering = False
                with socket.socket(family, kind, proto) as probe:
                    try:
                        probe.bind(address)
                    except OSError as e:
                        if e.errno == errno.EACCES:  # the port's fault, not the host's
                            raise PortInUse(
                                e.errno,
                                f"port {port} on {host}: permission denied (ports below 1024 "
                                "need privileges); choose another port",
                            ) from None
                        if e.errno != errno.EADDRINUSE:
                            raise
                        if _listened(port):
                            raise PortInUse(
                                e.errno,
                                f"port {port} on {host} is in use (another deployment or "
                                "program listens there); choose another port or stop it",
                            ) from None
                        lingering = True  # only closed connections' ends: no one's
                if hold:
                    keeper = socket.socket(family, kind, proto)
                    held.append(keeper)
                    keeper.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    if lingering:
                        keeper.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    keeper.bind(address)
    except BaseException:
        for s in held:
            s.close()
        raise
    return held


def _listened(port: int) -> bool:
    """Whether any socket on this host listens on TCP ``port`` (any address)."""
    return any(
        c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
        for c in psutil.net_connections(kind="tcp")
    )


def _addresses(host: str, port: int) -> list[tuple]:  # type: ignore[type-arg]
    """Where a server listening on ``host:port`` binds (both families for ``localhost``)."""
    found = socket.getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    unique = {(f, a[:2]): (f, t, p, c, a) for f, t, p, c, a in found}
    return list(unique.values())


class Restarts:
    """When to restart a process that died: at once the first time, then after a delay that
    doubles (up to ``max_delay_s``) while it keeps dying; ``limit`` restarts within
    ``window_s`` seconds is a crash loop, and the next death ends supervision."""

    def __init__(
        self,
        limit: int = 5,
        window_s: float = 60.0,
        first_delay_s: float = 0.1,
        max_delay_s: float = 4.0,
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self._first = first_delay_s
        self._max = max_delay_s
        self._times: deque[float] = deque()

    def next_delay(self, now: float | None = None) -> float | None:
        """Record a death; the seconds to wait before restarting, or None for a crash loop."""
        now = time.monotonic() if now is None else now
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()
        if len(self._times) >= self.limit:
            return None
        self._times.append(now)
        return min(self._max, self._first * 2 ** (len(self._times) - 1))

    def describe(self) -> str:
        return f"{self.limit} restarts within {self.window_s:.0f} s"
