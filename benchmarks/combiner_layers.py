"""Where the combiner's CPU goes, layer by layer, on the digits ensemble: what any Python gRPC
endpoint costs, what Chorus's stages cost without one, and per request or per batch.

    python -m benchmarks.combiner_layers [--seconds 3] [--rounds 3]

On one deployment (its Triton and combiner), batch-1 requests, closed loop, at concurrency 1 to
64, each case's rounds interleaved with the others' (the median round is kept):

- the floor: a grpc.aio server on uvloop answering every ModelInfer at once (the unary handler
  of :mod:`benchmarks.profile_combiner`), its process's CPU;
- Chorus in process: ``EnsembleService.infer`` called from this process on the deployment's own
  config, awaited directly: every stage and the batch's call to Triton, no gRPC endpoint; this
  process's CPU (grpc's threads included, and the service's watch of Triton: this process's
  CPU while idle is reported) and the mean batch (its metrics); what the imports made is frozen
  out of the collector's sight, as the worker does;
- the combiner: through its gRPC endpoint, the CPU of its process tree (the supervisor and its
  workers) and its mean batch (from its metrics endpoint);
- once, the batch's call to Triton alone: one call to the fan-out model as Chorus makes it for a
  batch of one, awaited in turn from this process.

The stages' CPU is split into a part per request and a part per batch by a least-squares fit
of ``cpu = per_request + per_batch / mean_batch`` over the concurrencies (its largest residual
is reported).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing as mp
import threading
import time
import urllib.request
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import psutil
import uvloop

from benchmarks.baselines import descendants, digits_example, interleaved, requests_for, served
from benchmarks.profile_combiner import _serve_canned, measured
from benchmarks.report import publish
from combiner import metrics
from combiner.config import CombinerConfig
from combiner.stages.messages import fanout_output, request
from combiner.stages.service import EnsembleService
from combiner.triton.nodes import Nodes
from combiner.triton.upstream import Upstream
from orchestrator.deploying.launch import free_port

CONCURRENCY = (1, 2, 4, 8, 16, 32, 64)
T = TypeVar("T")


@dataclass(frozen=True)
class Case:
    requests_per_s: float
    cpu_ms: float  # per request
    batch: float  # mean requests a batch (1 where there are no batches)


def _own_cpu() -> float:
    """This process's CPU seconds, all its threads."""
    times = psutil.Process().cpu_times()
    return times.user + times.system


def _batches(samples: dict[str, float]) -> tuple[float, float]:
    return samples["chorus_batched_requests_count"], samples["chorus_batched_requests_sum"]


def _scraped(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("chorus_batched_requests_") and "bucket" not in line
    }


def _in_process() -> dict[str, float]:
    (family,) = metrics.BATCHED.collect()
    return {s.name: s.value for s in family.samples if "bucket" not in s.name}


def _mean_batch(before: tuple[float, float], after: tuple[float, float]) -> float:
    count = after[0] - before[0]
    return (after[1] - before[1]) / count if count else 1.0


async def _closed_loop(call, requests: list, c: int, seconds: float) -> int:
    """``c`` loops awaiting ``call(request)`` in turn for ``seconds``; how many answered."""
    done = 0

    async def one(k: int, until: float) -> None:
        nonlocal done
        while time.monotonic() < until:
            await call(requests[k % len(requests)])
            k += c
            done += 1

    until = time.monotonic() + seconds
    await asyncio.gather(*(one(k, until) for k in range(c)))
    return done


class InProcess:
    """Chorus's service on the deployment's config, in this process, on an event loop of its
    own that runs throughout (its watch of Triton with it) in a thread of its own."""

    def __init__(self, config: CombinerConfig) -> None:
        self.config = config
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        key = Path(config.triton_key_file).read_text().strip() if config.triton_key_file else None
        self.service, self.upstream = self._run(self._start(key))

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    async def _start(self, key: str | None) -> tuple[EnsembleService, Upstream]:
        service = EnsembleService(self.config, Nodes(self.config, key))
        await service.start()
        until = time.monotonic() + 60
        while service.nodes.stranded:  # until its watch has seen Triton serve
            if time.monotonic() > until:
                raise RuntimeError(f"Triton not ready for {service.nodes.stranded}")
            await asyncio.sleep(0.05)
        assert self.config.triton_url is not None, "one node's deployment"
        return service, Upstream(self.config.triton_url, key)

    def idle(self, seconds: float = 2.0) -> float:
        """This process's CPU while nothing is asked of it, in milliseconds a second."""
        gc.collect()
        gc.freeze()
        cpu = _own_cpu()
        time.sleep(seconds)
        return (_own_cpu() - cpu) / seconds * 1000

    def load(self, requests: list, c: int, seconds: float) -> Case:
        self._run(_closed_loop(self.service.infer, requests, c, 0.5))
        before, cpu = _batches(_in_process()), _own_cpu()
        began = time.monotonic()
        n = self._run(_closed_loop(self.service.infer, requests, c, seconds))
        took = time.monotonic() - began
        batch = _mean_batch(before, _batches(_in_process()))
        return Case(n / took, (_own_cpu() - cpu) / n * 1000, batch)

    def triton_call(self, requests: list, seconds: float) -> Case:
        """The call to the fan-out model a batch of one makes (its bytes in the message)."""
        fanout = self.service.predictor._fanout
        assert fanout is not None, "the deployment has no fan-out model"
        names = [
            fanout_output(m.name, t.name) for m in self.config.members for t in self.config.outputs
        ]
        inputs = {t.name: t for t in self.config.inputs}
        calls = [
            request(fanout, inputs, self.service.reader.parse(r), 0, 1, None, names)
            for r in requests[:64]
        ]
        metadata = self.upstream._metadata

        async def call(req):
            return await self.upstream._stub.ModelInfer(req, metadata=metadata)

        self._run(_closed_loop(call, calls, 1, 0.5))
        cpu, began = _own_cpu(), time.monotonic()
        n = self._run(_closed_loop(call, calls, 1, seconds))
        return Case(n / (time.monotonic() - began), (_own_cpu() - cpu) / n * 1000, 1.0)

    def close(self) -> None:
        self.service.release()
        self._run(self.service.close(1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


def fit(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    """Least squares of ``cpu = a + b / batch`` over (mean batch, cpu) points: (a, b, the
    largest residual's size)."""
    x = np.array([[1.0, 1.0 / batch] for batch, _ in points])
    y = np.array([cpu for _, cpu in points])
    (a, b), *_ = np.linalg.lstsq(x, y, rcond=None)
    return float(a), float(b), float(np.abs(y - x @ np.array([a, b])).max())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/combiner_layers.md"))
    args = parser.parse_args()
    data, ensemble = digits_example()
    ours = requests_for(ensemble.name, "image", data.x_test)
    floor_port = free_port()
    floor = mp.get_context("spawn").Process(
        target=_serve_canned, args=(floor_port, "unary"), daemon=True
    )
    floor.start()
    with grpc.insecure_channel(f"127.0.0.1:{floor_port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
    metrics_port = free_port()
    results: dict[tuple[str, int], Case] = {}
    try:
        with served(ensemble, "chorus-layers-", metrics_port=metrics_port) as d:
            assert d.endpoints is not None and d.combiner is not None
            config = CombinerConfig.load(d.workdir / "combiner.json")
            local = InProcess(config)
            idle = local.idle()
            worker = {"combiner": descendants(d.combiner.pid or 0)}

            def endpoint(c: int) -> Case:
                assert d.endpoints is not None
                measured(d.endpoints.ensemble, ours, c, 0.5, worker)
                before = _batches(_scraped(metrics_port))
                r, cpu = measured(d.endpoints.ensemble, ours, c, args.seconds, worker)
                batch = _mean_batch(before, _batches(_scraped(metrics_port)))
                return Case(r.samples_per_s, cpu["combiner"], batch)

            def floor_case(c: int) -> Case:
                url = f"127.0.0.1:{floor_port}"
                measured(url, ours, c, 0.3, {"server": [floor.pid or 0]})
                r, cpu = measured(url, ours, c, args.seconds, {"server": [floor.pid or 0]})
                return Case(r.samples_per_s, cpu["server"], 1.0)

            try:
                for c in CONCURRENCY:
                    cases = {
                        "floor": lambda c=c: floor_case(c),
                        "in process": lambda c=c: local.load(ours, c, args.seconds),
                        "combiner": lambda c=c: endpoint(c),
                    }
                    for label, case in interleaved(
                        cases, args.rounds, lambda case: case.requests_per_s
                    ).items():
                        results[label, c] = case
                        print(f"{label} c{c}: {case}", flush=True)
                call = sorted(
                    (local.triton_call(ours, args.seconds) for _ in range(args.rounds)),
                    key=lambda case: case.cpu_ms,
                )[args.rounds // 2]
            finally:
                local.close()
    finally:
        floor.terminate()
    per_request, per_batch, residual = fit(
        [(results["in process", c].batch, results["in process", c].cpu_ms) for c in CONCURRENCY]
    )
    lines = [
        "# Where the combiner's CPU goes, layer by layer",
        "",
        f"`python -m benchmarks.combiner_layers --seconds {args.seconds} --rounds {args.rounds}`"
        ": the digits ensemble, batch-1 requests, closed loop; CPU milliseconds a request (see "
        "the module's docstring for what each column measures). The floor is any Python gRPC "
        "endpoint's; Chorus in process is its stages and its calls to Triton, without an "
        "endpoint (its batches grow larger than the combiner's: this process awaits each answer "
        "directly); its stages at the combiner's batch are read from the fit below, and the rest "
        "is what the combiner costs beyond the floor and them (combiner - floor - stages).",
        "",
        "| concurrency | floor server | Chorus in process | its mean batch | combiner (gRPC) | "
        "its mean batch | its stages (the fit, at its batch) | the rest |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in CONCURRENCY:
        f, i, w = results["floor", c], results["in process", c], results["combiner", c]
        stages = per_request + per_batch / w.batch
        lines.append(
            f"| {c} | {f.cpu_ms:.3f} | {i.cpu_ms:.3f} | {i.batch:.1f} | {w.cpu_ms:.3f} | "
            f"{w.batch:.1f} | {stages:.3f} | {w.cpu_ms - f.cpu_ms - stages:+.3f} |"
        )
    lines += [
        "",
        "| requests/s | " + " | ".join(f"concurrency {c}" for c in CONCURRENCY) + " |",
        "|---|" + "---:|" * len(CONCURRENCY),
        *(
            f"| {label} | "
            + " | ".join(f"{results[label, c].requests_per_s:,.0f}" for c in CONCURRENCY)
            + " |"
            for label in ("floor", "in process", "combiner")
        ),
        "",
        f"- Chorus in process, fitted as CPU = per request + per batch / mean batch: "
        f"{per_request:.3f} ms a request and {per_batch:.3f} ms a batch (the largest residual "
        f"{residual:.3f} ms); this process spends {idle:.1f} ms of CPU a second when idle (the "
        "service's watch of Triton, grpc's threads), which the rows count too.",
        f"- Of a batch's part, its call to Triton alone (the fan-out model, a batch of one, "
        f"from this process): {call.cpu_ms:.3f} ms ({call.requests_per_s:,.0f} calls/s in turn); "
        f"the rest, {per_batch - call.cpu_ms:.3f} ms, is the stages' work a batch.",
        "",
    ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
