"""Chorus at this checkout against Chorus at another commit, side by side, on the same machine.

    python -m benchmarks.ab --old REV [--rounds 3] [--seconds 3] [--ensemble digits|one]

Each version serves the digits ensemble from its own code (a git worktree of REV; this
checkout), beside Triton's native ensemble on the same members (``--ensemble one``: a
one-member ensemble of its cnn, beside that member called directly); batch-1 clients at
concurrency 1, 8 and 64 measure both, and the CPU per request of the combiner and of Triton
(their process trees, from /proc).
The versions alternate, round after round, and each is judged by its ratio to the native
ensemble measured in the same round, so the machine's drift between minutes cancels out. Kept
in benchmarks/results/ab.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.report import publish
from orchestrator.examples.digits.train import HERE, load_split, train_members

CONCURRENCY = (1, 8, 64)

# One round, run with a checkout's own code: its benchmarks.baselines helpers (this is why the
# key to Triton is passed only where that code has it).
ROUND = """
import inspect, json, sys, tempfile
from pathlib import Path
from benchmarks.baselines import add_baselines, load, requests_for, served
try:
    from benchmarks.baselines import cpu_seconds, descendants
except ImportError:  # a checkout from before they were there
    cpu_seconds = descendants = None
try:
    from orchestrator.examples.digits.train import HERE, load_split
    from orchestrator.planning.spec import load_ensemble
except ImportError:  # a checkout from before the sub-packages
    from examples.digits.train import HERE, load_split
    from orchestrator.spec import load_ensemble

seconds, kind = float(sys.argv[1]), sys.argv[2]
ensemble = load_ensemble(HERE / "ensemble.yaml")
x = load_split().x_test
if kind == "one":  # one member, beside itself called directly
    member = next(m for m in ensemble.members if m.name == "cnn")
    ((_, member_input),) = member.input_map
    one = Path(tempfile.mkdtemp()) / "one.yaml"
    one.write_text(
        f"name: one\\nmembers:\\n  - {{name: cnn, path: {member.path}}}\\n"
        "combine: {rule: mean, softmax: true}\\nserving: {max_batch_size: 64}\\n"
    )
    ensemble = load_ensemble(one)
keyed = "headers" in inspect.signature(load).parameters
out = {}
with served(ensemble, "chorus-ab-") as d:
    key = getattr(d.endpoints, "triton_headers", {})
    extra = (key,) if keyed else ()
    if kind == "one":
        native = requests_for("cnn", member_input, x)
    else:
        add_baselines(ensemble, d.workdir / "repository", d.endpoints.triton_grpc, 64, *extra)
        native = requests_for("native", "image", x)
    ours = requests_for(ensemble.name, "image", x)
    pids = descendants(d.combiner.pid) if descendants else []
    triton = descendants(d.triton.process.pid) if descendants else []
    for c in (1, 8, 64):
        n = load(d.endpoints.triton_grpc, native, c, seconds, *extra)
        before = (cpu_seconds(pids), cpu_seconds(triton)) if pids else (0.0, 0.0)
        o = load(d.endpoints.ensemble, ours, c, seconds)
        per = 1000 / max(o.requests, 1)
        cpu = (cpu_seconds(pids) - before[0]) * per if pids else None
        triton_cpu = (cpu_seconds(triton) - before[1]) * per if pids else None
        out[c] = [o.samples_per_s, n.samples_per_s, o.p50_ms, n.p50_ms, cpu, triton_cpu]
print("RESULT " + json.dumps(out))
"""


def run_round(tree: Path, seconds: float, kind: str) -> dict[int, list[float]]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, "-c", ROUND, str(seconds), kind],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return {int(c): v for c, v in json.loads(line.removeprefix("RESULT ")).items()}
    raise SystemExit(f"a round in {tree} failed:\n{done.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--old", required=True, help="the commit to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument(
        "--ensemble",
        choices=("digits", "one"),
        default="digits",
        help="digits: the 4 members beside Triton's native ensemble; one: its cnn alone, "
        "beside the member called directly",
    )
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/ab.md (ab_one.md)")
    args = parser.parse_args()
    out = args.out or Path(f"benchmarks/results/ab{'_one' if args.ensemble == 'one' else ''}.md")
    here = Path.cwd()
    models = HERE / "models"
    if not (models / "cnn.onnx").is_file():
        train_members(models, load_split())
    old_rev = subprocess.run(
        ["git", "rev-parse", "--short", args.old], capture_output=True, text=True, check=True
    ).stdout.strip()
    new_rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    old_tree = Path(tempfile.mkdtemp(prefix="chorus-ab-")) / "old"
    subprocess.run(["git", "worktree", "add", "--detach", str(old_tree), args.old], check=True)
    try:
        example = old_tree / "orchestrator" / "examples" / "digits"
        if not example.is_dir():  # a checkout from before the sub-packages
            example = old_tree / "examples" / "digits"
        shutil.copytree(models, example / "models")
        runs: dict[str, list[dict[int, list[float]]]] = {"old": [], "new": []}
        for r in range(args.rounds):
            for version, tree in (("old", old_tree), ("new", here))[:: 1 if r % 2 == 0 else -1]:
                runs[version].append(run_round(tree, args.seconds, args.ensemble))
                print(f"round {r + 1}: {version} done", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], check=False)

    one = args.ensemble == "one"
    native = "the member" if one else "native"
    lines = [
        "# Chorus against an earlier commit",
        "",
        f"`python -m benchmarks.ab --old {args.old} --rounds {args.rounds} --seconds "
        f"{args.seconds:g}{' --ensemble one' if one else ''}`: old = {old_rev}, new = "
        f"{new_rev} (uncommitted changes included). "
        + (
            "A one-member ensemble (the digits cnn), batch-1 clients, closed loop; each "
            "version measured beside that member called directly on its Triton in the same "
            "round, rounds alternating."
            if one
            else "The digits ensemble, batch-1 clients, closed loop; each version measured "
            "beside Triton's native ensemble in the same round, rounds alternating."
        ),
        "",
        f"| concurrency | version | Chorus / {native}, each round | median | Chorus requests/s, "
        f"median | Chorus p50 - {native} p50 (ms), median | combiner CPU ms/request, each "
        "round | median | Triton CPU ms/request (through Chorus), median |",
        "|---:|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for c in CONCURRENCY:
        for version in ("old", "new"):
            ratios = [run[c][0] / run[c][1] for run in runs[version]]
            added = [run[c][2] - run[c][3] for run in runs[version]]
            cpu = [run[c][4] for run in runs[version] if len(run[c]) > 4 and run[c][4] is not None]
            triton = [run[c][5] for run in runs[version] if len(run[c]) > 5]
            served = statistics.median(run[c][0] for run in runs[version])
            lines.append(
                f"| {c} | {version} | {', '.join(f'{x:.2f}' for x in ratios)} | "
                f"{statistics.median(ratios):.2f} | {served:,.0f} | "
                f"{statistics.median(added):+.2f} | "
                + (
                    f"{', '.join(f'{x:.3f}' for x in cpu)} | {statistics.median(cpu):.3f} | "
                    if cpu
                    else "— | — | "
                )
                + (f"{statistics.median(triton):.3f} |" if triton else "— |")
            )
    publish(lines, out)


if __name__ == "__main__":
    main()
