"""Write the model repository Triton serves: one directory per member.

Configs are rendered by jinja2 from ``model_repository_templates/`` and parsed back through
Triton's own ``ModelConfig`` schema before they are written. The template is chosen by the
backends the target server has: ONNX Runtime where it exists (the official container, with its
PyTorch backend for TorchScript members), else the Python backend running the same ONNX file
with onnxruntime, or the TorchScript file with torch (the server bundled in nvidia-pytriton).
Rendering is deterministic: the same inputs give the same bytes, and files whose bytes would
not change are not touched.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jinja2
from google.protobuf import text_encoding, text_format
from tritonclient.grpc import model_config_pb2

import model_repository_templates
from orchestrator.errors import ChorusError
from orchestrator.planning.plan import Plan
from orchestrator.planning.spec import Ensemble, Member, validate_name

__all__ = [
    "NODE_MARKER",
    "Backend",
    "InstanceGroup",
    "describe_changes",
    "fanout_name",
    "instance_groups",
    "pick_backend",
    "render_config",
    "render_fanout",
    "render_node",
    "render_plan",
    "render_repository",
]

Backend = Literal["onnxruntime", "python"]


def _pbtxt(value: object) -> str:
    """``value`` as a quoted protobuf text-format string: its quotes, backslashes, newlines and
    other control characters escaped, so that a name (a tensor's comes from the ONNX file) is
    read back as itself and can never close its field or add one."""
    return '"' + text_encoding.CEscape(str(value), as_utf8=True) + '"'


# written into every node's rendered repository (its node's name): a folder without it and
# without models is not one, and `chorus node` refuses it. Not a model: Triton ignores it.
NODE_MARKER = ".chorus-node"

_TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(model_repository_templates.__file__).parent),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    autoescape=False,
)
_TEMPLATES.filters["pbtxt"] = _pbtxt  # every string a template writes goes through it


@dataclass(frozen=True)
class InstanceGroup:
    kind: Literal["gpu", "cpu"]
    count: int
    gpus: tuple[int, ...] = ()


def pick_backend(available: Iterable[str]) -> Backend:
    """ONNX Runtime where the server has it, else the Python backend."""
    names = set(available)
    if "onnxruntime" in names:
        return "onnxruntime"
    if "python" in names:
        return "python"
    raise ChorusError(
        "the Triton server has neither the onnxruntime nor the python backend "
        f"(it has: {', '.join(sorted(names)) or 'none'}); Chorus needs one to serve ONNX members"
    )


def render_config(
    member: Member,
    backend: Backend,
    groups: tuple[InstanceGroup, ...],
    max_batch_size: int,
    intra_op_threads: int = 0,
    queue_delay_us: int = 0,
) -> str:
    """The member's ``config.pbtxt``, checked against Triton's schema."""
    validate_name(member.name)
    template = "pytorch" if member.torchscript and backend == "onnxruntime" else backend
    text = _TEMPLATES.get_template(f"{template}.pbtxt.j2").render(
        name=member.name,
        max_batch_size=max_batch_size,
        inputs=member.inputs,
        outputs=member.outputs,
        instance_groups=groups,
        intra_op_threads=intra_op_threads,
        queue_delay_us=queue_delay_us,
        model_file=model_file(member),
    )
    config = parse_config(text, member.name)
    for kind, asked, rendered in (
        ("inputs", member.inputs, config.input),
        ("outputs", member.outputs, config.output),
    ):
        if [t.name for t in rendered] != [t.name for t in asked]:
            raise ChorusError(f"rendered config of {member.name!r} does not name its {kind}")
    return text


def parse_config(text: str, name: str) -> model_config_pb2.ModelConfig:
    """Parse a config.pbtxt with Triton's ModelConfig schema; a failure is a Chorus bug."""
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise ChorusError(f"rendered config of {name!r} does not parse as ModelConfig: {e}") from e
    if config.name != name:
        raise ChorusError(f"rendered config names {config.name!r}, expected {name!r}")
    return config


def render_repository(
    ensemble: Ensemble,
    repo: Path,
    backend: Backend,
    groups: Mapping[str, tuple[InstanceGroup, ...]],
    max_batch_size: Mapping[str, int],
    intra_op_threads: int = 0,
) -> list[Path]:
    """Write the directory of every member that ``groups`` names under ``repo``; returns the
    files whose bytes changed."""
    changed = []
    repo.mkdir(parents=True, exist_ok=True)
    for member in ensemble.members:
        if member.name not in groups:
            continue
        config = render_config(
            member, backend, groups[member.name], max_batch_size[member.name], intra_op_threads
        )
        root = repo / member.name
        if _write(root / "config.pbtxt", config.encode()):
            changed.append(root / "config.pbtxt")
        target = root / "1" / model_file(member)
        if _copy(member.path, target):
            changed.append(target)
        if backend == "python":
            code = _TEMPLATES.get_template("python_model.py.j2").render()
            if _write(root / "1" / "model.py", code.encode()):
                changed.append(root / "1" / "model.py")
    return changed


def model_file(member: Member) -> str:
    """The member's file name in its repository folder (what Triton's backends look for)."""
    return "model.pt" if member.torchscript else "model.onnx"


def instance_groups(plan: Plan, node: str) -> dict[str, tuple[InstanceGroup, ...]]:
    """The plan's instances on one node, as Triton instance groups: one group per GPU, one for
    the CPU. Members with no instance on the node are left out."""
    devices = {d.id: d for d in plan.devices}
    out = {}
    for member in plan.members:
        groups = []
        cpu = 0
        for device_id, count in sorted(plan.instances[member].items()):
            d = devices[device_id]
            if d.node != node:
                continue
            if d.kind == "gpu":
                groups.append(InstanceGroup("gpu", count, (d.index,)))
            else:
                cpu += count
        if cpu:
            groups.append(InstanceGroup("cpu", cpu))
        if groups:
            out[member] = tuple(groups)
    return out


def cpu_threads(plan: Plan, node: str) -> int:
    """onnxruntime threads per CPU instance: the node's CPU lanes shared by its CPU instances."""
    cpus = [d for d in plan.devices if d.node == node and d.kind == "cpu"]
    lanes = sum(d.lanes for d in cpus)
    ids = {d.id for d in cpus}
    count = sum(c for per in plan.instances.values() for i, c in per.items() if i in ids)
    return max(1, lanes // max(1, count))


def render_plan(ensemble: Ensemble, plan: Plan, repo: Path, backend: Backend) -> list[Path]:
    """Render the plan: into ``repo`` for a single node, with the fan-out model beside the
    members; else one ``repo/NODE`` per node holding only that node's instances. Returns the
    files whose bytes changed."""
    nodes = plan.nodes()
    changed = []
    for node in nodes:
        target = repo if len(nodes) == 1 else repo / node
        changed += render_node(ensemble, plan, node, target, backend)
    if len(nodes) > 1:  # what a single-node plan left at the top
        changed += _remove_members(ensemble, repo, keep=set(), fanout=True)
    return changed


def render_node(
    ensemble: Ensemble, plan: Plan, node: str, repo: Path, backend: Backend
) -> list[Path]:
    """Render one node's part of the plan into ``repo`` (its members; the fan-out model too if
    the plan has this node only), removing members that left it. Returns what changed."""
    groups = instance_groups(plan, node)
    changed = []
    repo.mkdir(parents=True, exist_ok=True)  # a node the plan leaves empty still has its folder
    _write(repo / NODE_MARKER, f"{node}\n".encode())  # `chorus node` serves it, even empty
    if groups:
        changed += render_repository(
            ensemble, repo, backend, groups, plan.max_batch_size, cpu_threads(plan, node)
        )
    changed += _remove_members(ensemble, repo, keep=set(groups))
    if len(plan.nodes()) == 1 and ensemble.outputs:
        name = fanout_name(ensemble)
        text = render_fanout(ensemble, min(plan.max_batch_size.values()))
        if _write(repo / name / "config.pbtxt", text.encode()):
            changed.append(repo / name / "config.pbtxt")
        (repo / name / "1").mkdir(parents=True, exist_ok=True)
    return changed


def _remove_members(
    ensemble: Ensemble, repo: Path, keep: set[str], fanout: bool = False
) -> list[Path]:
    """Delete the directories of this ensemble's members (and with ``fanout``, of its fan-out
    model) that ``repo`` holds but should not: Triton would load them. Nothing else is
    touched."""
    names = [m.name for m in ensemble.members if m.name not in keep]
    if fanout:
        names.append(fanout_name(ensemble))
    removed = []
    for name in names:
        path = repo / name
        if (path / "config.pbtxt").is_file():
            shutil.rmtree(path)
            removed.append(path)
    return removed


def fanout_name(ensemble: Ensemble) -> str:
    """The fan-out model's name on Triton."""
    return validate_name(f"{ensemble.name}__fanout")


def render_fanout(ensemble: Ensemble, max_batch_size: int) -> str:
    """A Triton ensemble that sends the input to every member and returns all their outputs
    (``<member>__<output>``), checked against Triton's schema."""
    name = fanout_name(ensemble)
    text = _TEMPLATES.get_template("fanout.pbtxt.j2").render(
        name=name,
        max_batch_size=max_batch_size,
        inputs=ensemble.inputs,
        outputs=ensemble.outputs,
        members=ensemble.members,
    )
    parse_config(text, name)
    return text


def _write(path: Path, data: bytes) -> bool:
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return True


def _copy(src: Path, dst: Path) -> bool:
    same_size = dst.is_file() and dst.stat().st_size == src.stat().st_size
    if same_size and dst.read_bytes() == src.read_bytes():
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)
    return True


def describe_changes(repo: Path, plan: Plan) -> list[str]:
    """What rendering ``plan`` into ``repo`` would change, member by member, read from the
    configs already there: new members, instances per device, batch sizes."""
    nodes = plan.nodes()
    lines = []
    for node in nodes:
        target = repo if len(nodes) == 1 else repo / node
        where = "" if len(nodes) == 1 else f"[{node}] "
        for member, groups in instance_groups(plan, node).items():
            path = target / member / "config.pbtxt"
            new = _groups_text(groups)
            if not path.is_file():
                lines.append(
                    f"{where}{member}: new, {new}, batch size {plan.max_batch_size[member]}"
                )
                continue
            old = parse_config(path.read_text(), member)
            old_groups = tuple(
                InstanceGroup("gpu" if g.kind == g.KIND_GPU else "cpu", g.count, tuple(g.gpus))
                for g in old.instance_group
            )
            if _groups_text(old_groups) != new:
                lines.append(f"{where}{member}: instances {_groups_text(old_groups)} -> {new}")
            if old.max_batch_size != plan.max_batch_size[member]:
                lines.append(
                    f"{where}{member}: batch size {old.max_batch_size} -> "
                    f"{plan.max_batch_size[member]}"
                )
        placed = set(instance_groups(plan, node))
        for member in plan.members:
            if member not in placed and (target / member / "config.pbtxt").is_file():
                lines.append(f"{where}{member}: removed (no instance on {node} any more)")
    return lines


def _groups_text(groups: tuple[InstanceGroup, ...]) -> str:
    parts = []
    for g in groups:
        devices = ",".join(f"gpu{i}" for i in g.gpus) if g.kind == "gpu" else "cpu"
        parts.append(f"{g.count}x {devices}")
    return " + ".join(parts)
