"""What serving costs beyond the members' calls, measured through real deployments of the
combiner (:func:`measure_host`), and turned into the costs the planner counts
(:func:`derive_host`, pure, for tests); see :class:`~orchestrator.planning.profile.Host`.

A measurement never depends on the serving policy: it runs with every member required and no
deadline (:func:`measuring_policy`), so a member slower than the ensemble's deadline is measured
instead of failing the start. Real hosts are never idle, so the costs are medians over repeated
rounds with their range, the CPU counted is that of the processes serving (not the host's other
work), and a cost that comes out below 0 (two noisy windows' difference) is reported as
unmeasured, with its reason, never as a negative number.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import psutil

from combiner.sdk import EnsembleError
from orchestrator.deploying.launch import ServerBinary
from orchestrator.deploying.up import Deployment
from orchestrator.errors import ChorusError
from orchestrator.measuring.bench import Load, ensemble_load, random_rows
from orchestrator.measuring.member_curves import batch_sizes
from orchestrator.measuring.process_usage import core_times_s, cpu_by_process, cpu_spent
from orchestrator.measuring.progress import Phase, ProfileProgress
from orchestrator.planning.hardware import Device
from orchestrator.planning.plan import Plan, one_instance_each
from orchestrator.planning.profile import Curve, Host
from orchestrator.planning.spec import Ensemble

__all__ = ["Alone", "Calls", "Window", "derive_host", "measure_host", "measuring_policy"]


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
    progress: ProfileProgress | None = None,
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
    ``progress`` shows each step (default: none). None for ensembles of several inputs (not
    driven yet)."""
    if len(ensemble.inputs) != 1:
        return None
    rows = ensemble.max_batch_size
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
    one_at_a_time = sum(latency) / 1000  # s, about
    load_s = max(seconds / rounds, 5 * one_at_a_time)
    alone_s = max(seconds / rounds / 2, 5 * one_at_a_time)
    run = _Run(measuring_policy(ensemble), workdir, binary, cpu, concurrency)
    four = small < rows  # a second deployment, of four calls per member and request
    # each deployment started and stopped; the load windows; the one-at-a-time ones
    steps = 2 * (2 + four) + rounds * (1 + four) + 2 * rounds
    load: list[tuple[Window, Window | None]] = []
    alone: list[Alone] = []
    with (
        (progress or ProfileProgress(show=False)).phase("serving costs", steps) as phase,
        ExitStack() as stack,
    ):
        concurrent = stack.enter_context(run.serving(phase, "full", full, "concurrent"))
        with ExitStack() as loaded:
            four_calls = (
                loaded.enter_context(run.serving(phase, "quarter", quarter, "concurrent"))
                if four
                else None
            )
            for r in range(1, rounds + 1):
                with phase.step(f"round {r}/{rounds}, load on 'full'"):
                    one_call = run.window(concurrent, load_s)
                if four_calls is None:
                    load.append((one_call, None))
                    continue
                with phase.step(f"round {r}/{rounds}, load on 'quarter'"):
                    load.append((one_call, run.window(four_calls, load_s)))
        # one request at a time feels every other process: the second deployment has gone
        sequential = stack.enter_context(run.serving(phase, "sequential", full, "sequential"))
        for r in range(1, rounds + 1):
            with phase.step(f"round {r}/{rounds}, one request at a time on 'full'"):
                together = run.drive(concurrent, 1, alone_s)
            with phase.step(f"round {r}/{rounds}, one request at a time on 'sequential'"):
                in_turn = run.drive(sequential, 1, alone_s)
            alone.append(
                Alone(
                    together.p50_ms if together.requests else 0.0,
                    rows / in_turn.samples_per_s * 1000 if in_turn.requests else 0.0,
                )
            )
    return derive_host(calls, load, alone, len(run.cores))


class _Run:
    """The deployments of one :func:`measure_host` and the load it drives through them."""

    def __init__(
        self, served: Ensemble, workdir: Path, binary: ServerBinary, cpu: Device, clients: int
    ) -> None:
        (tensor,) = served.inputs
        self.served = served
        self.workdir = workdir
        self.binary = binary
        self.cpu = cpu
        self.clients = clients
        self.rows = served.max_batch_size
        self.x = random_rows(tensor, max(4 * self.rows, 256))
        self.me = psutil.Process()
        self.cores = os.sched_getaffinity(0)
        self.roots: list[int] = []  # the deployments' processes: Triton's, the combiner's

    def drive(self, url: str, clients: int, window_s: float) -> Load:
        try:
            return ensemble_load(url, self.x, self.rows, clients, window_s)
        except EnsembleError as e:  # a member that fails, or hangs past the member timeout
            raise ChorusError(
                f"measuring what serving costs through the combiner ({url}): a request failed: {e}"
            ) from e

    @contextmanager
    def serving(
        self, phase: Phase, name: str, plan: Plan, fan_out: Literal["concurrent", "sequential"]
    ) -> Iterator[str]:
        """The ensemble's address on a deployment of ``plan``, warmed up; stopped after."""
        deployment = Deployment(
            self.served,
            self.workdir / name,
            binary=self.binary,
            devices=(self.cpu,),
            plan=plan,
            fan_out=fan_out,
        )
        with phase.step(f"starting the deployment {name!r} (Triton and the combiner)"):
            url = deployment.start().ensemble
            try:
                triton = deployment.triton.process if deployment.triton is not None else None
                for process in (triton, deployment.combiner):
                    if process is not None and process.pid is not None:
                        self.roots.append(process.pid)
                self.drive(url, self.clients, 0.5)  # warm up
            except BaseException:
                deployment.stop()
                raise
        try:
            yield url
        finally:
            with phase.step(f"stopping the deployment {name!r}"):
                deployment.stop()

    def window(self, url: str, seconds: float) -> Window:
        """A window of load on one deployment, with what the host spent on it."""
        cores_before, serving_before = core_times_s(self.cores), cpu_by_process(self.roots)
        client_before = sum(self.me.cpu_times()[:2])
        start = time.perf_counter()
        answered = self.drive(url, self.clients, seconds)
        elapsed = time.perf_counter() - start
        client = sum(self.me.cpu_times()[:2]) - client_before
        serving = cpu_spent(serving_before, cpu_by_process(self.roots)) + client
        (busy, idle), (busy_before, idle_before) = core_times_s(self.cores), cores_before
        return Window(
            requests=answered.samples_per_s / self.rows * elapsed,
            seconds=elapsed,
            serving_cpu_s=serving,
            client_cpu_s=client,
            idle_s=idle - idle_before,
            others_cpu_s=busy - busy_before - serving,
        )


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
