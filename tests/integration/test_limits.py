"""Sizes and errors a hostile client can send: every request is bounded by what max_batch_size
rows of the ensemble's inputs need, before and after decompression, on HTTP and gRPC, and every
refusal is an answer in the protocol (a status and, on HTTP, a JSON error), never a crash."""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import zlib

import grpc
import numpy as np
import psutil
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.integration.conftest import worker_pids

# what 64 rows of digits need, as JSON text at most, plus headers (CombinerConfig.request_limit)
LIMIT = max(64 * 64 * 4, 32 * 64 * 64) + (1 << 16)


def http(endpoints, method: str, path: str, body: bytes = b"", **headers: str) -> tuple[int, str]:
    """One raw HTTP/1.1 exchange; the body is sent as given, Content-Length as given."""
    host, port = endpoints.ensemble_http.rsplit(":", 1)
    head = {"Host": host, "Content-Length": str(len(body)), "Connection": "close", **headers}
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items()), "", ""]
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall("\r\n".join(lines).encode())
        # refused before the whole body was read: the answer is what matters
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(body)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head_text, _, payload = answer.partition(b"\r\n\r\n")
    status = int(head_text.split()[1])
    return status, payload.decode(errors="replace")


def infer_body(doc: object) -> bytes:
    return json.dumps(doc).encode()


def worker_rss(deployment) -> int:
    return sum(psutil.Process(p).memory_info().rss for p in worker_pids(deployment))


def test_an_http_body_longer_than_the_limit_is_refused_before_it_is_read(endpoints, still_serving):
    status, text = http(
        endpoints,
        "POST",
        "/v2/models/digits/infer",
        bytes(200_000),
        **{"Content-Length": str(3 << 30)},  # says 3 GiB; sends a little
    )
    assert status == 413
    assert "Content-Length is 3221225472" in json.loads(text)["error"]


def test_a_gzip_bomb_is_refused_without_inflating_it(deployment, endpoints, still_serving):
    before = worker_rss(deployment)
    bomb = gzip.compress(bytes(200 << 20), compresslevel=9)  # 200 MiB of zeros, ~200 KB
    small_bomb = gzip.compress(bytes(50 << 20), compresslevel=9)  # under the limit on the wire
    assert len(small_bomb) < LIMIT < len(bomb) * 2
    for body in (bomb, small_bomb):
        status, text = http(
            endpoints, "POST", "/v2/models/digits/infer", body, **{"Content-Encoding": "gzip"}
        )
        assert status == 413, text
        assert "too large" in json.loads(text)["error"]
    assert worker_rss(deployment) - before < 64 << 20  # never inflated


def test_a_small_gzip_of_millions_of_json_values_is_refused(endpoints, still_serving):
    doc = '{"inputs": [{"name": "image", "datatype": "FP32", "shape": [20000000], "data": ['
    body = gzip.compress((doc + "0.0," * 20_000_000 + "0.0]}]}").encode())
    assert len(body) < LIMIT
    status, text = http(
        endpoints, "POST", "/v2/models/digits/infer", body, **{"Content-Encoding": "gzip"}
    )
    assert status == 413
    assert "inflates to more" in json.loads(text)["error"]


def test_a_grpc_message_over_the_limit_is_refused(deployment, endpoints, still_serving):
    before = worker_rss(deployment)
    x = np.zeros((4096, 1, 8, 8), np.float32)  # 1 MiB
    request = service_pb2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="image", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    big = service_pb2.ModelInferRequest(model_name="digits")
    big.inputs.add(name="image", datatype="FP32", shape=[1, 1, 8, 8])
    big.raw_input_contents.append(bytes(256 << 20))  # 256 MiB of zeros, gzip on the wire
    with grpc.insecure_channel(
        endpoints.ensemble, options=[("grpc.max_send_message_length", -1)]
    ) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for message, compression in ((request, None), (big, grpc.Compression.Gzip)):
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(message, timeout=60, compression=compression)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value
    assert worker_rss(deployment) - before < 64 << 20


BAD_HTTP = {
    "a NaN deadline": (
        "POST",
        "/v2/models/digits/infer",
        b'{"parameters": {"deadline_ms": NaN}, "inputs": [{"name": "image", "datatype": '
        b'"FP32", "shape": [1, 1, 8, 8], "data": ' + json.dumps([0.0] * 64).encode() + b"}]}",
        {},
        400,
        "NaN is not a JSON number",  # Python's json would read it; JSON has no NaN
    ),
    "a deadline of 2**70": (
        "POST",
        "/v2/models/digits/infer",
        infer_body({"parameters": {"deadline_ms": 2**70}, "inputs": []}),
        {},
        400,
        "does not fit 64 bits",
    ),
    "a dimension of 2**70": (
        "POST",
        "/v2/models/digits/infer",
        infer_body({"inputs": [{"name": "image", "datatype": "FP32", "shape": [2**70]}]}),
        {},
        400,
        "a list of 64-bit integers",
    ),
    "an encoding it does not take": (
        "POST",
        "/v2/models/digits/infer",
        b"{}",
        {"Content-Encoding": "br"},
        415,
        "Content-Encoding 'br' is not supported",
    ),
    "a broken gzip stream": (
        "POST",
        "/v2/models/digits/infer",
        b"not gzip",
        {"Content-Encoding": "gzip"},
        400,
        "not valid gzip",
    ),
    "a shared-memory key '..'": (
        "POST",
        "/v2/systemsharedmemory/region/x/register",
        infer_body({"key": "..", "offset": 0, "byte_size": 64}),
        {},
        400,
        "opens only keys",
    ),
    "an unknown route": ("GET", "/v2/nothing/here", b"", {}, 404, "Not Found"),
    "a wrong method": ("DELETE", "/v2/models/digits/infer", b"", {}, 405, "Method Not Allowed"),
    "a raw deflate stream that ends early": (
        "POST",
        "/v2/models/digits/infer",
        zlib.compress(b'{"inputs": []}' * 100)[:20],
        {"Content-Encoding": "deflate"},
        400,
        "ends before its stream does",
    ),
}


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "words"),
    BAD_HTTP.values(),
    ids=BAD_HTTP.keys(),
)
def test_a_bad_http_request_is_answered_with_a_json_error_and_its_status(
    endpoints, still_serving, method, path, body, headers, status, words
):
    got, text = http(endpoints, method, path, body, **headers)
    assert got == status, text
    assert words in json.loads(text)["error"]


def test_a_nan_deadline_over_grpc_is_invalid_argument(endpoints, still_serving):
    request = service_pb2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="image", datatype="FP32", shape=[1, 1, 8, 8])
    request.raw_input_contents.append(bytes(256))
    with grpc.insecure_channel(endpoints.ensemble) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for value in (float("nan"), float("inf"), -1.0, 0.0):
            request.parameters["deadline_ms"].double_param = value
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(request, timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "positive, finite" in e.value.details()
