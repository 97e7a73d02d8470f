"""Deadline and quorum against real Python-backend members: one sleeps past the deadline, one
raises. A partial answer names its contributors; below the quorum, DEADLINE_EXCEEDED; the server
keeps serving and never mixes a late answer into another request."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from combiner.client import DeadlineExceeded, EnsembleClient
from combiner.config import CombinerConfig, MemberRoute, TensorInfo
from combiner.rules import softmax
from orchestrator.launch import ManagedProcess, TritonServer, free_port
from orchestrator.render import InstanceGroup, render_repository
from orchestrator.spec import load_ensemble
from orchestrator.up import _wait_combiner_ready
from tests.onnx_models import linear

PYTHON_MEMBER = """
import time
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "x").as_numpy()
            {body}
        return responses
"""
SLOW = (
    "time.sleep(1.5)\n            responses.append(pb_utils.InferenceResponse("
    "[pb_utils.Tensor('y', np.full((len(x), 3), 99.0, dtype=np.float32))]))"
)
BROKEN = "raise RuntimeError('this member is broken on purpose')"
CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 16
input [{{ name: "x", data_type: TYPE_FP32, dims: [4] }}]
output [{{ name: "y", data_type: TYPE_FP32, dims: [3] }}]
instance_group [{{ count: 1, kind: KIND_CPU }}]
"""


def python_member(repo: Path, name: str, body: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(CONFIG.format(name=name))
    (repo / name / "1" / "model.py").write_text(PYTHON_MEMBER.format(body=body))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("deadline")
    linear(root / "a.onnx", seed=1)
    linear(root / "b.onnx", seed=2)
    (root / "ensemble.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "toy",
                "members": [{"name": "a", "path": "a.onnx"}, {"name": "b", "path": "b.onnx"}],
            }
        )
    )
    ensemble = load_ensemble(root / "ensemble.yaml")
    repo = root / "repo"
    render_repository(
        ensemble,
        repo,
        "python",
        {m: (InstanceGroup("cpu", 1),) for m in "ab"},
        {"a": 16, "b": 16},
        1,
    )
    python_member(repo, "slow", SLOW)
    python_member(repo, "broken", BROKEN)
    names = ["a", "b", "slow", "broken"]
    with TritonServer(repo, root / "triton", names) as triton:
        combiners = {}
        for quorum in (2, 3):
            config = CombinerConfig(
                name="toy",
                triton_url=triton.grpc_url,
                max_batch_size=16,
                inputs=(TensorInfo(name="x", dtype="FP32", shape=(4,)),),
                outputs=(TensorInfo(name="y", dtype="FP32", shape=(3,)),),
                members=tuple(
                    MemberRoute(name=n, inputs={"x": "x"}, outputs={"y": "y"}) for n in names
                ),
                softmax=True,
                deadline_ms=400,
                quorum=quorum,
            )
            path = root / f"combiner-{quorum}.json"
            config.save(path)
            port = free_port()
            process = ManagedProcess(
                f"combiner-{quorum}",
                [sys.executable, "-m", "combiner", "--config", str(path), "--grpc-port", str(port)],
                root / f"combiner-{quorum}.log",
                stop_signal=signal.SIGTERM,
            )
            process.start()
            _wait_combiner_ready(process, f"127.0.0.1:{port}", time.monotonic() + 60)
            combiners[quorum] = (process, f"127.0.0.1:{port}")
        try:
            yield ensemble, combiners
        finally:
            for process, _ in combiners.values():
                process.stop()


def reference(ensemble, x, members=("a", "b")):
    outs = [
        softmax(ort.InferenceSession(str(m.path)).run(None, {"x": x})[0])
        for m in ensemble.members
        if m.name in members
    ]
    return np.mean(outs, axis=0)


def test_a_partial_answer_names_its_contributors_and_why_others_are_missing(stack):
    ensemble, combiners = stack
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    with EnsembleClient(combiners[2][1]) as client:
        began = time.monotonic()
        answer = client.infer(x)
        waited = time.monotonic() - began
    assert answer.contributors == ("a", "b")
    assert answer.partial
    assert "slow (no answer within 400 ms)" in answer.missing
    assert "broken (" in answer.missing and "broken on purpose" in answer.missing
    np.testing.assert_allclose(answer.outputs["y"], reference(ensemble, x), rtol=1e-5)
    assert waited < 1.4  # answered at the deadline, not when the slow member finished


def test_below_quorum_the_request_gets_deadline_exceeded_naming_the_missing(stack):
    _, combiners = stack
    with EnsembleClient(combiners[3][1]) as client, pytest.raises(DeadlineExceeded) as e:
        client.infer(np.zeros((1, 4), dtype=np.float32))
    assert "2 of 4 members answered, below the quorum of 3" in str(e.value)
    assert "slow (no answer" in str(e.value)


def test_a_longer_per_request_deadline_lets_the_slow_member_in(stack):
    ensemble, combiners = stack
    x = np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)
    with EnsembleClient(combiners[3][1]) as client:
        answer = client.infer(x, deadline_ms=5000)
    assert answer.contributors == ("a", "b", "slow")
    assert answer.missing.startswith("broken (")
    slow = softmax(np.full((2, 3), 99.0))
    expected = (2 * reference(ensemble, x) + slow) / 3
    np.testing.assert_allclose(answer.outputs["y"], expected, rtol=1e-5)


def test_late_answers_never_reach_later_requests_and_serving_goes_on(stack):
    ensemble, combiners = stack
    with EnsembleClient(combiners[2][1]) as client:
        for seed in range(4):  # the slow member's answers to earlier requests arrive meanwhile
            x = np.random.default_rng(10 + seed).normal(size=(seed + 1, 4)).astype(np.float32)
            answer = client.infer(x)
            assert answer.contributors == ("a", "b")
            np.testing.assert_allclose(answer.outputs["y"], reference(ensemble, x), rtol=1e-5)


def test_a_bad_deadline_parameter_is_refused(stack):
    _, combiners = stack
    from combiner.client import InvalidRequest

    with EnsembleClient(combiners[2][1]) as client, pytest.raises(InvalidRequest, match="positive"):
        client.infer(np.zeros((1, 4), dtype=np.float32), deadline_ms=-5)
