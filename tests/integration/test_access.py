"""Who may do what: the Triton that Chorus launches answers only Chorus (its key) but for
health; the combiner's endpoints take an optional bearer token and TLS."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import trustme
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from combiner.sdk import EnsembleClient, Unauthenticated, Unavailable
from orchestrator.deploying.launch import free_port
from tests.integration.toy import combiner, toy_config, toy_triton


def test_without_the_key_nobody_can_load_unload_or_infer_on_the_launched_triton(
    endpoints, still_serving
):
    x = np.zeros((1, 1, 8, 8), np.float32)
    tensor = grpcclient.InferInput("image", [1, 1, 8, 8], "FP32")
    tensor.set_data_from_numpy(x)
    with grpcclient.InferenceServerClient(endpoints.triton_grpc) as triton:
        assert triton.is_server_ready() and triton.is_model_ready("mlp")  # health is open
        for attempt in (
            lambda: triton.unload_model("mlp"),
            lambda: triton.load_model("mlp"),
            lambda: triton.infer("mlp", [tensor]),
            lambda: triton.get_model_repository_index(),
            lambda: triton.get_system_shared_memory_status(),
        ):
            with pytest.raises(InferenceServerException, match="restricted"):
                attempt()
        assert triton.is_model_ready("mlp")  # still loaded
        wrong = {"triton-grpc-protocol-chorus-key": "guess"}
        with pytest.raises(InferenceServerException, match="restricted"):
            triton.unload_model("mlp", headers=wrong)
    http = httpclient.InferenceServerClient(endpoints.triton_http)
    with pytest.raises(InferenceServerException, match="restricted"):
        http.unload_model("mlp")
    assert http.is_model_ready("mlp")
    http.close()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A combiner with a bearer token, and one with a token and TLS."""
    root = tmp_path_factory.mktemp("access")
    token = root / "token"
    token.write_text("s3cret-token\n")
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_file = root / "cert.pem", root / "key.pem", root / "ca.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    http_port, tls_http_port = free_port(), free_port()
    with toy_triton(root, {}) as (_, triton):
        config = toy_config(triton, root, ["a", "b"])
        with (
            combiner(
                root,
                "token",
                config,
                "--token-file",
                str(token),
                "--http-port",
                str(http_port),
            ) as (_, plain),
            combiner(
                root,
                "tls",
                config,
                "--token-file",
                str(token),
                "--tls-cert",
                str(cert),
                "--tls-key",
                str(key),
                "--http-port",
                str(tls_http_port),
            ) as (secure_process, secure),
        ):
            yield {
                "plain": plain,
                "plain_http": f"127.0.0.1:{http_port}",
                "secure": secure,
                "secure_http": f"127.0.0.1:{tls_http_port}",
                "secure_log": secure_process.log,
                "ca": str(ca_file),
            }


def infer_request() -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="toy")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    return request


def test_without_the_token_only_health_answers(guarded):
    with grpc.insecure_channel(guarded["plain"]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=10).ready
        wrong = ((), (("authorization", "Bearer wrong"),), (("authorization", "s3cret-token"),))
        for metadata in wrong:
            for rpc in (
                lambda m: stub.ModelInfer(infer_request(), metadata=m, timeout=10),
                lambda m: stub.ModelMetadata(
                    service_pb2.ModelMetadataRequest(name="toy"), metadata=m, timeout=10
                ),
            ):
                with pytest.raises(grpc.RpcError) as e:
                    rpc(metadata)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        right = (("authorization", "Bearer s3cret-token"),)
        answer = stub.ModelInfer(infer_request(), metadata=right, timeout=10)
        assert answer.outputs[0].name == "y"


def test_the_http_endpoint_wants_the_token_too(guarded):
    base = f"http://{guarded['plain_http']}"
    assert urllib.request.urlopen(f"{base}/v2/health/ready", timeout=10).status == 200
    for headers in ({}, {"Authorization": "Bearer nope"}):
        request = urllib.request.Request(f"{base}/v2/models/toy", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=10)
        assert e.value.code == 401
        assert "Bearer" in json.loads(e.value.read())["error"]
    request = urllib.request.Request(
        f"{base}/v2/models/toy", headers={"Authorization": "Bearer s3cret-token"}
    )
    assert json.loads(urllib.request.urlopen(request, timeout=10).read())["name"] == "toy"
    assert urllib.request.urlopen(f"{base}/v2/models/toy/ready", timeout=10).status == 200
    # paths that end in '/ready' only once decoded are not health checks: they told anyone
    # the ensemble's name (a 404 naming it) without the token
    for path in ("/v2/models/x%2Fready", "/v2/models/toy/versions/1%2Fready"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{base}{path}", timeout=10)
        assert e.value.code == 401, path
        assert "toy" not in e.value.read().decode()


def test_the_sdk_brings_the_token_and_speaks_tls(guarded):
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    with EnsembleClient(guarded["plain"], token="s3cret-token") as client:
        plain = client.predict(x)
    with EnsembleClient(
        guarded["secure"], token="s3cret-token", root_certificates=guarded["ca"]
    ) as client:
        np.testing.assert_allclose(client.predict(x), plain, rtol=1e-6)
    with (
        EnsembleClient(guarded["secure"], token="s3cret-token") as client,
        pytest.raises(Unavailable),
    ):
        client.predict(x)  # plaintext to a TLS endpoint: no answer
    for token in (None, "not-the-token"):  # an error that says what is wrong
        with (
            EnsembleClient(guarded["plain"], token=token) as client,
            pytest.raises(Unauthenticated, match="Bearer"),
        ):
            client.predict(x)
    context = ssl.create_default_context(cafile=guarded["ca"])
    request = urllib.request.Request(
        f"https://{guarded['secure_http']}/v2/models/toy",
        headers={"Authorization": "Bearer s3cret-token"},
    )
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        assert json.loads(response.read())["name"] == "toy"
    # and its log tells the operator the scheme a client must use
    assert f"https://{guarded['secure_http']}" in guarded["secure_log"].read_text()
