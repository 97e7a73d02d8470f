"""Chorus's control plane: read the ensemble, see the hardware, render Triton's model repository,
launch Triton and the combiner. It never sits on the request path."""

from orchestrator.deploying.launch import TritonServer, find_tritonserver
from orchestrator.deploying.render import (
    InstanceGroup,
    pick_backend,
    render_config,
    render_repository,
)
from orchestrator.deploying.up import Deployment, Endpoints
from orchestrator.errors import ChorusError, InfeasibleError, LaunchError, SpecError
from orchestrator.planning.hardware import Device, discover
from orchestrator.planning.spec import Ensemble, Member, Tensor, load_ensemble

__all__ = [
    "ChorusError",
    "Deployment",
    "Device",
    "Endpoints",
    "Ensemble",
    "InfeasibleError",
    "InstanceGroup",
    "LaunchError",
    "Member",
    "SpecError",
    "Tensor",
    "TritonServer",
    "discover",
    "find_tritonserver",
    "load_ensemble",
    "pick_backend",
    "render_config",
    "render_repository",
]
