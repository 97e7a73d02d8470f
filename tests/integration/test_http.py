"""The ensemble's HTTP/REST endpoint: a stock tritonclient.http gets what gRPC gives."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aiohttpclient
from tritonclient.utils import InferenceServerException

from tests.integration.test_serving import direct_combination


@pytest.fixture
def http(endpoints):
    assert endpoints.ensemble_http is not None
    client = httpclient.InferenceServerClient(endpoints.ensemble_http)
    yield client
    client.close()


def _input(array, binary=True, name="image", dtype="FP32"):
    t = httpclient.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array, binary_data=binary)
    return t


def test_health_metadata_and_config_read_like_tritons(http):
    assert http.is_server_live() and http.is_server_ready()
    assert {"binary_tensor_data", "system_shared_memory"} <= set(
        http.get_server_metadata()["extensions"]
    )
    assert http.is_model_ready("digits")
    assert not http.is_model_ready("nope")
    meta = http.get_model_metadata("digits")
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert [o["name"] for o in meta["outputs"]] == ["probabilities"]
    assert http.get_model_config("digits")["max_batch_size"] == 64
    assert http.get_model_repository_index() == [
        {"name": "digits", "version": "1", "state": "READY"}
    ]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_answers_like_the_direct_combination(ensemble, http, binary):
    x = np.random.default_rng(5).random((6, 1, 8, 8), dtype=np.float32)
    result = http.infer(
        "digits",
        [_input(x, binary)],
        outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=binary)],
        request_id="h-7",
    )
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), direct_combination(ensemble, x), rtol=1e-4, atol=1e-6
    )
    response = result.get_response()
    assert response["id"] == "h-7"
    assert response["parameters"]["chorus_contributors"] == ",".join(
        m.name for m in ensemble.members
    )
    # the binary tensor extension was used exactly when asked for
    assert ("data" in response["outputs"][0]) is not binary


def test_compressed_requests_and_responses(ensemble, http):
    x = np.random.default_rng(6).random((3, 1, 8, 8), dtype=np.float32)
    result = http.infer(
        "digits",
        [_input(x)],
        request_compression_algorithm="gzip",
        response_compression_algorithm="deflate",
    )
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), direct_combination(ensemble, x), rtol=1e-4, atol=1e-6
    )


def test_deadline_parameter_is_read_and_checked(ensemble, http):
    x = np.random.default_rng(7).random((2, 1, 8, 8), dtype=np.float32)
    result = http.infer("digits", [_input(x)], parameters={"deadline_ms": 10_000})
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), direct_combination(ensemble, x), rtol=1e-4, atol=1e-6
    )
    with pytest.raises(InferenceServerException) as e:
        http.infer("digits", [_input(x)], parameters={"deadline_ms": -5})
    assert e.value.status() == "400"
    assert "'deadline_ms' must be a positive, finite number" in e.value.message()


BAD = {
    "unknown input": (
        lambda: [_input(np.zeros((2, 1, 8, 8), np.float32), name="pixels")],
        "unknown input 'pixels'",
    ),
    "wrong shape": (lambda: [_input(np.zeros((2, 8, 8), np.float32))], "shape [2, 8, 8]"),
    "wrong dtype": (
        lambda: [_input(np.zeros((2, 1, 8, 8)), dtype="FP64")],
        "datatype FP64",
    ),
}


@pytest.mark.parametrize(("make", "expected"), BAD.values(), ids=BAD.keys())
def test_bad_request_gets_400_naming_the_problem_then_serving_goes_on(http, make, expected):
    with pytest.raises(InferenceServerException) as e:
        http.infer("digits", make())
    assert e.value.status() == "400"
    assert expected in e.value.message()
    good = http.infer("digits", [_input(np.zeros((2, 1, 8, 8), np.float32))])
    assert good.as_numpy("probabilities").shape == (2, 10)


def _post(endpoints, path, body: bytes, headers=None):
    request = urllib.request.Request(
        f"http://{endpoints.ensemble_http}{path}", data=body, headers=headers or {}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


MALFORMED = {
    "not json": (b"{inputs", {}, "not valid JSON"),
    "no inputs": (b"{}", {}, "no 'inputs' list"),
    "binary size past the body": (
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "image",
                        "datatype": "FP32",
                        "shape": [1, 1, 8, 8],
                        "parameters": {"binary_data_size": 256},
                    }
                ]
            }
        ).encode()
        + b"\0" * 10,
        "header",
        "binary_data_size 256 runs past the 10 bytes",
    ),
    "data of the wrong type": (
        json.dumps(
            {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": ["a"]}]}
        ).encode(),
        {},
        "'data' must hold numbers, found str",
    ),
    "binary size not an integer": (
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "image",
                        "datatype": "FP32",
                        "shape": [1, 1, 8, 8],
                        "parameters": {"binary_data_size": "256"},
                    }
                ]
            }
        ).encode()
        + b"\0" * 256,
        "header",
        "binary_data_size must be a non-negative integer, got '256'",
    ),
    "binary and JSON data": (
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "image",
                        "datatype": "FP32",
                        "shape": [1, 1, 8, 8],
                        "data": [0.0] * 64,
                        "parameters": {"binary_data_size": 256},
                    }
                ]
            }
        ).encode()
        + b"\0" * 256,
        "header",
        "has both 'data' and binary_data_size",
    ),
    "booleans for FP32": (  # numpy took true for 1.0
        json.dumps(
            {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [True]}]}
        ).encode(),
        {},
        "'data' value True at index 0 is not a FP32 number",
    ),
}


@pytest.mark.parametrize(("body", "headers", "expected"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_bodies_are_refused_by_name(endpoints, body, headers, expected):
    if headers == "header":
        binary = len(body) - body.rindex(b"}") - 1
        headers = {"Inference-Header-Content-Length": str(len(body) - binary)}
    status, text = _post(endpoints, "/v2/models/digits/infer", body, headers)
    assert status == 400
    assert expected in json.loads(text)["error"]


UNREADABLE_JSON = {  # JSON that Python's json does not read: a bare ValueError, a RecursionError
    "an integer of 4,301 digits": (b'{"id": ' + b"9" * 4301 + b', "inputs": []}', "digits"),
    "nesting 5,000 deep": (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
}


@pytest.mark.parametrize(
    "path", ["/v2/models/digits/infer", "/v2/systemsharedmemory/region/r/register"]
)
@pytest.mark.parametrize(("body", "expected"), UNREADABLE_JSON.values(), ids=UNREADABLE_JSON.keys())
def test_json_python_cannot_read_is_400_not_a_traceback(
    deployment, endpoints, path, body, expected
):
    """Each was a 500 and a traceback in the log, for a 10 KB request from anyone."""
    log = deployment.workdir / "combiner.log"
    before = log.stat().st_size
    status, text = _post(endpoints, path, body)
    assert status == 400, text
    error = json.loads(text)["error"]
    assert "not valid JSON" in error and expected in error
    with log.open("rb") as f:
        f.seek(before)
        added = f.read().decode(errors="replace")
    assert "failed unexpectedly" not in added, added[-2000:]


def test_unknown_model_is_404(endpoints):
    status, text = _post(endpoints, "/v2/models/nope/infer", b'{"inputs": []}')
    assert status == 404
    assert "unknown model 'nope'" in json.loads(text)["error"]


def test_concurrent_distinct_requests_each_get_their_own_answer(ensemble, endpoints):
    xs = [
        np.random.default_rng(100 + i).random((i % 3 + 1, 1, 8, 8), np.float32) for i in range(64)
    ]

    async def go():
        client = aiohttpclient.InferenceServerClient(endpoints.ensemble_http, conn_limit=64)
        try:

            async def one(x):
                t = aiohttpclient.InferInput("image", list(x.shape), "FP32")
                t.set_data_from_numpy(x)
                return (await client.infer("digits", [t])).as_numpy("probabilities")

            return await asyncio.gather(*(one(x) for x in xs))
        finally:
            await client.close()

    for x, answer in zip(xs, asyncio.run(go()), strict=True):
        np.testing.assert_allclose(answer, direct_combination(ensemble, x), rtol=1e-4, atol=1e-6)


def test_clients_that_leave_mid_body_are_not_each_a_traceback_in_the_log(
    deployment, endpoints, still_serving
):
    """A client gone before its body ended is the client's doing, not a bug: it wrote ~20
    lines of traceback a connection (megabytes a minute from one client), and no limit."""
    assert endpoints.ensemble_http is not None
    host, _, port = endpoints.ensemble_http.rpartition(":")
    log = deployment.workdir / "combiner.log"
    before = log.stat().st_size
    for _ in range(20):
        with socket.create_connection((host, int(port))) as s:
            s.sendall(
                b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + b"{" * 10
            )
            time.sleep(0.02)  # read by then: the handler waits for the rest
    for _ in range(20):  # asked for a 100 Continue, gone before it is sent
        with socket.create_connection((host, int(port))) as s:
            s.sendall(
                b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
                b"Content-Type: application/json\r\nExpect: 100-continue\r\n\r\n"
            )
    time.sleep(1.0)
    with log.open("rb") as f:
        f.seek(before)
        added = f.read().decode(errors="replace")
    assert "Traceback" not in added and "failed unexpectedly" not in added, added[-2000:]
    assert "Error handling request" not in added, added[-2000:]


def test_a_client_that_waits_for_100_continue_gets_it_then_the_answer(endpoints):
    """(curl does so for bodies over 1 KiB.)"""
    assert endpoints.ensemble_http is not None
    host, _, port = endpoints.ensemble_http.rpartition(":")
    body = json.dumps(
        {
            "inputs": [
                {"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}
            ]
        }
    ).encode()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(
            b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            + f"\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        assert s.recv(4096).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(body)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            chunk = s.recv(65536)
            assert chunk, answer
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer[:300]
    assert json.loads(payload)["outputs"][0]["shape"] == [1, 10]
