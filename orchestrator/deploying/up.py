"""Bring an ensemble up: render its repository, launch Triton, launch the combiner, wait ready.

:class:`Deployment` is what ``chorus up`` and ``chorus demo`` run: a context manager that
leaves nothing running when it exits, whatever happened. :meth:`Deployment.supervise` keeps it
up: Triton or the combiner that dies is restarted (with backoff), the ensemble answering
UNAVAILABLE meanwhile; only a crash loop ends it. Stopping drains: the combiner answers what it
accepted, then Triton stops.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

import tritonclient.grpc as grpcclient
from google.protobuf import json_format

from combiner import (
    CascadeRoute,
    CombinerConfig,
    MemberRoute,
    NodeRoute,
    Restarts,
    TensorInfo,
    is_served,
    served_file,
)
from orchestrator.deploying.deploy import write_key
from orchestrator.deploying.launch import (
    ManagedProcess,
    ServerBinary,
    TritonServer,
    find_tritonserver,
    free_port,
)
from orchestrator.deploying.render import (
    cpu_threads,
    fanout_name,
    instance_groups,
    parse_config,
    pick_backend,
    render_config,
    render_plan,
)
from orchestrator.deploying.workdir import hold, release
from orchestrator.errors import ChorusError, LaunchError
from orchestrator.planning.hardware import Device, discover
from orchestrator.planning.plan import Plan, one_instance_each
from orchestrator.planning.spec import Ensemble, Tensor

__all__ = ["Deployment", "Endpoints", "combiner_config", "instances_per_node"]


@dataclass(frozen=True)
class Endpoints:
    ensemble: str  # host:port of the combiner's gRPC endpoint (the ensemble)
    triton_grpc: str  # host:port of Triton's gRPC endpoint (the members)
    triton_http: str
    ensemble_http: str | None = None  # host:port of its HTTP/REST endpoint, if served
    # opens Triton's restricted gRPC APIs (tritonclient's headers=); only Chorus has it
    triton_headers: Mapping[str, str] = field(default_factory=dict)


def combiner_config(
    ensemble: Ensemble,
    triton: str | Mapping[str, str],
    plan: Plan,
    fan_out: Literal["concurrent", "sequential"] = "concurrent",
    shared_memory: bool = False,
    key_file: Path | None = None,
    fanout_model: bool = False,
    cascade: CascadeRoute | None = None,
) -> CombinerConfig:
    """What the combiner serves for ``plan``: ``triton`` is the gRPC address of its Triton,
    or, for a plan over several nodes, each node's (node name -> host:port); each member's
    calls then go to the nodes holding its instances, in proportion to them. With
    ``shared_memory``, the (first) node's Triton shares the combiner's host and gets the
    calls through shared memory; ``key_file`` holds the key to Triton's restricted APIs;
    ``fanout_model``: the repository holds the fan-out model (one node only); ``cascade``:
    call the members tier by tier (:func:`orchestrator.planning.cascade.resolve_cascade`)."""

    def info(t: Tensor) -> TensorInfo:
        return TensorInfo(name=t.name, dtype=t.dtype, shape=t.shape)

    nodes: tuple[NodeRoute, ...] = ()
    per_node: dict[str, dict[str, int]] = {m.name: {} for m in ensemble.members}
    if not isinstance(triton, str):
        missing = [n for n in plan.nodes() if n not in triton]
        if missing:
            raise ChorusError(f"no Triton address for node(s) {', '.join(missing)} of the plan")
        if len(plan.nodes()) == 1:
            triton = triton[plan.nodes()[0]]
        else:
            first = plan.nodes()[0]
            nodes = tuple(
                NodeRoute(name=n, url=triton[n], shared_memory=shared_memory and n == first)
                for n in plan.nodes()
            )
            per_node = instances_per_node(plan)
    return CombinerConfig(
        name=ensemble.name,
        triton_url=triton if isinstance(triton, str) else None,
        nodes=nodes,
        shared_memory=shared_memory and not nodes,
        triton_key_file=str(key_file) if key_file is not None else None,
        fanout_model=fanout_name(ensemble) if fanout_model and not nodes else None,
        fanout_max_batch_size=min(plan.max_batch_size.values())
        if fanout_model and not nodes
        else None,
        max_batch_size=ensemble.max_batch_size,
        inputs=tuple(info(t) for t in ensemble.inputs),
        outputs=tuple(info(t) for t in ensemble.outputs),
        members=tuple(
            MemberRoute(
                name=m.name,
                weight=m.weight,
                inputs=dict(m.input_map),
                outputs=dict(m.output_map),
                max_batch_size=plan.max_batch_size[m.name],
                nodes=per_node[m.name],
            )
            for m in ensemble.members
        ),
        rule=ensemble.rule,
        softmax=ensemble.softmax,
        rule_path=(str(ensemble.file.parent),),
        uncertainty=ensemble.uncertainty,
        deadline_ms=ensemble.deadline_ms,
        member_timeout_ms=ensemble.member_timeout_ms,
        quorum=ensemble.quorum,
        fan_out=fan_out,
        cascade=cascade,
        max_in_flight=_max_in_flight(ensemble, plan, cascade),
        workers=plan.combiner_workers,
    )


def _max_in_flight(ensemble: Ensemble, plan: Plan, cascade: CascadeRoute | None) -> int:
    """A batch per instance of the scarcest member keeps every instance busy; more batches out
    at once would only queue on Triton, split into smaller batches. With a cascade, only the
    first tier's members get every batch: the later tiers get the rows left, in smaller
    batches, and were planned for that share, so their instances do not bound it."""
    first = cascade.tiers[0] if cascade is not None else [m.name for m in ensemble.members]
    return max(1, min(sum(plan.instances[name].values()) for name in first))


def instances_per_node(plan: Plan) -> dict[str, dict[str, int]]:
    """Each member's instances on each node that holds some."""
    node_of = {d.id: d.node for d in plan.devices}
    out: dict[str, dict[str, int]] = {}
    for member, per_device in plan.instances.items():
        counts = out.setdefault(member, {})
        for device, count in per_device.items():
            if count:
                counts[node_of[device]] = counts.get(node_of[device], 0) + count
    return out


class Deployment:
    """Triton serving the members plus the combiner serving the ensemble, on this host."""

    def __init__(
        self,
        ensemble: Ensemble,
        workdir: Path,
        host: str = "127.0.0.1",
        grpc_port: int | None = None,
        http_port: int | None = None,
        binary: ServerBinary | None = None,
        devices: tuple[Device, ...] | None = None,
        plan: Plan | None = None,
        timeout_s: float = 180.0,
        fan_out: Literal["concurrent", "sequential"] = "concurrent",
        workers: int | None = 1,
        metrics_port: int | None = None,
        batching: bool = True,
        shared_memory: bool | None = None,
        combiner_options: dict[str, object] | None = None,
        allow_client_shm: bool = False,
        token_file: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        drain_timeout_s: float = 30.0,
        cascade: CascadeRoute | None = None,
    ) -> None:
        """Serve ``plan`` (default: one instance of every member, on this host's devices).
        ``grpc_port`` None picks a free port; ``http_port`` None serves no HTTP, 0 a free port;
        ``shared_memory`` None writes inputs to shared memory when Triton is on this host;
        ``combiner_options`` overrides fields of the combiner's config (``CombinerConfig``);
        ``allow_client_shm`` lets clients on this host register their own shared memory;
        ``token_file``, ``tls_cert`` and ``tls_key`` protect the ensemble's endpoints;
        ``drain_timeout_s`` bounds how long stopping waits for requests in flight;
        ``cascade`` calls the members tier by tier (None: every member, every row);
        ``workers`` None starts the combiner processes the plan needs
        (:attr:`Plan.combiner_workers`)."""
        self.ensemble = ensemble
        self.workdir = workdir
        self.host = host
        self.grpc_port = grpc_port
        self.http_port = http_port
        self.binary = binary or find_tritonserver()
        devices = devices if devices is not None else discover()
        self.plan = plan or one_instance_each(
            ensemble.name, [m.name for m in ensemble.members], devices, ensemble.max_batch_size
        )
        _check_servable(ensemble, self.plan)
        self.backend = pick_backend(self.binary.backends)
        self.port = 0
        self.timeout_s = timeout_s
        self.fan_out: Literal["concurrent", "sequential"] = fan_out
        self.workers = workers
        self.batching = batching
        self.shared_memory = shared_memory  # None: when Triton is on this host
        self.combiner_options = dict(combiner_options or {})
        self.allow_client_shm = allow_client_shm
        self.token_file = token_file
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.drain_timeout_s = drain_timeout_s
        self.cascade = cascade
        self.metrics_port = metrics_port
        self.triton: TritonServer | None = None
        self.combiner: ManagedProcess | None = None
        self._combiner_stop_s = 15.0
        self.endpoints: Endpoints | None = None
        self._owner: Path | None = None  # its working directory, while it holds it

    def start(self) -> Endpoints:
        deadline = time.monotonic() + self.timeout_s
        repo = self.workdir / "repository"
        if self._owner is None:  # before anything is written there (workdir.py)
            self._owner = hold(self.workdir)
        try:
            render_plan(self.ensemble, self.plan, repo, self.backend)
            (self.workdir / "plan.json").write_text(self.plan.to_json())
            models = [m.name for m in self.ensemble.members]
            if (repo / fanout_name(self.ensemble)).is_dir():
                models.append(fanout_name(self.ensemble))  # after its members
            self.triton = TritonServer(repo, self.workdir, models, binary=self.binary)
            self._write_key(self.triton.key)
            self.triton.start(timeout=deadline - time.monotonic())
            self.port = self.grpc_port or free_port(self.host)
            if self.http_port == 0:
                self.http_port = free_port(self.host)
            self._start_combiner(deadline)
        except BaseException:
            self.stop()
            raise
        self.endpoints = Endpoints(
            f"{self.host}:{self.port}",
            self.triton.grpc_url,
            self.triton.http_url,
            f"{self.host}:{self.http_port}" if self.http_port is not None else None,
            self.triton.grpc_headers,
        )
        return self.endpoints

    def _write_key(self, key: str | None) -> None:
        """The key to Triton's restricted APIs, for the combiner: readable by this user only."""
        path = self.workdir / "triton.key"
        path.unlink(missing_ok=True)
        if key is not None:
            write_key(path, key)

    def supervise(self, stop: threading.Event, say: Callable[[str], None] = print) -> None:
        """Keep Triton and the combiner running until ``stop`` is set. Either that dies is
        restarted, at once and then with a growing delay: Triton on the same ports with the
        same key and members (the combiner answers UNAVAILABLE meanwhile and registers its
        shared memory again when Triton is back), the combiner with the same config. A crash
        loop (5 restarts in a minute) raises LaunchError with the process's log tail."""
        assert self.triton is not None and self.combiner is not None
        restarts = {"tritonserver": Restarts(), "combiner": Restarts()}
        while not stop.wait(0.2):
            for name in restarts:
                process = self.triton.process if name == "tritonserver" else self.combiner
                code = process.exited() if process is not None else None
                if process is None or code is None:
                    continue
                delay = restarts[name].next_delay()
                if delay is None:
                    raise process.failure(
                        f"exited with code {code}: {restarts[name].describe()}, giving up"
                    )
                say(f"{name} exited with code {code}; restarting it in {delay:.1f} s")
                if stop.wait(delay):
                    return
                began = time.monotonic()
                try:
                    if name == "tritonserver":
                        self.triton.restart(self.timeout_s)
                    else:
                        self._start_combiner(time.monotonic() + self.timeout_s)
                except LaunchError as e:  # counts as another death on the next round
                    say(f"{name} did not come back: {e}")
                    continue
                say(f"{name} is back ({time.monotonic() - began:.1f} s)")

    def apply(self, plan: Plan) -> list[str]:
        """Serve another plan without restarting Triton: the members whose config changes are
        loaded again with a config override (explicit model control), the repository is
        rewritten to match, and the combiner restarts. Returns the members reloaded."""
        assert self.triton is not None, "start() first"
        _check_servable(self.ensemble, plan)
        node = plan.nodes()[0]
        old_groups = instance_groups(self.plan, self.plan.nodes()[0])
        new_groups = instance_groups(plan, node)
        old_threads, new_threads = cpu_threads(self.plan, node), cpu_threads(plan, node)
        reloaded = []
        headers = self.triton.grpc_headers
        with grpcclient.InferenceServerClient(self.triton.grpc_url) as client:
            for m in self.ensemble.members:
                old = render_config(
                    m,
                    self.backend,
                    old_groups[m.name],
                    self.plan.max_batch_size[m.name],
                    old_threads,
                )
                new = render_config(
                    m, self.backend, new_groups[m.name], plan.max_batch_size[m.name], new_threads
                )
                if new != old:
                    override = json_format.MessageToJson(parse_config(new, m.name))
                    client.load_model(m.name, config=override, headers=headers)
                    reloaded.append(m.name)
        self.plan = plan
        repo = self.workdir / "repository"
        render_plan(self.ensemble, plan, repo, self.backend)
        (self.workdir / "plan.json").write_text(plan.to_json())
        if (repo / fanout_name(self.ensemble)).is_dir():  # its batch limit follows the members'
            with grpcclient.InferenceServerClient(self.triton.grpc_url) as client:
                client.load_model(fanout_name(self.ensemble), headers=headers)
        self._stop_combiner()
        self._start_combiner(time.monotonic() + self.timeout_s)
        return reloaded

    def _start_combiner(self, deadline: float) -> None:
        assert self.triton is not None
        self._stop_combiner()  # a previous run: what it left behind goes first
        config_file = self.workdir / "combiner.json"
        local = self.triton.host in ("127.0.0.1", "localhost", "::1")
        config = combiner_config(
            self.ensemble,
            self.triton.grpc_url,
            self.plan,
            self.fan_out,
            shared_memory=local if self.shared_memory is None else self.shared_memory and local,
            key_file=self.workdir / "triton.key" if self.triton.key is not None else None,
            fanout_model=(self.workdir / "repository" / fanout_name(self.ensemble)).is_dir(),
            cascade=self.cascade,
        )
        update: dict[str, object] = {
            "batching": self.batching,
            "client_shared_memory": self.allow_client_shm,
            "drain_timeout_s": self.drain_timeout_s,
        }
        config = CombinerConfig.model_validate(
            {**config.model_dump(), **update, **self.combiner_options}
        )
        config.save(config_file)
        self._combiner_stop_s = config.stop_s() + 15.0  # its supervisor waits stop_s() + 5
        served_file(config_file).unlink(missing_ok=True)  # an earlier run's is no sign of this
        argv = [
            sys.executable,
            "-m",
            "combiner",
            "--config",
            str(config_file),
            "--host",
            self.host,
            "--grpc-port",
            str(self.port),
            "--workers",
            "auto" if self.workers is None else str(self.workers),
        ]
        if self.http_port is not None:
            argv += ["--http-port", str(self.http_port)]
        if self.metrics_port is not None:
            argv += ["--metrics-port", str(self.metrics_port)]
        for flag, path in (
            ("--token-file", self.token_file),
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
        ):
            if path is not None:
                argv += [flag, str(path)]
        self.combiner = ManagedProcess(
            "combiner",
            argv,
            self.workdir / "combiner.log",
            env=dict(os.environ),
            stop_signal=signal.SIGTERM,
            death_signal=signal.SIGTERM,  # so that it drains, and removes its metrics folder
            stop_timeout=self._combiner_stop_s,
        )
        self.combiner.start()
        _wait_combiner_ready(self.combiner, config_file, deadline)

    def _stop_combiner(self) -> None:
        """SIGTERM, then as long as it may take: its workers answer what they accepted, and
        the calls they still have on Triton end (a kill would cancel them)."""
        if self.combiner is not None:
            self.combiner.stop()

    def processes(self) -> list[ManagedProcess]:
        """The processes started so far: Triton, then the combiner."""
        started = [self.triton.process if self.triton else None, self.combiner]
        return [p for p in started if p is not None]

    def stop(self) -> None:
        """Stop the combiner (it answers what it accepted, up to the drain timeout), then
        Triton; safe to call more than once."""
        try:
            self._stop_combiner()
            if self.triton is not None:
                self.triton.stop()
        finally:
            if self._owner is not None:
                owner, self._owner = self._owner, None
                release(owner)

    def __enter__(self) -> Endpoints:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _check_servable(ensemble: Ensemble, plan: Plan) -> None:
    if set(plan.members) != {m.name for m in ensemble.members}:
        raise ChorusError(
            f"the plan is for members {sorted(plan.members)}, the ensemble has "
            f"{sorted(m.name for m in ensemble.members)}: plan again"
        )
    if len(plan.nodes()) > 1:
        raise ChorusError(
            f"the plan spans nodes {', '.join(plan.nodes())}; chorus up serves one node: "
            "render one repository per node with 'chorus regenerate-configs'"
        )


def _wait_combiner_ready(process: ManagedProcess, config_file: Path, deadline: float) -> None:
    """Wait until every worker of this combiner listens: its supervisor then writes the digest
    of the config they serve beside it. (Not a connection to the port: another deployment's
    listener would answer that; the supervisor refuses a port anything else holds, and exits.)"""
    while True:
        code = process.exited()
        if code is not None:
            raise process.failure(f"exited with code {code} before it was ready")
        if time.monotonic() > deadline:
            raise process.failure("was not ready in time")
        if is_served(config_file):
            return
        time.sleep(0.05)
