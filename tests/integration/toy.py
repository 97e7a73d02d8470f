"""A toy ensemble on a real tritonserver, with members that misbehave on purpose: two linear
ONNX members, and Python-backend members that are slow, broken, or hung. Combiners are started
as ``python -m combiner`` processes on it, each with its own config."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from combiner.config import CombinerConfig, MemberRoute, TensorInfo
from orchestrator.deploying.launch import ManagedProcess, TritonServer, free_port
from orchestrator.deploying.render import InstanceGroup, render_repository
from orchestrator.deploying.up import _wait_combiner_ready
from orchestrator.planning.spec import Ensemble, load_ensemble
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


def sleeping(seconds: float, value: float = 99.0) -> str:
    """A member that answers ``value`` everywhere after ``seconds``."""
    return (
        f"time.sleep({seconds})\n            responses.append(pb_utils.InferenceResponse("
        f"[pb_utils.Tensor('y', np.full((len(x), 3), {value}, dtype=np.float32))]))"
    )


def short(value: float = 7.0) -> str:
    """A member that answers one row fewer than it was asked for (``value`` everywhere)."""
    return (
        "responses.append(pb_utils.InferenceResponse([pb_utils.Tensor('y', "
        f"np.full((max(len(x) - 1, 0), 3), {value}, dtype=np.float32))]))"
    )


def overflowing(threshold: float = 1e37) -> str:
    """A member that answers NaN on the rows whose first value is above ``threshold`` (as a
    model that overflows on a large input), 1.0 elsewhere."""
    return (
        f"y = np.where(x[:, :1] > {threshold}, np.nan, 1.0).astype(np.float32)\n            "
        "responses.append(pb_utils.InferenceResponse([pb_utils.Tensor('y', "
        "np.repeat(y, 3, axis=1))]))"
    )


BROKEN = "raise RuntimeError('this member is broken on purpose')"
CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 16
input [{{ name: "x", data_type: TYPE_FP32, dims: [4] }}]
output [{{ name: "y", data_type: TYPE_FP32, dims: [3] }}]
instance_group [{{ count: {count}, kind: KIND_CPU }}]
"""


def python_member(repo: Path, name: str, body: str, instances: int = 1) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(CONFIG.format(name=name, count=instances))
    (repo / name / "1" / "model.py").write_text(PYTHON_MEMBER.format(body=body))


@contextmanager
def toy_triton(
    root: Path, odd_members: dict[str, tuple[str, int]]
) -> Iterator[tuple[Ensemble, TritonServer]]:
    """Triton serving members ``a`` and ``b`` (linear ONNX) and ``odd_members`` (name ->
    (Python body, instances))."""
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
    for name, (body, instances) in odd_members.items():
        python_member(repo, name, body, instances)
    # members that sleep on purpose need not be waited for when Triton stops
    with TritonServer(
        repo, root / "triton", ["a", "b", *odd_members], extra_args=["--exit-timeout-secs=1"]
    ) as triton:
        yield ensemble, triton


def toy_config(triton: TritonServer, root: Path, members: Sequence[str], **fields: Any) -> dict:
    """A combiner config for the toy members, with Chorus's key to this Triton."""
    key = root / "triton.key"
    key.write_text(f"{triton.key}\n")
    key.chmod(0o600)
    config = CombinerConfig(
        name="toy",
        triton_url=triton.grpc_url,
        triton_key_file=str(key),
        max_batch_size=16,
        inputs=(TensorInfo(name="x", dtype="FP32", shape=(4,)),),
        outputs=(TensorInfo(name="y", dtype="FP32", shape=(3,)),),
        members=tuple(MemberRoute(name=n, inputs={"x": "x"}, outputs={"y": "y"}) for n in members),
        softmax=True,
        drain_timeout_s=2.0,  # members that sleep on purpose need not be waited for
    )
    return {**config.model_dump(), **fields}


@contextmanager
def combiner(
    root: Path,
    name: str,
    config: dict,
    *args: str,
    wrapper: Sequence[str] = (),
    port: int | None = None,
) -> Iterator[tuple[ManagedProcess, str]]:
    """``python -m combiner`` on ``config`` (a dict of CombinerConfig fields), run through
    ``wrapper`` (a command prefix, e.g. ``prlimit ...``); yields the process and its gRPC
    address."""
    path = root / f"{name}.json"
    validated = CombinerConfig.model_validate(config)
    validated.save(path)
    port = port or free_port()
    argv = [sys.executable, "-m", "combiner", "--config", str(path), "--grpc-port", str(port)]
    process = ManagedProcess(
        name,
        [*wrapper, *argv, *args],
        root / f"{name}.log",
        stop_signal=signal.SIGTERM,
    )
    process.start()
    try:
        _wait_combiner_ready(process, path, time.monotonic() + 60)
        yield process, f"127.0.0.1:{port}"
    finally:
        process.stop(validated.stop_s() + 15.0)
