"""What a client can hold open is bounded before it is spent: idle connections past the file
limit, slow bodies, messages over the size limit, malformed requests. The worker keeps serving
fresh clients throughout."""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from combiner.client import EnsembleClient
from orchestrator.launch import free_port
from tests.integration.toy import combiner, toy_config, toy_triton


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """A combiner whose file limit is 1024 (soft and hard), as many shells and units give."""
    root = tmp_path_factory.mktemp("limits")
    http = free_port()
    with toy_triton(root, {}) as (_, triton):
        config = toy_config(triton, root, ["a", "b"], body_timeout_s=1.0)
        with combiner(
            root,
            "combiner-limited",
            config,
            "--http-port",
            str(http),
            wrapper=["prlimit", "--nofile=1024:1024"],
        ) as (process, address):
            yield process, address, f"127.0.0.1:{http}"


def fresh_answers(address: str, http: str) -> None:
    """A new gRPC client and a new HTTP client are answered within a second."""
    x = np.ones((1, 4), np.float32)
    with EnsembleClient(address) as client:
        assert client.predict(x, timeout_s=1.0).shape == (1, 3)
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}]}
    request = urllib.request.Request(
        f"http://{http}/v2/models/toy/infer", data=json.dumps(body).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=1.0) as response:
        assert response.status == 200


def test_idle_connections_past_the_file_limit_leave_fresh_clients_served(limited):
    process, address, http = limited
    host, _, port = http.rpartition(":")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    idle = []
    try:
        for _ in range(1100):
            s = socket.socket()
            s.settimeout(5)
            s.connect((host, int(port)))  # and never send a byte
            idle.append(s)
        time.sleep(0.5)  # the worker has accepted what it will
        fresh_answers(address, http)
    finally:
        for s in idle:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert process.exited() is None
    assert "Too many open files" not in process.log.read_text()


def test_a_slow_body_is_cut_off_and_the_worker_serves_on(limited):
    _, address, http = limited
    host, _, port = http.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /v2/models/toy/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"inputs": '
        )
        reply = s.recv(4096)  # the rest never comes
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b"did not arrive within 1 s" in reply
    fresh_answers(address, http)


def test_a_malformed_request_is_answered_400_without_a_traceback_in_the_log(limited):
    process, address, http = limited
    host, _, port = http.rpartition(":")
    before = process.log.read_text()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v2/models/toy/infer HTTP/1.1\r\nContent-Length: nope\r\n\r\n")
        reply = s.recv(4096)
    assert reply.split(b" ", 2)[1] == b"400", reply
    fresh_answers(address, http)
    with contextlib.suppress(FileNotFoundError):
        assert "Traceback" not in process.log.read_text()[len(before) :]


def test_a_binary_message_over_the_grpc_limit_is_refused_before_it_is_read(endpoints):
    """The digits ensemble takes 64 rows of 1x8x8 FP32: 16 KiB of tensor, so its gRPC limit is
    80 KiB with room for headers. A 400-row binary message (100 KiB) is over it; the limit used
    to allow JSON's 32 bytes a value (192 KiB), so it was read and decoded first."""
    x = np.zeros((400, 1, 8, 8), np.float32)
    with grpcclient.InferenceServerClient(endpoints.ensemble) as client:
        tensor = grpcclient.InferInput("image", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException) as e:
            client.infer("digits", [tensor])
    assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED", e.value.message()
