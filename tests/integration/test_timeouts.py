"""Clients that give up, and members that do not answer: nothing reaches Triton as a
cancellation (the bundled 2.51 crashes on one: server issues #7368, #8034), a deadline is its
own request's, and a hung member cannot wedge the batcher.

The storms below each crashed the bundled Triton before Chorus stopped cancelling member calls
(a tiny deadline_ms one request at a time: after ~450 requests)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from combiner.sdk import DeadlineExceeded, EnsembleClient
from tests.integration.test_serving import direct_combination
from tests.integration.test_shm import triton_regions
from tests.integration.toy import combiner, sleeping, toy_config, toy_triton


def request(x: np.ndarray, deadline_ms: float | None = None) -> service_pb2.ModelInferRequest:
    r = service_pb2.ModelInferRequest(model_name="digits")
    r.inputs.add(name="image", datatype="FP32", shape=list(x.shape))
    r.raw_input_contents.append(x.tobytes())
    if deadline_ms is not None:
        r.parameters["deadline_ms"].double_param = deadline_ms
    return r


def storm(
    address: str, clients: int, per_client: int, send: Callable[[object, int, int], str]
) -> Counter[str]:
    """``clients`` threads, each on its own channel, each sending ``per_client`` requests."""
    codes: Counter[str] = Counter()
    lock = threading.Lock()

    def client(index: int) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            for i in range(per_client):
                code = send(stub, index, i)
                with lock:
                    codes[code] += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return codes


def call(stub, req, timeout: float) -> str:
    try:
        stub.ModelInfer(req, timeout=timeout)
        return "OK"
    except grpc.RpcError as e:
        return e.code().name


@pytest.fixture
def triton_stays_up(deployment, endpoints, ensemble):
    """Triton's process is the same one after the test, and the ensemble still answers."""
    assert deployment.triton is not None and deployment.triton.process is not None
    pid = deployment.triton.process.pid
    yield
    assert deployment.triton.process.exited() is None, deployment.triton.process.log_tail()
    assert deployment.triton.process.pid == pid
    x = np.random.default_rng(3).random((4, 1, 8, 8), dtype=np.float32)
    with EnsembleClient(endpoints.ensemble) as client:
        np.testing.assert_allclose(
            client.predict(x), direct_combination(ensemble, x), rtol=1e-4, atol=1e-6
        )


def test_a_storm_of_tiny_deadlines_one_at_a_time_leaves_triton_up(endpoints, triton_stays_up):
    x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
    codes = storm(endpoints.ensemble, 1, 1000, lambda s, c, i: call(s, request(x, 0.001), 10))
    assert sum(codes.values()) == 1000
    assert set(codes) <= {"OK", "DEADLINE_EXCEEDED"}, codes


def test_stock_clients_giving_up_after_4_ms_leave_triton_up(endpoints, triton_stays_up):
    x = np.random.default_rng(1).random((1, 1, 8, 8), dtype=np.float32)
    codes = storm(endpoints.ensemble, 4, 750, lambda s, c, i: call(s, request(x), 0.004))
    assert sum(codes.values()) == 3000
    assert set(codes) <= {"OK", "DEADLINE_EXCEEDED", "CANCELLED"}, codes


def test_ten_ms_deadlines_at_concurrency_16_leave_triton_up(endpoints, triton_stays_up):
    x = np.random.default_rng(2).random((1, 1, 8, 8), dtype=np.float32)
    codes = storm(endpoints.ensemble, 16, 100, lambda s, c, i: call(s, request(x, 10.0), 10))
    assert sum(codes.values()) == 1600
    assert set(codes) <= {"OK", "DEADLINE_EXCEEDED"}, codes


def test_a_request_without_a_deadline_is_never_cut_short_by_its_neighbours(
    ensemble, endpoints, triton_stays_up
):
    """Half the clients send deadline_ms=0.001, half none, into the same batches: every
    request without a deadline gets its own full answer."""
    everything = np.random.default_rng(1000).random((32 * 20, 1, 8, 8), dtype=np.float32)
    expected = direct_combination(ensemble, everything)
    wrong = []

    def send(stub, c: int, i: int) -> str:
        x = everything[20 * c + i : 20 * c + i + 1]
        if c % 2:
            return "tiny:" + call(stub, request(x, 0.001), 10)
        try:
            answer = stub.ModelInfer(request(x), timeout=30)
        except grpc.RpcError as e:
            return "none:" + e.code().name
        got = np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(1, 10)
        if not np.allclose(got, expected[20 * c + i], rtol=1e-4, atol=1e-6):
            wrong.append((c, i))
        return "none:" + answer.parameters["chorus_contributors"].string_param

    codes = storm(endpoints.ensemble, 32, 20, send)
    everyone = ",".join(m.name for m in ensemble.members)
    assert codes[f"none:{everyone}"] == 16 * 20, codes
    assert set(codes) - {f"none:{everyone}"} <= {"tiny:OK", "tiny:DEADLINE_EXCEEDED"}, codes
    assert wrong == []


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Members a and b answer at once; 'hung' sleeps 20 s on every batch, 'slow' 1 s. Two
    combiners: a, b and hung (member timeout 400 ms, one batch at a time, at most two batches
    left running on a member); a, b and slow (all must answer; shared memory for outputs)."""
    root = tmp_path_factory.mktemp("timeouts")
    odd = {"hung": (sleeping(20.0), 1), "slow": (sleeping(1.0), 1)}
    with toy_triton(root, odd) as (_, triton):
        hung = toy_config(
            triton,
            root,
            ["a", "b", "hung"],
            quorum=2,
            member_timeout_ms=400,
            max_in_flight=1,
        )
        slow = toy_config(
            triton,
            root,
            ["a", "b", "slow"],
            member_timeout_ms=10_000,
            shared_memory=True,
            output_shared_memory_min_bytes=0,
        )
        with (
            combiner(root, "combiner-hung", hung) as (_, hung_address),
            combiner(root, "combiner-slow", slow) as (slow_process, slow_address),
        ):
            yield triton, hung_address, slow_process, slow_address


def test_a_hung_member_times_out_and_the_others_keep_being_served(toy):
    _, address, _, _ = toy
    missing = []
    with EnsembleClient(address) as client:
        for seed in range(6):  # more batches than slots, and than the hung member may hold
            x = np.random.default_rng(seed).normal(size=(seed + 1, 4)).astype(np.float32)
            answer = client.infer(x, timeout_s=10)
            assert answer.contributors == ("a", "b")
            assert answer.outputs["y"].shape == (seed + 1, 3)
            assert answer.missing == ("hung",)
            missing.append(answer.reasons["hung"])
    assert missing[0].startswith("no answer within the member timeout (400 ms)"), missing
    # once two of its batches are left running, the hung member is not called until they end
    assert missing[-1].startswith("not called: it is still running 2 earlier batches"), missing


def test_a_region_stays_out_of_the_pool_while_a_call_given_up_may_write_to_it(toy):
    """A client that gives up does not give back the shared memory its batch's calls point
    at (the slow member will write its output there): the next batch gets a region of its
    own, and every answer is its own."""
    triton, _, process, address = toy

    class Endpoints:
        triton_grpc = triton.grpc_url
        triton_headers = triton.grpc_headers

    def ours() -> set[str]:
        return {n for n in triton_regions(Endpoints) if n.startswith(f"chorus_{worker}_")}

    x = np.random.default_rng(7).normal(size=(2, 4)).astype(np.float32)
    with EnsembleClient(address) as client:
        first = client.infer(x)  # a region for the pool, back in the pool after
        worker = next(iter(triton_regions(Endpoints))).split("_")[1]
        assert len(ours()) == 1
        with pytest.raises(DeadlineExceeded):
            client.infer(x, timeout_s=0.2)  # gives up while 'slow' holds the region
        second = client.infer(x)  # its batch needs a region while the first is held
        assert len(ours()) == 2
    np.testing.assert_allclose(second.outputs["y"], first.outputs["y"], rtol=1e-6)
    assert first.contributors == second.contributors == ("a", "b", "slow")
    assert process.exited() is None
