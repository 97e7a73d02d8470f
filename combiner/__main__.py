"""Run the combiner: ``python -m combiner --config combiner.json [--host H] [--grpc-port P]
[--http-port P] [--workers N] [--metrics-port M]``.

Starts N worker processes sharing the gRPC (and HTTP) port (SO_REUSEPORT: the kernel spreads
connections over them), serves their summed Prometheus metrics on the metrics port, and stops
them all on SIGINT or SIGTERM. If a worker dies, the others are stopped and the exit code is 1.
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
from pathlib import Path

from .workers import die_with_parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m combiner", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="combiner.json to serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--grpc-port", type=int, default=8100)
    parser.add_argument("--http-port", type=int, default=None, help="also serve HTTP/REST")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    raise SystemExit(
        supervise(
            args.config, args.host, args.grpc_port, args.workers, args.metrics_port, args.http_port
        )
    )


def supervise(
    config: Path,
    host: str,
    port: int,
    workers: int,
    metrics_port: int | None,
    http_port: int | None = None,
) -> int:
    metrics_dir = tempfile.mkdtemp(prefix="chorus-metrics-")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    argv = [
        sys.executable,
        "-m",
        "combiner.worker",
        "--config",
        str(config),
        "--host",
        host,
        "--grpc-port",
        str(port),
    ]
    if http_port is not None:
        argv += ["--http-port", str(http_port)]
    if workers > 1:
        argv.append("--reuse-port")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    procs = [subprocess.Popen(argv, env=env, preexec_fn=die_with_parent) for _ in range(workers)]
    try:
        if metrics_port is not None:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
            from prometheus_client import CollectorRegistry, start_http_server
            from prometheus_client.multiprocess import MultiProcessCollector

            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=metrics_dir)
            start_http_server(metrics_port, addr=host, registry=registry)
        while not stop.wait(0.2):
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                print(
                    f"combiner worker {dead[0].pid} exited with code {dead[0].returncode}; "
                    "stopping the others",
                    file=sys.stderr,
                    flush=True,
                )
                return 1
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(metrics_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
