"""What Chorus gives away: Triton's key only on the calls Triton restricts (never on a health
probe, which whoever holds Triton's port while it restarts would answer), no Triton metrics
port, and to a client only the name and status code of a member that failed, never the
member's own error text (a traceback with paths, or values of other clients' rows), nor
Triton's address when the members cannot be reached."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from combiner.sdk import EnsembleClient, Unavailable
from combiner.triton.upstream import KEY_HEADER, MemberError, Upstream
from combiner.triton.watch import TritonWatch
from orchestrator.deploying.launch import TritonServer, free_port
from tests.integration.processes import descendants
from tests.integration.toy import BROKEN, combiner, toy_config, toy_triton

KEY = f"triton-grpc-protocol-{KEY_HEADER}"


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, TritonServer]]:
    root = tmp_path_factory.mktemp("exposure")
    with toy_triton(root, {"broken": (BROKEN, 1)}) as (_, triton):
        yield root, triton


class Recorder(service_pb2_grpc.GRPCInferenceServiceServicer):
    """A gRPC server standing on a port, as whoever binds Triton's port while it restarts
    would: it answers health and inference, and keeps the metadata of every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []

    def _keep(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.calls.append((method, dict(context.invocation_metadata() or ())))

    async def ServerLive(
        self, request: service_pb2.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ServerLiveResponse:
        self._keep("ServerLive", context)
        return service_pb2.ServerLiveResponse(live=True)

    async def ModelReady(
        self, request: service_pb2.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelReadyResponse:
        self._keep("ModelReady", context)
        return service_pb2.ModelReadyResponse(ready=True)

    async def ModelInfer(
        self, request: service_pb2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelInferResponse:
        self._keep("ModelInfer", context)
        return service_pb2.ModelInferResponse(model_name=request.model_name)


async def probed_and_inferred(recorder: Recorder, probes: int) -> None:
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(recorder, server)
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    await server.start()
    upstream = Upstream(f"127.0.0.1:{port}", key="0123abcd")
    try:
        watch = TritonWatch(upstream, ["a", "b"])
        for _ in range(probes):
            assert await watch.check()
        await upstream.infer(service_pb2.ModelInferRequest(model_name="a"))
    finally:
        await upstream.close()
        await server.stop(None)


def test_health_probes_carry_no_key_and_inference_does() -> None:
    recorder = Recorder()
    asyncio.run(probed_and_inferred(recorder, probes=3))
    probes = [(m, meta) for m, meta in recorder.calls if m != "ModelInfer"]
    assert sorted({m for m, _ in probes}) == ["ModelReady", "ServerLive"]
    assert len(probes) == 3 * 3  # ServerLive and two ModelReady per probe
    assert all(KEY not in meta for _, meta in probes), probes
    (inference,) = [meta for m, meta in recorder.calls if m == "ModelInfer"]
    assert inference[KEY] == "0123abcd"  # the recorder sees keys where there are any


def test_the_launched_triton_answers_probes_without_the_key_and_infers_only_with_it(
    toy: tuple[Path, TritonServer],
) -> None:
    _, triton = toy

    async def probe() -> tuple[str | None, str | None, str]:
        keyless, keyed = Upstream(triton.grpc_url), Upstream(triton.grpc_url, triton.key)
        try:
            keyless_ready = await keyless.readiness(["a", "b", "broken"])
            keyed_ready = await keyed.readiness(["a", "b", "broken"])
            request = service_pb2.ModelInferRequest(model_name="a")
            request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
            request.raw_input_contents.append(np.zeros((1, 4), np.float32).tobytes())
            with pytest.raises(MemberError) as refused:
                await keyless.infer(request)
            await keyed.infer(request)
            return keyless_ready, keyed_ready, refused.value.details
        finally:
            await keyless.close()
            await keyed.close()

    keyless_ready, keyed_ready, refused = asyncio.run(probe())
    assert keyless_ready is None and keyed_ready is None
    assert "restricted" in refused


def test_the_launched_triton_listens_on_its_grpc_and_http_ports_only(
    toy: tuple[Path, TritonServer],
) -> None:
    _, triton = toy
    assert triton.process is not None and triton.process.pid is not None
    listening = {
        c.laddr.port
        for c in psutil.Process(triton.process.pid).net_connections("inet")
        if c.status == psutil.CONN_LISTEN
    }
    assert listening == {triton.grpc_port, triton.http_port}
    assert "Metrics Service" not in triton.process.log_tail(200)


def test_a_failed_member_is_named_with_its_status_code_and_its_text_stays_in_the_log(
    toy: tuple[Path, TritonServer],
) -> None:
    root, triton = toy
    config = toy_config(triton, root, ["a", "b", "broken"], quorum=2)
    with combiner(root, "combiner", config) as (process, address):
        with EnsembleClient(address) as client:
            answer = client.infer(np.ones((2, 4), np.float32))
        log = process.log.read_text()
    assert answer.contributors == ("a", "b")
    assert answer.missing == ("broken",)
    reason = answer.reasons["broken"]
    assert reason.startswith("INTERNAL: ")
    for private in ("broken on purpose", "RuntimeError", "model.py", str(root), "At:", "\n"):
        assert private not in reason, reason
    assert "broken on purpose" in log and "model.py" in log


def test_unreachable_members_are_named_to_the_client_and_tritons_address_stays_in_the_log(
    toy: tuple[Path, TritonServer],
) -> None:
    root, triton = toy
    port = free_port()  # nothing listens there: gRPC's error names this address
    config = toy_config(triton, root, ["a", "b"], triton_url=f"127.0.0.1:{port}")
    with combiner(root, "unreachable", config) as (process, address):
        with EnsembleClient(address) as client, pytest.raises(Unavailable) as refused:
            client.infer(np.ones((2, 4), np.float32))
        log = process.log.read_text()
    told = str(refused.value)
    for private in (str(port), "127.0.0.1", "ipv4", "connect"):
        assert private not in told, told
    assert "the members are not reachable: a, b" in told, told
    assert f"127.0.0.1:{port}" in log  # the operator still reads gRPC's own text


# Another user's listener: it only counts the bytes it is sent (a combiner that trusted it
# would open an HTTP/2 connection and probe it at once). The system's python3 (not the venv,
# which another user may not be able to read).
IMPOSTOR = """
import socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
server = socket.create_server((host, int(port)))
print("LISTENING", flush=True)
end, got = time.monotonic() + float(sys.argv[2]), 0
while (left := end - time.monotonic()) > 0:
    server.settimeout(left)
    try:
        conn, _ = server.accept()
        conn.settimeout(max(0.01, min(0.5, end - time.monotonic())))
        while chunk := conn.recv(65536):
            got += len(chunk)
    except OSError:
        pass
print("GOT", got, flush=True)
"""


@pytest.mark.skipif(os.getuid() != 0, reason="starting a listener as another user needs root")
@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="no system python3")
def test_a_listener_of_another_user_on_tritons_port_is_never_trusted(tmp_path: Path) -> None:
    """Another local user binds Triton's port while it restarts, to answer the probes as Triton
    would: the watch does not declare it ready, and sends it nothing (no probe, no key, no
    shared memory)."""
    address = f"127.0.0.1:{free_port()}"
    impostor = subprocess.Popen(
        ["/usr/bin/python3", "-c", IMPOSTOR, address, "3"],
        stdout=subprocess.PIPE,
        text=True,
        user=65534,  # nobody
        group=65534,
        cwd="/",
    )
    try:
        assert impostor.stdout is not None and impostor.stdout.readline().strip() == "LISTENING"

        async def probe() -> list[tuple[bool, str]]:
            upstream = Upstream(address, key="0123abcd")
            try:
                watch = TritonWatch(upstream, ["a"])
                return [(await watch.check(), watch.reason) for _ in range(3)]
            finally:
                await upstream.close()

        checks = asyncio.run(probe())
        said, _ = impostor.communicate(timeout=20)
    finally:
        impostor.kill()
    for ready, reason in checks:
        assert not ready
        assert reason.endswith("is held by uid 65534, not this user's Triton"), reason
    assert said.split() == ["GOT", "0"], said


def _shm_files(pid: int) -> set[Path]:
    """The shared-memory files a process maps or holds open."""
    files = set()
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            path = line.split(maxsplit=5)[-1]
            if path.startswith("/dev/shm/"):
                files.add(Path(path.removesuffix(" (deleted)")))
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("/dev/shm/"):
                    files.add(Path(target.removesuffix(" (deleted)")))
    return files


def test_what_holds_clients_tensors_is_the_deployments_user_alone(deployment, endpoints) -> None:
    """The combiner's shared memory (each batch's input, the members' outputs) and the logs (a
    failed call's text may hold other clients' values) are for the deployment's user alone: the
    logs were 0644. (Triton's Python backend makes its own regions 0644 whatever the umask:
    SECURITY.md.)"""
    with EnsembleClient(endpoints.ensemble) as client:  # the regions hold a request's tensors
        client.predict(np.zeros((1, 1, 8, 8), np.float32))
    assert deployment.combiner is not None and deployment.combiner.pid is not None
    combiner = deployment.combiner.pid
    files = set().union(*(_shm_files(p) for p in {combiner} | descendants(combiner)))
    assert files, "the combiner maps no shared memory"
    assert {f: oct(f.stat().st_mode & 0o777) for f in files if f.stat().st_mode & 0o077} == {}
    logs = {p.name: oct(p.stat().st_mode & 0o777) for p in deployment.workdir.glob("*.log")}
    assert {"tritonserver.log", "combiner.log"} <= set(logs), logs
    assert {n: m for n, m in logs.items() if n in ("tritonserver.log", "combiner.log")} == {
        "tritonserver.log": "0o600",
        "combiner.log": "0o600",
    }
