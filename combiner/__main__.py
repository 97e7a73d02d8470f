"""Run the combiner: ``python -m combiner --config combiner.json [--host H] [--grpc-port P]
[--http-port P] [--workers N] [--metrics-port M] [--token-file F] [--tls-cert F --tls-key F]``.

Starts N worker processes sharing the gRPC (and HTTP) port (SO_REUSEPORT: the kernel spreads
connections over them) and serves their summed Prometheus metrics on the metrics port. A worker
that dies is restarted alone, the others serving meanwhile; one that keeps dying (5 restarts in a
minute) stops them all, with exit code 1. SIGINT or SIGTERM drains every worker (each answers
what it accepted, up to the config's ``drain_timeout_s``) and exits 0.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from .auth import Credentials
from .config import CombinerConfig
from .worker import add_endpoint_arguments
from .workers import Restarts, die_with_parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m combiner", description=__doc__)
    add_endpoint_arguments(parser)
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    try:
        Credentials.load(args.token_file, args.tls_cert, args.tls_key)
        drain = CombinerConfig.load(args.config).drain_timeout_s
    except (OSError, ValueError) as e:
        parser.error(str(e))
    argv = [sys.executable, "-m", "combiner.worker", "--config", str(args.config)]
    argv += ["--host", args.host, "--grpc-port", str(args.grpc_port)]
    for flag in ("http_port", "token_file", "tls_cert", "tls_key"):
        if getattr(args, flag) is not None:
            argv += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    if args.workers > 1:
        argv.append("--reuse-port")
    raise SystemExit(supervise(argv, args.workers, args.host, args.metrics_port, drain))


def supervise(
    argv: list[str], workers: int, host: str, metrics_port: int | None, drain_s: float
) -> int:
    metrics_dir = tempfile.mkdtemp(prefix="chorus-metrics-")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(argv, env=env, preexec_fn=die_with_parent)

    procs = [start() for _ in range(workers)]
    restarts = Restarts()
    try:
        if metrics_port is not None:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
            from prometheus_client import CollectorRegistry, start_http_server
            from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=metrics_dir)
            start_http_server(metrics_port, addr=host, registry=registry)
        while not stop.wait(0.2):
            for i, proc in enumerate(procs):
                if proc.poll() is None:
                    continue
                delay = restarts.next_delay()
                if delay is None:
                    _say(
                        f"combiner worker {proc.pid} exited with code {proc.returncode}: "
                        f"{restarts.describe()}, giving up; stopping the others"
                    )
                    return 1
                _say(
                    f"combiner worker {proc.pid} exited with code {proc.returncode}; "
                    f"restarting it in {delay:.1f} s (the others keep serving)"
                )
                if metrics_port is not None:
                    mark_process_dead(proc.pid, metrics_dir)
                if stop.wait(delay):
                    break
                procs[i] = start()
        return 0
    finally:
        _stop_all(procs, drain_s + 5.0)
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _stop_all(procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """SIGTERM every worker (each drains), then wait; kill what is left at the timeout."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    until = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, until - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
