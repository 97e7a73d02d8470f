"""A co-located client's inputs and outputs in its own shared memory, through the SDK and
through stock tritonclient (gRPC and HTTP)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from combiner.sdk import AsyncEnsembleClient, EnsembleClient, EnsembleError, InvalidRequest
from tests.integration.test_serving import direct_combination

SHM = Path("/dev/shm")
# over gRPC a client's registrations belong to its session: a secret header of its own
H = {"chorus-shm-session": uuid.uuid4().hex}
OTHER = {"chorus-shm-session": uuid.uuid4().hex}


def combiner_regions(url: str) -> set[str]:
    """The regions registered on a new connection: none, whatever other connections hold."""
    with grpcclient.InferenceServerClient(url) as client:
        status = client.get_system_shared_memory_status(as_json=True)
    return set(status.get("regions", {}))


def own_segments() -> set[str]:
    return {p.name for p in SHM.glob(f"chorus_client_{os.getpid()}_*")}


def test_sdk_shared_memory_answers_and_cleans_up(ensemble, endpoints, split):
    before = own_segments()
    x = split.x_test[:300]
    expected = direct_combination(ensemble, x)
    client = EnsembleClient(endpoints.ensemble, shared_memory=True)
    answer = client.infer(x[:17])
    np.testing.assert_allclose(answer.outputs["probabilities"], expected[:17], rtol=1e-4, atol=1e-6)
    # max-batch chunks in flight together, each in its own region
    np.testing.assert_allclose(
        client.predict_all(x, chunk=20, concurrency=4), expected, rtol=1e-4, atol=1e-6
    )
    made = own_segments() - before
    assert len(made) >= 2
    assert combiner_regions(endpoints.ensemble) == set()  # the SDK's connection's, not others'
    client.close()
    assert not own_segments() & made


def test_async_sdk_shared_memory_keeps_concurrent_requests_apart(ensemble, endpoints):
    xs = [
        np.random.default_rng(500 + i).random((i % 4 + 1, 1, 8, 8), np.float32) for i in range(64)
    ]

    async def go():
        async with AsyncEnsembleClient(endpoints.ensemble, shared_memory=True) as client:
            return await asyncio.gather(*(client.predict(x) for x in xs))

    for x, answer in zip(xs, asyncio.run(go()), strict=True):
        np.testing.assert_allclose(answer, direct_combination(ensemble, x), rtol=1e-4, atol=1e-6)


@pytest.fixture
def region():
    name = f"chorus_client_test_{os.getpid()}"
    handle = shm.create_shared_memory_region(name, "/" + name, 4096)
    yield name, handle
    shm.destroy_shared_memory_region(handle)


def test_async_calls_cancelled_at_any_step_leave_no_registration_behind(ensemble, endpoints):
    """A call cancelled while its region was being registered unlinked the region here but
    left it registered there: 64 such filled the client's cap, and every later call failed."""
    x = np.random.default_rng(7).random((2, 1, 8, 8), np.float32)

    async def go() -> tuple[np.ndarray, set[str], set[str]]:
        client = AsyncEnsembleClient(endpoints.ensemble, shared_memory=True)
        try:
            await client.predict(x)
            for i in range(150):  # each cancelled in a step of its own, by chance
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(client.predict(x), 0.0002 * (i % 10 + 1))
            for i in range(150):  # cancelled twice: the second lands on the cleaning up
                call = asyncio.ensure_future(client.predict(x))
                await asyncio.sleep(0.0002 * (i % 10 + 1))
                call.cancel()
                await asyncio.sleep(0.0001 * (i % 7))
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await call
            answer = await client.predict(x)
            session = client._core.headers or {}
            with grpcclient.InferenceServerClient(endpoints.ensemble) as stock:
                status = stock.get_system_shared_memory_status(as_json=True, headers=session)
            assert client._core.regions is not None
            held = {r.name for r in client._core.regions.every}
            return answer, set(status.get("regions", {})), held
        finally:
            await client.close()

    answer, registered, held = asyncio.run(go())
    np.testing.assert_allclose(answer, direct_combination(ensemble, x), rtol=1e-4, atol=1e-6)
    assert registered <= held, registered - held


def test_an_async_predict_all_that_fails_leaves_no_segment_once_closed(endpoints):
    """Its other chunks were left running: closed under them, they leaked their segments."""
    x = np.random.default_rng(9).random((400, 1, 8, 8), np.float32)
    x[330] = np.nan  # one chunk refused, the others in flight
    before = own_segments()

    async def go() -> None:
        for _ in range(3):
            async with AsyncEnsembleClient(endpoints.ensemble, shared_memory=True) as client:
                with pytest.raises(InvalidRequest, match="is not finite"):
                    await client.predict_all(x, chunk=8, concurrency=8)

    asyncio.run(go())
    assert own_segments() - before == set()


CLOSE_UNDER_CALLS = """
import os, sys, threading, time
import numpy as np
from combiner.sdk import EnsembleClient, EnsembleError
client = EnsembleClient(sys.argv[1], shared_memory=True)
x = np.random.default_rng(4).random((8, 1, 8, 8), np.float32)
client.predict(x)
odd = []
def loop():
    while True:
        try:
            client.predict(x)
        except EnsembleError:  # closed: during its call, or before it
            if client._core.closed:
                return
        except BaseException as e:
            odd.append(repr(e))
            return
threads = [threading.Thread(target=loop) for _ in range(4)]
for t in threads:
    t.start()
time.sleep(0.3)
client.close()
for t in threads:
    t.join(30)
assert not any(t.is_alive() for t in threads), "a call hung"
assert not odd, odd
left = [n for n in os.listdir("/dev/shm") if n.startswith(f"chorus_client_{os.getpid()}_")]
assert not left, left
print("ok")
"""


def test_closing_a_client_under_its_calls_in_flight_crashes_nothing_and_leaks_nothing(
    endpoints,
):
    """close() from another thread unmapped regions calls were writing into: a segfault."""
    for _ in range(4):
        run = subprocess.run(
            [sys.executable, "-c", CLOSE_UNDER_CALLS, endpoints.ensemble],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_closing_an_async_client_under_its_calls_leaves_no_segment_and_no_odd_error(endpoints):
    """Calls outliving close() had raised grpc's UsageError or a CancelledError nobody asked
    for, and left segments."""
    x = np.random.default_rng(5).random((8, 1, 8, 8), np.float32)
    before = own_segments()

    async def go() -> list[str]:
        client = AsyncEnsembleClient(endpoints.ensemble, shared_memory=True)
        await client.predict(x)
        odd: list[str] = []

        async def loop() -> None:
            while not client._core.closed:
                try:
                    await client.predict(x)
                except EnsembleError:
                    if not client._core.closed:
                        raise
                except BaseException as e:
                    odd.append(repr(e))
                    return

        calls = [asyncio.ensure_future(loop()) for _ in range(6)]
        await asyncio.sleep(0.3)
        await client.close()
        await asyncio.wait_for(asyncio.gather(*calls), 30)
        return odd

    for _ in range(3):
        assert asyncio.run(go()) == []
    assert own_segments() - before == set()


def test_a_cancelled_close_is_finished_by_the_next(endpoints):
    """close() cancelled midway had taken its free regions out of every list: the next
    close() found none, and their segments stayed until the process ended."""
    x = np.random.default_rng(6).random((8, 1, 8, 8), np.float32)
    before = own_segments()

    async def go() -> None:
        client = AsyncEnsembleClient(endpoints.ensemble, shared_memory=True)
        await asyncio.gather(*(client.predict(x) for _ in range(4)))  # four free regions
        closing = asyncio.ensure_future(client.close())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        closing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await closing
        await client.close()

    for _ in range(3):
        asyncio.run(go())
    assert own_segments() - before == set()


def test_stock_grpc_client_with_input_and_output_in_shared_memory(ensemble, endpoints, region):
    name, handle = region
    x = np.random.default_rng(9).random((3, 1, 8, 8), np.float32)
    shm.set_shared_memory_region(handle, [x])
    with grpcclient.InferenceServerClient(endpoints.ensemble) as client:
        client.register_system_shared_memory(name, "/" + name, 4096, headers=H)
        try:
            tensor = grpcclient.InferInput("image", [3, 1, 8, 8], "FP32")
            tensor.set_shared_memory(name, x.nbytes)
            out = grpcclient.InferRequestedOutput("probabilities")
            out.set_shared_memory(name, 3 * 10 * 4, offset=1024)
            client.infer("digits", [tensor], outputs=[out], headers=H)
            got = shm.get_contents_as_numpy(handle, np.float32, (3, 10), offset=1024)
            np.testing.assert_allclose(got, direct_combination(ensemble, x), rtol=1e-4, atol=1e-6)

            small = grpcclient.InferRequestedOutput("probabilities")
            small.set_shared_memory(name, 16, offset=1024)
            with pytest.raises(InferenceServerException, match="needs 120 bytes"):
                client.infer("digits", [tensor], outputs=[small], headers=H)
        finally:
            client.unregister_system_shared_memory(name, headers=H)
        with pytest.raises(InferenceServerException, match="unknown shared-memory region"):
            client.infer("digits", [tensor], headers=H)


def test_a_stock_grpc_clients_registration_outlives_the_sweep_while_it_is_connected(
    ensemble, endpoints, region
):
    """The sweep (every 2 s, on a registration or a status call) drops the regions of closed
    connections only: it took gRPC's peer ``ipv4:127.0.0.1:P`` for gone where the socket table
    shows the dual-stack socket's ``::ffff:127.0.0.1``, and dropped every gRPC session's."""
    name, handle = region
    x = np.random.default_rng(11).random((2, 1, 8, 8), np.float32)
    shm.set_shared_memory_region(handle, [x])
    with grpcclient.InferenceServerClient(endpoints.ensemble) as client:
        client.register_system_shared_memory(name, "/" + name, 4096, headers=H)
        try:
            time.sleep(2.5)  # past the sweep's interval
            status = client.get_system_shared_memory_status(as_json=True, headers=H)
            assert set(status.get("regions", {})) == {name}
            tensor = grpcclient.InferInput("image", [2, 1, 8, 8], "FP32")
            tensor.set_shared_memory(name, x.nbytes)
            got = client.infer("digits", [tensor], headers=H).as_numpy("probabilities")
            np.testing.assert_allclose(got, direct_combination(ensemble, x), rtol=1e-4, atol=1e-6)
        finally:
            client.unregister_system_shared_memory(name, headers=H)


def test_stock_http_client_with_shared_memory(ensemble, endpoints, region):
    name, handle = region
    x = np.random.default_rng(10).random((2, 1, 8, 8), np.float32)
    shm.set_shared_memory_region(handle, [x])
    client = httpclient.InferenceServerClient(endpoints.ensemble_http)
    client.register_system_shared_memory(name, "/" + name, 4096)
    try:
        assert [r["name"] for r in client.get_system_shared_memory_status()] == [name]
        tensor = httpclient.InferInput("image", [2, 1, 8, 8], "FP32")
        tensor.set_shared_memory(name, x.nbytes)
        out = httpclient.InferRequestedOutput("probabilities")
        out.set_shared_memory(name, 2 * 10 * 4, offset=2048)
        client.infer("digits", [tensor], outputs=[out])
        got = shm.get_contents_as_numpy(handle, np.float32, (2, 10), offset=2048)
        np.testing.assert_allclose(got, direct_combination(ensemble, x), rtol=1e-4, atol=1e-6)
    finally:
        client.unregister_system_shared_memory(name)
        client.close()


def test_bad_registrations_are_refused_by_name(endpoints, region):
    name, _ = region
    with grpcclient.InferenceServerClient(endpoints.ensemble) as client:
        with pytest.raises(InferenceServerException, match="names no region this endpoint may"):
            client.register_system_shared_memory(
                "ghost", "/chorus_client_no_such_key", 64, headers=H
            )
        with pytest.raises(InferenceServerException, match="exceed its 4096 bytes"):
            client.register_system_shared_memory(name, "/" + name, 8192, headers=H)
        client.register_system_shared_memory(name, "/" + name, 4096, headers=H)
        try:
            with pytest.raises(InferenceServerException, match="already registered"):
                client.register_system_shared_memory(name, "/" + name, 4096, headers=H)
            tensor = grpcclient.InferInput("image", [100, 1, 8, 8], "FP32")
            tensor.set_shared_memory(name, 100 * 64 * 4)
            with pytest.raises(InferenceServerException, match="exceeds the maximum batch"):
                client.infer("digits", [tensor], headers=H)
            tensor = grpcclient.InferInput("image", [20, 1, 8, 8], "FP32")
            tensor.set_shared_memory(name, 20 * 64 * 4)
            with pytest.raises(InferenceServerException, match="do not fit shared-memory region"):
                client.infer("digits", [tensor], headers=H)
        finally:
            client.unregister_system_shared_memory(name, headers=H)


def refused(client, name: str, key: str, size: int = 64) -> str:
    with pytest.raises(InferenceServerException) as e:
        client.register_system_shared_memory(name, key, size, headers=H)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT", e.value
    return e.value.message()


def test_nothing_but_a_clients_own_region_can_be_registered(endpoints, still_serving, tmp_path):
    """Triton's own IPC regions, the combiner's pool, a link to a file, a path: refused."""
    with grpcclient.InferenceServerClient(endpoints.triton_grpc) as triton:  # this deployment's
        status = triton.get_system_shared_memory_status(
            as_json=True, headers=dict(endpoints.triton_headers)
        )
    pool = sorted(r["key"].lstrip("/") for r in status.get("regions", {}).values())
    triton_own = sorted(p.name for p in SHM.glob("triton_python_backend_shm_region_*"))
    assert pool and triton_own  # what a hostile client would aim at is there
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious" * 100)
    link = SHM / f"chorus_client_link_{os.getpid()}"
    link.symlink_to(victim)
    try:
        with grpcclient.InferenceServerClient(endpoints.ensemble) as client:
            for key in (pool[0], triton_own[0], link.name, "..", "../etc/passwd", ""):
                message = refused(client, "evil", "/" + key)
                assert str(victim) not in message
            assert client.get_system_shared_memory_status(as_json=True, headers=H) == {}
    finally:
        link.unlink()
    assert victim.read_bytes() == b"precious" * 100


def test_a_region_truncated_after_registration_is_refused_and_the_worker_lives(
    endpoints, still_serving
):
    name = f"chorus_client_shrinking_{os.getpid()}"
    handle = shm.create_shared_memory_region(name, "/" + name, 1 << 16)
    try:
        x = np.random.default_rng(4).random((8, 1, 8, 8), np.float32)
        shm.set_shared_memory_region(handle, [x])
        with grpcclient.InferenceServerClient(endpoints.ensemble) as client:
            client.register_system_shared_memory(name, "/" + name, 1 << 16, headers=H)
            os.truncate(SHM / name, 128)  # what used to kill the worker with SIGBUS
            tensor = grpcclient.InferInput("image", [8, 1, 8, 8], "FP32")
            tensor.set_shared_memory(name, x.nbytes)
            with pytest.raises(InferenceServerException) as e:
                client.infer("digits", [tensor], headers=H)
            assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
            assert "shrank to 128 bytes" in e.value.message()
            client.unregister_system_shared_memory(name, headers=H)
    finally:
        shm.destroy_shared_memory_region(handle)


def test_registrations_are_per_session_and_capped(endpoints, still_serving):
    name = f"chorus_client_many_{os.getpid()}"
    handle = shm.create_shared_memory_region(name, "/" + name, 4096)
    try:
        with (
            grpcclient.InferenceServerClient(endpoints.ensemble) as mine,
            # a connection of its own (channels of one process share one by default)
            grpcclient.InferenceServerClient(
                endpoints.ensemble, channel_args=[("grpc.use_local_subchannel_pool", 1)]
            ) as other,
        ):
            for i in range(64):
                mine.register_system_shared_memory(f"r{i}", "/" + name, 4096, headers=H)
            with pytest.raises(InferenceServerException) as e:
                mine.register_system_shared_memory("r64", "/" + name, 4096, headers=H)
            assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
            assert "the most allowed" in e.value.message()
            other.unregister_system_shared_memory(headers=OTHER)  # "all": all of *its* regions
            assert (
                len(mine.get_system_shared_memory_status(as_json=True, headers=H)["regions"]) == 64
            )
            with pytest.raises(InferenceServerException, match="unknown shared-memory region"):
                tensor = grpcclient.InferInput("image", [1, 1, 8, 8], "FP32")
                tensor.set_shared_memory("r0", 256)
                other.infer("digits", [tensor], headers=OTHER)  # another session cannot use them
            mine.unregister_system_shared_memory(headers=H)
            assert mine.get_system_shared_memory_status(as_json=True, headers=H) == {}
    finally:
        shm.destroy_shared_memory_region(handle)
