"""Several combiner workers on one port, and their metrics summed on the metrics port."""

from __future__ import annotations

import re
import socket
import time
import urllib.request

import numpy as np
import pytest

from combiner.sdk import EnsembleClient, InvalidRequest
from orchestrator.deploying.launch import free_port
from orchestrator.deploying.up import Deployment
from tests.integration.processes import command_name, descendants


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" (\S+)"
    match = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    assert match, f"no sample {name}{{{wanted}}} in:\n{text}"
    return float(match.group(1))


@pytest.fixture(scope="module")
def two_workers(ensemble, served_plan, tmp_path_factory):
    port = free_port()
    deployment = Deployment(
        ensemble,
        tmp_path_factory.mktemp("workers"),
        plan=served_plan,
        workers=2,
        metrics_port=port,
        http_port=0,
    )
    with deployment as endpoints:
        yield deployment, endpoints, f"http://127.0.0.1:{port}/metrics"


def test_two_workers_share_the_port_and_answer_every_connection(two_workers, split):
    deployment, endpoints, _ = two_workers
    assert deployment.combiner is not None and deployment.combiner.pid is not None
    workers = [
        p for p in descendants(deployment.combiner.pid) if "combiner.worker" in command_name(p)
    ]
    assert len(workers) == 2
    for i in range(8):  # a new connection each time: the kernel spreads them over workers
        with EnsembleClient(endpoints.ensemble) as client:
            assert client.predict(split.x_test[i : i + 3]).shape == (3, 10)


def test_both_workers_serve_http_on_the_shared_port_and_count_it(two_workers, split):
    import tritonclient.http as httpclient

    _, endpoints, url = two_workers
    before = metric(
        urllib.request.urlopen(url, timeout=5).read().decode(), "chorus_requests_total", code="OK"
    )
    for i in range(6):  # a new connection each time
        client = httpclient.InferenceServerClient(endpoints.ensemble_http)
        x = np.ascontiguousarray(split.x_test[i : i + 2])
        tensor = httpclient.InferInput("image", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        assert client.infer("digits", [tensor]).as_numpy("probabilities").shape == (2, 10)
        client.close()
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert metric(text, "chorus_requests_total", code="OK") == before + 6


def test_metrics_count_requests_by_code_and_time_each_member(two_workers, ensemble, split):
    _, endpoints, url = two_workers
    before = urllib.request.urlopen(url, timeout=5).read().decode()
    ok_before = metric(before, "chorus_requests_total", code="OK")
    with EnsembleClient(endpoints.ensemble) as client:
        for i in range(5):  # with a deadline: one call per member, each timed
            client.predict(split.x_test[i : i + 1], deadline_ms=60_000)
        client.predict(split.x_test[:1])  # without: one call to the fan-out model
        with pytest.raises(InvalidRequest):
            client.predict(np.zeros((1, 1, 8, 8), dtype=np.float64))
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert metric(text, "chorus_requests_total", code="OK") == ok_before + 6
    assert metric(text, "chorus_requests_total", code="INVALID_ARGUMENT") >= 1
    assert metric(text, "chorus_request_latency_seconds_count") >= ok_before + 7
    for m in ensemble.members:
        assert metric(text, "chorus_member_latency_seconds_count", member=m.name) >= 5
    fanout = f"{ensemble.name}__fanout"
    assert metric(text, "chorus_member_latency_seconds_count", member=fanout) >= 1
    assert metric(text, "chorus_requests_in_flight") == 0


def test_sixty_four_concurrent_requests_each_get_their_own_answer(two_workers, ensemble):
    import asyncio

    from combiner.sdk import AsyncEnsembleClient
    from tests.integration.test_serving import direct_combination

    _, endpoints, url = two_workers
    xs = [
        np.random.default_rng(100 + i).random((i % 3 + 1, 1, 8, 8), dtype=np.float32)
        for i in range(64)
    ]

    async def go():
        async with AsyncEnsembleClient(endpoints.ensemble) as client:
            await client.metadata()
            return await asyncio.gather(*(client.predict(x) for x in xs))

    before = urllib.request.urlopen(url, timeout=5).read().decode()
    answers = asyncio.run(go())
    for x, answer in zip(xs, answers, strict=True):
        np.testing.assert_allclose(answer, direct_combination(ensemble, x), rtol=1e-4, atol=1e-6)
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    requests = metric(text, "chorus_batched_requests_sum") - metric(
        before, "chorus_batched_requests_sum"
    )
    batches = metric(text, "chorus_batched_requests_count") - metric(
        before, "chorus_batched_requests_count"
    )
    assert requests == 64  # every request went through the batching stage, once
    # how many shared a batch depends on timing (see test_batching), but 64 requests sent at
    # once never each get a batch of their own
    assert 1 <= batches < 64


def test_client_shared_memory_is_off_unless_allowed(two_workers):
    import os

    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    import tritonclient.utils.shared_memory as shm
    from tritonclient.utils import InferenceServerException

    _, endpoints, _ = two_workers  # started without allow_client_shm
    name = f"chorus_client_off_{os.getpid()}"
    handle = shm.create_shared_memory_region(name, "/" + name, 4096)
    try:
        with grpcclient.InferenceServerClient(endpoints.ensemble) as client:
            assert "system_shared_memory" not in client.get_server_metadata().extensions
            with pytest.raises(InferenceServerException, match="--allow-client-shm") as e:
                client.register_system_shared_memory(name, "/" + name, 4096)
            assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
        http = httpclient.InferenceServerClient(endpoints.ensemble_http)
        with pytest.raises(InferenceServerException, match="--allow-client-shm") as e:
            http.register_system_shared_memory(name, "/" + name, 4096)
        assert e.value.status() == "400"
        http.close()
    finally:
        shm.destroy_shared_memory_region(handle)


def test_idle_connections_to_the_metrics_port_hold_no_thread_for_long(two_workers):
    """The metrics port is the supervisor's (the process that restarts the workers): each
    connection held a thread of it for as long as the client kept it open, without limit."""
    import psutil

    deployment, _, url = two_workers
    assert deployment.combiner is not None and deployment.combiner.pid is not None
    supervisor = psutil.Process(deployment.combiner.pid)
    threads = supervisor.num_threads()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(60)]
    try:
        for s in idle[::2]:
            s.sendall(b"GET /metrics HTTP/1.1\r\n")  # half a request, then nothing
        time.sleep(1)
        assert supervisor.num_threads() <= threads + 20  # bounded, whoever connects
        text = urllib.request.urlopen(url, timeout=20).read().decode()
        assert "chorus_requests_in_flight" in text  # and it still answers
        log = deployment.workdir / "combiner.log"
        size = log.stat().st_size
        time.sleep(11)  # past the timeout: those left are closed, each without a traceback
        with log.open("rb") as f:
            f.seek(size)
            added = f.read().decode(errors="replace")
        assert "Traceback" not in added and "Exception occurred" not in added, added[-1500:]
    finally:
        for s in idle:
            s.close()
