"""Deadlines beside a slow member: are partial answers on time, and does anyone starve?

    python -m benchmarks.deadline [--seconds 5] [--deadline-ms 50] [--json FILE] [--before FILE]

The case of issue 16's finding 11, on a real tritonserver with the toy members of
``tests/integration/toy.py``: ``a`` and ``b`` (linear ONNX, about a millisecond a call) and
``slowpoke`` (Python backend, sleeping 200 ms a call), one instance each; quorum 2, so ``a`` and
``b`` make an answer. Closed-loop gRPC clients, each on a connection of its own, send one row
a request. Phases, one after another on one combiner, with nothing in between (what one phase
leaves running on the slow member, the next one meets):

1. concurrency 1 and 8, every request with ``deadline_ms``;
2. concurrency 8, half the clients with ``deadline_ms``, half with none (those must wait for
   every member: bounded by the member timeout, never cut short);
3. concurrency 32, every request with ``deadline_ms``;
4. one request without a deadline, at once after phase 3 (it meets what the burst of deadlines
   left running on the slow member).

Reported (and kept in benchmarks/results/deadline.md): per phase, the answer time of the
requests with a deadline, measured by the client from sending to its answer or refusal (p50,
p99, max, and p99 past the deadline), the share refused (DEADLINE_EXCEEDED although the quorum's
members answer in a millisecond), and of the requests without a deadline, how many every member
answered. ``--json`` keeps the figures; ``--before`` adds those of another run (for instance one
from a ``git archive`` of an earlier commit, run there) beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from benchmarks.report import publish
from tests.integration.toy import combiner, sleeping, toy_config, toy_triton

MEMBERS = ("a", "b", "slowpoke")
SLOW_S = 0.2
QUORUM = 2
WARMUP_S = 0.5
CLIENT_TIMEOUT_S = 60.0


@dataclass
class Phase:
    label: str
    concurrency: int
    without_deadline: int  # clients sending no deadline
    latencies_ms: list[float] = field(default_factory=list)  # requests with a deadline
    codes: Counter[str] = field(default_factory=Counter)  # requests with a deadline
    patient: Counter[str] = field(default_factory=Counter)  # without: contributors, or code

    def figures(self, deadline_ms: float) -> dict[str, float]:
        sent = sum(self.codes.values())
        p50, p99 = np.percentile(self.latencies_ms, [50, 99]) if self.latencies_ms else (0, 0)
        every = ",".join(MEMBERS)
        return {
            "sent": sent,
            "p50_ms": float(p50),
            "p99_ms": float(p99),
            "max_ms": max(self.latencies_ms, default=0.0),
            "p99_over_ms": float(p99) - deadline_ms,
            "refused": self.codes["DEADLINE_EXCEEDED"] / sent if sent else 0.0,
            "other_errors": sent - self.codes["OK"] - self.codes["DEADLINE_EXCEEDED"],
            "patient_sent": sum(self.patient.values()),
            "patient_full": self.patient[every],
        }


def request(x: np.ndarray, deadline_ms: float | None) -> service_pb2.ModelInferRequest:
    r = service_pb2.ModelInferRequest(model_name="toy")
    r.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    r.raw_input_contents.append(x.tobytes())
    if deadline_ms is not None:
        r.parameters["deadline_ms"].double_param = deadline_ms
    return r


async def ask(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, x: np.ndarray, deadline_ms: float | None
) -> tuple[str, str]:
    """The answer's code, and its contributors (comma-separated; empty if refused)."""
    try:
        answer = await stub.ModelInfer(request(x, deadline_ms), timeout=CLIENT_TIMEOUT_S)
    except grpc.aio.AioRpcError as e:
        return e.code().name, ""
    return "OK", answer.parameters["chorus_contributors"].string_param


async def run_phase(address: str, phase: Phase, seconds: float, deadline_ms: float) -> None:
    start_at = time.perf_counter() + WARMUP_S
    end_at = start_at + seconds
    rows = np.random.default_rng(phase.concurrency).normal(size=(4096, 1, 4)).astype(np.float32)

    async def client(k: int) -> None:
        patient = k < phase.without_deadline
        options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            i = k
            while (began := time.perf_counter()) < end_at:
                code, who = await ask(stub, rows[i % len(rows)], None if patient else deadline_ms)
                took_ms = (time.perf_counter() - began) * 1000
                i += phase.concurrency
                if began < start_at:
                    continue
                if patient:
                    phase.patient[who or code] += 1
                else:
                    phase.latencies_ms.append(took_ms)
                    phase.codes[code] += 1

    await asyncio.gather(*(client(k) for k in range(phase.concurrency)))


async def after(address: str) -> str:
    """One request without a deadline, sent at once after the phases: its contributors, and
    who is missing and why."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            answer = await stub.ModelInfer(request(np.zeros((1, 4), np.float32), None))
        except grpc.aio.AioRpcError as e:
            return f"refused: {e.code().name} ({e.details()})"
        missing = answer.parameters["chorus_missing"].string_param
        who = answer.parameters["chorus_contributors"].string_param
        return who + (f"; missing: {missing}" if missing else "")


def table(figures: dict[str, dict[str, float]], deadline_ms: float) -> list[str]:
    lines = [
        "| phase | deadline requests | p50 ms | p99 ms | max ms | p99 past the deadline (ms) "
        "| refused | other errors | without a deadline: every member / sent |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, f in figures.items():
        if label == "after":
            continue
        patient = f"{f['patient_full']:.0f} / {f['patient_sent']:.0f}" if f["patient_sent"] else "-"
        lines.append(
            f"| {label} | {f['sent']:,.0f} | {f['p50_ms']:.1f} | {f['p99_ms']:.1f} "
            f"| {f['max_ms']:.1f} | {f['p99_over_ms']:+.1f} | {100 * f['refused']:.1f}% "
            f"| {f['other_errors']:.0f} | {patient} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per phase")
    parser.add_argument("--deadline-ms", type=float, default=50.0)
    parser.add_argument("--json", type=Path, help="also keep the figures here")
    parser.add_argument("--before", type=Path, help="figures (--json) of a run to show beside")
    parser.add_argument("--before-label", default="", help="what --before ran, e.g. a commit")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/deadline.md"))
    args = parser.parse_args()
    phases = [
        Phase("concurrency 1", 1, 0),
        Phase("concurrency 8", 8, 0),
        Phase("concurrency 8, half without a deadline", 8, 4),
        Phase("concurrency 32", 32, 0),
    ]
    root = Path(tempfile.mkdtemp(prefix="chorus-deadline-"))
    load = os.getloadavg()[0]
    began = time.monotonic()
    with toy_triton(root, {"slowpoke": (sleeping(SLOW_S), 1)}) as (_, triton):
        config = toy_config(triton, root, MEMBERS, quorum=QUORUM)
        with combiner(root, "combiner", config) as (_, address):
            for phase in phases:
                asyncio.run(run_phase(address, phase, args.seconds, args.deadline_ms))
                f = phase.figures(args.deadline_ms)
                print(
                    f"{phase.label}: p99 {f['p99_ms']:.1f} ms, refused {100 * f['refused']:.1f}%"
                    f", every member {f['patient_full']:.0f} / {f['patient_sent']:.0f}",
                    flush=True,
                )
            last = asyncio.run(after(address))
    took = time.monotonic() - began
    figures: dict[str, dict[str, float]] = {p.label: p.figures(args.deadline_ms) for p in phases}
    if args.json:
        args.json.write_text(json.dumps({**figures, "after": last}, indent=1))

    lines = [
        "# Deadlines beside a slow member",
        "",
        f"`python -m benchmarks.deadline --seconds {args.seconds:g} --deadline-ms "
        f"{args.deadline_ms:g}` ({took:.0f} s in all): members `a` and `b` (linear ONNX, about "
        f"a millisecond a call) and `slowpoke` (Python backend, {SLOW_S * 1000:.0f} ms a call), "
        f"one instance each, quorum {QUORUM}, requests of one row with `deadline_ms="
        f"{args.deadline_ms:g}`; closed-loop gRPC clients, each on its own connection, "
        f"phases one after another on one combiner, {os.cpu_count()} CPU cores shared by the "
        f"clients, the combiner and Triton (the host's load average {load:.1f} at the start); "
        f"{WARMUP_S:g} s of each phase not counted. Answer time: from sending to the answer or "
        "refusal, at the client.",
        "",
        *table(figures, args.deadline_ms),
        "",
        f"A request without a deadline sent at once after the last phase: `{last}`.",
    ]
    if args.before:
        before = json.loads(args.before.read_text())
        lines += [
            "",
            f"Before ({args.before_label or args.before.name}: the same run on that version):",
            "",
            *table(before, args.deadline_ms),
            "",
            f"Its request without a deadline after the last phase: `{before['after']}`.",
        ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
