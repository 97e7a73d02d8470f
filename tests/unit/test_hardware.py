import os
import time

from orchestrator.measuring.measure import _cores_s
from orchestrator.planning.hardware import discover


def test_discovery_always_finds_the_cpu_with_its_cores_and_memory():
    devices = discover(node="n0")
    cpu = devices[-1]
    assert cpu.kind == "cpu" and cpu.id == "n0/cpu0"
    assert cpu.cores >= 1
    assert 0 < cpu.free_bytes <= cpu.memory_bytes
    assert all(d.kind == "gpu" and d.memory_bytes > 0 for d in devices[:-1])


def test_busy_time_counts_the_cpu_this_process_spends_on_its_cores():
    cores = os.sched_getaffinity(0)
    (before, _), mine = _cores_s(cores), time.process_time()
    while time.process_time() - mine < 0.3:  # burn CPU on these cores
        pass
    spent, busy = time.process_time() - mine, _cores_s(cores)[0] - before
    tick = 1 / os.sysconf("SC_CLK_TCK")
    assert busy >= spent - 2 * tick  # every process counts, this one too
    assert _cores_s(set()) == (0.0, 0.0)  # no core, no time
