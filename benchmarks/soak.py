"""Soak: the digits ensemble under ``chorus up --workers 2`` for minutes, with faults.

    python -m benchmarks.soak [--minutes 10] [--concurrency 64] [--shm-share 0.25]

Closed-loop gRPC clients, each on a connection of its own, send distinct inputs (1-4 rows drawn
at random from 4,096 random images) and check every answer against the ensemble computed
directly with onnxruntime; ``--shm-share`` of them use the SDK with client shared memory
(``chorus up --allow-client-shm``: inputs and outputs in their own regions). Meanwhile a fault
schedule: Triton is SIGKILLed at 20% and 80% of the run, a combiner worker at 50%, and the
combiner's config is changed at 65% (a reload: a new set of workers, the old ones drained).
Nobody restarts anything but Chorus itself.

Reported (and kept in benchmarks/results/soak.md): requests sent, correct, wrong, errors by
code inside and outside the fault windows (a window is the 10 s after a fault: the goal is
service back within 10 s), lost (no answer within the client's 60 s), how long each fault took
to recover (from the kill to the first correct answer after its last error), and the resident
memory of every process at start and end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import psutil
from tritonclient.grpc import service_pb2, service_pb2_grpc

from benchmarks.report import publish
from combiner.sdk import AsyncEnsembleClient, EnsembleError
from combiner.stages.rules import softmax
from orchestrator.deploying.launch import free_port
from orchestrator.examples.digits.train import HERE, load_split, train_members
from orchestrator.measuring.measure import measure_profile
from orchestrator.planning.profile import save_profile
from orchestrator.planning.spec import Ensemble, load_ensemble

WINDOW_S = 10.0
CLIENT_TIMEOUT_S = 60.0


@dataclass
class Tally:
    sent: int = 0
    correct: int = 0
    wrong: int = 0
    lost: int = 0
    errors: list[tuple[float, str]] = field(default_factory=list)  # (answered at, code)
    oks: list[float] = field(default_factory=list)  # answered at


def direct(ensemble: Ensemble, x: np.ndarray) -> np.ndarray:
    outputs = []
    for m in ensemble.members:
        ((_, name),) = m.input_map
        session = ort.InferenceSession(str(m.path), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {name: x})[0])
    stacked = np.stack(outputs)
    return (softmax(stacked) if ensemble.softmax else stacked).mean(axis=0)


def roles(pid: int) -> dict[str, list[int]]:
    """The process tree of chorus up, by role."""
    found: dict[str, list[int]] = defaultdict(list)
    found["chorus up"].append(pid)
    for child in psutil.Process(pid).children(recursive=True):
        try:
            line = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "triton_python_backend_stub" in line:
            found["Triton Python-backend stubs"].append(child.pid)
        elif "tritonserver" in line:
            found["tritonserver"].append(child.pid)
        elif "combiner.worker" in line:
            found["combiner workers"].append(child.pid)
        elif "-m combiner" in line:
            found["combiner supervisor"].append(child.pid)
    return found


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):  # gone meanwhile
            total += psutil.Process(pid).memory_info().rss
    return total / 2**20


async def client(
    address: str,
    images: np.ndarray,
    expected: np.ndarray,
    tally: Tally,
    stop: asyncio.Event,
    seed: int,
) -> None:
    rng = random.Random(seed)
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        while not stop.is_set():
            rows = rng.sample(range(len(images)), rng.randint(1, 4))
            request = service_pb2.ModelInferRequest(model_name="digits")
            request.inputs.add(name="image", datatype="FP32", shape=[len(rows), 1, 8, 8])
            request.raw_input_contents.append(images[rows].tobytes())
            tally.sent += 1
            try:
                answer = await stub.ModelInfer(request, timeout=CLIENT_TIMEOUT_S)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    tally.lost += 1  # no request here has a deadline: only the client's ran out
                else:
                    tally.errors.append((time.monotonic(), e.code().name))
                await asyncio.sleep(0.05)  # a client that retries, not one that spins
                continue
            got = np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(len(rows), 10)
            if np.allclose(got, expected[rows], rtol=1e-4, atol=1e-6):
                tally.correct += 1
                tally.oks.append(time.monotonic())
            else:
                tally.wrong += 1


async def shm_client(
    address: str,
    images: np.ndarray,
    expected: np.ndarray,
    tally: Tally,
    stop: asyncio.Event,
    seed: int,
) -> None:
    """A client of the SDK whose inputs and outputs go through its own shared memory."""
    rng = random.Random(seed)
    async with AsyncEnsembleClient(address, model="digits", shared_memory=True) as sdk:
        while not stop.is_set():
            rows = rng.sample(range(len(images)), rng.randint(1, 4))
            tally.sent += 1
            try:
                answer = await sdk.infer(images[rows], timeout_s=CLIENT_TIMEOUT_S)
            except EnsembleError as e:
                if e.code == "DEADLINE_EXCEEDED":
                    tally.lost += 1
                else:
                    tally.errors.append((time.monotonic(), e.code or type(e).__name__))
                await asyncio.sleep(0.05)
                continue
            if np.allclose(answer.outputs["probabilities"], expected[rows], rtol=1e-4, atol=1e-6):
                tally.correct += 1
                tally.oks.append(time.monotonic())
            else:
                tally.wrong += 1


def reload(config: Path) -> None:
    """Change the combiner's config (a valid change): its supervisor starts new workers."""
    doc = json.loads(config.read_text())
    doc["batch_fill_ms"] = float(doc.get("batch_fill_ms", 5.0)) + 0.5
    config.write_text(json.dumps(doc, indent=2) + "\n")


async def run_load(
    address: str,
    images: np.ndarray,
    expected: np.ndarray,
    concurrency: int,
    seconds: float,
    faults: list[tuple[float, str]],
    up: subprocess.Popen[str],
    shm_clients: int,
    config: Path,
) -> tuple[Tally, list[tuple[float, str, int]]]:
    tally = Tally()
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(
            (shm_client if seed < shm_clients else client)(
                address, images, expected, tally, stop, seed
            )
        )
        for seed in range(concurrency)
    ]
    began = time.monotonic()
    done: list[tuple[float, str, int]] = []
    for at, what in faults:
        await asyncio.sleep(max(0.0, began + at - time.monotonic()))
        tree = roles(up.pid)
        if what == "reload":
            reload(config)
            done.append((time.monotonic(), what, 0))
            print(f"{time.monotonic() - began:7.1f} s: changed {config}", flush=True)
            continue
        victim = tree["tritonserver"][0] if what == "Triton" else tree["combiner workers"][0]
        os.kill(victim, signal.SIGKILL)
        done.append((time.monotonic(), what, victim))
        print(f"{time.monotonic() - began:7.1f} s: killed {what} (pid {victim})", flush=True)
    await asyncio.sleep(max(0.0, began + seconds - time.monotonic()))
    stop.set()
    await asyncio.gather(*tasks)
    return tally, done


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--shm-share", type=float, default=0.25, help="share of the clients on shared memory"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/soak.md"))
    args = parser.parse_args()
    seconds = args.minutes * 60

    split = load_split()
    if not all((HERE / "models" / f"{m}.onnx").is_file() for m in ("mlp", "cnn")):
        train_members(HERE / "models", split)
    ensemble = load_ensemble(HERE / "ensemble.yaml")
    images = np.random.default_rng(0).random((4096, 1, 8, 8), dtype=np.float32)
    expected = direct(ensemble, images)
    work = Path(tempfile.mkdtemp(prefix="chorus-soak-"))
    profile = work / "profile.json"
    save_profile(measure_profile(ensemble, work / "profiling", seconds_per_point=0.1), profile)

    port = free_port()
    argv = [sys.executable, "-m", "orchestrator", "up", str(HERE / "ensemble.yaml")]
    argv += ["--profile", str(profile), "--workers", "2", "--workdir", str(work / "up")]
    argv += ["--grpc-port", str(port), "--http-port", str(free_port())]
    argv += ["--metrics-port", str(free_port()), "--allow-client-shm"]
    log = work / "chorus-up.txt"
    with log.open("w") as errors:
        up = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors, text=True)
    assert up.stdout is not None
    line = up.stdout.readline()
    if "serving on" not in line:
        raise SystemExit(f"chorus up did not start: {line}\n{log.read_text()}")
    time.sleep(2.0)  # both workers listening
    start_rss = {role: rss_mib(pids) for role, pids in roles(up.pid).items()}
    faults = [(0.2 * seconds, "Triton"), (0.5 * seconds, "worker")]
    faults += [(0.65 * seconds, "reload"), (0.8 * seconds, "Triton")]
    shm_clients = round(args.shm_share * args.concurrency)
    began = time.monotonic()
    tally, done = asyncio.run(
        run_load(
            f"127.0.0.1:{port}",
            images,
            expected,
            args.concurrency,
            seconds,
            faults,
            up,
            shm_clients,
            work / "up" / "combiner.json",
        )
    )
    elapsed = time.monotonic() - began
    end_rss = {role: rss_mib(pids) for role, pids in roles(up.pid).items()}
    up.send_signal(signal.SIGTERM)
    exit_code = up.wait(timeout=120)

    kills = [t for t, _, _ in done]
    inside: Counter[str] = Counter()
    outside: Counter[str] = Counter()
    for at, code in tally.errors:
        (inside if any(k <= at <= k + WINDOW_S for k in kills) else outside)[code] += 1
    recovery = []
    for i, (killed, what, pid) in enumerate(done):
        until = kills[i + 1] if i + 1 < len(kills) else float("inf")
        caused = [t for t, _ in tally.errors if killed <= t < until]
        last = max(caused, default=killed)
        back = min((t for t in tally.oks if t > last), default=float("nan"))
        recovery.append((what, pid, len(caused), back - killed))

    command = (
        f"python -m benchmarks.soak --minutes {args.minutes:g} --concurrency {args.concurrency}"
        f" --shm-share {args.shm_share:g}"
    )
    lines = [
        "# Soak with faults",
        "",
        f"`{command}` (`chorus up --workers 2`, digits ensemble, 2 CPU cores shared by the "
        "clients, the combiner and Triton)",
        "",
        f"Ran {elapsed:.0f} s with {args.concurrency} closed-loop gRPC clients, each on its own "
        f"connection ({shm_clients} of them the SDK with client shared memory), 1-4 distinct "
        "rows per request, every answer checked against onnxruntime.",
        "",
        "| sent | correct | wrong | lost | errors in fault windows | errors outside |",
        "|---:|---:|---:|---:|---|---|",
        f"| {tally.sent:,} | {tally.correct:,} | {tally.wrong} | {tally.lost} | "
        f"{_codes(inside)} | {_codes(outside)} |",
        "",
        f"Throughput: {tally.correct / elapsed:,.0f} answers/s on average. A fault window is "
        f"the {WINDOW_S:.0f} s after a kill.",
        "",
        "| fault | pid | errors it caused | back after (s) |",
        "|---|---:|---:|---:|",
        *(
            f"| {w} SIGKILLed | {p} | {n} | {b:.2f} |"
            if w != "reload"
            else f"| config changed (reload) | - | {n} | {b:.2f} |"
            for w, p, n, b in recovery
        ),
        "",
        "Back after: from the kill to the first correct answer after the last error it caused.",
        "",
        "| process | RSS at start (MiB) | RSS at end (MiB) |",
        "|---|---:|---:|",
        *(
            f"| {role} | {start_rss.get(role, 0):.0f} | {end_rss.get(role, 0):.0f} |"
            for role in sorted(set(start_rss) | set(end_rss))
        ),
        "",
        "Killed processes are replaced, so their RSS at the end is that of their successor.",
        f"`chorus up` exit code after SIGTERM: {exit_code}.",
    ]
    publish(lines, args.out)


def _codes(counter: Counter[str]) -> str:
    return ", ".join(f"{code} {n}" for code, n in sorted(counter.items())) or "none"


if __name__ == "__main__":
    main()
