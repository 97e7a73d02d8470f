"""`docker compose up` on the Chorus image (made by docker/prepare.sh, which `make test` runs),
through `docker compose` itself (the v2 plugin prepare.sh installs where the client lacks it):
the README's deploy lines run as written, the CPU variant serves the example ensemble to a stock
tritonclient on a published loopback port, and `docker compose down -v` leaves nothing behind.
Both compose files (CPU and GPU) pass `config`."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from orchestrator.deploying.launch import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKER = "docker"  # the client a user types: the first on PATH
COMPOSE = [DOCKER, "compose"]
FILES = {"cpu": ["compose.yaml"], "gpu": ["compose.yaml", "compose.gpu.yaml"]}


def test_docker_compose_is_the_v2_plugin():
    done = subprocess.run(
        [*COMPOSE, "version", "--short"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"no `docker compose` (bash docker/prepare.sh): {done.stderr}"
    assert int(done.stdout.strip().lstrip("v").split(".")[0]) >= 2, done.stdout


@pytest.mark.parametrize("variant", sorted(FILES))
def test_compose_files_pass_config(variant):
    args = [a for f in FILES[variant] for a in ("-f", str(ROOT / f))]
    done = subprocess.run(
        [*COMPOSE, *args, "config"], capture_output=True, text=True, check=False, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert "127.0.0.1" in done.stdout  # published on loopback only
    if variant == "gpu":
        assert "nvcr.io/nvidia/tritonserver:24.12-py3" in done.stdout


class Compose:
    """One compose project on this machine's engine, with its own published port."""

    def __init__(self, cwd: Path, files: list[str], env: dict[str, str] | None = None) -> None:
        self.cwd = cwd
        self.files = [a for f in files for a in ("-f", f)]
        self.name = f"chorustest{os.getpid()}{len(os.listdir(cwd))}"
        self.grpc_port = free_port()
        self.env = {
            **os.environ,
            "COMPOSE_PROJECT_NAME": self.name,
            "CHORUS_GRPC_PORT": str(self.grpc_port),
            "CHORUS_HTTP_PORT": str(free_port()),
            "CHORUS_METRICS_PORT": str(free_port()),
            **(env or {}),
        }

    def __call__(
        self, *args: str, stdin: str | None = None, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*COMPOSE, *self.files, *args],
            cwd=self.cwd,
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def up(self) -> float:
        """``up -d --wait``; the seconds until the ensemble answered a first request."""
        began = time.monotonic()
        up = self("up", "-d", "--wait", "--no-build")
        assert up.returncode == 0, up.stderr + self.logs()
        x = np.zeros((1, 1, 8, 8), np.float32)
        while True:
            try:
                self.infer(x)
                return time.monotonic() - began
            except InferenceServerException:
                assert time.monotonic() - began < 600, self.logs()
                time.sleep(0.5)

    def logs(self) -> str:
        """Each service's last lines: the one that failed is among them, whichever it is."""
        return self("logs", "--no-color", "--tail", "40").stdout

    def infer(self, x: np.ndarray) -> np.ndarray:
        """The ensemble's answer, asked with a stock tritonclient on the published port."""
        with grpcclient.InferenceServerClient(f"127.0.0.1:{self.grpc_port}") as client:
            tensor = grpcclient.InferInput("image", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            return client.infer("digits", [tensor], client_timeout=60).as_numpy("probabilities")

    def python(self, service: str, code: str, stdin: object = None) -> object:
        """Run Python in a service's container (JSON in, JSON out)."""
        done = self("exec", "-T", service, "python3", "-c", code, stdin=json.dumps(stdin))
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def direct(self, x: np.ndarray) -> np.ndarray:
        """The example's answer for ``x``: its member files copied out of the deployment, run
        here with onnxruntime."""
        import onnxruntime as ort

        if not hasattr(self, "_sessions"):
            paths = self.python("combiner", MEMBERS)
            assert isinstance(paths, list)
            self._sessions = []
            for path in paths:
                data = self.python("combiner", READ, f"/deploy/example/{path}")
                assert isinstance(data, str)
                self._sessions.append(ort.InferenceSession(bytes.fromhex(data)))
        outs = []
        for s in self._sessions:
            z = s.run(None, {s.get_inputs()[0].name: x})[0]
            e = np.exp(z - z.max(1, keepdims=True))
            outs.append(e / e.sum(1, keepdims=True))
        return np.mean(outs, 0)

    def down(self) -> None:
        down = self("down", "-v", "--timeout", "40")
        assert down.returncode == 0, down.stderr
        for what in ("container", "network", "volume"):
            assert _project(self.name, what) == [], what


MEMBERS = """
import json, yaml
spec = yaml.safe_load(open('/deploy/example/ensemble.yaml'))
print(json.dumps([m['path'] for m in spec['members']]))
"""

READ = """
import json, sys
print(json.dumps(open(json.load(sys.stdin), 'rb').read().hex()))
"""

CONFIGS = """
import glob, json
paths = sorted(glob.glob('/deploy/repository/*/config.pbtxt'))
print(json.dumps({p: open(p).read() for p in paths}))
"""

COUNTS = """
import json, sys, tritonclient.grpc as g
key = open('/deploy/triton.key').read().strip()
out = {}
for node, address in json.load(sys.stdin).items():
    with g.InferenceServerClient(address) as c:
        stats = c.get_inference_statistics(headers={'triton-grpc-protocol-chorus-key': key},
                                           as_json=True)
    out[node] = {s['name']: int(s.get('inference_count', 0)) for s in stats['model_stats']}
print(json.dumps(out))
"""


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
    compose = Compose(checkout, ["compose.yaml"])
    try:
        seconds = compose.up()
        print(f"docker compose up to the first answer: {seconds:.1f} s")
        x = np.random.default_rng(11).random((5, 1, 8, 8), np.float32)
        np.testing.assert_allclose(compose.infer(x), compose.direct(x), rtol=1e-4, atol=1e-6)
    finally:
        compose.down()


def test_two_nodes_in_compose_answer_like_one_and_split_calls_as_planned():
    compose = Compose(ROOT / "tests" / "docker", ["two-nodes.yaml"])
    try:
        compose.up()
        plan = compose.python("combiner", "print(open('/deploy/plan.json').read())")
        assert isinstance(plan, dict)
        nodes = {d["id"]: d["node"] for d in plan["devices"]}
        share = {
            m: {n: sum(c for d, c in per.items() if nodes[d] == n) for n in ("node0", "node1")}
            for m, per in plan["instances"].items()
        }
        assert all(any(s[n] for s in share.values()) for n in ("node0", "node1")), share
        addresses = {"node0": "triton0:8001", "node1": "triton1:8001"}
        before = compose.python("combiner", COUNTS, addresses)
        rng = np.random.default_rng(12)
        batches, rows = 30, 4
        for _ in range(batches):  # one after another: each request a batch of its own
            x = rng.random((rows, 1, 8, 8), np.float32)
            np.testing.assert_allclose(compose.infer(x), compose.direct(x), rtol=1e-4, atol=1e-6)
        after = compose.python("combiner", COUNTS, addresses)
        assert isinstance(before, dict) and isinstance(after, dict)
        for member, on in share.items():
            total = sum(on.values())
            for node in ("node0", "node1"):
                got = after[node].get(member, 0) - before[node].get(member, 0)
                expected = batches * rows * on[node] / total
                assert abs(got - expected) <= rows, (member, node, got, expected, share)
    finally:
        compose.down()


def test_regenerate_configs_in_compose_reloads_only_what_changed_while_serving():
    hardware = "/etc/chorus/hardware/"
    compose = Compose(
        ROOT,
        ["compose.yaml", "tests/docker/reload.yaml"],
        {"CHORUS_HARDWARE": hardware + "small.yaml"},
    )
    try:
        compose.up()
        before = compose.python("combiner", CONFIGS)
        results: list[tuple[float, str]] = []  # (when, outcome)
        stop = threading.Event()

        def load(seed: int) -> None:
            rng = np.random.default_rng(seed)
            while not stop.is_set():
                x = rng.random((int(rng.integers(1, 32)), 1, 8, 8), np.float32)
                try:
                    got = compose.infer(x)
                except InferenceServerException as e:
                    results.append((time.monotonic(), e.status() or "?"))
                    continue
                right = np.allclose(got, compose.direct(x), 1e-4, 1e-6)
                results.append((time.monotonic(), "ok" if right else "WRONG"))

        compose.direct(np.zeros((1, 1, 8, 8), np.float32))  # the members, copied out first
        threads = [threading.Thread(target=load, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        switch_began = time.monotonic()
        regenerate = compose(
            "run", "--rm", "-e", f"CHORUS_HARDWARE={hardware}large.yaml", "planner"
        )
        switch_ended = time.monotonic()
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(90)
            assert not t.is_alive(), "a client hangs"
        assert regenerate.returncode == 0, regenerate.stderr
        after = compose.python("combiner", CONFIGS)
    finally:
        compose.down()
    assert isinstance(before, dict) and isinstance(after, dict)
    changed = sorted(p.split("/")[-2] for p in after if before.get(p) != after[p])
    (line,) = [x for x in regenerate.stdout.splitlines() if x.startswith("reloaded: ")]
    reloaded = line.removeprefix("reloaded: ").split(", ")
    assert changed, regenerate.stdout
    assert sorted(n for n in reloaded if not n.endswith("__fanout")) == [
        c for c in changed if not c.endswith("__fanout")
    ]
    outcomes = [o for _, o in results]
    assert "WRONG" not in outcomes
    assert set(outcomes) <= {"ok", "StatusCode.UNAVAILABLE"}, sorted(set(outcomes))
    # answered throughout: during the switch and after it, not only before (an outage passed)
    during = [o for t, o in results if switch_began <= t <= switch_ended]
    after_switch = [o for t, o in results if t > switch_ended]
    assert during.count("ok") > 0 and after_switch.count("ok") > 0, (during, after_switch)


def _readme_deploy_lines() -> list[str]:
    """The README's CPU deploy block, one command a line (a backslash continues it)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    (block,) = [b for b in blocks if "docker compose up -d --wait" in b]
    lines: list[str] = []
    continued = False
    for line in block.splitlines():
        if continued:
            lines[-1] += "\n" + line
        elif line.strip():
            lines.append(line)
        continued = line.rstrip().endswith("\\")
    return lines


def _held(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def test_readme_deploy_lines_run_as_written_and_down_leaves_nothing_of_the_project():
    """`docker compose up -d --wait`, the client one-liner and `docker compose down -v`, as the
    README has them, from the repository's root: its default project (named after the folder)
    and its fixed ports, with the venv's `python` first on PATH."""
    lines = _readme_deploy_lines()
    assert lines[0].startswith("docker compose up -d --wait"), lines
    assert lines[-1].startswith("docker compose down -v"), lines
    env = {
        k: v
        for k, v in os.environ.items()  # nothing that moves the project, its files or ports
        if not k.startswith("COMPOSE_")
        and not (k.startswith("CHORUS_") and k not in ("CHORUS_IMAGE", "CHORUS_BASE_IMAGE"))
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    config = subprocess.run(
        [*COMPOSE, "config", "--format", "json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    project = json.loads(config.stdout)
    name = project["name"]
    for what in ("container", "network", "volume"):
        assert _project(name, what) == [], f"project {name} runs already ({what}s): not ours"
    ports = [int(p["published"]) for s in project["services"].values() for p in s.get("ports", [])]
    held = [p for p in ports if _held(p)]
    assert not held, f"the README's ports {ports} are needed free on 127.0.0.1; held: {held}"
    downed = False
    try:
        for line in lines:
            began = time.monotonic()
            done = subprocess.run(
                ["bash", "-c", line],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
                check=False,
            )
            print(f"{time.monotonic() - began:6.1f} s  {line.splitlines()[0]}")
            logs = "" if done.returncode == 0 else _logs(env)
            assert done.returncode == 0, f"{line}\n{done.stdout}{done.stderr}{logs}"
            if "tritonclient" in line:
                assert done.stdout.startswith("[["), done.stdout  # the probabilities, printed
            downed = line.startswith("docker compose down")
    finally:
        if not downed:
            subprocess.run(
                [*COMPOSE, "down", "-v", "--timeout", "40"], cwd=ROOT, env=env, check=False
            )
    for what in ("container", "network", "volume"):
        assert _project(name, what) == [], what


def _logs(env: dict[str, str]) -> str:
    done = subprocess.run(
        [*COMPOSE, "logs"], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    return done.stdout[-5000:]
