"""Measure each member on a real Triton: the memory one instance needs, and its latency per
batch size. What ``chorus profile`` runs; the result is a
:class:`~orchestrator.planning.profile.Profile`.

One tritonserver is started with no model loaded; each member is loaded alone (one instance),
measured at batch sizes 1, 2, 4, ... up to the ensemble's maximum with random inputs, and
unloaded. Memory is the growth of the server's process tree (the server and its Python backend
stubs) on the CPU, or of the GPU's used memory (NVML) on a GPU: once when the member is loaded
(``memory_bytes``) and once after its largest batch (``memory_per_sample_bytes``, per sample).
On a GPU the member is loaded with a config override placing it there, without a restart.

Then what serving costs beyond the members (:func:`measure_host`), through real deployments
of the combiner. A measurement never depends on the serving policy: it runs with every member
required and no deadline, so a member slower than the ensemble's deadline is measured instead
of failing the start. Real hosts are never idle, so the costs are medians over repeated rounds
with their range, the CPU counted is that of the processes serving (not the host's other work),
and a cost that comes out below 0 (two noisy windows' difference) is reported as unmeasured,
with its reason, never as a negative number (:func:`derive_host`, pure, for tests).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import psutil
import tritonclient.grpc as grpcclient
from google.protobuf import json_format
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from tritonclient.utils import triton_to_np_dtype

from orchestrator.deploying.launch import ServerBinary, TritonServer, find_tritonserver
from orchestrator.deploying.render import (
    InstanceGroup,
    parse_config,
    pick_backend,
    render_config,
    render_repository,
)
from orchestrator.errors import ChorusError
from orchestrator.planning.hardware import Device, discover, gpu_used_bytes
from orchestrator.planning.profile import Curve, Host, Profile
from orchestrator.planning.spec import Ensemble, Member

if TYPE_CHECKING:
    from orchestrator.planning.plan import Plan

__all__ = [
    "Alone",
    "Calls",
    "Window",
    "batch_sizes",
    "derive_host",
    "measure_host",
    "measure_profile",
    "measuring_policy",
    "tree_rss_bytes",
]


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


# a request that a member has not answered in this long finds it hung, not slow: the serving
# policy's member timeout is set aside when it is shorter
_MEMBER_TIMEOUT_MS = 60_000.0


def measuring_policy(ensemble: Ensemble) -> Ensemble:
    """The ensemble as the profile serves it: its serving policy set aside (every member must
    answer, no deadline, a member timeout of a minute at least). A member slower than the
    deadline is measured, not counted missing; partial answers are what the ensemble serves,
    and must never stop a measurement."""
    return replace(
        ensemble,
        deadline_ms=None,
        quorum=len(ensemble.members),
        member_timeout_ms=max(ensemble.member_timeout_ms, _MEMBER_TIMEOUT_MS),
    )


@dataclass(frozen=True)
class Window:
    """One window of load on a deployment: what it answered, and what the host spent on it."""

    requests: float  # answered in the window (the load's rate times the window's length)
    seconds: float
    serving_cpu_s: float  # CPU of the deployments' processes and of this one (the clients)
    client_cpu_s: float  # CPU of this process alone
    idle_s: float  # the cores' idle time
    others_cpu_s: float  # the cores' busy time that no process of the serving spent


@dataclass(frozen=True)
class Alone:
    """One round of one request at a time: on the deployment that calls the members
    concurrently, then on the one that calls them one after another (0: none answered)."""

    concurrent_p50_ms: float  # the median request
    sequential_ms: float  # the mean request, as throughput sees it


@dataclass(frozen=True)
class Calls:
    """What the members' calls cost, measured one at a time (their curves), for one request
    of ``rows`` rows: one call per member, or ``rows / small`` calls each at batch ``small``."""

    members: int
    rows: int
    small: int
    cpu_ms: float  # Triton's CPU for a request's calls at batch ``rows``
    small_cpu_ms: float  # Triton's CPU for a request's calls at batch ``small``
    latency_ms: tuple[float, ...]  # each member's round trip at batch ``rows``


def measure_host(
    ensemble: Ensemble,
    workdir: Path,
    binary: ServerBinary,
    curves: Mapping[str, Curve],
    cpu: Device,
    seconds: float = 3.0,
    concurrency: int = 4,
    rounds: int = 3,
) -> Host | None:
    """What serving costs beyond the members' calls as ``curves`` measured them one at a time
    (see :class:`~orchestrator.planning.profile.Host`), on the ``cpu`` device: every member on it,
    requests of ``max_batch_size`` rows from ``concurrency`` clients in this process, with the
    serving policy set aside (:func:`measuring_policy`).

    Two deployments are loaded in turn, in ``rounds`` rounds of short windows: one instance of
    each member at the largest batch size (one call per member and request), and at a quarter
    of it (four calls). The CPU per request of the processes serving (the deployments' and this
    one's; not the host's other work) in each, less the members' calls as measured one at a
    time, gives the CPU per request and per call; the cores' idle time gives the share of
    their time (what other processes left) that serving keeps busy. Then, in as many rounds,
    one request at a time on the first deployment and on a third that calls the members one
    after another: what a request and each sequential call add. :func:`derive_host` turns the
    rounds into costs. Each window lasts at least five requests made one at a time.
    ``seconds``: the load windows' time in all (the one-at-a-time windows take half of it).
    None for ensembles of several inputs (not driven yet)."""
    from combiner.client import EnsembleError
    from orchestrator.deploying.up import Deployment
    from orchestrator.measuring.bench import Load, ensemble_load, random_rows
    from orchestrator.planning.plan import one_instance_each

    if len(ensemble.inputs) != 1:
        return None
    served = measuring_policy(ensemble)
    (tensor,) = ensemble.inputs
    rows = ensemble.max_batch_size
    x = random_rows(tensor, max(4 * rows, 256))
    names = [m.name for m in ensemble.members]
    full = one_instance_each(ensemble.name, names, (cpu,), rows)
    small = min(batch_sizes(rows), key=lambda b: abs(b - rows / 4))
    quarter = replace(full, max_batch_size=dict.fromkeys(names, small))
    latency = tuple(curves[m].latency(rows) or 0.0 for m in names)
    calls = Calls(
        members=len(names),
        rows=rows,
        small=small,
        cpu_ms=sum(curves[m].cpu(rows) for m in names),
        small_cpu_ms=rows / small * sum(curves[m].cpu(small) for m in names),
        latency_ms=latency,
    )
    me = psutil.Process()
    cores = os.sched_getaffinity(0)
    one_at_a_time = sum(latency) / 1000  # s, about
    load_s = max(seconds / rounds, 5 * one_at_a_time)
    alone_s = max(seconds / rounds / 2, 5 * one_at_a_time)
    roots: list[int] = []  # the deployments' processes: Triton's, the combiner's

    def drive(url: str, clients: int, window_s: float) -> Load:
        try:
            return ensemble_load(url, x, rows, clients, window_s)
        except EnsembleError as e:  # a member that fails, or hangs past the member timeout
            raise ChorusError(
                f"measuring what serving costs through the combiner ({url}): a request failed: {e}"
            ) from e

    def serve(
        stack: ExitStack, name: str, plan: Plan, fan_out: Literal["concurrent", "sequential"]
    ) -> str:
        deployment = Deployment(
            served, workdir / name, binary=binary, devices=(cpu,), plan=plan, fan_out=fan_out
        )
        url = stack.enter_context(deployment).ensemble
        triton = deployment.triton.process if deployment.triton is not None else None
        for process in (triton, deployment.combiner):
            if process is not None and process.pid is not None:
                roots.append(process.pid)
        drive(url, concurrency, 0.5)  # warm up
        return url

    def window(url: str) -> Window:
        cores_before, serving_before = _cores_s(cores), _cpu_by_process(roots)
        client_before = sum(me.cpu_times()[:2])
        start = time.perf_counter()
        answered = drive(url, concurrency, load_s)
        elapsed = time.perf_counter() - start
        client = sum(me.cpu_times()[:2]) - client_before
        serving = _spent(serving_before, _cpu_by_process(roots)) + client
        (busy, idle), (busy_before, idle_before) = _cores_s(cores), cores_before
        return Window(
            requests=answered.samples_per_s / rows * elapsed,
            seconds=elapsed,
            serving_cpu_s=serving,
            client_cpu_s=client,
            idle_s=idle - idle_before,
            others_cpu_s=busy - busy_before - serving,
        )

    load: list[tuple[Window, Window | None]] = []
    alone: list[Alone] = []
    with ExitStack() as stack:
        concurrent = serve(stack, "full", full, "concurrent")
        with ExitStack() as loaded:
            four_calls = serve(loaded, "quarter", quarter, "concurrent") if small < rows else None
            for _ in range(rounds):
                load.append((window(concurrent), window(four_calls) if four_calls else None))
        # one request at a time feels every other process: the second deployment has gone
        sequential = serve(stack, "sequential", full, "sequential")
        for _ in range(rounds):
            together = drive(concurrent, 1, alone_s)
            in_turn = drive(sequential, 1, alone_s)
            alone.append(
                Alone(
                    together.p50_ms if together.requests else 0.0,
                    rows / in_turn.samples_per_s * 1000 if in_turn.requests else 0.0,
                )
            )
    return derive_host(calls, load, alone, len(cores))


def derive_host(
    calls: Calls,
    load: Sequence[tuple[Window, Window | None]],
    alone: Sequence[Alone],
    cores: int,
) -> Host:
    """The costs of serving from measuring rounds (see :func:`measure_host`): each cost once
    per round, from windows measured side by side (the host's drift cancels), then its median
    over the rounds (a round that a busy host disturbed does not move it), with the rounds'
    range as its bounds. A round with a window that answered nothing is left out. A median
    below 0 is no cost this host could measure: None, with the reason. A cost already derived
    enters the next as the planner will count it (0 where unmeasured)."""
    unmeasured: dict[str, str] = {}
    bounds: list[tuple[str, float, float]] = []

    def settle(name: str, samples: Sequence[float]) -> float | None:
        if not samples:
            unmeasured[name] = "no measuring round had a request answered in each window"
            return None
        middle, low, high = statistics.median(samples), min(samples), max(samples)
        if middle < 0:
            unmeasured[name] = (
                f"{middle:+.3f} ms, from {low:+.3f} to {high:+.3f} over {len(samples)} rounds: "
                "below 0, a difference lost in this host's noise; counted as 0"
            )
            return None
        bounds.append((name, low, high))
        return middle

    rounds = [(f, q) for f, q in load if f.requests > 0 and (q is None or q.requests > 0)]
    per_request = [f.serving_cpu_s / f.requests * 1000 for f, _ in rounds]  # ms
    client = settle(
        "client_cpu_ms",
        [
            (f.client_cpu_s + (q.client_cpu_s if q else 0.0))
            / (f.requests + (q.requests if q else 0.0))
            * 1000
            for f, q in rounds
        ],
    )
    per_call: float | None = None
    four_calls = [(f, q) for f, q in rounds if q is not None]
    if calls.small < calls.rows:  # the four-call deployment's extra CPU beyond its calls'
        extra_calls = calls.members * (calls.rows / calls.small - 1)
        per_call = settle(
            "call_cpu_ms",
            [
                (
                    (q.serving_cpu_s / q.requests * 1000 - calls.small_cpu_ms)
                    - (f.serving_cpu_s / f.requests * 1000 - calls.cpu_ms)
                )
                / extra_calls
                for f, q in four_calls
            ],
        )
    else:
        unmeasured["call_cpu_ms"] = (
            f"one batch size only ({calls.rows}): no second deployment to tell a call's cost "
            "from a request's; counted as 0"
        )
    combiner = settle(
        "combiner_cpu_ms",
        [
            spent - calls.cpu_ms - calls.members * (per_call or 0.0) - (client or 0.0)
            for spent in per_request
        ],
    )
    busy_share = _busy_share(rounds, cores, unmeasured, bounds)
    answered = [a for a in alone if a.concurrent_p50_ms > 0 and a.sequential_ms > 0]
    slowest, total = max(calls.latency_ms, default=0.0), sum(calls.latency_ms)
    added = settle("latency_ms", [a.concurrent_p50_ms - slowest for a in answered])
    sequential_call = settle(
        "sequential_call_ms",
        [(a.sequential_ms - total - (added or 0.0)) / calls.members for a in answered],
    )
    return Host(
        rows=calls.rows,
        combiner_cpu_ms=combiner,
        client_cpu_ms=client,
        latency_ms=added,
        call_cpu_ms=per_call,
        sequential_call_ms=sequential_call,
        busy_share=busy_share,
        unmeasured=tuple(unmeasured.items()),
        bounds=tuple(bounds),
    )


# other processes' busy share of the cores above which serving's own share is not measured
_OTHERS_SHARE = 0.1


def _busy_share(
    rounds: Sequence[tuple[Window, Window | None]],
    cores: int,
    unmeasured: dict[str, str],
    bounds: list[tuple[str, float, float]],
) -> float | None:
    """The share of the cores' time (what other processes left of it) that serving kept busy,
    the median over the rounds; None where the load says nothing of it (the reason in
    ``unmeasured``): where it kept under half of the cores busy (a machine too large for this
    load), or where other processes kept the cores busy too (they fill serving's gaps)."""
    shares, others = [], []
    for windows in rounds:
        spent = [w for w in windows if w is not None]
        serving = sum(w.serving_cpu_s for w in spent)
        available = serving + sum(w.idle_s for w in spent)
        if available > 0:
            shares.append(serving / available)
            others.append(
                max(0.0, sum(w.others_cpu_s for w in spent)) / cores / sum(w.seconds for w in spent)
            )
    if not shares:
        unmeasured["busy_share"] = "no measuring round had a request answered in each window"
        return None
    share, other = statistics.median(shares), statistics.median(others)
    if other > _OTHERS_SHARE:
        unmeasured["busy_share"] = (
            f"other processes kept {other:.0%} of the {cores} cores busy: serving's own share "
            "cannot be told from theirs; planned with every core"
        )
        return None
    if share < 0.5:
        unmeasured["busy_share"] = (
            f"the load kept {share:.0%} of the {cores} cores busy, under half: it says nothing "
            "of a load that would take them all; planned with every core"
        )
        return None
    bounds.append(("busy_share", min(shares), min(1.0, max(shares))))
    return min(1.0, share)


def _cores_s(cores: set[int]) -> tuple[float, float]:
    """(busy, idle) seconds of these cores so far (busy: every process and the kernel; idle:
    waiting for I/O included; time stolen by a hypervisor is neither)."""
    busy = idle = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
            user, nice, system, idle_ticks, iowait, irq, softirq = (int(v) for v in fields[:7])
            busy += user + nice + system + irq + softirq
            idle += idle_ticks + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return busy / tick, idle / tick


def _cpu_by_process(roots: Sequence[int]) -> dict[tuple[int, float], float]:
    """CPU seconds (user + system) so far of each process of these trees, by (pid, start)."""
    spent: dict[tuple[int, float], float] = {}
    for root in roots:
        try:
            top = psutil.Process(root)
            tree = [top, *top.children(recursive=True)]
        except psutil.Error:  # a deployment that has stopped
            continue
        for process in tree:
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    spent[(process.pid, process.create_time())] = times.user + times.system
            except psutil.Error:
                pass
    return spent


def _spent(
    before: Mapping[tuple[int, float], float], after: Mapping[tuple[int, float], float]
) -> float:
    """CPU seconds spent between two readings of :func:`_cpu_by_process` (a process that
    ended meanwhile is left out; one that began counts from its start)."""
    return sum(cpu - before.get(key, 0.0) for key, cpu in after.items())


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
