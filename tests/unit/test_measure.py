"""How the profile turns measuring rounds into the costs of serving (``derive_host``), on data
written by hand: medians over rounds, their range, and a cost that comes out below 0 reported as
unmeasured with its reason, never as a negative number. Also the serving policy that a
measurement runs under, what the planner makes of a cost the profile could not measure, the CPU
and memory of process trees that the profile reads, and the progress it shows."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest
from rich.console import Console

from orchestrator.errors import SpecError
from orchestrator.measuring.host_costs import (
    Alone,
    Calls,
    Window,
    derive_host,
    measuring_policy,
)
from orchestrator.measuring.process_usage import cpu_by_process, cpu_spent, tree_rss_bytes
from orchestrator.measuring.progress import ProfileProgress
from orchestrator.planning.allocate import problem
from orchestrator.planning.hardware import Device
from orchestrator.planning.profile import Curve, Host, Profile, load_profile, save_profile
from orchestrator.planning.spec import Ensemble, Member

# three members; a request of 64 rows is one call each (Triton's CPU: 6 ms in all), or four
# calls each at batch 16 (9 ms in all); their round trips at 64 rows: 2, 3 and 5 ms
CALLS = Calls(
    members=3, rows=64, small=16, cpu_ms=6.0, small_cpu_ms=9.0, latency_ms=(2.0, 3.0, 5.0)
)
EXTRA_CALLS = 9  # 3 members x (4 - 1) more calls on the quarter deployment


def window(per_request_ms: float, requests: float = 100.0, client_ms: float = 2.0) -> Window:
    """A window of one second that answered ``requests``, each costing the processes serving
    ``per_request_ms`` of CPU (``client_ms`` of it the client's), on an otherwise idle host
    whose two cores were busy three quarters of the time."""
    serving = per_request_ms * requests / 1000
    return Window(
        requests=requests,
        seconds=1.0,
        serving_cpu_s=serving,
        client_cpu_s=client_ms * requests / 1000,
        idle_s=serving / 3,
        others_cpu_s=0.0,
    )


def quarter_for(per_call_ms: float, full_ms: float = 10.0) -> float:
    """The quarter deployment's CPU per request when each extra call costs ``per_call_ms``:
    its calls (9 ms) plus what the full one spends beyond its own (full - 6 ms), plus 9 calls."""
    return CALLS.small_cpu_ms + (full_ms - CALLS.cpu_ms) + EXTRA_CALLS * per_call_ms


CLEAN = (window(10.0), window(quarter_for(0.25)))
ALONE = Alone(concurrent_p50_ms=6.5, sequential_ms=10.0 + 1.5 + 3 * 0.4)


def test_quiet_rounds_give_each_cost_by_its_definition():
    host = derive_host(CALLS, [CLEAN] * 3, [ALONE] * 3, cores=2)
    assert host.call_cpu_ms == pytest.approx(0.25)
    # 10 ms per request - 6 ms of calls - 3 x 0.25 ms per call - 2 ms of the client
    assert host.combiner_cpu_ms == pytest.approx(1.25)
    assert host.client_cpu_ms == pytest.approx(2.0)
    assert host.latency_ms == pytest.approx(1.5)  # 6.5 ms - the slowest member's 5 ms
    assert host.sequential_call_ms == pytest.approx(0.4)  # (12.7 - 10 - 1.5) / 3
    assert host.busy_share == pytest.approx(0.75)
    assert host.unmeasured == ()


def test_a_round_that_a_busy_host_disturbed_does_not_move_the_costs():
    disturbed = (window(14.0), window(quarter_for(0.25)))  # the full window paid 4 ms more
    host = derive_host(CALLS, [CLEAN, disturbed, CLEAN], [ALONE] * 3, cores=2)
    assert host.call_cpu_ms == pytest.approx(0.25)
    assert host.combiner_cpu_ms == pytest.approx(1.25)
    # the range over the rounds says how far the disturbed one was: 14 - 6 - 0.75 - 2 ms
    bounds = {name: (low, high) for name, low, high in host.bounds}
    assert bounds["combiner_cpu_ms"] == pytest.approx((1.25, 5.25))
    assert bounds["call_cpu_ms"][1] == pytest.approx(0.25)


def test_noisy_windows_whose_difference_is_below_zero_are_reported_unmeasured():
    # per round, each extra call measured at -0.5, -0.41 and +0.2 ms: the median is below 0
    rounds = [(window(10.0), window(quarter_for(pc))) for pc in (-0.5, -0.41, 0.2)]
    # one request at a time: the combiner measured quicker than the members' own round trips
    alone = [Alone(4.8, 9.5), Alone(4.9, 9.4), Alone(5.3, 12.0)]
    host = derive_host(CALLS, rounds, alone, cores=2)
    assert host.call_cpu_ms is None and host.latency_ms is None
    assert host.sequential_call_ms is None
    reasons = dict(host.unmeasured)
    assert set(reasons) == {"call_cpu_ms", "latency_ms", "sequential_call_ms"}
    assert "-0.410 ms" in reasons["call_cpu_ms"] and "below 0" in reasons["call_cpu_ms"]
    assert "counted as 0" in reasons["sequential_call_ms"]
    # the costs derived after them count them as 0, as the planner will
    assert host.combiner_cpu_ms == pytest.approx(10.0 - 6.0 - 0.0 - 2.0)
    for name in ("combiner_cpu_ms", "client_cpu_ms"):
        assert getattr(host, name) >= 0


def test_a_round_with_a_window_that_answered_nothing_is_left_out():
    empty = (window(10.0, requests=0.0), window(quarter_for(0.25)))
    host = derive_host(CALLS, [empty, CLEAN, CLEAN], [Alone(0.0, 0.0), ALONE, ALONE], cores=2)
    assert host.combiner_cpu_ms == pytest.approx(1.25)
    assert host.sequential_call_ms == pytest.approx(0.4)


def test_no_round_answered_leaves_every_cost_unmeasured_and_never_raises():
    empty = (window(10.0, requests=0.0), window(10.0, requests=0.0))
    host = derive_host(CALLS, [empty] * 3, [Alone(0.0, 0.0)] * 3, cores=2)
    costs = ("combiner_cpu_ms", "client_cpu_ms", "latency_ms", "call_cpu_ms", "sequential_call_ms")
    assert all(getattr(host, name) is None for name in costs)
    assert host.busy_share is None
    assert set(dict(host.unmeasured)) == {*costs, "busy_share"}


def test_one_batch_size_leaves_the_cost_of_a_call_unmeasured():
    one_size = replace(CALLS, small=64)
    host = derive_host(one_size, [(window(10.0), None)] * 3, [ALONE] * 3, cores=2)
    assert host.call_cpu_ms is None
    assert "one batch size only" in dict(host.unmeasured)["call_cpu_ms"]
    assert host.combiner_cpu_ms == pytest.approx(10.0 - 6.0 - 2.0)


def test_other_processes_keeping_the_cores_busy_leave_the_busy_share_unmeasured():
    busy = [replace(w, idle_s=0.0, others_cpu_s=0.5) for w in CLEAN]  # a quarter of 2 cores
    host = derive_host(CALLS, [tuple(busy)] * 3, [ALONE] * 3, cores=2)  # type: ignore[list-item]
    assert host.busy_share is None
    assert "other processes kept 25% of the 2 cores busy" in dict(host.unmeasured)["busy_share"]
    # the processes serving are counted, not the host: their costs do not change
    assert host.combiner_cpu_ms == pytest.approx(1.25)
    assert host.call_cpu_ms == pytest.approx(0.25)


def test_a_load_that_keeps_under_half_the_cores_busy_says_nothing_of_the_share():
    light = [replace(w, idle_s=2 * w.serving_cpu_s) for w in CLEAN]  # a third of the time
    host = derive_host(CALLS, [tuple(light)] * 3, [ALONE] * 3, cores=2)  # type: ignore[list-item]
    assert host.busy_share is None
    assert "under half" in dict(host.unmeasured)["busy_share"]


def test_a_measurement_sets_the_serving_policy_aside():
    ensemble = Ensemble(
        name="toy",
        file=Path("ensemble.yaml"),
        members=(),
        inputs=(),
        outputs=(),
        rule="mean",
        softmax=False,
        max_batch_size=4,
        deadline_ms=150.0,
        quorum=2,
        member_timeout_ms=100.0,
    )
    members = tuple(Member(n, Path(f"{n}.onnx"), 1.0, (), (), (), ()) for n in "abc")
    ensemble = replace(ensemble, members=members)
    measured = measuring_policy(ensemble)
    assert measured.deadline_ms is None
    assert measured.quorum == 3
    assert measured.member_timeout_ms == 60_000.0
    patient = replace(ensemble, member_timeout_ms=120_000.0)
    assert measuring_policy(patient).member_timeout_ms == 120_000.0


def test_profile_files_keep_unmeasured_costs_with_their_reasons(tmp_path):
    host = derive_host(
        CALLS,
        [(window(10.0), window(quarter_for(pc))) for pc in (-0.5, -0.41, 0.2)],
        [ALONE] * 3,
        cores=2,
    )
    rounded = replace(
        host, bounds=tuple((n, round(lo, 4), round(hi, 4)) for n, lo, hi in host.bounds)
    )
    profile = Profile({"m": {"cpu": Curve(1, 2, ((1, 2.0),))}}, rounded)
    save_profile(profile, tmp_path / "p.json")
    loaded = load_profile(tmp_path / "p.json")
    assert loaded.host is not None
    assert loaded.host.call_cpu_ms is None
    assert dict(loaded.host.unmeasured) == dict(host.unmeasured)
    assert loaded.host.bounds == rounded.bounds


def test_a_profile_file_naming_an_unknown_cost_is_refused(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(
        '{"members": {"m": {"cpu": {"memory_bytes": 1, "latency_ms": {"1": 2.0}}}},'
        ' "host": {"rows_per_request": 64, "combiner_cpu_ms": 1.0,'
        ' "unmeasured": {"call_cpu": "typo"}}}'
    )
    with pytest.raises(SpecError, match=r"host\.unmeasured.*'call_cpu' is not a measured cost"):
        load_profile(path)


def test_the_planner_counts_a_cost_the_profile_could_not_measure_as_zero():
    members = {
        f"m{i}": Curve(
            2**30, 10**6, ((1, 2.0), (64, 20.0)), ((1, 1.0), (64, 15.0)), ((1, 1.0), (64, 8.0))
        )
        for i in range(2)
    }
    cpu = Device("node0", "cpu", 0, "cpu", 64 * 2**30, 64 * 2**30, cores=4, lanes=4)

    def planned(host: Host):  # type: ignore[no-untyped-def]
        return problem(
            list(members), Profile({m: {"cpu": c} for m, c in members.items()}, host), [cpu], 64
        )

    unmeasured = planned(Host(64, None, None, None, call_cpu_ms=None, sequential_call_ms=None))
    zero = planned(Host(64, 0.0, 0.0, 0.0, call_cpu_ms=0.0, sequential_call_ms=0.0))
    np.testing.assert_array_equal(unmeasured.cpu, zero.cpu)
    assert (unmeasured.host_cpu, unmeasured.host_latency, unmeasured.sequential_call) == (
        zero.host_cpu,
        zero.host_latency,
        zero.sequential_call,
    )


BURNER = """
import subprocess, sys, time
if sys.argv[1:] == ["burn"]:
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    print("burnt", flush=True)
    time.sleep(60)
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], "burn"])
child.wait()
"""


def test_the_cpu_of_the_processes_serving_counts_every_process_of_their_trees():
    with subprocess.Popen(
        [sys.executable, "-c", BURNER, BURNER], stdout=subprocess.PIPE, text=True
    ) as parent:
        try:
            before = cpu_by_process([parent.pid])
            assert parent.stdout is not None and parent.stdout.readline() == "burnt\n"
            spent = cpu_spent(before, cpu_by_process([parent.pid]))
        finally:
            for process in psutil.Process(parent.pid).children(recursive=True):
                process.kill()
            parent.kill()
    tick = 1 / os.sysconf("SC_CLK_TCK")
    assert spent >= 0.3 - 2 * tick  # the grandchild's, begun after the first reading


HOLDER = """
import sys, time
held = bytearray(int(sys.argv[1]) << 20)
held[::4096] = b"x" * len(held[::4096])  # resident: every page touched
print("held", flush=True)
time.sleep(60)
"""

SPAWNER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], "/m/1/model.py"])
child.wait()
"""


def test_the_memory_of_a_process_tree_counts_its_descendants_or_those_of_a_member():
    mib = 2**20
    with subprocess.Popen(
        [sys.executable, "-c", SPAWNER, HOLDER, "96"], stdout=subprocess.PIPE, text=True
    ) as parent:
        try:
            assert parent.stdout is not None and parent.stdout.readline() == "held\n"
            (child,) = psutil.Process(parent.pid).children()
            tree, member = tree_rss_bytes(parent.pid), tree_rss_bytes(parent.pid, "/m/1/model.py")
            alone = tree_rss_bytes(child.pid)
            elsewhere = tree_rss_bytes(parent.pid, "/other/1/model.py")
        finally:
            for process in psutil.Process(parent.pid).children(recursive=True):
                process.kill()
            parent.kill()
    # the grandchild holds 96 MiB, and an interpreter (under 64 MiB) besides
    assert 96 * mib <= member < (96 + 64) * mib
    assert member == pytest.approx(alone, abs=mib)  # its stub only, the parent left out
    assert tree >= member + 4 * mib  # the parent's interpreter too
    assert elsewhere == 0
    assert tree_rss_bytes(parent.pid) == 0  # a tree that has gone holds nothing


def test_profile_progress_without_a_terminal_says_each_step_and_that_a_long_one_still_runs():
    out = io.StringIO()
    console = Console(file=out, width=200)
    with ProfileProgress(console=console, heartbeat_s=0.3) as progress:
        with progress.doing("starting Triton"):
            pass
        with progress.phase("each member", steps=2) as phase:
            with phase.step("mlp, batch 1"):
                pass
            with phase.step("mlp, batch 2"):
                time.sleep(1.0)
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("] starting Triton")
    assert lines[1].endswith("] each member: mlp, batch 1 (1/2)")
    assert lines[2].endswith("] each member: mlp, batch 2 (2/2)")
    beats = lines[3:]
    assert 1 <= len(beats) <= 4 and all("each member: mlp, batch 2 (2/2): " in b for b in beats)
    assert beats[-1].endswith(" s so far")


def test_profile_progress_hidden_says_nothing():
    out = io.StringIO()
    with ProfileProgress(show=False, console=Console(file=out), heartbeat_s=0.01) as progress:
        with progress.phase("each member", steps=1) as phase, phase.step("mlp, batch 1"):
            pass
    assert out.getvalue() == ""
