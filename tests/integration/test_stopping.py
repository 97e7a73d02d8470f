"""Stopping the combiner never cancels a call Triton is running (Triton 2.51 can crash on a
cancellation), and every request that reached a listener is answered: in flight or arriving
at the instant of SIGTERM, none is cut. The member tells us itself whether Triton saw a
cancellation (``request.is_cancelled()``)."""

from __future__ import annotations

import http.client as http_client
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from combiner.sdk import EnsembleClient
from orchestrator.deploying.launch import free_port
from tests.integration.toy import combiner, toy_config, toy_triton


def watching(seconds: float, record: Path) -> str:
    """A member that answers after ``seconds`` and writes, per request, whether Triton had
    cancelled it by then."""
    return (
        f"time.sleep({seconds})\n"
        f"            open({str(record)!r}, 'a').write(f'{{r.is_cancelled()}}\\n')\n"
        "            responses.append(pb_utils.InferenceResponse("
        "[pb_utils.Tensor('y', np.full((len(x), 3), 1.0, dtype=np.float32))]))"
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("stopping")
    record = root / "cancelled.txt"
    with toy_triton(root, {"slow": (watching(3.0, record), 1)}) as (_, triton):
        yield root, triton, record


def test_a_call_still_running_at_stop_is_never_cancelled(stack):
    """The slow member's call outlives the drain (1 s): before, the channel was closed under
    it and Triton saw a cancellation."""
    root, triton, record = stack
    record.unlink(missing_ok=True)
    config = toy_config(
        triton, root, ["a", "b", "slow"], deadline_ms=200, quorum=2, drain_timeout_s=1.0
    )
    pid = triton.process.pid if triton.process else None
    with combiner(root, "combiner-stop", config) as (process, address):
        with EnsembleClient(address) as client:
            answer = client.infer(np.ones((2, 4), np.float32))
        assert answer.contributors == ("a", "b")  # at its deadline; slow's call goes on
        assert process.proc is not None
        began = time.monotonic()
        process.proc.send_signal(signal.SIGTERM)
        code = process.proc.wait(timeout=60)
        took = time.monotonic() - began
    assert code == 0, process.log.read_text()[-3000:]
    until = time.monotonic() + 10  # (before the fix the combiner was gone before the member)
    while not record.exists() and time.monotonic() < until:
        time.sleep(0.1)
    assert record.read_text().split() == ["False"]  # Triton never saw a cancellation
    assert took > 1.5  # it waited for the call, past its 1 s drain
    assert triton.process is not None and triton.process.pid == pid
    with grpcclient.InferenceServerClient(triton.grpc_url) as direct:
        assert direct.is_server_live()


def test_requests_in_flight_and_arriving_at_sigterm_are_answered_never_cut(stack):
    root, triton, _ = stack
    config = toy_config(triton, root, ["a", "b"], drain_timeout_s=5.0)
    outcomes: list[str] = []
    lock = threading.Lock()
    with combiner(root, "combiner-sigterm", config) as (process, address):
        go = threading.Event()
        stop_sending = threading.Event()

        def closed_loop(seed: int) -> None:
            x = np.random.default_rng(seed).random((1, 4), np.float32)
            with grpcclient.InferenceServerClient(address) as client:
                tensor = grpcclient.InferInput("x", [1, 4], "FP32")
                tensor.set_data_from_numpy(x)
                go.wait()
                while not stop_sending.is_set():
                    try:
                        client.infer("toy", [tensor])
                        outcome = "answered"
                    except InferenceServerException as e:
                        outcome = f"{e.status()}: {e.message()}"
                    with lock:
                        outcomes.append(outcome)
                    if outcome != "answered":
                        return

        threads = [threading.Thread(target=closed_loop, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        go.set()
        time.sleep(1.0)  # every client in its loop
        assert process.proc is not None
        process.proc.send_signal(signal.SIGTERM)
        code = process.proc.wait(timeout=60)
        stop_sending.set()
        for t in threads:
            t.join(timeout=30)
    assert code == 0
    answered = outcomes.count("answered")
    others = [o for o in outcomes if o != "answered"]
    assert answered > 16
    # what did not get an answer never reached a listener: no connection to make
    assert all(o.startswith("StatusCode.UNAVAILABLE") and "connect" in o.lower() for o in others), (
        others
    )


def test_ctrl_c_to_the_whole_process_group_still_drains_and_cancels_nothing(stack):
    """A terminal's Ctrl-C signals every process of its group: the workers must not take it
    as a second signal (exit at once), which cut the request and cancelled its call."""
    root, triton, record = stack
    record.unlink(missing_ok=True)
    config = toy_config(triton, root, ["a", "b", "slow"], drain_timeout_s=10.0)
    with combiner(root, "combiner-ctrl-c", config) as (process, address):
        assert process.proc is not None
        answers: list[object] = []

        def ask() -> None:
            with EnsembleClient(address) as client:
                try:
                    answers.append(client.infer(np.ones((1, 4), np.float32)).contributors)
                except Exception as e:
                    answers.append(e)

        asking = threading.Thread(target=ask)
        asking.start()
        time.sleep(1.0)  # the request waits for the slow member
        os.killpg(process.proc.pid, signal.SIGINT)  # ManagedProcess: a session, so a group
        code = process.proc.wait(timeout=60)
        asking.join(timeout=30)
    assert code == 0, process.log.read_text()[-3000:]
    assert answers == [("a", "b", "slow")]
    until = time.monotonic() + 10
    while not record.exists() and time.monotonic() < until:
        time.sleep(0.1)
    assert record.read_text().split() == ["False"]


def test_a_restart_on_the_same_ports_after_clients_were_connected_is_not_refused(stack):
    """Closed connections' ends (FIN_WAIT2, TIME_WAIT) made the port look in use."""
    root, triton, _ = stack
    config = toy_config(triton, root, ["a", "b"])
    port, http = free_port(), free_port()
    for round_ in range(2):
        with combiner(
            root, f"combiner-restart-{round_}", config, "--http-port", str(http), port=port
        ) as (process, address):
            body = json.dumps(
                {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}]}
            )
            connection = http_client.HTTPConnection("127.0.0.1", http, timeout=10)
            connection.request("POST", "/v2/models/toy/infer", body=body)  # kept alive
            assert connection.getresponse().read()
            with EnsembleClient(address) as client:
                assert client.predict(np.ones((1, 4), np.float32)).shape == (1, 3)
        assert process.proc is not None and process.proc.returncode == 0
        connection.close()
