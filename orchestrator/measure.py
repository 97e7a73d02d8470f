"""Measure each member on a real Triton: the memory one instance needs, and its latency per
batch size. What ``chorus profile`` runs; the result is a :class:`~orchestrator.profile.Profile`.

One tritonserver is started with no model loaded; each member is loaded alone (one instance),
measured at batch sizes 1, 2, 4, ... up to the ensemble's maximum with random inputs, and
unloaded. Memory is the growth of the server's process tree (the server and its Python backend
stubs) on the CPU, or of the GPU's used memory (NVML) on a GPU: once when the member is loaded
(``memory_bytes``) and once after its largest batch (``memory_per_sample_bytes``, per sample).
On a GPU the member is loaded with a config override placing it there, without a restart.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import psutil
import tritonclient.grpc as grpcclient
from google.protobuf import json_format
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from tritonclient.utils import triton_to_np_dtype

from .hardware import Device, discover, gpu_used_bytes
from .launch import ServerBinary, TritonServer, find_tritonserver
from .profile import Curve, Host, Profile
from .render import InstanceGroup, parse_config, pick_backend, render_config, render_repository
from .spec import Ensemble, Member

if TYPE_CHECKING:
    from .plan import Plan

__all__ = ["batch_sizes", "measure_profile", "tree_rss_bytes"]


def batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to the maximum, which is always included."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch_size:
        sizes.append(sizes[-1] * 2)
    if max_batch_size > 1:
        sizes.append(max_batch_size)
    return sizes


def tree_rss_bytes(pid: int, marker: str | None = None) -> int:
    """Resident memory of a process and all its descendants, from /proc; with ``marker``, only
    of the descendants whose command line contains it (a member's backend stubs)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            if marker is not None and (
                p == pid
                or marker not in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
            ):
                continue
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def measure_profile(
    ensemble: Ensemble,
    workdir: Path,
    devices: tuple[Device, ...] | None = None,
    seconds_per_point: float = 0.3,
    binary: ServerBinary | None = None,
    show_progress: bool = True,
) -> Profile:
    """Measure every member on each kind of local device (the first GPU, and the CPU)."""
    devices = devices if devices is not None else discover()
    targets = [d for d in devices if d.kind == "gpu"][:1] + [d for d in devices if d.kind == "cpu"]
    binary = binary or find_tritonserver()
    backend = pick_backend(binary.backends)
    sizes = batch_sizes(ensemble.max_batch_size)
    repo = workdir / "profile-repository"
    cpu_group = {m.name: (InstanceGroup("cpu", 1),) for m in ensemble.members}
    render_repository(
        ensemble,
        repo,
        backend,
        cpu_group,
        {m.name: ensemble.max_batch_size for m in ensemble.members},
        intra_op_threads=1,
    )
    results: dict[str, dict[str, Curve]] = {m.name: {} for m in ensemble.members}
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with (
        TritonServer(repo, workdir / "profile", [], binary=binary) as server,
        grpcclient.InferenceServerClient(server.grpc_url) as client,
        Progress(*columns, disable=not show_progress, transient=True) as progress,
    ):
        task = progress.add_task(
            "profiling", total=len(targets) * len(ensemble.members) * len(sizes)
        )
        for device in targets:
            assert server.process is not None and server.process.pid is not None
            for member in ensemble.members:
                memory = _meter(device, server.process.pid, member.name, backend)
                override = None
                if device.kind == "gpu":
                    text = render_config(
                        member,
                        backend,
                        (InstanceGroup("gpu", 1, (device.index,)),),
                        ensemble.max_batch_size,
                        intra_op_threads=0,
                    )
                    override = json_format.MessageToJson(parse_config(text, member.name))
                headers = server.grpc_headers
                with _loaded(client, member.name, override, memory, headers) as (before, loaded):
                    latency, service, cpu = {}, {}, {}
                    for b in sizes:
                        progress.update(
                            task, description=f"{member.name} on {device.kind}, batch {b}"
                        )
                        latency[b], service[b], cpu[b] = _latency_ms(
                            client, member, b, seconds_per_point, headers, server.process.pid
                        )
                        progress.advance(task)
                    after = memory()
                results[member.name][device.kind] = Curve(
                    memory_bytes=max(0, loaded - before),
                    memory_per_sample_bytes=max(0, (after - loaded) // sizes[-1]),
                    latency_ms=tuple(sorted(latency.items())),
                    service_ms=tuple(sorted(service.items())),
                    cpu_ms=tuple(sorted(cpu.items())),
                )
    cpus = [d for d in devices if d.kind == "cpu"]
    host = None
    if cpus:
        curves = {m: c["cpu"] for m, c in results.items()}
        host = measure_host(ensemble, workdir / "host", binary, curves, cpus[0])
    return Profile(results, host)


def measure_host(
    ensemble: Ensemble,
    workdir: Path,
    binary: ServerBinary,
    curves: Mapping[str, Curve],
    cpu: Device,
    seconds: float = 3.0,
    concurrency: int = 4,
) -> Host | None:
    """What serving costs beyond the members' calls as ``curves`` measured them one at a time
    (see :class:`~orchestrator.profile.Host`), on the ``cpu`` device: every member on it,
    requests of ``max_batch_size`` rows from ``concurrency`` clients in this process.

    Two deployments are loaded in turn, in short alternating windows (the machine's speed
    drifts): one instance of each member at the largest batch size (one call per member and
    request), and at a quarter of it (four calls). The busy CPU per request of the cores this
    process may run on (/proc/stat: every process and the kernel) in each, less the members'
    calls as measured one at a time, gives the CPU per request and per call; and the share of
    those cores that serving keeps busy (kept where the load kept at least half of them busy:
    a machine too large for this load says nothing about it). Then, alone (one request at a
    time feels every other process), a third deployment calls the members one after another
    for one client: what each call adds to a request. Each window lasts at least five
    requests made one at a time. None for ensembles of several inputs (not driven yet)."""
    from .bench import ensemble_load, random_rows
    from .plan import one_instance_each
    from .up import Deployment

    if len(ensemble.inputs) != 1:
        return None
    (tensor,) = ensemble.inputs
    rows = ensemble.max_batch_size
    x = random_rows(tensor, max(4 * rows, 256))
    names = [m.name for m in ensemble.members]
    full = one_instance_each(ensemble.name, names, (cpu,), rows)
    sizes = batch_sizes(rows)
    small = min(sizes, key=lambda b: abs(b - rows / 4))
    quarter = replace(full, max_batch_size=dict.fromkeys(names, small))
    me = psutil.Process()
    cores = os.sched_getaffinity(0)
    one_at_a_time = sum(curves[m].latency(rows) or 0.0 for m in names) / 1000  # s, about
    window = max(seconds / 3, 5 * one_at_a_time)

    def serve(
        stack: ExitStack, name: str, plan: Plan, fan_out: Literal["concurrent", "sequential"]
    ) -> str:
        deployment = Deployment(
            ensemble, workdir / name, binary=binary, devices=(cpu,), plan=plan, fan_out=fan_out
        )
        url = stack.enter_context(deployment).ensemble
        ensemble_load(url, x, rows, concurrency, 0.5)  # warm up
        return url

    with ExitStack() as stack:
        urls = [serve(stack, "full", full, "concurrent")]
        if small < rows:
            urls.append(serve(stack, "quarter", quarter, "concurrent"))
        busy = {url: [0.0, 0.0, 0.0, 0.0] for url in urls}  # CPU s, client CPU s, requests, s
        for _ in range(3):
            for url in urls:
                cpu_before, client_before = _busy_s(cores), sum(me.cpu_times()[:2])
                start = time.perf_counter()
                load = ensemble_load(url, x, rows, concurrency, window)
                elapsed = time.perf_counter() - start
                spent = busy[url]
                spent[0] += _busy_s(cores) - cpu_before
                spent[1] += sum(me.cpu_times()[:2]) - client_before
                spent[2] += load.samples_per_s / rows * elapsed
                spent[3] += elapsed
        alone = ensemble_load(urls[0], x, rows, 1, seconds / 2)
    with ExitStack() as stack:  # alone: one request at a time feels every other process
        url = serve(stack, "sequential", full, "sequential")
        one_by_one = ensemble_load(url, x, rows, 1, max(2.0, 5 * one_at_a_time))
    if not one_by_one.requests or not all(spent[2] for spent in busy.values()):
        raise RuntimeError("measuring what serving costs: a load window saw no request answered")
    per_request = [spent[0] / spent[2] * 1000 for spent in busy.values()]  # ms
    calls = [sum(curves[m].cpu(rows) for m in names)]
    calls += [rows / small * sum(curves[m].cpu(small) for m in names)] * (len(urls) - 1)
    per_call = 0.0
    if len(urls) == 2:  # the four-call deployment's extra CPU beyond its calls' is per call
        extra_calls = len(names) * (rows / small - 1)
        per_call = ((per_request[1] - calls[1]) - (per_request[0] - calls[0])) / extra_calls
    client_ms = sum(s[1] for s in busy.values()) / sum(s[2] for s in busy.values()) * 1000
    rest = per_request[0] - calls[0] - len(names) * per_call - client_ms
    share = sum(s[0] for s in busy.values()) / sum(s[3] for s in busy.values()) / len(cores)
    latency = {m: curves[m].latency(rows) or 0.0 for m in names}
    added = max(0.0, alone.p50_ms - max(latency.values()))
    request_ms = rows / one_by_one.samples_per_s * 1000  # the mean, as throughput sees it
    return Host(
        rows=rows,
        combiner_cpu_ms=max(0.0, rest),
        client_cpu_ms=client_ms,
        latency_ms=added,
        call_cpu_ms=per_call,
        sequential_call_ms=(request_ms - sum(latency.values()) - added) / len(names),
        busy_share=min(1.0, share) if share >= 0.5 else None,
    )


def _busy_s(cores: set[int]) -> float:
    """CPU seconds these cores have been busy (every process, the kernel included)."""
    total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
            user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
            total += user + nice + system + irq + softirq
    return total / os.sysconf("SC_CLK_TCK")


def _meter(device: Device, pid: int, member: str, backend: str) -> Callable[[], int]:
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
) -> Iterator[tuple[int, int]]:
    before = memory()
    client.load_model(name, config=override, headers=headers)
    try:
        yield before, _settled(memory)
    finally:
        client.unload_model(name, headers=headers)
        deadline = time.monotonic() + 30
        while client.is_model_ready(name) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # the backend stub exits after the model is unloaded


def _settled(memory: Callable[[], int]) -> int:
    time.sleep(0.2)
    return memory()


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
    cpu_before = _tree_cpu_s(server_pid)
    times: list[float] = []
    end = time.perf_counter() + seconds
    while len(times) < 3 or time.perf_counter() < end:
        start = time.perf_counter()
        client.infer(member.name, inputs, headers=headers)
        times.append((time.perf_counter() - start) * 1000.0)
    cpu = (_tree_cpu_s(server_pid) - cpu_before) * 1000.0 / len(times)
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


def _tree_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) of a process and its descendants so far."""
    if pid is None:
        return 0.0
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in processes:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total
