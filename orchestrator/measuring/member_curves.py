"""One member alone on a running Triton: its :class:`~orchestrator.planning.profile.Curve` on one
device, the memory one instance needs and its latency, busy time and Triton's CPU at each batch
size.

The member is loaded alone (one instance; on a GPU through a config override that places it
there, without a restart), measured at each batch size with random inputs, and unloaded.
Memory is the growth of the server's process tree (the server and its Python backend stubs) on
the CPU, or of the GPU's used memory (NVML) on a GPU: once when the member is loaded
(``memory_bytes``) and once after its largest batch (``memory_per_sample_bytes``, per sample).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import tritonclient.grpc as grpcclient
from google.protobuf import json_format
from tritonclient.utils import triton_to_np_dtype

from orchestrator.deploying.render import Backend, InstanceGroup, parse_config, render_config
from orchestrator.measuring.process_usage import tree_cpu_s, tree_rss_bytes
from orchestrator.measuring.progress import Phase
from orchestrator.planning.hardware import Device, gpu_used_bytes
from orchestrator.planning.profile import Curve
from orchestrator.planning.spec import Member

__all__ = ["batch_sizes", "member_curve", "steps_per_member"]


def batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to the maximum, which is always included."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch_size:
        sizes.append(sizes[-1] * 2)
    if max_batch_size > 1:
        sizes.append(max_batch_size)
    return sizes


def steps_per_member(sizes: Sequence[int]) -> int:
    """The progress steps of :func:`member_curve`: loading, each batch size, unloading."""
    return len(sizes) + 2


def member_curve(
    client: grpcclient.InferenceServerClient,
    headers: dict[str, str],
    server_pid: int,
    member: Member,
    device: Device,
    backend: Backend,
    sizes: Sequence[int],
    seconds_per_point: float,
    phase: Phase,
) -> Curve:
    """Load ``member`` alone on ``device`` in the server ``server_pid``, measure it at each of
    ``sizes`` (the last the largest) for ``seconds_per_point`` each, unload it."""
    memory = _meter(device, server_pid, member.name, backend)
    override = _placed_on(member, backend, device, sizes[-1]) if device.kind == "gpu" else None
    on = f"{member.name} on {device.kind}"
    latency, service, cpu = {}, {}, {}
    with _loaded(client, member.name, override, memory, headers, phase, on) as (before, loaded):
        for b in sizes:
            with phase.step(f"{on}, batch {b}"):
                latency[b], service[b], cpu[b] = _latency_ms(
                    client, member, b, seconds_per_point, headers, server_pid
                )
        after = memory()
    return Curve(
        memory_bytes=max(0, loaded - before),
        memory_per_sample_bytes=max(0, (after - loaded) // sizes[-1]),
        latency_ms=tuple(sorted(latency.items())),
        service_ms=tuple(sorted(service.items())),
        cpu_ms=tuple(sorted(cpu.items())),
    )


def _placed_on(member: Member, backend: Backend, device: Device, max_batch_size: int) -> str:
    """The config override (JSON) that loads one instance of the member on this GPU."""
    text = render_config(
        member,
        backend,
        (InstanceGroup("gpu", 1, (device.index,)),),
        max_batch_size,
        intra_op_threads=0,
    )
    return json_format.MessageToJson(parse_config(text, member.name))


def _meter(device: Device, pid: int, member: str, backend: Backend) -> Callable[[], int]:
    """How to read the memory a member's instance holds on this device."""
    if device.kind == "gpu":
        return lambda: gpu_used_bytes(device.index)
    if backend == "python":  # each instance is a stub process of its own
        marker = f"/{member}/1/model.py"
        return lambda: tree_rss_bytes(pid, marker)
    return lambda: tree_rss_bytes(pid)


@contextmanager
def _loaded(
    client: grpcclient.InferenceServerClient,
    name: str,
    override: str | None,
    memory: Callable[[], int],
    headers: dict[str, str],
    phase: Phase,
    on: str,
) -> Iterator[tuple[int, int]]:
    """The member loaded, as (memory before, memory once loaded); unloaded after."""
    with phase.step(f"loading {on}"):
        before = memory()
        client.load_model(name, config=override, headers=headers)
        time.sleep(0.2)  # settled
        loaded = memory()
    try:
        yield before, loaded
    finally:
        with phase.step(f"unloading {on}"):
            client.unload_model(name, headers=headers)
            deadline = time.monotonic() + 30
            while client.is_model_ready(name) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)  # the backend stub exits after the model is unloaded


def _latency_ms(
    client: grpcclient.InferenceServerClient,
    member: Member,
    batch: int,
    seconds: float,
    headers: dict[str, str],
    server_pid: int | None = None,
) -> tuple[float, float, float]:
    """(median round trip, busy time of the instance per batch from Triton's compute
    statistics (its share of the round trip, at the median), CPU of Triton's process tree per
    call) in ms."""
    rng = np.random.default_rng(batch)
    inputs = []
    for t in member.inputs:
        shape = [batch, *(d if d > 0 else 1 for d in t.shape)]
        data = rng.random(shape).astype(triton_to_np_dtype(t.dtype))
        tensor = grpcclient.InferInput(t.name, shape, t.dtype)
        tensor.set_data_from_numpy(data)
        inputs.append(tensor)
    for _ in range(2):  # warm up
        client.infer(member.name, inputs, headers=headers)
    busy_before = _busy_ns(client, member.name, headers)
    cpu_before = tree_cpu_s(server_pid)
    times: list[float] = []
    end = time.perf_counter() + seconds
    while len(times) < 3 or time.perf_counter() < end:
        start = time.perf_counter()
        client.infer(member.name, inputs, headers=headers)
        times.append((time.perf_counter() - start) * 1000.0)
    cpu = (tree_cpu_s(server_pid) - cpu_before) * 1000.0 / len(times)
    busy_ns, executions = (
        a - b for a, b in zip(_busy_ns(client, member.name, headers), busy_before, strict=True)
    )
    median = statistics.median(times)
    if executions <= 0:
        return median, median, cpu
    # the busy share of the mean round trip, applied to the median one: a few slow calls
    # (a busy machine) raise both means. Triton may record a warm-up call's statistics after
    # the window began: never more busy than the round trip.
    service = busy_ns / 1e6 / executions * median / statistics.fmean(times)
    return median, min(service, median), cpu


def _busy_ns(
    client: grpcclient.InferenceServerClient, model: str, headers: dict[str, str]
) -> tuple[int, int]:
    """(compute input + infer + output ns, executions) so far, from Triton's statistics."""
    stats = client.get_inference_statistics(model, headers=headers, as_json=True)
    total = executions = 0
    for model_stats in stats.get("model_stats", []):
        inference = model_stats.get("inference_stats", {})
        for part in ("compute_input", "compute_infer", "compute_output"):
            total += int(inference.get(part, {}).get("ns", 0))
        executions += int(model_stats.get("execution_count", 0))
    return total, executions
