"""``chorus demo``: train the digits ensemble, serve it on a real Triton, measure it.

Trains four DNNs (``train.py``), brings them up through the same code as ``chorus up``, sends
the held-out set through the ensemble's endpoint with the client SDK, and prints each member's
accuracy (asked of Triton directly), the ensemble's, and the measured throughput. Before
serving, each member is profiled on Triton and placed by the planner, as ``chorus up`` does.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from rich.console import Console
from rich.table import Table

from combiner.sdk import EnsembleClient
from orchestrator.deploying.up import Deployment
from orchestrator.examples.digits.train import Split, load_split, write_example
from orchestrator.measuring.bench import ensemble_load
from orchestrator.measuring.measure import measure_profile
from orchestrator.planning.hardware import discover
from orchestrator.planning.plan import plan_ensemble, plan_table
from orchestrator.planning.profile import save_profile
from orchestrator.planning.spec import Ensemble, load_ensemble

__all__ = ["member_predictions", "run"]


def member_predictions(
    ensemble: Ensemble,
    triton_url: str,
    x: np.ndarray,
    batch: Mapping[str, int],
    headers: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """Each member's raw output for ``x``, asked of Triton directly (bypassing the combiner;
    ``headers`` hold Chorus's key to Triton), in batches of each member's limit there."""
    out = {}
    with grpcclient.InferenceServerClient(triton_url) as client:
        for m in ensemble.members:
            ((_, in_name),) = m.input_map
            ((_, out_name),) = m.output_map
            parts = []
            step = batch[m.name]
            for i in range(0, len(x), step):
                chunk = np.ascontiguousarray(x[i : i + step])
                tensor = grpcclient.InferInput(in_name, list(chunk.shape), "FP32")
                tensor.set_data_from_numpy(chunk)
                answer = client.infer(m.name, [tensor], headers=dict(headers or {}))
                parts.append(answer.as_numpy(out_name))
            out[m.name] = np.concatenate(parts)
    return out


def run(workdir: Path, epochs: int = 20, console: Console | None = None) -> None:
    console = console or Console(stderr=True)
    out = Console()
    with console.status("training 4 members on scikit-learn's digits (CPU)..."):
        began = time.perf_counter()
        split: Split = load_split()
        example = write_example(workdir / "example", split, epochs=epochs)
        trained_s = time.perf_counter() - began
    out.print(
        f"trained 4 members in {trained_s:.1f} s into {example.parent}; held-out set: "
        f"{len(split.y_test)} digits"
    )

    ensemble = load_ensemble(example)
    began = time.perf_counter()
    profile = measure_profile(ensemble, workdir, seconds_per_point=0.1)
    save_profile(profile, workdir / "profile.json")
    devices = discover()
    names = [m.name for m in ensemble.members]
    plan = plan_ensemble(ensemble.name, names, ensemble.max_batch_size, profile, devices)
    out.print(f"profiled the members on Triton and planned in {time.perf_counter() - began:.1f} s")
    out.print(plan_table(plan))

    cold = time.perf_counter()
    with console.status("starting Triton and the combiner..."):
        deployment = Deployment(ensemble, workdir, plan=plan, devices=devices)
        endpoints = deployment.start()
    try:
        with EnsembleClient(endpoints.ensemble) as client:
            client.predict(split.x_test[:1])
            first_answer_s = time.perf_counter() - cold
            out.print(
                f"serving {ensemble.name!r} on {endpoints.ensemble}; first answer "
                f"{first_answer_s:.1f} s after a cold start"
            )
            probs = client.predict_all(split.x_test)
            assert isinstance(probs, np.ndarray)  # one output
        members = member_predictions(
            ensemble,
            endpoints.triton_grpc,
            split.x_test,
            plan.max_batch_size,
            endpoints.triton_headers,
        )
        with console.status("measuring throughput..."):
            loads = [
                ensemble_load(endpoints.ensemble, split.x_test, b, c, 3.0)
                for b, c in ((1, 1), (1, 16), (64, 4))
            ]
    finally:
        deployment.stop()

    table = Table(title="accuracy on the held-out digits")
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    for name, logits in members.items():
        table.add_row(name, f"{np.mean(logits.argmax(1) == split.y_test):.4f}")
    table.add_row(
        f"[bold]ensemble ({ensemble.rule}{', softmax' if ensemble.softmax else ''})[/bold]",
        f"[bold]{np.mean(probs.argmax(1) == split.y_test):.4f}[/bold]",
    )
    out.print(table)
    perf = Table(title="throughput through the ensemble endpoint (closed loop, 3 s each)")
    for col in ("batch", "concurrency", "samples/s", "p50 ms", "p99 ms"):
        perf.add_column(col, justify="right")
    for t in loads:
        perf.add_row(
            str(t.batch),
            str(t.concurrency),
            f"{t.samples_per_s:,.0f}",
            f"{t.p50_ms:.1f}",
            f"{t.p99_ms:.1f}",
        )
    out.print(perf)
    out.print(
        f"the cost model predicted {plan.predicted_throughput:,.0f} samples/s at full "
        "batches (counting the combiner's CPU, not that of these clients, which run here too)"
    )
    out.print("stopped Triton and the combiner")
