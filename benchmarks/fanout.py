"""The two ways to reach the members, side by side: one call per member (needed for deadlines
and partial answers) vs one call to the rendered fan-out ensemble (Triton fans out in C++).

    python -m benchmarks.fanout [--seconds 3]

Same deployment, same closed-loop load; a request with a ``deadline_ms`` parameter takes the
per-member path, one without takes the fan-out model.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from benchmarks.baselines import digits_example
from benchmarks.report import publish
from combiner.sdk import AsyncEnsembleClient
from orchestrator.deploying.up import Deployment
from orchestrator.measuring.bench import Load, closed_loop


def load(url: str, x, batch: int, concurrency: int, seconds: float, deadline_ms) -> Load:
    async def go() -> Load:
        async with AsyncEnsembleClient(url) as client:
            await client.metadata()
            return await closed_loop(
                lambda rows: client.predict(rows, deadline_ms=deadline_ms),
                x,
                batch,
                concurrency,
                seconds,
            )

    return asyncio.run(go())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fanout.md"))
    args = parser.parse_args()
    split, ensemble = digits_example()
    rows = []
    with Deployment(ensemble, Path(tempfile.mkdtemp(prefix="chorus-fanout-"))) as endpoints:
        for batch, concurrency in ((1, 1), (1, 16), (64, 4)):
            for label, deadline in (("one call per member", 60_000.0), ("fan-out model", None)):
                r = load(
                    endpoints.ensemble, split.x_test, batch, concurrency, args.seconds, deadline
                )
                rows.append((batch, concurrency, label, r))
                print(f"batch {batch} c{concurrency} {label}: {r.samples_per_s:,.0f}", flush=True)
    lines = [
        "# Reaching the members: one call per member vs one call to the fan-out model",
        "",
        f"`python -m benchmarks.fanout --seconds {args.seconds}`: the digits ensemble (4 members, "
        "one instance each, Python backend), 2 CPU cores, closed loop through the combiner; the "
        "per-member rows send a (never reached) 60 s deadline, which forces per-member calls.",
        "",
        "| batch | concurrency | path | samples/s | p50 ms | p99 ms |",
        "|---:|---:|---|---:|---:|---:|",
        *(
            f"| {b} | {c} | {label} | {r.samples_per_s:,.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} |"
            for b, c, label, r in rows
        ),
        "",
    ]
    for i in range(0, len(rows), 2):
        b, c, _, per_member = rows[i]
        fan = rows[i + 1][3]
        lines.append(
            f"batch {b}, concurrency {c}: fan-out / per-member = "
            f"{fan.samples_per_s / per_member.samples_per_s:.2f}x"
        )
    publish(lines, args.out)


if __name__ == "__main__":
    main()
