"""Client shared memory, tried as an unlucky or hostile neighbour would: a region let go while
its request runs, a later connection from the same port, a hard link to the combiner's pool,
and the SDK across a worker that was killed or replaced."""

from __future__ import annotations

import asyncio
import fcntl
import http.client
import json
import os
import signal
import socket
import struct
import uuid
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from combiner.sdk import DeadlineExceeded, EnsembleClient, Unavailable
from tests.integration.test_serving import direct_combination

SHM = Path("/dev/shm")
SESSION = "chorus-shm-session"
ROWS = 4
OUT_BYTES = ROWS * 10 * 4


def session() -> dict[str, str]:
    return {SESSION: uuid.uuid4().hex}


def own_segments() -> set[str]:
    return {p.name for p in SHM.glob(f"chorus_client_{os.getpid()}_*")}


class Segment:
    """A shared-memory file of the test's own."""

    def __init__(self, tag: str, size: int = 4096) -> None:
        self.name = f"chorus_client_{tag}_{os.getpid()}"
        self.handle = shm.create_shared_memory_region(self.name, "/" + self.name, size)
        self.size = size

    def zero(self) -> None:
        shm.set_shared_memory_region(self.handle, [np.zeros(self.size, np.uint8)])

    def bytes(self) -> bytes:
        return (SHM / self.name).read_bytes()

    def destroy(self) -> None:
        shm.destroy_shared_memory_region(self.handle)


def test_a_region_let_go_while_its_request_runs_never_sends_the_answer_elsewhere(
    ensemble, endpoints, still_serving
):
    """Client 1 asks its output into region A and unregisters A at once; client 2 keeps
    registering region B, which nobody asks anything into. Before the fix, A's descriptor was
    closed at unregister, B's open() got its number, and client 1's answer landed in B."""
    a, b = Segment("race_a"), Segment("race_b")
    x = np.random.default_rng(31).random((ROWS, 1, 8, 8), np.float32)
    shm.set_shared_memory_region(a.handle, [x])
    cycles, leaks, errors, answered, watching = 200, [], [], [0], [True]

    async def first() -> None:
        headers = session()
        async with aioclient.InferenceServerClient(endpoints.ensemble) as client:
            for _ in range(cycles):
                await client.register_system_shared_memory(
                    "a", "/" + a.name, a.size, headers=headers
                )
                tensor = aioclient.InferInput("image", list(x.shape), "FP32")
                tensor.set_shared_memory("a", x.nbytes)
                out = aioclient.InferRequestedOutput("probabilities")
                out.set_shared_memory("a", OUT_BYTES, offset=2048)
                call = asyncio.ensure_future(
                    client.infer("digits", [tensor], outputs=[out], headers=headers)
                )
                await asyncio.sleep(0)  # the request is on its way
                await client.unregister_system_shared_memory("a", headers=headers)
                try:
                    await call
                    answered[0] += 1
                except InferenceServerException as e:  # unregistered before it was read: fine
                    if "unknown shared-memory region" not in e.message():
                        errors.append(e.message())
        watching[0] = False

    async def second() -> None:
        headers = session()
        async with aioclient.InferenceServerClient(
            endpoints.ensemble, channel_args=[("grpc.use_local_subchannel_pool", 1)]
        ) as client:
            while watching[0]:
                b.zero()
                await client.register_system_shared_memory(
                    "b", "/" + b.name, b.size, headers=headers
                )
                await asyncio.sleep(0.002)
                await client.unregister_system_shared_memory("b", headers=headers)
                if b.bytes() != bytes(b.size):
                    leaks.append(b.bytes())

    async def both() -> None:
        await asyncio.wait_for(asyncio.gather(first(), second()), 120)

    try:
        asyncio.run(both())
        assert leaks == [], f"{len(leaks)} of client 1's answers landed in client 2's region"
        assert errors == []  # before the fix: INTERNAL, EBADF
        assert answered[0] > 0
        got = shm.get_contents_as_numpy(a.handle, np.float32, (ROWS, 10), offset=2048)
        np.testing.assert_allclose(got, direct_combination(ensemble, x), rtol=1e-4, atol=1e-6)
    finally:
        a.destroy()
        b.destroy()


def http_call(
    port: int, source_port: int, method: str, path: str, body: object = None
) -> tuple[int, bytes]:
    """One request on a new connection from ``source_port``, closed with a reset (no
    TIME_WAIT, so the next connection may take the same port at once)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, source_address=("127.0.0.1", source_port))
    conn.connect()
    assert conn.sock is not None
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_a_later_connection_from_the_same_port_inherits_no_registration(endpoints, still_serving):
    assert endpoints.ensemble_http is not None
    port = int(endpoints.ensemble_http.rpartition(":")[2])
    segment = Segment("inherit")
    with socket.socket() as probe:  # a port of the test's own for its client end
        probe.bind(("127.0.0.1", 0))
        source = probe.getsockname()[1]
    try:
        status, _ = http_call(
            port,
            source,
            "POST",
            "/v2/systemsharedmemory/region/mine/register",
            {"key": "/" + segment.name, "offset": 0, "byte_size": segment.size},
        )
        assert status == 200
        status, body = http_call(port, source, "GET", "/v2/systemsharedmemory/status")
        assert status == 200 and json.loads(body) == []
        status, body = http_call(
            port,
            source,
            "POST",
            "/v2/models/digits/infer",
            {
                "inputs": [
                    {
                        "name": "image",
                        "shape": [1, 1, 8, 8],
                        "datatype": "FP32",
                        "parameters": {"shared_memory_region": "mine"},
                    }
                ]
            },
        )
        assert status == 400 and b"unknown shared-memory region 'mine'" in body
    finally:
        segment.destroy()


def test_grpc_registration_without_a_session_is_refused_naming_the_header(endpoints, still_serving):
    segment = Segment("nosession")
    try:
        with grpcclient.InferenceServerClient(endpoints.ensemble) as client:
            with pytest.raises(InferenceServerException) as e:
                client.register_system_shared_memory("r", "/" + segment.name, segment.size)
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "needs the header 'chorus-shm-session'" in e.value.message()
    finally:
        segment.destroy()


def test_a_hard_link_to_the_combiners_pool_is_refused(endpoints, still_serving):
    with grpcclient.InferenceServerClient(endpoints.triton_grpc) as triton:
        status = triton.get_system_shared_memory_status(
            as_json=True, headers=dict(endpoints.triton_headers)
        )
    keys = [r["key"] for r in status.get("regions", {}).values()]
    assert keys, "the deployment's combiner registered no pool region with Triton"
    link = SHM / f"chorus_client_link_{os.getpid()}"
    os.link(SHM / keys[0].lstrip("/"), link)
    try:
        with grpcclient.InferenceServerClient(endpoints.ensemble) as client:
            with pytest.raises(InferenceServerException) as e:
                client.register_system_shared_memory(
                    "evil", "/" + link.name, 4096, headers=session()
                )
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "names no region this endpoint may open" in e.value.message()
    finally:
        link.unlink()


def test_the_sdk_gives_no_region_back_after_a_call_that_was_not_answered(
    ensemble, endpoints, still_serving
):
    x = np.random.default_rng(5).random((3, 1, 8, 8), np.float32)
    before = own_segments()
    with EnsembleClient(endpoints.ensemble, shared_memory=True) as client:
        client.predict(x)
        (used,) = own_segments() - before
        with pytest.raises(DeadlineExceeded):
            client.predict(x, timeout_s=1e-6)  # the client gives up; the server may answer
        assert used not in own_segments()  # never reused: unregistered and unlinked
        np.testing.assert_allclose(
            client.predict(x), direct_combination(ensemble, x), rtol=1e-4, atol=1e-6
        )


@pytest.mark.parametrize("chorus_up", [("--allow-client-shm",)], indirect=True)
def test_the_sdks_shared_memory_survives_a_killed_worker_and_a_reload(ensemble, chorus_up):
    x = np.random.default_rng(6).random((5, 1, 8, 8), np.float32)
    expected = direct_combination(ensemble, x)
    config = chorus_up.workdir / "combiner.json"
    served = config.with_name("combiner.json.served")
    with EnsembleClient(chorus_up.address, shared_memory=True) as client:
        np.testing.assert_allclose(client.predict(x), expected, rtol=1e-4, atol=1e-6)
        old = chorus_up.children("combiner.worker")
        for pid in old:
            os.kill(pid, signal.SIGKILL)
        chorus_up.wait_for(
            "two new workers",
            lambda: len(chorus_up.children("combiner.worker") - old) == 2,
        )
        answers = []

        def answered() -> bool:  # UNAVAILABLE until the new workers listen, then answers
            try:
                answers.append(client.predict(x))
            except Unavailable:
                return False
            return True

        chorus_up.wait_for("an answer from the new workers", answered)
        np.testing.assert_allclose(answers[-1], expected, rtol=1e-4, atol=1e-6)

        before = served.read_text()
        doc = json.loads(config.read_text())
        doc["batch_fill_ms"] = doc.get("batch_fill_ms", 5.0) + 1.0  # any valid change reloads
        config.write_text(json.dumps(doc))
        chorus_up.wait_for("the reload", lambda: served.read_text() != before, timeout=90)
        np.testing.assert_allclose(client.predict(x), expected, rtol=1e-4, atol=1e-6)


def test_a_region_under_a_lease_is_refused_at_once_and_the_worker_goes_on(endpoints, still_serving):
    """A client that holds a write lease on its own region's file, then registers it: the
    combiner's open waited in its event loop until the lease broke (45 s by default: every
    other request on that worker with it); now it is refused at once, naming the lease."""
    name = f"chorus_client_lease_{os.getpid()}"
    path = SHM / name
    with path.open("wb") as f:
        f.truncate(4096)
    previous = signal.signal(signal.SIGIO, lambda *_: None)  # the lease's break is asked for
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        with grpcclient.InferenceServerClient(endpoints.ensemble) as client:
            with pytest.raises(InferenceServerException, match="under a lease") as refused:
                client.register_system_shared_memory(
                    "leased",
                    "/" + name,
                    4096,
                    headers={SESSION: uuid.uuid4().hex},
                    client_timeout=20,  # (not a speed bound: the wait was 45 s)
                )
            assert "INVALID_ARGUMENT" in str(refused.value.status())
    finally:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        os.close(fd)
        signal.signal(signal.SIGIO, previous)
        path.unlink()
