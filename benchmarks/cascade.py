"""A calibrated cascade against the full ensemble, served side by side from the same members.

    python -m benchmarks.cascade [--seconds 3] [--rounds 3]

The members (:mod:`benchmarks.cascade_members`: two cheap MLPs, two CNNs costing over ten times
as much a sample, on upscaled digits) are trained into a temporary folder, then everything goes
through the ``chorus`` command line, as a user would run it (``python -m orchestrator``):
``chorus profile`` once, ``chorus calibrate`` on the validation rows (fidelity 0.999 to the
full ensemble there, so that the held-out rows keep 0.995 with a margin), and two
``chorus up`` on free ports, each with a work folder of its own and the same
profile: the calibrated cascade, and the same ensemble file with its cascade section removed
(so its plan is the full ensemble's). Both stay up while they are measured in turn: in each
round, each cell (batch 1 and 16, concurrency 1, 8 and 64) measures the two one after the
other under the same closed-loop load (prebuilt gRPC requests of the held-out rows, the
client of :mod:`benchmarks.baselines`), in alternating order; a cell's ratio is the median of
its rounds' ratios, since this shared machine's speed drifts between minutes.

Then the held-out rows, asked of both in batches of 16: fidelity (the share of rows whose
top-1 is the full ensemble's), each one's accuracy, the share of rows each tier answered
(the response parameter ``chorus_tier``), and the cascade deployment asked with the request
parameter ``cascade: false``, which must answer as the full ensemble does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import yaml
from tritonclient.utils import InferenceServerException

from benchmarks.baselines import load, requests_for
from benchmarks.cascade_members import CHEAP, COST_BATCH, EXPENSIVE, Built, build
from benchmarks.report import publish
from orchestrator.deploying.launch import free_port
from orchestrator.measuring.bench import Load
from orchestrator.planning.hardware import discover

__all__ = ["main"]

BATCHES = (1, 16)
CONCURRENCY = (1, 8, 64)
FIDELITY = 0.999  # on the validation rows: the held-out rows must keep 0.995 (issue 18)
HELD_OUT_TARGET = 0.995
NAME = "cascade_digits"  # the ensemble's name in benchmarks/cascade_members.py
INPUT, OUTPUT = "image", "probabilities"
LABELS = ("cascade", "full")
ASK_BATCH = 16  # rows per request when the held-out rows are asked for their answers


def chorus(args: Sequence[str | Path], cwd: Path, ok: Sequence[int] = (0,)) -> int:
    """One ``chorus`` command, run to its end (its progress on this terminal); its exit code,
    which must be one of ``ok``."""
    argv = [sys.executable, "-m", "orchestrator", *map(str, args)]
    print("$ chorus " + " ".join(map(str, args)), flush=True)
    code = subprocess.run(argv, cwd=cwd, check=False).returncode
    if code not in ok:
        raise subprocess.CalledProcessError(code, argv)
    return code


def without_cascade(ensemble: Path) -> Path:
    """The same ensemble file, its ``combine.cascade`` section removed, beside it (so that the
    member paths, relative to the file, hold)."""
    spec = yaml.safe_load(ensemble.read_text())
    spec["combine"].pop("cascade")
    full = ensemble.with_name("full.yaml")
    full.write_text(yaml.safe_dump(spec, sort_keys=False))
    return full


@dataclass
class Served:
    """One ``chorus up``, running."""

    label: str
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def start(label: str, options: Sequence[str | Path], cwd: Path, timeout_s: float = 600.0) -> Served:
    """``chorus up OPTIONS`` on free ports, its output to ``cwd/LABEL.log``; returns once the
    ensemble is ready (or raises with the log's tail)."""
    grpc_port, http_port, metrics_port = _ports(3)
    log = cwd / f"{label}.log"
    args = [
        "up", *options, "--host", "127.0.0.1", "--grpc-port", grpc_port,
        "--http-port", http_port, "--metrics-port", metrics_port, "--drain-timeout", "5",
    ]  # fmt: skip
    print("$ chorus " + " ".join(map(str, args)) + f"  > {log}", flush=True)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", *map(str, args)],
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    served = Served(label, process, f"127.0.0.1:{grpc_port}", log)
    try:
        _wait_ready(served, timeout_s)
    except BaseException:
        stop(served)
        raise
    return served


def _wait_ready(served: Served, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with grpcclient.InferenceServerClient(served.url) as client:
        while True:
            if served.process.poll() is not None:
                raise RuntimeError(
                    f"chorus up ({served.label}) exited with {served.process.returncode}:\n"
                    + served.tail()
                )
            with contextlib.suppress(InferenceServerException):
                if client.is_model_ready(NAME, client_timeout=2.0):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"chorus up ({served.label}) not ready in {timeout_s:g} s")
            time.sleep(0.5)


def stop(served: Served, timeout_s: float = 120.0) -> None:
    """SIGTERM (``chorus up`` drains, then stops Triton), wait; kill only past the timeout."""
    if served.process.poll() is None:
        served.process.send_signal(signal.SIGTERM)
        try:
            served.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            served.process.kill()
            served.process.wait()


@contextlib.contextmanager
def deployments(options: dict[str, list[str | Path]], cwd: Path) -> Iterator[dict[str, Served]]:
    """Every ``chorus up`` (label -> its options) running; all stopped at the end."""
    running: dict[str, Served] = {}
    try:
        for label, given in options.items():
            running[label] = start(label, given, cwd)
        yield running
    finally:
        for served in running.values():
            stop(served)


@dataclass(frozen=True)
class Cell:
    """One deployment's measurement at one batch size and concurrency."""

    samples_per_s: float
    p50_ms: float
    p99_ms: float

    @classmethod
    def of(cls, measured: Load, batch: int) -> Cell:
        # benchmarks.baselines.load counts requests: each carries ``batch`` rows
        return cls(measured.samples_per_s * batch, measured.p50_ms, measured.p99_ms)


def measure(
    running: dict[str, Served], x: np.ndarray, seconds: float, rounds: int
) -> dict[tuple[str, int, int], list[Cell]]:
    """Every cell, every round, the two deployments one after the other in alternating order."""
    requests = {b: requests_for(NAME, INPUT, x, batch=b) for b in BATCHES}
    for served in running.values():  # a fresh deployment's first seconds run slow
        for b in BATCHES:
            load(served.url, requests[b], 8, 1.0)
    cells: dict[tuple[str, int, int], list[Cell]] = {}
    for r in range(rounds):
        order = list(running) if r % 2 == 0 else list(running)[::-1]
        for b in BATCHES:
            for c in CONCURRENCY:
                for label in order:
                    cell = Cell.of(load(running[label].url, requests[b], c, seconds), b)
                    cells.setdefault((label, b, c), []).append(cell)
                    print(
                        f"round {r + 1}, {label}, batch {b}, concurrency {c}: "
                        f"{cell.samples_per_s:,.0f} samples/s, p50 {cell.p50_ms:.2f} ms",
                        flush=True,
                    )
    return cells


@dataclass(frozen=True)
class Answers:
    probabilities: np.ndarray  # (rows, 10)
    tiers: np.ndarray | None  # (rows,) the tier that answered each row; None if not said


def ask(url: str, x: np.ndarray, parameters: dict[str, bool] | None = None) -> Answers:
    """Every row of ``x``, in requests of ``ASK_BATCH`` rows, with a stock Triton gRPC
    client; ``parameters``: the requests' (KServe request parameters)."""
    parts, tiers = [], []
    with grpcclient.InferenceServerClient(url) as client:
        for start in range(0, len(x), ASK_BATCH):
            rows = np.ascontiguousarray(x[start : start + ASK_BATCH])
            tensor = grpcclient.InferInput(INPUT, list(rows.shape), "FP32")
            tensor.set_data_from_numpy(rows)
            result = client.infer(NAME, [tensor], parameters=parameters)
            parts.append(result.as_numpy(OUTPUT))
            said = result.get_response().parameters
            if "chorus_tier" in said:
                tiers.append([int(t) for t in said["chorus_tier"].string_param.split(",")])
    said_all = len(tiers) == len(parts)
    return Answers(np.concatenate(parts), np.concatenate(tiers) if said_all else None)


def quality(running: dict[str, Served], x: np.ndarray, y: np.ndarray) -> list[str]:
    cascade = ask(running["cascade"].url, x)
    full = ask(running["full"].url, x)
    forced = ask(running["cascade"].url, x, {"cascade": False})
    top = {"cascade": cascade.probabilities.argmax(-1), "full": full.probabilities.argmax(-1)}
    fidelity = float(np.mean(top["cascade"] == top["full"]))
    forced_same = float(np.mean(forced.probabilities.argmax(-1) == top["full"]))
    forced_gap = float(np.max(np.abs(forced.probabilities - full.probabilities)))
    lines = [
        f"On the {len(y)} held-out rows (requests of {ASK_BATCH} rows, one at a time):",
        "",
        f"- **fidelity {fidelity:.2%}** (target {HELD_OUT_TARGET:.1%}: the share of rows whose "
        f"top-1 is the full ensemble's; {int(np.sum(top['cascade'] != top['full']))} rows "
        "differ)",
        *(f"- accuracy, {label}: {np.mean(top[label] == y):.2%}" for label in LABELS),
        f"- the cascade asked with `cascade: false`: top-1 equal to the full ensemble's on "
        f"{forced_same:.2%} of rows, probabilities within {forced_gap:.2g}",
    ]
    if cascade.tiers is None:
        lines.append("- rows answered per tier: not said (no `chorus_tier` in the answers)")
    else:
        counts = np.bincount(cascade.tiers, minlength=2)
        lines.append(
            "- rows answered per tier (`chorus_tier`): "
            + ", ".join(f"tier {t}: {n / len(y):.1%} ({n})" for t, n in enumerate(counts.tolist()))
        )
    if forced.tiers is not None:
        lines.append(
            "- `chorus_tier` of the `cascade: false` answers: "
            + ", ".join(f"{t}: {n}" for t, n in enumerate(np.bincount(forced.tiers).tolist()))
        )
    return lines


def throughput_table(cells: dict[tuple[str, int, int], list[Cell]]) -> list[str]:
    lines = [
        "| batch | concurrency | cascade samples/s | full samples/s | cascade / full "
        "(median of rounds) | rounds | cascade p50 / p99 ms | full p50 / p99 ms |",
        "|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    summary = []
    for b in BATCHES:
        for c in CONCURRENCY:
            ours, theirs = cells["cascade", b, c], cells["full", b, c]
            ratios = [o.samples_per_s / t.samples_per_s for o, t in zip(ours, theirs, strict=True)]

            def median(runs: list[Cell], field: str) -> float:
                return statistics.median(getattr(run, field) for run in runs)

            lines.append(
                f"| {b} | {c} | {median(ours, 'samples_per_s'):,.0f} | "
                f"{median(theirs, 'samples_per_s'):,.0f} | {statistics.median(ratios):.2f}x | "
                f"{', '.join(f'{r:.2f}' for r in ratios)} | {median(ours, 'p50_ms'):.2f} / "
                f"{median(ours, 'p99_ms'):.2f} | {median(theirs, 'p50_ms'):.2f} / "
                f"{median(theirs, 'p99_ms'):.2f} |"
            )
            summary.append(f"batch {b}, concurrency {c}: {statistics.median(ratios):.2f}x")
    return [*lines, "", "Cascade / full throughput: " + "; ".join(summary) + "."]


def members_table(built: Built) -> list[str]:
    tier = {**dict.fromkeys(CHEAP, 0), **dict.fromkeys(EXPENSIVE, 1)}
    lines = [
        f"| member | tier | cost a sample at batch {COST_BATCH} (onnxruntime, 1 thread) | "
        "held-out accuracy |",
        "|---|---:|---:|---:|",
        *(
            f"| {m} | {tier[m]} | {built.cost_ms[m] * 1000:.1f} us | {built.accuracy[m]:.2%} |"
            for m in (*CHEAP, *EXPENSIVE)
        ),
        f"| full ensemble (mean of softmaxes) | | | {built.accuracy['ensemble']:.2%} |",
        "",
        f"The cheapest expensive member costs **{built.cost_ratio:.1f}x** the dearest cheap "
        f"one a sample; the members trained in {built.train_s:.1f} s.",
    ]
    return lines


def calibration_lines(found: dict[str, Any]) -> list[str]:
    """What ``chorus calibrate`` chose, said in a sentence, then its file."""
    if found.get("tiers") is None:
        said = (
            f"No cascade met the target {found['target']:g} (the best fidelity reached "
            f"{found.get('best_fidelity') or 0:.2%}): the cascade deployment serves the full "
            "ensemble."
        )
    else:
        tiers = " then ".join("[" + ", ".join(t) + "]" for t in found["tiers"])
        accuracy = (
            ""
            if found.get("accuracy") is None
            else f", accuracy {found['accuracy']:.2%} (full ensemble {found['full_accuracy']:.2%})"
        )
        said = (
            f"Chosen: {tiers}, exit {found['exit']} >= {found['threshold']:.4g}; on the "
            f"{found['rows']} validation rows the tiers are reached by "
            + ", ".join(f"{r:.1%}" for r in found["reach"])
            + f" of the rows, fidelity {found['fidelity']:.2%}{accuracy}, expected cost "
            f"{found['cost']:.1%} of the full ensemble's."
        )
    return [said, "", "```json", json.dumps(found), "```"]


def plan_line(label: str, plan: dict[str, Any]) -> str:
    """A deployment's plan (from its ``plan.json``) in one line."""
    line = (
        f"- plan, {label}: instances "
        + ", ".join(f"{m} {sum(per.values())}" for m, per in plan["instances"].items())
        + "; batch sizes "
        + ", ".join(f"{m} {b}" for m, b in plan["max_batch_size"].items())
        + f"; predicted {plan['predicted_throughput']:,.0f} samples/s"
    )
    if plan.get("shares"):
        line += (
            " (shares of the rows: "
            + ", ".join(f"{m} {share:.3g}" for m, share in plan["shares"].items())
            + "; the full ensemble's plan predicted "
            + f"{plan.get('full_ensemble_throughput') or 0:,.0f})"
        )
    return line + "."


def _commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved; the median is kept")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cascade.md"))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="chorus-cascade-"))
    try:
        built = build(root / "members")
        print(f"members built in {root / 'members'} (cost ratio {built.cost_ratio:.1f}x)")
        files = {"cascade": built.ensemble, "full": without_cascade(built.ensemble)}
        workdirs = {label: root / f"work-{label}" for label in LABELS}
        # the members measured once, without the cascade (its threshold is not chosen yet);
        # every command after is given this profile
        profile = root / "profile.json"
        chorus(["profile", files["full"], "-o", profile, "--workdir", workdirs["full"]], root)
        calibration_file = workdirs["cascade"] / "calibration.json"
        # exit code 1: no cascade met the target (the file then says so, and up serves the
        # full ensemble), which the report shows
        chorus(
            [
                "calibrate", built.ensemble, "--inputs", built.val_inputs,
                "--fidelity", str(FIDELITY),
                "--profile", profile, "--workdir", workdirs["cascade"],
                "-o", calibration_file,
            ],
            root,
            ok=(0, 1),
        )  # fmt: skip
        calibration = json.loads(calibration_file.read_text())
        x_test, y_test = np.load(built.test_inputs), np.load(built.test_labels)
        options: dict[str, list[str | Path]] = {
            label: [files[label], "--workdir", workdirs[label], "--profile", profile]
            for label in LABELS
        }
        options["cascade"] += ["--calibration", calibration_file]
        with deployments(options, root) as running:
            cells = measure(running, x_test, args.seconds, args.rounds)
            held_out = quality(running, x_test, y_test)
            plans = {
                label: json.loads((workdirs[label] / "plan.json").read_text())
                for label in LABELS
                if (workdirs[label] / "plan.json").is_file()
            }
    except BaseException:
        print(f"kept {root} (the members, the work folders, chorus up's logs)", file=sys.stderr)
        raise
    shutil.rmtree(root, ignore_errors=True)

    devices = discover()
    cpu = devices[-1]
    gpus = [d.name for d in devices if d.kind == "gpu"]
    lines = [
        "# A calibrated cascade against the full ensemble",
        "",
        f"`python -m benchmarks.cascade --seconds {args.seconds:g} --rounds {args.rounds}` at "
        f"{_commit()} (uncommitted changes included), on {platform.node()}: {cpu.cores} CPU "
        f"cores ({cpu.name}), {', '.join(gpus) if gpus else 'no GPU'}, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}; the bundled Triton (Python "
        "backend running each member's ONNX file). Both deployments (`chorus up`, one "
        "combiner worker each) run at once on these cores with the clients, and are measured "
        "in turn: in each round, each cell measures the two one after the other "
        f"({args.seconds:g} s each, closed loop, prebuilt gRPC requests of the held-out rows), "
        "in alternating order. Throughput in samples (rows) per second; each figure is the "
        "median over the rounds, the ratio the median of the rounds' ratios.",
        "",
        "## The members",
        "",
        "scikit-learn's digits upscaled to 32x32 (bilinear), split 60 / 20 / 20 (seeded): "
        "training, validation (for `chorus calibrate`), held-out (everything below).",
        "",
        *members_table(built),
        "",
        "## Calibration",
        "",
        f"`chorus calibrate ensemble.yaml --inputs val_inputs.npy --fidelity {FIDELITY} "
        "--profile profile.json` (tiers fixed in the file: the MLPs, then the CNNs; exit: "
        "confidence, its threshold chosen by calibrate; no labels, so a cascade is judged by "
        f"its fidelity to the full ensemble on the validation rows, at least {FIDELITY:.1%}, "
        "stricter than the 99.5% the held-out rows must keep).",
        "",
        *calibration_lines(calibration),
        "",
        *(plan_line(label, plan) for label, plan in plans.items()),
        "",
        "## Throughput and latency",
        "",
        *throughput_table(cells),
        "",
        "## Answers on the held-out rows",
        "",
        *held_out,
        "",
    ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
