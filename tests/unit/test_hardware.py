"""This machine's devices as discovery sees them, and the cores' busy and idle time that the
profile reads, against what the kernel and the clock say by other ways."""

import os
import time

from orchestrator.measuring.process_usage import core_times_s
from orchestrator.planning.hardware import discover


def test_discovery_always_finds_the_cpu_with_its_cores_and_memory():
    devices = discover(node="n0")
    cpu = devices[-1]
    assert cpu.kind == "cpu" and cpu.id == "n0/cpu0"
    assert cpu.cores == cpu.lanes == len(os.sched_getaffinity(0))  # the cores it may run on
    # the machine's memory, as the kernel counts its pages (sysinfo), and what it has free
    assert cpu.memory_bytes == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < cpu.free_bytes <= cpu.memory_bytes
    assert cpu.name and cpu.name == cpu.name.strip()
    assert all(d.kind == "gpu" and d.memory_bytes > 0 for d in devices[:-1])


def test_busy_time_counts_the_cpu_this_process_spends_on_its_cores():
    cores = os.sched_getaffinity(0)
    (before, _), mine = core_times_s(cores), time.process_time()
    while time.process_time() - mine < 0.3:  # burn CPU on these cores
        pass
    spent, busy = time.process_time() - mine, core_times_s(cores)[0] - before
    tick = 1 / os.sysconf("SC_CLK_TCK")
    assert busy >= spent - 2 * tick  # every process counts, this one too
    assert core_times_s(set()) == (0.0, 0.0)  # no core, no time


def test_busy_and_idle_time_of_the_cores_add_up_to_the_time_that_passed():
    cores = os.sched_getaffinity(0)
    start, (busy, idle) = time.monotonic(), core_times_s(cores)
    time.sleep(1.0)
    elapsed, (busy_after, idle_after) = time.monotonic() - start, core_times_s(cores)
    accounted = (busy_after - busy) + (idle_after - idle)
    tick = 1 / os.sysconf("SC_CLK_TCK")
    # each core's second is busy or idle (less what a hypervisor stole): never more
    assert accounted <= len(cores) * (elapsed + 2 * tick)
    assert accounted >= 0.5 * len(cores) * elapsed
