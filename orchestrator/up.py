"""Bring an ensemble up: render its repository, launch Triton, launch the combiner, wait ready.

:class:`Deployment` is what ``chorus up`` and ``chorus demo`` run: a context manager that
leaves nothing running when it exits, whatever happened.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

import grpc
import tritonclient.grpc as grpcclient
from google.protobuf import json_format
from tritonclient.grpc import service_pb2, service_pb2_grpc

from combiner.config import CombinerConfig, MemberRoute, TensorInfo

from .errors import ChorusError
from .hardware import Device, discover
from .launch import ManagedProcess, ServerBinary, TritonServer, find_tritonserver, free_port
from .plan import Plan, one_instance_each
from .render import (
    cpu_threads,
    fanout_name,
    instance_groups,
    parse_config,
    pick_backend,
    render_config,
    render_plan,
)
from .spec import Ensemble, Tensor

__all__ = ["Deployment", "Endpoints", "combiner_config"]


@dataclass(frozen=True)
class Endpoints:
    ensemble: str  # host:port of the combiner's gRPC endpoint (the ensemble)
    triton_grpc: str  # host:port of Triton's gRPC endpoint (the members)
    triton_http: str
    ensemble_http: str | None = None  # host:port of its HTTP/REST endpoint, if served


def combiner_config(
    ensemble: Ensemble,
    triton_url: str,
    plan: Plan,
    fan_out: Literal["concurrent", "sequential"] = "concurrent",
) -> CombinerConfig:
    def info(t: Tensor) -> TensorInfo:
        return TensorInfo(name=t.name, dtype=t.dtype, shape=t.shape)

    return CombinerConfig(
        name=ensemble.name,
        triton_url=triton_url,
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
            )
            for m in ensemble.members
        ),
        rule=ensemble.rule,
        softmax=ensemble.softmax,
        rule_path=(str(ensemble.file.parent),),
        uncertainty=ensemble.uncertainty,
        deadline_ms=ensemble.deadline_ms,
        quorum=ensemble.quorum,
        fan_out=fan_out,
        # a batch per instance of the scarcest member keeps every instance busy; more batches
        # out at once would only queue on Triton, split into smaller batches
        max_in_flight=max(1, min(sum(plan.instances[m.name].values()) for m in ensemble.members)),
    )


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
        workers: int = 1,
        metrics_port: int | None = None,
        batching: bool = True,
        shared_memory: bool | None = None,
        combiner_options: dict[str, object] | None = None,
    ) -> None:
        """Serve ``plan`` (default: one instance of every member, on this host's devices).
        ``grpc_port`` None picks a free port; ``http_port`` None serves no HTTP, 0 a free port;
        ``shared_memory`` None writes inputs to shared memory when Triton is on this host;
        ``combiner_options`` overrides fields of the combiner's config (``CombinerConfig``)."""
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
        self.metrics_port = metrics_port
        self.triton: TritonServer | None = None
        self.combiner: ManagedProcess | None = None
        self.endpoints: Endpoints | None = None

    def start(self) -> Endpoints:
        deadline = time.monotonic() + self.timeout_s
        repo = self.workdir / "repository"
        render_plan(self.ensemble, self.plan, repo, self.backend)
        (self.workdir / "plan.json").write_text(self.plan.to_json())
        try:
            models = [m.name for m in self.ensemble.members]
            if (repo / fanout_name(self.ensemble)).is_dir():
                models.append(fanout_name(self.ensemble))  # after its members
            self.triton = TritonServer(repo, self.workdir, models, binary=self.binary)
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
        )
        return self.endpoints

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
                    client.load_model(m.name, config=override)
                    reloaded.append(m.name)
        self.plan = plan
        repo = self.workdir / "repository"
        render_plan(self.ensemble, plan, repo, self.backend)
        (self.workdir / "plan.json").write_text(plan.to_json())
        if (repo / fanout_name(self.ensemble)).is_dir():  # its batch limit follows the members'
            with grpcclient.InferenceServerClient(self.triton.grpc_url) as client:
                client.load_model(fanout_name(self.ensemble))
        if self.combiner is not None:
            self.combiner.stop()
        self._start_combiner(time.monotonic() + self.timeout_s)
        return reloaded

    def _start_combiner(self, deadline: float) -> None:
        assert self.triton is not None
        config_file = self.workdir / "combiner.json"
        config = combiner_config(self.ensemble, self.triton.grpc_url, self.plan, self.fan_out)
        local = self.triton.host in ("127.0.0.1", "localhost", "::1")
        shared = local if self.shared_memory is None else self.shared_memory and local
        update: dict[str, object] = {"batching": self.batching, "shared_memory": shared}
        if (self.workdir / "repository" / fanout_name(self.ensemble)).is_dir():
            update["fanout_model"] = fanout_name(self.ensemble)
            update["fanout_max_batch_size"] = min(self.plan.max_batch_size.values())
        config = CombinerConfig.model_validate(
            {**config.model_dump(), **update, **self.combiner_options}
        )
        config.save(config_file)
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
            str(self.workers),
        ]
        if self.http_port is not None:
            argv += ["--http-port", str(self.http_port)]
        if self.metrics_port is not None:
            argv += ["--metrics-port", str(self.metrics_port)]
        self.combiner = ManagedProcess(
            "combiner",
            argv,
            self.workdir / "combiner.log",
            env=dict(os.environ),
            stop_signal=signal.SIGTERM,
        )
        self.combiner.start()
        _wait_combiner_ready(self.combiner, f"{self.host}:{self.port}", deadline)

    def processes(self) -> list[ManagedProcess]:
        """The processes started so far: Triton, then the combiner."""
        started = [self.triton.process if self.triton else None, self.combiner]
        return [p for p in started if p is not None]

    def stop(self) -> None:
        """Stop the combiner, then Triton; safe to call more than once."""
        if self.combiner is not None:
            self.combiner.stop()
        if self.triton is not None:
            self.triton.stop()

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


def _wait_combiner_ready(process: ManagedProcess, address: str, deadline: float) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        while True:
            code = process.exited()
            if code is not None:
                raise process.failure(f"exited with code {code} before it was ready")
            if time.monotonic() > deadline:
                raise process.failure(f"was not ready on {address} in time")
            try:
                if stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=1.0).ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
