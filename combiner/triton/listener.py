"""Who listens on Triton's port: when Triton runs on this host, the combiner sends its key and
its inputs only to a listener of its own user.

Triton restarts on the ports it had (``chorus up`` restarts it). In the moment it is down,
another local user could bind its port and answer the probes as Triton would, then receive the
next restricted call (the key, registering shared memory, requests' inputs). So, before the
watch declares Triton ready, the socket that listens on a loopback Triton's port must belong to
a process of the combiner's own user (or root's). A Triton on another host, or in another
network namespace (compose, Kubernetes), is reached over the network and is not checked here.
"""

from __future__ import annotations

import ipaddress
import os

import psutil

__all__ = ["foreign_listener"]


def foreign_listener(url: str) -> str | None:
    """Why the listener on ``url`` (``host:port``) is not to be trusted, or None (it is this
    user's or root's, nothing listens there, or the host is not this machine's loopback)."""
    host, _, port_text = url.rpartition(":")
    host = host.strip("[]")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        if not ipaddress.ip_address(host).is_loopback:
            return None
        port = int(port_text)
    except ValueError:
        return None
    mine = os.getuid()
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status != psutil.CONN_LISTEN or not conn.laddr or conn.laddr.port != port:
            continue
        if conn.pid is None:  # a process this user may not see: another user's
            return f"port {port} is held by a process of another user"
        try:
            uid = psutil.Process(conn.pid).uids().real
        except psutil.Error:
            return f"port {port} is held by a process that cannot be checked"
        if uid not in (mine, 0):
            return f"port {port} is held by uid {uid}, not this user's Triton"
    return None
