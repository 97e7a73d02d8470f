from orchestrator.hardware import discover


def test_discovery_always_finds_the_cpu_with_its_cores_and_memory():
    devices = discover(node="n0")
    cpu = devices[-1]
    assert cpu.kind == "cpu" and cpu.id == "n0/cpu0"
    assert cpu.cores >= 1
    assert 0 < cpu.free_bytes <= cpu.memory_bytes
    assert all(d.kind == "gpu" and d.memory_bytes > 0 for d in devices[:-1])
