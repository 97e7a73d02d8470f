"""The same fuzz as tests/unit/test_fuzz_decoding, sent to the live endpoints: every answer is a
status in the protocol (no UNKNOWN, no 500, no INTERNAL), and the worker that took them all
still serves correctly afterwards."""

from __future__ import annotations

import http.client
import json

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from tests.unit.test_fuzz_decoding import grpc_requests, http_requests

LIVE = settings(
    max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None
)
GRPC_ANSWERS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNIMPLEMENTED,
}
HTTP_ANSWERS = {200, 400, 404, 405, 413, 415, 429, 504}
METHODS = [m.name for m in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods]


def test_fuzzed_grpc_requests_get_answers_in_the_protocol(endpoints, still_serving):
    with grpc.insecure_channel(endpoints.ensemble) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        raw = {
            name: channel.unary_unary(f"/inference.GRPCInferenceService/{name}")
            for name in METHODS
            if name != "ModelStreamInfer"
        }

        @LIVE
        @given(grpc_requests())
        def structured(request):
            try:
                infer(request, timeout=30)
            except grpc.RpcError as e:
                assert e.code() in GRPC_ANSWERS, (e.code(), e.details())

        @LIVE
        @given(st.sampled_from(sorted(raw)), st.binary(max_size=200))
        def any_bytes(method, body):
            try:
                raw[method](body, timeout=30)
            except grpc.RpcError as e:
                assert e.code() in GRPC_ANSWERS, (method, e.code(), e.details())

        structured()
        any_bytes()


def test_fuzzed_http_requests_get_json_answers_in_the_protocol(endpoints, still_serving):
    host, port = endpoints.ensemble_http.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)

    def post(path: str, body: bytes, headers: dict[str, str]) -> None:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        text = response.read()
        assert response.status in HTTP_ANSWERS, (response.status, text[:300])
        if response.status != 200:
            assert "error" in json.loads(text)
        if response.will_close:
            connection.close()

    @LIVE
    @given(http_requests(), st.sampled_from(["digits", "digits/versions/1", "nope"]))
    def infer(request, model):
        body, header_length = request
        headers = {}
        if header_length is not None:  # what a header can carry: printable ASCII
            printable = "".join(c for c in header_length if " " <= c <= "~")
            headers["Inference-Header-Content-Length"] = printable
        post(f"/v2/models/{model}/infer", body, headers)

    @LIVE
    @given(
        st.sampled_from(
            [
                "/v2/systemsharedmemory/region/r/register",
                "/v2/systemsharedmemory/region/r/unregister",
                "/v2/repository/index",
                "/v2/models/digits/infer",
            ]
        ),
        st.binary(max_size=200),
        st.sampled_from(["identity", "gzip", "deflate", "zstd"]),
    )
    def any_bytes(path, body, encoding):
        post(path, body, {"Content-Encoding": encoding})

    try:
        infer()
        any_bytes()
    finally:
        connection.close()
