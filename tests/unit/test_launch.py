from __future__ import annotations

import stat
from pathlib import Path

import pytest

from orchestrator.errors import LaunchError
from orchestrator.launch import TritonServer, find_tritonserver


def fake_server(tmp_path: Path, body: str) -> Path:
    """A program standing in for a tritonserver that fails to start, as a broken one would."""
    path = tmp_path / "bin" / "tritonserver"
    path.parent.mkdir()
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_tritonserver_comes_from_the_environment_variable_first(tmp_path, monkeypatch):
    path = fake_server(tmp_path, "exit 0")
    monkeypatch.setenv("TRITONSERVER", str(path))
    binary = find_tritonserver()
    assert binary.path == path.resolve() and not binary.bundled


def test_the_bundled_tritonserver_is_found_with_its_python_backend(monkeypatch):
    monkeypatch.delenv("TRITONSERVER", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    binary = find_tritonserver()
    assert binary.bundled and binary.path.is_file()
    assert "python" in binary.backends


def test_a_server_that_dies_at_start_raises_with_the_tail_of_its_log(tmp_path, monkeypatch):
    path = fake_server(tmp_path, 'echo "E1128 model cnn failed to load: bad opset"; exit 7')
    monkeypatch.setenv("TRITONSERVER", str(path))
    server = TritonServer(tmp_path / "repo", tmp_path / "work", ["cnn"])
    with pytest.raises(LaunchError, match="exited with code 7") as e:
        server.start(timeout=30)
    assert "model cnn failed to load: bad opset" in e.value.log_tail
    assert "bad opset" in str(e.value)
