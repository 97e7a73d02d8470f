"""`chorus regenerate-configs` as a user runs it, for a machine described in a file."""

from __future__ import annotations

import json

import yaml

from tests.cli import chorus
from tests.onnx_models import linear


def _hardware(path, gpus: int, nodes: int = 1) -> None:
    devices = [{"kind": "gpu", "index": i, "memory_gb": 16} for i in range(gpus)]
    path.write_text(
        yaml.safe_dump({"nodes": [{"name": f"node{n}", "devices": devices} for n in range(nodes)]})
    )


def test_regenerate_configs_is_idempotent_and_reports_what_moved(tmp_path):
    linear(tmp_path / "a.onnx", seed=0)
    linear(tmp_path / "b.onnx", seed=1)
    (tmp_path / "ensemble.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "toy",
                "members": [{"name": "a", "path": "a.onnx"}, {"name": "b", "path": "b.onnx"}],
                "serving": {"max_batch_size": 16},
            }
        )
    )
    gib = 1 << 30
    (tmp_path / "profile.json").write_text(
        json.dumps(
            {
                "members": {
                    m: {
                        "gpu": {
                            "memory_bytes": 6 * gib,
                            "latency_ms": {"1": 2.0, "4": 3.0, "16": 6.0},
                        }
                    }
                    for m in ("a", "b")
                }
            }
        )
    )
    repo = tmp_path / "repo"
    args = [
        "regenerate-configs",
        str(tmp_path / "ensemble.yaml"),
        "--repo",
        str(repo),
        "--profile",
        str(tmp_path / "profile.json"),
        "--hardware",
        str(tmp_path / "hw.yaml"),
        "--backend",
        "python",
    ]

    _hardware(tmp_path / "hw.yaml", gpus=1)
    first = chorus(*args)
    assert first.returncode == 0, first.stderr
    assert "a: new" in first.stdout and "b: new" in first.stdout
    snapshot = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()}

    again = chorus(*args)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"{repo}: unchanged"
    assert {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()} == snapshot

    _hardware(tmp_path / "hw.yaml", gpus=4)  # the machine grew: members spread out
    grown = chorus(*args)
    assert grown.returncode == 0, grown.stderr
    assert "instances 1x gpu0 ->" in grown.stdout
    assert "file(s) rewritten" in grown.stdout

    _hardware(tmp_path / "hw.yaml", gpus=2, nodes=4)  # four nodes: one repository each
    spread = chorus(*args)
    assert spread.returncode == 0, spread.stderr
    nodes = {p.relative_to(repo).parts[0] for p in repo.glob("node*/*/config.pbtxt")}
    assert nodes == {"node0", "node1", "node2", "node3"}
    again = chorus(*args)
    assert again.stdout.strip() == f"{repo}: unchanged"
