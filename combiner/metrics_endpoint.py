"""The supervisor's ``/metrics`` endpoint: prometheus_client's WSGI app, on a server whose every
limit has a value.

prometheus_client's own server gives each connection a thread for as long as the client keeps
it open, however many there are; here it is the supervisor's, the process that restarts the
workers. So a connection that sends nothing for ``TIMEOUT_S`` is closed (without a word in the
log: a client's doing), and at most ``CONNECTIONS`` are open at once: one more closes the oldest
(a scrape takes milliseconds, so the oldest is usually one that holds its connection without
asking; a flood mostly evicts itself, though a scrape caught behind many newcomers is cut too).
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from collections import OrderedDict
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

__all__ = ["CONNECTIONS", "TIMEOUT_S", "serve_metrics"]

TIMEOUT_S = 10.0
CONNECTIONS = 16


class _Handler(WSGIRequestHandler):
    timeout = TIMEOUT_S  # each read and write on the connection

    def log_message(self, format: str, *args: Any) -> None:  # no line a scrape
        pass


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    request_queue_size = 64  # connections not yet accepted (socketserver's default is 5)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._open: OrderedDict[int, socket.socket] = OrderedDict()  # oldest first
        self._lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            while len(self._open) >= CONNECTIONS:
                _, oldest = self._open.popitem(last=False)
                with contextlib.suppress(OSError):  # its thread's read ends: it goes
                    oldest.shutdown(socket.SHUT_RDWR)
            self._open[id(request)] = request
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that timed out or broke is the client's doing: nothing to log (the
        default prints a traceback each time, to the supervisor's log)."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._open.pop(id(request), None)


def serve_metrics(host: str, port: int, registry: Any) -> WSGIServer:
    """Serve ``registry`` on ``host:port`` from a thread of its own (a daemon)."""
    from prometheus_client import make_wsgi_app

    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    server_class = type("_MetricsServer", (_Server,), {"address_family": family})
    server: WSGIServer = make_server(
        str(address[0]), port, make_wsgi_app(registry), server_class, handler_class=_Handler
    )
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
