"""Chorus's control plane: read the ensemble, see the hardware, render Triton's model repository,
launch Triton and the combiner. It never sits on the request path."""

from .errors import ChorusError, InfeasibleError, LaunchError, SpecError
from .hardware import Device, discover
from .launch import TritonServer, find_tritonserver
from .render import InstanceGroup, pick_backend, render_config, render_repository
from .spec import Ensemble, Member, Tensor, load_ensemble
from .up import Deployment, Endpoints

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
