"""How long `docker compose up` takes to a first answer, and how big the image is.

    python -m benchmarks.compose_up [--rounds 3]

Each round is a fresh project (new volume: the planner trains the example, measures the
members' profile and plans, then Triton and the combiner start), timed from `up -d` to the
first correct answer of a stock tritonclient on the published port; then `down -v`. Needs the
image and `docker compose` v2 (`make image`, i.e. docker/prepare.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from benchmarks.report import publish
from orchestrator.deploying.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ["docker", "compose"]  # the v2 plugin (docker/prepare.sh installs it where missing)
IMAGE = os.environ.get("CHORUS_IMAGE", "chorus:latest")


def one_round(i: int) -> tuple[float, float]:
    """(seconds to the first answer, seconds of it before the planner had finished)."""
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "compose.yaml").write_text((ROOT / "compose.yaml").read_text())
        port = free_port()
        env = {
            **os.environ,
            "COMPOSE_PROJECT_NAME": f"chorusbench{os.getpid()}{i}",
            "CHORUS_GRPC_PORT": str(port),
            "CHORUS_HTTP_PORT": str(free_port()),
            "CHORUS_METRICS_PORT": str(free_port()),
        }

        def compose(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*COMPOSE, *args], cwd=folder, env=env, capture_output=True, text=True, check=False
            )

        try:
            began = time.monotonic()
            up = compose("up", "-d", "--no-build")
            if up.returncode != 0:
                raise SystemExit(up.stderr)
            x = np.zeros((1, 1, 8, 8), np.float32)
            tensor = grpcclient.InferInput("image", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            with grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as client:
                while True:
                    try:
                        client.infer("digits", [tensor], client_timeout=10)
                        break
                    except InferenceServerException:
                        if time.monotonic() - began > 900:
                            raise SystemExit(compose("logs").stdout[-5000:]) from None
                        time.sleep(0.2)
            first = time.monotonic() - began
            state = json.loads(
                subprocess.run(
                    ["docker", "inspect", f"{env['COMPOSE_PROJECT_NAME']}-planner-1"],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            )[0]["State"]
            started = _seconds(state["StartedAt"])
            planner = _seconds(state["FinishedAt"]) - started
            return first, planner
        finally:
            compose("down", "-v", "--timeout", "40")


def _seconds(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp[:26].rstrip("Z") + "+00:00").timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    size = int(
        subprocess.run(
            ["docker", "image", "inspect", IMAGE, "--format", "{{.Size}}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    rounds = [one_round(i) for i in range(args.rounds)]
    lines = [
        "# docker compose up: time to the first answer, and the image",
        "",
        f"`python -m benchmarks.compose_up --rounds {args.rounds}` on this machine (2 cores, CPU "
        f"variant: the bundled Triton), image `{IMAGE}` built by `docker/prepare.sh` from a "
        "debootstrap'd Debian bookworm.",
        "",
        f"Image size: {size / 1e9:.2f} GB ({size:,} bytes, as `docker image inspect` reports).",
        "",
        "| round | up -d to the first answer (s) | of which the planner (s) |",
        "|---:|---:|---:|",
        *(f"| {i + 1} | {a:.1f} | {p:.1f} |" for i, (a, p) in enumerate(rounds)),
        "",
        "The planner trains the digits example (4 members), measures their profile on its own",
        "Triton and plans, on a fresh volume each round; with `CHORUS_PROFILE` and a trained",
        "ensemble given, that part is the planning alone.",
    ]
    publish(lines, ROOT / "benchmarks" / "results" / "compose_up.md")


if __name__ == "__main__":
    main()
