"""Run the combiner: ``python -m combiner --config combiner.json [--host H] [--grpc-port P]
[--http-port P] [--workers N|auto] [--metrics-port M] [--token-file F] [--tls-cert F --tls-key F]``.

Starts N worker processes (``auto``, the default: the config's ``workers``, what the plan needs)
sharing the gRPC (and HTTP) port (SO_REUSEPORT: the kernel spreads
connections over them) and serves their summed Prometheus metrics on the metrics port. The
ports are this deployment's alone: one that anything else holds (another deployment included)
is refused with exit code 2 before any worker starts, and the supervisor holds them (bound,
never listening) as long as it runs, so nothing else takes them while its workers restart
(:func:`combiner.workers.claim_ports`). A worker
that dies is restarted alone, the others serving meanwhile; one that keeps dying (5 restarts in a
minute) stops them all, with exit code 1. SIGINT or SIGTERM drains every worker (each answers
what it accepted, up to the config's ``drain_timeout_s``) and exits 0.

The config file is watched: when it changes (``chorus regenerate-configs``) and is valid, a new
set of workers starts on the same ports; once they all listen, the old ones drain and stop, so
the endpoint answers throughout. A reload that fails (an invalid config, workers that do not
come up) is tried again every few seconds while the file stays as it is; the old config is
served meanwhile. The SHA-256 of the config every worker serves is written to
``<config>.served`` (what ``regenerate-configs`` and ``chorus up`` wait for).

The workers write their metrics to a folder of the supervisor's in ``$TMPDIR``, removed at its
stop; one a killed supervisor left is removed by the next to start on the host
(:mod:`combiner.metrics_folder`).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from combiner.config import CombinerConfig, config_digest, served_file
from combiner.endpoints.auth import Credentials
from combiner.metrics_folder import LOCK_FD_ENV, MetricsFolder, shown
from combiner.worker import add_endpoint_arguments
from combiner.workers import PortInUse, Restarts, claim_ports, die_with_parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m combiner", description=__doc__)
    add_endpoint_arguments(parser)
    parser.add_argument(
        "--workers",
        default="auto",
        help="worker processes; auto (the default): the config's 'workers', which the "
        "orchestrator sets to what the plan needs",
    )
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics")
    args = parser.parse_args(argv)
    try:
        workers = _workers(args.workers)
    except ValueError:
        parser.error(
            f"--workers must be 'auto' or a whole number from 1 to {_MAX_WORKERS}, "
            f"not {args.workers!r}"
        )
    try:
        Credentials.load(args.token_file, args.tls_cert, args.tls_key)
        loaded = CombinerConfig.load(args.config)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    worker_stop_s = loaded.stop_s()
    count = workers or loaded.workers
    _say(
        f"python -m combiner: {count} worker process(es)"
        + ("" if workers else " (auto: the config's 'workers')")
    )
    argv = [sys.executable, "-m", "combiner.worker", "--config", str(args.config)]
    argv += ["--host", args.host, "--grpc-port", str(args.grpc_port)]
    for flag in ("http_port", "token_file", "tls_cert", "tls_key"):
        if getattr(args, flag) is not None:
            argv += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    argv.append("--reuse-port")  # what lets them, and a reload's workers, share the ports
    ports = [p for p in (args.grpc_port, args.http_port) if p is not None]
    metrics = [] if args.metrics_port is None else [args.metrics_port]
    try:
        claim_ports(args.host, ports + metrics, hold=False)  # each free, and none given twice
        held = claim_ports(args.host, ports)  # (the metrics port: bound by this process alone)
    except PortInUse as e:
        _say(f"python -m combiner: {e.strerror}")
        raise SystemExit(2) from None
    except OSError as e:  # a name that does not resolve, an address not this host's
        _say(f"python -m combiner: cannot listen on {args.host!r}: {e.strerror}")
        raise SystemExit(2) from None
    try:
        code = supervise(
            argv, workers, args.host, args.metrics_port, worker_stop_s, args.config, count
        )
    finally:
        for s in held:
            s.close()
    raise SystemExit(code)


_READY_WAIT_S = 120.0
_MAX_WORKERS = 256  # as the config allows
_RELOAD_RETRY_S = 10.0


def _workers(value: str) -> int | None:
    """``--workers``: None for auto, else the count (ValueError if it is neither)."""
    if value == "auto":
        return None
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= _MAX_WORKERS:
        raise ValueError(value)
    return int(value)


def supervise(
    argv: list[str],
    workers: int | None,
    host: str,
    metrics_port: int | None,
    worker_stop_s: float,
    config: Path | None = None,
    first: int | None = None,
) -> int:
    """Run and restart the workers until SIGINT/SIGTERM; ``worker_stop_s``: the longest a
    worker may take to stop (it is killed only after that). ``workers`` None: as many as the
    config says (``first``: at the start, as read already), read again at each reload
    (``config`` is then required)."""
    folder = MetricsFolder()
    if folder.reclaimed:
        _say(
            f"removed {len(folder.reclaimed)} metrics folder(s) of combiners that were killed: "
            + shown(folder.reclaimed)
        )
    metrics_dir = str(folder.path)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir, LOCK_FD_ENV: str(folder.fd)}
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    started = 0

    def start() -> tuple[subprocess.Popen[bytes], Path]:
        nonlocal started
        started += 1
        ready = Path(metrics_dir) / f"ready-{started}"
        # a group of its own: a terminal's Ctrl-C (or any signal to the supervisor's group)
        # reaches the supervisor alone, which drains them once; a second signal would make a
        # worker exit at once, cutting requests and cancelling its calls on Triton
        proc = subprocess.Popen(
            [*argv, "--ready-file", str(ready)],
            env=env,
            preexec_fn=die_with_parent,
            process_group=0,
            pass_fds=(folder.fd,),  # the folder's lock: held until the last worker is gone
        )
        return proc, ready

    served = _digest(config)
    current = [
        start() for _ in range(workers or first or _count(workers, config))
    ]  # each worker and its ready file
    procs = [p for p, _ in current]
    restarts = Restarts()
    reported = False  # whether <config>.served says what every worker serves
    try:
        if config is not None and _wait_listening(current, stop):
            _write_served(config, served)
            reported = True
        if metrics_port is not None:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
            from prometheus_client import CollectorRegistry
            from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

            from combiner.metrics_endpoint import serve_metrics

            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=metrics_dir)
            serve_metrics(host, metrics_port, registry)
        retry_at = 0.0  # a reload that failed is tried again, after a while
        while not stop.wait(0.2):
            current_digest = _digest(config)
            if config is not None and not reported and _all_listen(current):
                _write_served(config, served)  # (a worker of the first set had to restart)
                reported = True
            if config is not None and current_digest != served and time.monotonic() >= retry_at:
                fresh = _reload(config, workers, start, stop, worker_stop_s)
                if fresh is None:
                    retry_at = time.monotonic() + _RELOAD_RETRY_S
                    _say(f"trying the reload again in {_RELOAD_RETRY_S:.0f} s")
                else:  # the new workers listen: the old ones drain and stop
                    served, retry_at, reported = current_digest, 0.0, True
                    old, current = procs, fresh
                    procs = [p for p, _ in current]
                    _stop_all(old, worker_stop_s + 5.0)
                    if metrics_port is not None:
                        for proc in old:
                            mark_process_dead(proc.pid, metrics_dir)
                    _write_served(config, served)
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
                current[i] = start()
                procs[i] = current[i][0]
        return 0
    finally:
        _stop_all(procs, worker_stop_s + 5.0)
        folder.remove()


def _reload(
    config: Path,
    workers: int | None,
    start: Callable[[], tuple[subprocess.Popen[bytes], Path]],
    stop: threading.Event,
    worker_stop_s: float,
) -> list[tuple[subprocess.Popen[bytes], Path]] | None:
    """The config changed: start workers on it beside the running ones; once they listen,
    return them (the caller's old ones are drained here). None if the config is invalid or
    they did not come up (the old ones keep serving)."""
    try:
        loaded = CombinerConfig.load(config)
    except (OSError, ValueError) as e:
        _say(f"{config} changed but is not a valid combiner config; still serving the old one: {e}")
        return None
    count = workers or loaded.workers
    _say(f"{config} changed: starting {count} worker(s) on it")
    generation = [start() for _ in range(count)]
    if not _wait_listening(generation, stop):
        _say("the new workers did not come up; still serving the old config")
        _stop_all([p for p, _ in generation], worker_stop_s + 5.0)  # some may have answered
        return None
    return generation


def _count(workers: int | None, config: Path | None) -> int:
    if workers is not None:
        return workers
    if config is None:
        raise ValueError("--workers auto needs a config")
    return CombinerConfig.load(config).workers


def _wait_listening(
    generation: list[tuple[subprocess.Popen[bytes], Path]], stop: threading.Event
) -> bool:
    """Wait until every worker of a generation listens; False if one exits or it takes too
    long."""
    until = time.monotonic() + _READY_WAIT_S
    while not all(ready.exists() for _, ready in generation):
        if stop.is_set() or time.monotonic() > until:
            return False
        if any(p.poll() is not None for p, _ in generation):
            return False
        time.sleep(0.05)
    return True


def _all_listen(generation: list[tuple[subprocess.Popen[bytes], Path]]) -> bool:
    return all(p.poll() is None and ready.exists() for p, ready in generation)


def _digest(config: Path | None) -> str | None:
    return None if config is None else config_digest(config)


def _write_served(config: Path, digest: str | None) -> None:
    """Tell ``regenerate-configs`` which config every worker serves now."""
    try:
        served_file(config).write_text(f"{digest}\n")
    except OSError as e:
        _say(f"cannot write {config}.served: {e}")


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
