"""``combiner.json`` as the combiner reads it: a number must be a number."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from combiner.config import CascadeRoute, CombinerConfig, MemberRoute, NodeRoute, TensorInfo


def _config() -> CombinerConfig:
    return CombinerConfig(
        name="toy",
        nodes=(NodeRoute(name="a", url="127.0.0.1:1"), NodeRoute(name="b", url="127.0.0.1:2")),
        max_batch_size=16,
        inputs=(TensorInfo(name="x", dtype="FP32", shape=(4,)),),
        outputs=(TensorInfo(name="y", dtype="FP32", shape=(3,)),),
        members=tuple(
            MemberRoute(name=n, inputs={"x": "x"}, outputs={"y": "y"}, nodes={"a": 1})
            for n in ("m0", "m1")
        ),
        cascade=CascadeRoute(tiers=(("m0",), ("m1",)), threshold=0.9, output="y"),
        uncertainty=("entropy",),
    )


def test_a_file_as_chorus_writes_it_loads_as_it_was(tmp_path):
    config = _config()
    config.save(tmp_path / "combiner.json")
    assert CombinerConfig.load(tmp_path / "combiner.json") == config


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_batch_size", True), ("member_timeout_ms", True), ("deadline_ms", "50"), ("quorum", 2.0)],
)
def test_a_value_of_the_wrong_kind_is_refused_naming_the_field(tmp_path, field, value):
    """A hand-edited file: JSON's `true` had been taken as 1 (a batch of one, a timeout of a
    millisecond), "50" as 50 and 2.0 as 2."""
    raw = json.loads(_config().model_dump_json())
    raw[field] = value
    path = tmp_path / "combiner.json"
    path.write_text(json.dumps(raw))
    argv = [sys.executable, "-m", "combiner", "--config", str(path), "--grpc-port", "0"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert "validation error" in done.stderr and f"\n{field}\n" in done.stderr, done.stderr
