"""Measure an ensemble on this machine: what ``chorus profile`` runs (and ``chorus plan`` or
``chorus up`` when there is no profile yet); the result is a
:class:`~orchestrator.planning.profile.Profile`.

First each member alone on a real Triton: one tritonserver is started with no model loaded,
and each member is loaded on each kind of local device in turn (the first GPU, the CPU),
measured at batch sizes 1, 2, 4, ... up to the ensemble's maximum, and unloaded
(:mod:`~orchestrator.measuring.member_curves`). Then what serving costs beyond the members,
through real deployments of the combiner (:mod:`~orchestrator.measuring.host_costs`). Every
step shows on stderr as it runs (:mod:`~orchestrator.measuring.progress`).

The names that other modules import from here are re-exported: the profile's measuring lives in
the modules named above, the reading of processes' CPU and memory in
:mod:`~orchestrator.measuring.process_usage`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import tritonclient.grpc as grpcclient

from orchestrator.deploying.launch import ServerBinary, TritonServer, find_tritonserver
from orchestrator.deploying.render import InstanceGroup, pick_backend, render_repository
from orchestrator.deploying.workdir import owning
from orchestrator.measuring.host_costs import (
    Alone,
    Calls,
    Window,
    derive_host,
    measure_host,
    measuring_policy,
)
from orchestrator.measuring.member_curves import batch_sizes, member_curve, steps_per_member
from orchestrator.measuring.process_usage import tree_rss_bytes
from orchestrator.measuring.progress import ProfileProgress
from orchestrator.planning.hardware import Device, discover
from orchestrator.planning.profile import Curve, Profile
from orchestrator.planning.spec import Ensemble

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


def measure_profile(
    ensemble: Ensemble,
    workdir: Path,
    devices: tuple[Device, ...] | None = None,
    seconds_per_point: float = 0.3,
    binary: ServerBinary | None = None,
    show_progress: bool = True,
) -> Profile:
    """Measure every member on each kind of local device (the first GPU, and the CPU), then
    what serving costs beyond them on the CPU; ``show_progress``: each step on stderr. The
    working directory is held meanwhile (:mod:`orchestrator.deploying.workdir`): another
    deployment's Triton there would be taken for a dead run's and stopped."""
    with owning(workdir):
        return _measure(ensemble, workdir, devices, seconds_per_point, binary, show_progress)


def _measure(
    ensemble: Ensemble,
    workdir: Path,
    devices: tuple[Device, ...] | None,
    seconds_per_point: float,
    binary: ServerBinary | None,
    show_progress: bool,
) -> Profile:
    devices = devices if devices is not None else discover()
    targets = [d for d in devices if d.kind == "gpu"][:1] + [d for d in devices if d.kind == "cpu"]
    results: dict[str, dict[str, Curve]] = {m.name: {} for m in ensemble.members}
    with ProfileProgress(show_progress) as progress:
        with progress.doing("finding tritonserver and rendering the profile's repository"):
            binary = binary or find_tritonserver()
            backend = pick_backend(binary.backends)
            repo = workdir / "profile-repository"
            render_repository(
                ensemble,
                repo,
                backend,
                {m.name: (InstanceGroup("cpu", 1),) for m in ensemble.members},
                {m.name: ensemble.max_batch_size for m in ensemble.members},
                intra_op_threads=1,
            )
        sizes = batch_sizes(ensemble.max_batch_size)
        steps = len(targets) * len(ensemble.members) * steps_per_member(sizes)
        with (
            _triton(repo, workdir / "profile", binary, progress) as server,
            grpcclient.InferenceServerClient(server.grpc_url) as client,
            progress.phase("members", steps) as phase,
        ):
            assert server.process is not None and server.process.pid is not None
            for device in targets:
                for member in ensemble.members:
                    results[member.name][device.kind] = member_curve(
                        client,
                        server.grpc_headers,
                        server.process.pid,
                        member,
                        device,
                        backend,
                        sizes,
                        seconds_per_point,
                        phase,
                    )
        cpus = [d for d in devices if d.kind == "cpu"]
        host = None
        if cpus:
            curves = {m: c["cpu"] for m, c in results.items()}
            host = measure_host(
                ensemble, workdir / "host", binary, curves, cpus[0], progress=progress
            )
    return Profile(results, host)


@contextmanager
def _triton(
    repo: Path, workdir: Path, binary: ServerBinary, progress: ProfileProgress
) -> Iterator[TritonServer]:
    """The profile's tritonserver, with no model loaded; stopped after."""
    server = TritonServer(repo, workdir, [], binary=binary)
    with progress.doing("starting Triton for the profile (no model loaded)"):
        server.start()
    try:
        yield server
    finally:
        with progress.doing("stopping the profile's Triton"):
            server.stop()
