"""What a client can hold open is bounded before it is spent: idle connections past the file
limit, slow bodies, messages over the size limit, malformed requests. The worker keeps serving
fresh clients throughout."""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import time
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from combiner.sdk import EnsembleClient
from orchestrator.deploying.launch import free_port
from tests.integration.toy import combiner, toy_config, toy_triton


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    with toy_triton(root, {}) as (_, triton):
        yield root, triton


@pytest.fixture(scope="module")
def limited(triton):
    """A combiner whose file limit is 1024 (soft and hard), as many shells and units give."""
    root, server = triton
    http = free_port()
    config = toy_config(server, root, ["a", "b"], body_timeout_s=1.0)
    with combiner(
        root,
        "combiner-limited",
        config,
        "--http-port",
        str(http),
        wrapper=["prlimit", "--nofile=1024:1024"],
    ) as (process, address):
        yield process, address, f"127.0.0.1:{http}"


@pytest.fixture(scope="module")
def two_connections(triton):
    """A combiner that keeps at most 2 connections a protocol."""
    root, server = triton
    http = free_port()
    config = toy_config(server, root, ["a", "b"], body_timeout_s=5.0, max_connections=2)
    with combiner(root, "combiner-two", config, "--http-port", str(http)) as (_, address):
        yield address, f"127.0.0.1:{http}"


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
    """Each is answered 400; the log gets one line for each of the first ten a minute, and no
    traceback: a client cannot make the combiner write as much as it likes."""
    process, address, http = limited
    host, _, port = http.rpartition(":")
    before = len(process.log.read_text())
    for _ in range(50):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v2/models/toy/infer HTTP/1.1\r\nContent-Length: nope\r\n\r\n")
            reply = s.recv(4096)
        assert reply.split(b" ", 2)[1] == b"400", reply
    fresh_answers(address, http)
    written = process.log.read_text()[before:]
    assert "Traceback" not in written
    assert 1 <= written.count("malformed HTTP request, answered 400") <= 10, written


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


def test_a_grpc_call_whose_message_never_comes_is_ended_and_the_worker_serves_on(limited):
    """A stream that sends its headers and never its message used to hold its place until the
    connection closed; now it is answered within the body timeout (1 s here)."""
    _, address, http = limited

    async def never_sent():
        await asyncio.Event().wait()  # the message never comes
        yield b""

    async def call() -> tuple[grpc.StatusCode, str, float]:
        async with grpc.aio.insecure_channel(address) as channel:
            infer = channel.stream_unary("/inference.GRPCInferenceService/ModelInfer")
            start = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await infer(never_sent(), timeout=10)
            return e.value.code(), e.value.details() or "", time.monotonic() - start

    code, details, waited = asyncio.run(call())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not arrive within 1 s" in details, details
    assert waited < 5, waited
    fresh_answers(address, http)


def test_a_connection_past_the_limit_reads_its_503_rather_than_a_reset(two_connections):
    """Both connections the worker keeps are busy (their bodies come slowly); a third client's
    request is answered 503 with its JSON, and the connection ends with a FIN, not a reset."""
    _, http = two_connections
    host, _, port = http.rpartition(":")
    head = (
        b"POST /v2/models/toy/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    busy = [socket.create_connection((host, int(port)), timeout=10) for _ in range(2)]
    try:
        for s in busy:
            s.sendall(head + b'{"inputs": ')  # and the rest later
        time.sleep(0.3)  # both are in their handlers
        for _ in range(20):
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(head + b" " * 1000)
                reply = b""
                while chunk := s.recv(4096):  # a reset raises ConnectionResetError here
                    reply += chunk
            assert reply.startswith(b"HTTP/1.1 503"), reply
            assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"].startswith("this endpoint")
    finally:
        for s in busy:
            s.close()


@pytest.fixture(scope="module")
def sixteen(triton):
    """A combiner that serves 16 requests at once: at most 16 + 64 gRPC calls wait for their
    message."""
    root, server = triton
    config = toy_config(server, root, ["a", "b"], body_timeout_s=5.0, max_requests_in_flight=16)
    with combiner(root, "combiner-sixteen", config) as (_, address):
        yield address


def test_calls_that_stall_before_their_message_are_bounded_oldest_first(sixteen):
    """200 calls that never send their message, without a token (health checks need none):
    past 80 waiting, each newcomer ends the oldest wait at once, so the worker holds at most
    80 of them; a client whose message comes with its call is served meanwhile."""
    address = sixteen

    async def never_sent():
        await asyncio.Event().wait()
        yield b""

    async def stall() -> tuple[list[str], int]:
        own = [("grpc.use_local_subchannel_pool", 1)]  # a connection each, 50 streams on each
        channels = [grpc.aio.insecure_channel(address, options=own) for _ in range(4)]
        try:
            for channel in channels:  # (streams opened before the server's settings may be refused)
                await channel.channel_ready()
                await channel.unary_unary("/inference.GRPCInferenceService/ServerLive")(b"")
            calls = [
                channels[i % 4].stream_unary("/inference.GRPCInferenceService/ServerLive")(
                    never_sent(), timeout=20
                )
                for i in range(200)
            ]
            tasks = [asyncio.ensure_future(c) for c in calls]
            done, waiting = await asyncio.wait(tasks, timeout=3)  # their own timeout: 5 s
            with EnsembleClient(address) as client:  # a fresh client, served meanwhile
                assert client.predict(np.ones((1, 4), np.float32), timeout_s=2.0).shape == (1, 3)
            ended = []
            for task in done:
                error = task.exception()
                assert isinstance(error, grpc.aio.AioRpcError), error
                assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
                ended.append(error.details() or "")
            for call in calls:
                call.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return ended, len(waiting)
        finally:
            for channel in channels:
                await channel.close()

    ended, waiting = asyncio.run(stall())
    assert (len(ended), waiting) == (120, 80)
    assert all("too many calls waiting" in d for d in ended), set(ended)
