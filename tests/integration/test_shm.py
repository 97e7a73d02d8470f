"""One copy of the input in shared memory: used, cleaned up on a clean stop, and reclaimed at
the next start after a kill -9."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from combiner.sdk import EnsembleClient
from orchestrator.deploying.up import Deployment
from tests.integration.processes import descendants
from tests.integration.test_serving import direct_combination

SHM = Path("/dev/shm")


def chorus_segments() -> set[str]:
    """What is in /dev/shm under Chorus's prefix (only ever compared with this test's own
    regions: other work on the host may have its own)."""
    return {p.name for p in SHM.glob("chorus_*")}


def triton_regions(endpoints) -> set[str]:
    """Asked of Triton directly, with Chorus's key to its restricted APIs."""
    with grpcclient.InferenceServerClient(endpoints.triton_grpc) as client:
        status = client.get_system_shared_memory_status(
            as_json=True, headers=dict(endpoints.triton_headers)
        )
    return {r["name"] for r in status.get("regions", {}).values()}


def test_inputs_go_through_shared_memory_and_nothing_is_left_behind(
    ensemble, served_plan, tmp_path, split
):
    first: set[str] = set()
    now: set[str] = set()
    deployment = Deployment(ensemble, tmp_path / "work", plan=served_plan)
    endpoints = deployment.start()
    try:
        x = split.x_test[:40]
        with EnsembleClient(endpoints.ensemble) as client:
            np.testing.assert_allclose(
                client.predict(x), direct_combination(ensemble, x), rtol=1e-4, atol=1e-6
            )
        first = triton_regions(endpoints)
        assert first and first <= chorus_segments()  # registered with Triton, on this host

        # kill -9 the whole combiner (supervisor, workers, and Python's resource tracker, which
        # would unlink what a dead worker left; each worker has a process group of its own)
        assert deployment.combiner is not None and deployment.combiner.pid is not None
        tree = [deployment.combiner.pid, *descendants(deployment.combiner.pid)]
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deployment.combiner.proc.wait()  # type: ignore[union-attr]
        time.sleep(0.2)
        assert first <= chorus_segments()

        deployment.apply(deployment.plan)  # a new combiner: reclaims them at its start
        with EnsembleClient(endpoints.ensemble) as client:
            np.testing.assert_allclose(
                client.predict(x), direct_combination(ensemble, x), rtol=1e-4, atol=1e-6
            )
        now = triton_regions(endpoints)
        assert now and not (now & first)
        assert not (chorus_segments() & first)
    finally:
        deployment.stop()
    assert not (chorus_segments() & (first | now))  # a clean stop unlinks every region
