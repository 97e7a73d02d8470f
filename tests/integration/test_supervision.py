"""Faults below the combiner are events, not the end: ``chorus up`` restarts Triton (the
ensemble answers UNAVAILABLE meanwhile, then correctly again, with nobody doing anything), the
combiner's supervisor replaces a dead worker while the other serves, SIGTERM under load cuts no
request, and only a crash loop ends ``chorus up``, with a message that says so."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import psutil
from tritonclient.grpc import service_pb2, service_pb2_grpc

from combiner.sdk import EnsembleClient, Unavailable
from tests.integration.processes import alive, descendants
from tests.integration.test_serving import direct_combination

SHM = Path("/dev/shm")


def orphans(session: int) -> list[int]:
    """Processes still alive in the session of a process that died."""
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if os.getsid(p.pid) == session and alive(p.pid):
                found.append(p.pid)
    return found


class Load:
    """Closed-loop clients, each on its own connection, each answer checked."""

    def __init__(self, address: str, ensemble, clients: int = 4, rows: int = 4) -> None:
        self.codes: Counter[str] = Counter()
        self.wrong = 0
        self.times: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._rows = rows
        self._x = np.random.default_rng(0).random((64, rows, 1, 8, 8), dtype=np.float32)
        self._expected = direct_combination(ensemble, self._x.reshape(-1, 1, 8, 8)).reshape(
            64, rows, 10
        )
        self._threads = [
            threading.Thread(target=self._client, args=(address, c)) for c in range(clients)
        ]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def _client(self, address: str, index: int) -> None:
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(address, options=options) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            i = index
            while not self._stop.is_set():
                i = (i + 7) % 64
                request = service_pb2.ModelInferRequest(model_name="digits")
                request.inputs.add(name="image", datatype="FP32", shape=[self._rows, 1, 8, 8])
                request.raw_input_contents.append(self._x[i].tobytes())
                try:
                    answer = stub.ModelInfer(request, timeout=30)
                    code = "OK"
                    got = np.frombuffer(answer.raw_output_contents[0], np.float32)
                    right = np.allclose(
                        got.reshape(self._rows, 10), self._expected[i], rtol=1e-4, atol=1e-6
                    )
                except grpc.RpcError as e:
                    code, right = e.code().name, True
                    time.sleep(0.01)  # a client that retries, not a spinning one
                with self._lock:
                    self.codes[code] += 1
                    self.wrong += not right
                    self.times.append((time.monotonic(), code))

    def count(self, code: str, since: float = 0.0) -> int:
        with self._lock:
            return sum(1 for t, c in self.times if c == code and t >= since)


def test_triton_killed_under_load_comes_back_by_itself(chorus_up, ensemble):
    up = chorus_up
    (triton,) = up.children("tritonserver")
    with Load(up.address, ensemble) as load:
        up.wait_for("answers", lambda: load.count("OK") > 20)
        killed = time.monotonic()
        subprocess.run(["kill", "-9", str(triton)], check=True)
        up.wait_for("Triton restarted", lambda: up.children("tritonserver") - {triton})
        up.wait_for("Triton ready", lambda: "tritonserver is back" in up.text())
        back = time.monotonic()
        up.wait_for("answers again", lambda: load.count("OK", since=back) > 20)
    assert load.wrong == 0
    assert set(load.codes) <= {"OK", "UNAVAILABLE"}, load.codes
    assert load.count("UNAVAILABLE", since=killed) > 0  # the fault was seen, and refused
    assert up.process.poll() is None  # chorus up kept going
    assert "tritonserver exited with code -9; restarting it" in up.text()
    assert "tritonserver is back" in up.text()
    assert orphans(triton) == []  # the Python backend's stubs of the killed Triton went too
    x = np.random.default_rng(5).random((7, 1, 8, 8), dtype=np.float32)
    expected = direct_combination(ensemble, x)

    def answers_right() -> bool:  # a new connection each time: either worker may take it
        try:
            with EnsembleClient(up.address) as client:
                return bool(np.allclose(client.predict(x), expected, rtol=1e-4, atol=1e-6))
        except Unavailable:
            return False  # a worker that has not seen Triton back yet (a probe away)

    up.wait_for("every worker answers", lambda: all(answers_right() for _ in range(8)))


def test_a_killed_worker_is_replaced_while_the_other_serves(chorus_up, ensemble):
    up = chorus_up
    first, second = sorted(up.children("combiner.worker"))
    with Load(up.address, ensemble) as load:
        up.wait_for("answers", lambda: load.count("OK") > 20)
        subprocess.run(["kill", "-9", str(first)], check=True)
        up.wait_for("a new worker", lambda: len(up.children("combiner.worker") - {first}) == 2)
        replaced = time.monotonic()
        up.wait_for("answers after", lambda: load.count("OK", since=replaced) > 20)
    assert second in up.children("combiner.worker")  # the other one was never stopped
    assert load.wrong == 0
    assert set(load.codes) <= {"OK", "UNAVAILABLE"}, load.codes
    assert up.process.poll() is None


def test_sigterm_under_load_answers_what_was_accepted_and_cuts_nothing(chorus_up, ensemble):
    up = chorus_up
    tree = descendants(up.process.pid)
    workers = up.children("combiner.worker")
    with Load(up.address, ensemble, clients=16) as load:
        up.wait_for("answers", lambda: load.count("OK") > 50)
        up.process.send_signal(signal.SIGTERM)
        code = up.process.wait(timeout=120)
        time.sleep(0.5)
    assert code == 0, up.text()
    assert load.wrong == 0
    # in flight at the signal: answered; sent after it: UNAVAILABLE (stopping, or no listener)
    assert set(load.codes) <= {"OK", "UNAVAILABLE"}, load.codes
    up.wait_for("every process gone", lambda: not any(alive(p) for p in tree))
    left = {p.name for p in SHM.glob("chorus_*") if p.name.split("_")[1] in map(str, workers)}
    assert left == set()  # the pool's regions are unlinked on the way out


def test_a_crash_loop_ends_chorus_up_with_a_message_and_code_1(chorus_up):
    up = chorus_up
    (triton,) = up.children("tritonserver")
    (up.workdir / "repository" / "mlp" / "1" / "model.onnx").unlink()  # it cannot come back
    subprocess.run(["kill", "-9", str(triton)], check=True)
    code = up.process.wait(timeout=180)
    assert code == 1, up.text()
    assert "tritonserver exited with code" in up.text()
    assert "5 restarts within 60 s, giving up" in up.text()
    events = (up.workdir / "events.log").read_text()  # also where the console may be gone
    assert "error: " in events and "5 restarts within 60 s, giving up" in events, events
