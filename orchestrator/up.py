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
from tritonclient.grpc import service_pb2, service_pb2_grpc

from combiner.config import CombinerConfig, MemberRoute, TensorInfo

from .errors import ChorusError
from .hardware import Device, discover
from .launch import ManagedProcess, ServerBinary, TritonServer, find_tritonserver, free_port
from .plan import Plan, one_instance_each
from .render import pick_backend, render_plan
from .spec import Ensemble, Tensor

__all__ = ["Deployment", "Endpoints", "combiner_config"]


@dataclass(frozen=True)
class Endpoints:
    ensemble: str  # host:port of the combiner's gRPC endpoint (the ensemble)
    triton_grpc: str  # host:port of Triton's gRPC endpoint (the members)
    triton_http: str


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
        fan_out=fan_out,
    )


class Deployment:
    """Triton serving the members plus the combiner serving the ensemble, on this host."""

    def __init__(
        self,
        ensemble: Ensemble,
        workdir: Path,
        host: str = "127.0.0.1",
        grpc_port: int | None = None,
        binary: ServerBinary | None = None,
        devices: tuple[Device, ...] | None = None,
        plan: Plan | None = None,
        timeout_s: float = 180.0,
        fan_out: Literal["concurrent", "sequential"] = "concurrent",
    ) -> None:
        """Serve ``plan`` (default: one instance of every member, on this host's devices)."""
        self.ensemble = ensemble
        self.workdir = workdir
        self.host = host
        self.grpc_port = grpc_port
        self.binary = binary or find_tritonserver()
        devices = devices if devices is not None else discover()
        self.plan = plan or one_instance_each(
            ensemble.name, [m.name for m in ensemble.members], devices, ensemble.max_batch_size
        )
        _check_servable(ensemble, self.plan)
        self.timeout_s = timeout_s
        self.fan_out: Literal["concurrent", "sequential"] = fan_out
        self.triton: TritonServer | None = None
        self.combiner: ManagedProcess | None = None
        self.endpoints: Endpoints | None = None

    def start(self) -> Endpoints:
        deadline = time.monotonic() + self.timeout_s
        repo = self.workdir / "repository"
        render_plan(self.ensemble, self.plan, repo, pick_backend(self.binary.backends))
        (self.workdir / "plan.json").write_text(self.plan.to_json())
        try:
            self.triton = TritonServer(
                repo, self.workdir, [m.name for m in self.ensemble.members], binary=self.binary
            )
            self.triton.start(timeout=deadline - time.monotonic())
            config_file = self.workdir / "combiner.json"
            combiner_config(self.ensemble, self.triton.grpc_url, self.plan, self.fan_out).save(
                config_file
            )
            port = self.grpc_port or free_port(self.host)
            self.combiner = ManagedProcess(
                "combiner",
                [
                    sys.executable,
                    "-m",
                    "combiner",
                    "--config",
                    str(config_file),
                    "--host",
                    self.host,
                    "--grpc-port",
                    str(port),
                ],
                self.workdir / "combiner.log",
                env=dict(os.environ),
                stop_signal=signal.SIGTERM,
            )
            self.combiner.start()
            address = f"{self.host}:{port}"
            _wait_combiner_ready(self.combiner, address, deadline)
        except BaseException:
            self.stop()
            raise
        self.endpoints = Endpoints(address, self.triton.grpc_url, self.triton.http_url)
        return self.endpoints

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
