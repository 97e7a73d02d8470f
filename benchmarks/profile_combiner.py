"""Where the CPU goes per request: the combiner, Triton (with its backend stubs) and the client,
for Chorus and Triton's native ensemble on the digits ensemble; and the floor, a grpc.aio
server on uvloop that answers every ModelInfer at once with a canned response: with a plain
unary handler, and reading its message as Chorus does (a stream-unary handler waiting for it
under a timeout: what bounds a client that never sends it, ``body_timeout_s``).

    python -m benchmarks.profile_combiner [--seconds 3] [--rounds 3]

CPU seconds are read from /proc for each process tree around each load; the client is this
process. ``--py-spy`` (py-spy comes with the test extras) also splits the combiner worker's CPU
at concurrency 64: its main thread (the event loop) and its other threads from /proc, and the
main thread by py-spy's samples, by stage.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import resource
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import grpc
import numpy as np
import psutil
import uvloop
from tritonclient.grpc import service_pb2

from benchmarks.baselines import (
    add_baselines,
    cpu_seconds,
    descendants,
    digits_example,
    interleaved,
    load,
    requests_for,
    served,
)
from benchmarks.report import publish
from orchestrator.deploying.launch import free_port
from orchestrator.examples.digits.train import HERE
from orchestrator.planning.spec import load_ensemble


def _canned(request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
    response = service_pb2.ModelInferResponse(model_name="digits", id=request.id)
    response.outputs.add(name="logits", datatype="FP32", shape=[1, 10])
    response.raw_output_contents.append(bytes(40))
    return response


def _serve_canned(port: int, reading: str) -> None:
    """``reading``: "unary", a plain unary handler; "timed", as Chorus reads a message: a
    stream-unary handler that waits for it under a timeout (the body timeout)."""

    async def unary(request, context):
        return _canned(request)

    async def timed(requests, context):
        async with asyncio.timeout(30):
            request = await anext(aiter(requests), None)
        return _canned(request)

    if reading == "unary":
        kind, method = grpc.unary_unary_rpc_method_handler, unary
    else:
        kind, method = grpc.stream_unary_rpc_method_handler, timed
    handler = kind(
        method,
        request_deserializer=service_pb2.ModelInferRequest.FromString,
        response_serializer=service_pb2.ModelInferResponse.SerializeToString,
    )

    async def go() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "inference.GRPCInferenceService", {"ModelInfer": handler}
                ),
            )
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    uvloop.run(go())


def _client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measured(
    url: str,
    requests: list,
    c: int,
    seconds: float,
    groups: dict[str, list[int]],
    headers: Mapping[str, str] | None = None,
):
    """A load, with CPU ms per request of each process group and of the client."""
    before = {name: cpu_seconds(pids) for name, pids in groups.items()}
    client_before = _client_cpu()
    r = load(url, requests, c, seconds, headers)
    n = max(r.requests, 1)
    cpu = {name: (cpu_seconds(pids) - before[name]) / n * 1000 for name, pids in groups.items()}
    cpu["client"] = (_client_cpu() - client_before) / n * 1000
    return r, cpu


FLOORS = {
    "unary": "unary handler",
    "timed": "reading its message as Chorus does (stream-unary, under a timeout)",
}


def floor(
    x: np.ndarray, seconds: float, rounds: int
) -> tuple[list[str], dict[tuple[str, int], float]]:
    """Two grpc.aio servers answering at once: a plain unary handler, and one that reads its
    message as Chorus must to bound a slow sender (the body timeout); rounds interleaved."""
    servers = {}
    for reading in FLOORS:
        port = free_port()
        process = mp.get_context("spawn").Process(
            target=_serve_canned, args=(port, reading), daemon=True
        )
        process.start()
        servers[reading] = (port, process)
    for port, _ in servers.values():  # a slow host takes seconds to import grpc and bind
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
    cpu_of: dict[tuple[str, int], float] = {}
    try:
        requests = requests_for("digits", "image", x)
        lines = [
            "| concurrency | server | requests/s | server CPU ms/request | its main thread | "
            "client CPU ms/request |",
            "|---:|---|---:|---:|---:|---:|",
        ]

        def one(reading: str, c: int):
            port, process = servers[reading]
            url = f"127.0.0.1:{port}"
            load(url, requests, c, 0.3)
            main_before = thread_cpu(process.pid or 0)[0]
            r, cpu = measured(url, requests, c, seconds, {"server": [process.pid or 0]})
            main = (thread_cpu(process.pid or 0)[0] - main_before) / max(r.requests, 1) * 1000
            return r, cpu, main

        for c in (1, 8, 64):
            cases = {reading: (lambda reading=reading, c=c: one(reading, c)) for reading in FLOORS}
            for reading, (r, cpu, main) in interleaved(
                cases, rounds, lambda t: t[0].samples_per_s
            ).items():
                cpu_of[reading, c] = cpu["server"]
                lines.append(
                    f"| {c} | {FLOORS[reading]} | {r.samples_per_s:,.0f} | {cpu['server']:.2f} "
                    f"| {main:.2f} | {cpu['client']:.2f} |"
                )
        return lines, cpu_of
    finally:
        for _, process in servers.values():
            process.terminate()


def split(
    x: np.ndarray, seconds: float, rounds: int, py_spy: bool
) -> tuple[list[str], dict[int, float]]:
    ensemble = load_ensemble(HERE / "ensemble.yaml")
    lines = [
        "| endpoint | concurrency | requests/s | combiner | Triton | client | total |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    spy_lines: list[str] = []
    combiner: dict[int, float] = {}
    with served(ensemble, "chorus-profile-") as d:
        assert d.endpoints is not None and d.combiner is not None and d.triton is not None
        key = d.endpoints.triton_headers
        add_baselines(ensemble, d.workdir / "repository", d.endpoints.triton_grpc, 64, key)
        groups = {
            "combiner": descendants(d.combiner.pid or 0),
            "triton": descendants(d.triton.process.pid or 0),
        }
        ours = requests_for(ensemble.name, "image", x)
        native = requests_for("native", "image", x)
        for c in (8, 64):
            cases = {
                "Chorus": lambda c=c: measured(d.endpoints.ensemble, ours, c, seconds, groups),
                "native ensemble": lambda c=c: measured(
                    d.endpoints.triton_grpc, native, c, seconds, groups, key
                ),
            }
            for label, (r, cpu) in interleaved(cases, rounds, lambda t: t[0].samples_per_s).items():
                total = cpu["combiner"] + cpu["triton"] + cpu["client"]
                if label == "Chorus":
                    combiner[c] = cpu["combiner"]
                lines.append(
                    f"| {label} | {c} | {r.samples_per_s:,.0f} | {cpu['combiner']:.2f} | "
                    f"{cpu['triton']:.2f} | {cpu['client']:.2f} | {total:.2f} |"
                )
        if py_spy:
            spy_lines = sample(d.combiner.pid or 0, d.endpoints.ensemble, ours, seconds)
    return [*lines, "", *spy_lines], combiner


# Where a sample of the combiner worker's main thread lies, by the first frame (from the top of
# the stack) in one of these files; "the event loop's own C work" is a sample with no Python
# frame below the loop's (uvloop, grpc.aio's Cython, protobuf, numpy's C called from there).
STAGES = {
    "metrics (prometheus_client)": ("prometheus_client/",),
    "request parsing and checks": ("combiner/stages/request.py",),
    "batching": ("combiner/stages/batching.py",),
    "member calls (lanes, requests to Triton, their answers)": (
        "combiner/stages/calls.py",
        "combiner/stages/lanes.py",
        "combiner/stages/messages.py",
        "combiner/stages/batch_shm.py",
        "combiner/triton/",
    ),
    "the prediction (tiers, the batch's state)": (
        "combiner/stages/predict.py",
        "combiner/stages/prediction.py",
    ),
    "combination (rule, checks)": ("combiner/stages/combination.py", "combiner/stages/rules.py"),
    "the service (deadline, quorum, response)": ("combiner/stages/service.py",),
    "the gRPC endpoint (handler, body timeout)": ("combiner/endpoints/",),
    "grpc.aio's Python (client calls)": ("grpc/",),
}


def thread_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds of a process's main thread (its event loop), and of its other threads
    (grpc.aio's poller and gRPC core's event engine)."""
    main = other = 0.0
    for t in psutil.Process(pid).threads():
        if t.id == pid:
            main += t.user_time + t.system_time
        else:
            other += t.user_time + t.system_time
    return main, other


def sample(combiner: int, url: str, requests: list, seconds: float) -> list[str]:
    """The combiner worker at concurrency 64: its threads' CPU per request (from /proc), and
    py-spy's samples of its main thread, by where they lie, spreading that thread's CPU."""
    worker = next(
        p
        for p in descendants(combiner)
        if "combiner.worker" in " ".join(psutil.Process(p).cmdline())
    )
    out = Path(tempfile.mkdtemp()) / "spy.txt"
    spy = subprocess.Popen(
        [
            *("py-spy", "record", "-p", str(worker), "-d", str(int(seconds))),
            *("-r", "400", "-f", "raw", "-o", str(out)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pids = descendants(combiner)
    before, threads_before = cpu_seconds(pids), thread_cpu(worker)
    r = load(url, requests, 64, seconds + 1)
    n = max(r.requests, 1)
    ms = (cpu_seconds(pids) - before) / n * 1000
    main_ms, other_ms = (
        (after - was) / n * 1000
        for after, was in zip(thread_cpu(worker), threads_before, strict=True)
    )
    spy.wait()
    shares: Counter[str] = Counter()
    for line in out.read_text().splitlines():
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        if "runpy" not in frames[0]:  # not the main thread (py-spy counts a thread that waits
            continue  # for the GIL as busy: /proc says what the others cost)
        where = "the event loop's own C work (uvloop, grpc.aio's Cython, protobuf)"
        for frame in reversed(frames):
            stage = next((k for k, paths in STAGES.items() if any(p in frame for p in paths)), None)
            if stage is not None:
                where = stage
                break
        shares[where] += int(count)
    total = max(sum(shares.values()), 1)
    return [
        f"The combiner at concurrency 64 (`--py-spy`): {ms:.3f} ms of CPU a request in all, "
        f"{r.samples_per_s:,.0f} requests/s. Its worker's main thread (the event loop) "
        f"{main_ms:.3f} ms, the worker's other threads {other_ms:.3f} ms, the supervisor and "
        f"the rest {ms - main_ms - other_ms:.3f} ms (from /proc). The main thread's "
        f"{total} py-spy samples over {int(seconds)} s, each where the innermost Chorus file "
        "on its stack is (else the loop's own work), spread that thread's CPU:",
        "",
        "| where, in the worker's main thread | share of samples | ms a request |",
        "|---|---:|---:|",
        *(
            f"| {name} | {count / total:.0%} | {main_ms * count / total:.3f} |"
            for name, count in shares.most_common()
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--py-spy", action="store_true", help="sample the combiner with py-spy")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/combiner_profile.md"))
    args = parser.parse_args()
    if args.py_spy and shutil.which("py-spy") is None:
        parser.error("--py-spy needs py-spy on PATH (pip install py-spy)")
    data, _ = digits_example()
    x = data.x_test
    chorus, combiner = split(x, args.seconds, args.rounds, args.py_spy)
    floor_lines, floors = floor(x, args.seconds, args.rounds)
    lines = [
        "# Where the CPU goes, per request",
        "",
        f"`python -m benchmarks.profile_combiner --seconds {args.seconds} --rounds {args.rounds}"
        + (" --py-spy" if args.py_spy else "")
        + "`: CPU milliseconds per request of each process tree, batch-1 requests, closed loop "
        "(the client is the benchmark process). Rows of a concurrency are interleaved rounds; "
        "the median round is kept.",
        "",
        "## The digits ensemble: Chorus vs Triton's native ensemble",
        "",
        *chorus,
        "",
        "## The floor: a grpc.aio server (uvloop) answering at once",
        "",
        *floor_lines,
        "",
        *(
            f"- concurrency {c}: the combiner's CPU a request is "
            f"{combiner[c] / floors['unary', c]:.2f}x the unary floor's and "
            f"{combiner[c] / floors['timed', c]:.2f}x the floor's that reads its message as "
            "Chorus does"
            for c in (8, 64)
        ),
        "",
    ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
