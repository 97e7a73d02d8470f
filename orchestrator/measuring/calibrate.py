"""Each member's answers on validation inputs, from a real Triton: the rows that ``chorus
calibrate`` simulates cascades on (:mod:`orchestrator.planning.cascade`).

The members are served as ``chorus up`` serves them when nothing was measured (one instance
each on this host's devices, :func:`~orchestrator.planning.plan.one_instance_each`), so that
their answers are the ones the backend that serves them gives, not those of another runtime
whose kernels may round differently: a row on the edge between two classes must fall on the
same side in the simulation as in serving. Each member is called on the rows in batches of its
limit, one batch at a time, with tritonclient's gRPC client.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from orchestrator.deploying.launch import ServerBinary, TritonServer, find_tritonserver
from orchestrator.deploying.render import pick_backend, render_plan
from orchestrator.deploying.workdir import owning
from orchestrator.errors import ChorusError
from orchestrator.measuring.progress import Phase, ProfileProgress
from orchestrator.planning.hardware import Device, discover
from orchestrator.planning.plan import one_instance_each
from orchestrator.planning.spec import Ensemble, Member

__all__ = ["member_outputs"]


def member_outputs(
    ensemble: Ensemble,
    inputs: Mapping[str, np.ndarray],
    output: str,
    workdir: Path,
    devices: tuple[Device, ...] | None = None,
    binary: ServerBinary | None = None,
    show_progress: bool = True,
) -> dict[str, np.ndarray]:
    """Member name -> its ``output`` (the ensemble's name for it) on the rows of ``inputs``
    (ensemble input name -> ``(rows, ...)``, checked against the ensemble's inputs), in the
    ensemble's order of members; ``workdir`` holds the repository and Triton's log."""
    names = [m.name for m in ensemble.members]
    plan = one_instance_each(ensemble.name, names, devices or discover(), ensemble.max_batch_size)
    with owning(workdir), ProfileProgress(show_progress) as progress:  # (workdir.py)
        with progress.doing("finding tritonserver and rendering the members' repository"):
            binary = binary or find_tritonserver()
            repo = workdir / "repository"
            render_plan(ensemble, plan, repo, pick_backend(binary.backends))
        server = TritonServer(repo, workdir, names, binary=binary)
        with progress.doing("starting Triton with every member (one instance each)"):
            server.start()
        try:
            with (
                grpcclient.InferenceServerClient(server.grpc_url) as client,
                progress.phase("members' answers", len(names)) as phase,
            ):
                return {
                    m.name: _answers(
                        client,
                        server.grpc_headers,
                        m,
                        inputs,
                        output,
                        plan.max_batch_size[m.name],
                        phase,
                    )
                    for m in ensemble.members
                }
        finally:
            with progress.doing("stopping the members' Triton"):
                server.stop()


def _answers(
    client: grpcclient.InferenceServerClient,
    headers: dict[str, str],
    member: Member,
    inputs: Mapping[str, np.ndarray],
    output: str,
    batch: int,
    phase: Phase,
) -> np.ndarray:
    """One member's ``output`` on every row, called in batches of ``batch`` rows."""
    their_input = dict(member.input_map)
    their_output = dict(member.output_map)[output]
    dtypes = {t.name: t.dtype for t in member.inputs}
    rows = len(next(iter(inputs.values())))
    wanted = [grpcclient.InferRequestedOutput(their_output)]
    parts = []
    batches = math.ceil(rows / batch)
    with phase.step(f"{member.name}, {rows} rows in {batches} batch(es) of up to {batch}"):
        for start in range(0, rows, batch):
            end = min(rows, start + batch)
            tensors = []
            for name, data in inputs.items():
                part = np.ascontiguousarray(data[start:end])
                tensor = grpcclient.InferInput(
                    their_input[name], list(part.shape), dtypes[their_input[name]]
                )
                tensor.set_data_from_numpy(part)
                tensors.append(tensor)
            try:
                result = client.infer(member.name, tensors, outputs=wanted, headers=headers)
            except InferenceServerException as e:
                raise ChorusError(
                    f"member {member.name!r} failed on rows {start} to {end - 1}: {e.message()}"
                ) from e
            answer = result.as_numpy(their_output)
            if answer is None or len(answer) != end - start:
                raise ChorusError(
                    f"member {member.name!r} answered no {their_output!r} for rows {start} to "
                    f"{end - 1} (or not one per row)"
                )
            parts.append(answer)
    return np.concatenate(parts)
