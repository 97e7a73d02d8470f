"""The ensemble file: what the user writes (pydantic, unknown keys rejected), and what it means.

``load_ensemble(path)`` reads ``ensemble.yaml``, validates it, reads each member's ONNX file for
its tensors, checks that the members agree on them, and returns a frozen :class:`Ensemble`.
Every problem raises :class:`SpecError` naming the file, the field and what is wrong.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import onnx
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
)

from combiner import DAY_MS, load_rule
from orchestrator.errors import SpecError, from_validation
from orchestrator.planning.files import Real, read_yaml

__all__ = [
    "Cascade",
    "CascadeFile",
    "Ensemble",
    "EnsembleFile",
    "Member",
    "Tensor",
    "Uncertainty",
    "load_ensemble",
    "validate_name",
]

# A name becomes a directory of the model repository and a model name on Triton.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")

Uncertainty = Literal["entropy", "mutual_information", "variance", "agreement"]

# ONNX element types Chorus can serve, as Triton names them.
_ONNX_TO_TRITON: dict[int, str] = {
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.DOUBLE: "FP64",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.INT16: "INT16",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.UINT16: "UINT16",
    onnx.TensorProto.UINT32: "UINT32",
    onnx.TensorProto.UINT64: "UINT64",
    onnx.TensorProto.BOOL: "BOOL",
}
_FLOAT_TYPES = {"FP16", "FP32", "FP64"}


def validate_name(name: str) -> str:
    """Accept a name usable as a directory and a Triton model name, or raise ValueError."""
    if not _NAME.match(name):
        raise ValueError(
            f"{name!r} is not a valid name: use 1-64 letters, digits, '_', '-' or '.', "
            "not starting with '.' or '-' (it becomes a directory of the model repository)"
        )
    return name


Name = Annotated[str, AfterValidator(validate_name)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TensorFile(_Strict):
    """A tensor of the ensemble, declared by hand (otherwise inferred from the first member)."""

    name: str
    dtype: str = Field(description="Triton data type, e.g. FP32")
    shape: list[StrictInt] = Field(
        description="dimensions after the batch dimension; -1 is variable"
    )


class MemberFile(_Strict):
    name: Name
    path: str = Field(
        description="the member's ONNX file (.onnx) or TorchScript file (.pt), relative to the "
        "ensemble file"
    )
    weight: Real = Field(1.0, gt=0, description="weight in weighted_mean")
    inputs: dict[str, str] = Field(
        default_factory=dict, description="ensemble input name -> this member's input name"
    )
    outputs: dict[str, str] = Field(
        default_factory=dict, description="ensemble output name -> this member's output name"
    )


class CascadeFile(_Strict):
    """``combine.cascade``: call the members in tiers, cheapest first, and answer a row as soon
    as the members so far meet the exit rule. What is left out, ``chorus calibrate`` chooses
    on validation inputs."""

    tiers: list[list[Name]] | None = Field(
        None,
        description="member names per tier, cheapest first, every member in one tier "
        "[default: chosen by 'chorus calibrate' from the members grouped by profiled cost]",
    )
    exit: Literal["agreement", "confidence"] = Field(
        "agreement",
        description="agreement: the share of the members so far that vote for their "
        "combination's top class; confidence: the combination's top value",
    )
    threshold: Real | None = Field(
        None,
        ge=0,
        le=1,
        description="the exit rule's score a row must reach to be answered early "
        "[default: chosen by 'chorus calibrate']",
    )
    output: str | None = Field(
        None,
        description="the output the exit rule reads; it needs a class axis (its last) "
        "[default: the first output]",
    )


class CombineFile(_Strict):
    rule: str = Field(
        "mean",
        description="mean | weighted_mean | geometric_mean | median | max | vote | module:function",
    )
    softmax: StrictBool = Field(False, description="apply softmax to each member's output first")
    uncertainty: list[Uncertainty] = Field(
        default_factory=list, description="uncertainty outputs to serve beside each output"
    )
    cascade: CascadeFile | None = Field(
        None, description="call the members tier by tier [default: every member, every row]"
    )


class ServingFile(_Strict):
    # Strict: a number is a number (YAML's `true` had been read as 1 ms)
    max_batch_size: StrictInt = Field(64, ge=1, le=65536)
    deadline_ms: Real | None = Field(
        None,
        gt=0,
        le=DAY_MS,
        description="default time to wait for members (per request: deadline_ms)",
    )
    member_timeout_ms: Real = Field(
        30_000,
        gt=0,
        le=DAY_MS,
        description="how long a batch waits for a member before counting it missing (its "
        "call is left to finish on Triton, its answer dropped)",
    )
    quorum: StrictInt | StrictFloat = Field(
        1.0, description="members that must answer: a fraction in (0, 1] or a count (integer)"
    )
    latency_target_ms: Real | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="the planner keeps every member's predicted time (filling a batch at the "
        "planned throughput, then serving it) within this",
    )


class EnsembleFile(_Strict):
    """The schema of ``ensemble.yaml``."""

    name: Name
    members: list[MemberFile] = Field(min_length=1)
    inputs: list[TensorFile] | None = None
    outputs: list[TensorFile] | None = None
    combine: CombineFile = CombineFile()
    serving: ServingFile = ServingFile()


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # Triton data type name
    shape: tuple[int, ...]  # without the batch dimension; -1 is variable


@dataclass(frozen=True)
class Member:
    name: str
    path: Path  # absolute
    weight: float
    inputs: tuple[Tensor, ...]  # the member's own tensors, in its own names
    outputs: tuple[Tensor, ...]
    input_map: tuple[tuple[str, str], ...]  # (ensemble name, member name)
    output_map: tuple[tuple[str, str], ...]

    @property
    def torchscript(self) -> bool:
        """A TorchScript member (``.pt``): positional tensors INPUT__i -> OUTPUT__j."""
        return is_torchscript(self.path)


TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".torchscript")


def is_torchscript(path: Path | str) -> bool:
    return Path(path).suffix.lower() in TORCHSCRIPT_SUFFIXES


@dataclass(frozen=True)
class Cascade:
    """``combine.cascade`` checked against the members and outputs. ``tiers`` and
    ``threshold`` are None where the file leaves them to the calibration; ``output`` is ''
    when the file names none and the tensors were not read (planning from a profile)."""

    tiers: tuple[tuple[str, ...], ...] | None
    exit: Literal["agreement", "confidence"]
    threshold: float | None
    output: str


@dataclass(frozen=True)
class Ensemble:
    name: str
    file: Path
    members: tuple[Member, ...]
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    rule: str
    softmax: bool
    max_batch_size: int
    uncertainty: tuple[str, ...] = ()
    deadline_ms: float | None = None
    quorum: int = 1  # members that must answer
    member_timeout_ms: float = 30_000.0
    latency_target_ms: float | None = None  # the planner's bound on fill + service time
    cascade: Cascade | None = None

    def member(self, name: str) -> Member:
        return next(m for m in self.members if m.name == name)


def load_ensemble(path: str | Path, read_models: bool = True) -> Ensemble:
    """Read, validate and resolve an ensemble file.

    With ``read_models=False`` (planning from a profile) the member files are not opened and
    need not exist; tensors are then only those declared in the file.
    """
    file = Path(path)
    raw = read_yaml(file)
    if not isinstance(raw, dict):
        raise SpecError(file, "", "expected a mapping with 'name' and 'members'")
    try:
        spec = EnsembleFile.model_validate(raw)
    except ValidationError as e:
        raise from_validation(file, e) from None
    return _resolve(file, spec, read_models)


def _resolve(file: Path, spec: EnsembleFile, read_models: bool) -> Ensemble:
    try:
        load_rule(spec.combine.rule, [str(file.resolve().parent)])
    except ValueError as e:
        raise SpecError(file, "combine.rule", str(e)) from None
    seen: set[str] = set()
    for i, m in enumerate(spec.members):
        if m.name in seen:
            raise SpecError(file, f"members[{i}].name", f"duplicate member name {m.name!r}")
        if m.name == f"{spec.name}__fanout":  # (render.fanout_name: Triton would see a cycle)
            raise SpecError(
                file,
                f"members[{i}].name",
                f"{m.name!r} is the name of the model Chorus adds to call every member; "
                "choose another",
            )
        seen.add(m.name)

    base = file.resolve().parent
    if read_models:
        members, inputs, outputs = _read_members(file, spec, base)
    else:  # planning from a profile: names and declared tensors only
        members = tuple(
            Member(m.name, (base / m.path).resolve(), m.weight, (), (), (), ())
            for m in spec.members
        )
        inputs = _declared(file, "inputs", spec.inputs)
        outputs = _declared(file, "outputs", spec.outputs)
    return Ensemble(
        name=spec.name,
        file=file.resolve(),
        members=members,
        inputs=inputs,
        outputs=outputs,
        rule=spec.combine.rule,
        softmax=spec.combine.softmax,
        max_batch_size=spec.serving.max_batch_size,
        uncertainty=tuple(dict.fromkeys(spec.combine.uncertainty)),
        deadline_ms=spec.serving.deadline_ms,
        quorum=_quorum(file, spec),
        member_timeout_ms=spec.serving.member_timeout_ms,
        latency_target_ms=spec.serving.latency_target_ms,
        cascade=_cascade(file, spec, outputs),
    )


def _cascade(file: Path, spec: EnsembleFile, outputs: tuple[Tensor, ...]) -> Cascade | None:
    """``combine.cascade`` resolved: its tiers hold the members, its output has a class axis."""
    given = spec.combine.cascade
    if given is None:
        return None
    if len(spec.members) < 2:
        raise SpecError(
            file,
            "combine.cascade",
            "a cascade needs at least 2 members (one tier to answer early, one after it)",
        )
    tiers = None
    if given.tiers is not None:
        tiers = _tiers(file, given.tiers, [m.name for m in spec.members])
        if given.exit == "agreement" and len(tiers[0]) == 1:
            raise SpecError(
                file,
                "combine.cascade.tiers[0]",
                f"{tiers[0][0]!r} alone: one member always agrees with itself, so exit "
                "agreement would answer every row with it and never call the later tiers; put "
                "more members in the first tier, or use exit: confidence",
            )
    return Cascade(
        tiers=tiers,
        exit=given.exit,
        threshold=given.threshold,
        output=_cascade_output(file, given.output, outputs),
    )


def _tiers(file: Path, tiers: list[list[str]], members: list[str]) -> tuple[tuple[str, ...], ...]:
    """The tiers, checked to hold every member exactly once in at least 2 non-empty tiers."""
    field = "combine.cascade.tiers"
    if len(tiers) < 2:
        raise SpecError(
            file,
            field,
            f"a cascade needs at least 2 tiers, got {len(tiers)}: e.g. "
            f"[[{', '.join(members[:2])}], [{', '.join(members[2:]) or '...'}]]",
        )
    seen: set[str] = set()
    for i, tier in enumerate(tiers):
        if not tier:
            raise SpecError(file, f"{field}[{i}]", "a tier needs at least one member")
        for j, name in enumerate(tier):
            if name not in members:
                raise SpecError(
                    file,
                    f"{field}[{i}][{j}]",
                    f"{name!r} is not a member (the members: {', '.join(members)})",
                )
            if name in seen:
                raise SpecError(file, f"{field}[{i}][{j}]", f"{name!r} is in more than one place")
            seen.add(name)
    missing = [m for m in members if m not in seen]
    if missing:
        raise SpecError(
            file,
            field,
            f"every member must be in a tier; missing: {', '.join(missing)}",
        )
    return tuple(tuple(tier) for tier in tiers)


def _cascade_output(file: Path, name: str | None, outputs: tuple[Tensor, ...]) -> str:
    """The output the exit rule reads: named, else the first; it must have a class axis."""
    field = "combine.cascade.output"
    if not outputs:  # planning from a profile: the tensors were not read
        return name or ""
    if name is None:
        tensor = outputs[0]
    else:
        found = [t for t in outputs if t.name == name]
        if not found:
            known = ", ".join(t.name for t in outputs)
            raise SpecError(file, field, f"{name!r} is not an output (the outputs: {known})")
        tensor = found[0]
    if not tensor.shape or tensor.shape[-1] == 1:
        shape = [-1 if d < 0 else d for d in tensor.shape]
        raise SpecError(
            file,
            field if name is not None else "combine.cascade",
            f"output {tensor.name!r} has shape {shape} (after the batch dimension): the exit "
            "rule needs a class axis, its last, of more than one class"
            + ("" if name is not None else "; name another with 'output:'"),
        )
    return tensor.name


def _read_members(
    file: Path, spec: EnsembleFile, base: Path
) -> tuple[tuple[Member, ...], tuple[Tensor, ...], tuple[Tensor, ...]]:
    """The members with their tensors (read from ONNX files; a TorchScript file has none, so
    its are the ensemble's, in Triton's PyTorch names INPUT__i, OUTPUT__j), and the ensemble's
    tensors, checked to agree."""
    declared_in = _declared(file, "inputs", spec.inputs)
    declared_out = _declared(file, "outputs", spec.outputs)
    onnx_read = {
        i: _read_onnx(file, i, base / m.path)
        for i, m in enumerate(spec.members)
        if not is_torchscript(m.path)
    }
    first_in, first_out = next(iter(onnx_read.values()), ((), ()))
    inputs = declared_in or first_in
    outputs = declared_out or first_out
    read = []
    for i, m in enumerate(spec.members):
        if i in onnx_read:
            read.append(onnx_read[i])
            continue
        if not inputs or not outputs:
            raise SpecError(
                file,
                f"members[{i}].path",
                f"{m.path} is TorchScript, which names no tensors: declare the ensemble's "
                "'inputs' and 'outputs' (name, dtype, shape), or list an ONNX member first",
            )
        problem = _not_a_model_file(base / m.path)
        if problem:
            raise SpecError(file, f"members[{i}].path", problem)
        read.append(
            (
                tuple(Tensor(f"INPUT__{k}", t.dtype, t.shape) for k, t in enumerate(inputs)),
                tuple(Tensor(f"OUTPUT__{k}", t.dtype, t.shape) for k, t in enumerate(outputs)),
            )
        )
    for t in outputs:
        if t.dtype not in _FLOAT_TYPES:
            raise SpecError(
                file,
                "outputs",
                f"output {t.name!r} is {t.dtype}; combining needs floating-point outputs "
                "(scores or probabilities)",
            )
        if spec.combine.uncertainty and not t.shape:
            raise SpecError(
                file,
                "combine.uncertainty",
                f"output {t.name!r} has no class axis: uncertainty needs (batch, ..., classes)",
            )
    members = []
    for i, (m, (m_in, m_out)) in enumerate(zip(spec.members, read, strict=True)):
        if is_torchscript(m.path):  # by position: its forward()'s arguments and results
            if m.inputs or m.outputs:
                raise SpecError(
                    file,
                    f"members[{i}]",
                    "a TorchScript member takes the ensemble's tensors in order; it has no "
                    "names to map",
                )
            in_map = tuple((t.name, x.name) for t, x in zip(inputs, m_in, strict=True))
            out_map = tuple((t.name, x.name) for t, x in zip(outputs, m_out, strict=True))
        else:
            in_map = _match(file, f"members[{i}]", "inputs", inputs, m_in, m.inputs, m.name)
            out_map = _match(file, f"members[{i}]", "outputs", outputs, m_out, m.outputs, m.name)
        members.append(
            Member(
                name=m.name,
                path=(base / m.path).resolve(),
                weight=m.weight,
                inputs=m_in,
                outputs=m_out,
                input_map=in_map,
                output_map=out_map,
            )
        )
    return tuple(members), inputs, outputs


def _quorum(file: Path, spec: EnsembleFile) -> int:
    """The quorum as a count of members."""
    q, members = spec.serving.quorum, len(spec.members)
    if isinstance(q, int):
        if not 1 <= q <= members:
            raise SpecError(
                file, "serving.quorum", f"a count of members must be 1 to {members}, got {q}"
            )
        return q
    if not 0 < q <= 1:
        raise SpecError(
            file,
            "serving.quorum",
            f"a fraction must be in (0, 1], got {q}; write a count as an integer",
        )
    return max(1, math.ceil(q * members - 1e-9))


def _declared(file: Path, field: str, tensors: list[TensorFile] | None) -> tuple[Tensor, ...]:
    if not tensors:
        return ()
    out = []
    for i, t in enumerate(tensors):
        if t.dtype not in _ONNX_TO_TRITON.values():
            allowed = ", ".join(sorted(_ONNX_TO_TRITON.values()))
            raise SpecError(file, f"{field}[{i}].dtype", f"{t.dtype!r} is not one of {allowed}")
        out.append(Tensor(t.name, t.dtype, tuple(t.shape)))
    return tuple(out)


def _not_a_model_file(path: Path) -> str | None:
    """Why ``path`` cannot be a member's file, if it cannot."""
    shown = repr(str(path))
    if not path.exists():
        return f"member file {shown} does not exist"
    if path.is_dir():
        return f"member file {shown} is a folder, not a model file"
    if not path.is_file():
        return f"member file {shown} is not a regular file (a device, a pipe?)"
    if path.stat().st_size == 0:
        return f"member file {shown} is empty, not a model"
    return None


def _read_onnx(file: Path, i: int, path: Path) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    field = f"members[{i}].path"
    problem = _not_a_model_file(path)
    if problem:
        raise SpecError(file, field, problem)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, ValueError, OSError...
        raise SpecError(file, field, f"{str(path)!r} is not a readable ONNX model: {e}") from e
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    ins = [v for v in graph.input if v.name not in initializers]
    return (
        tuple(_tensor(file, field, path, v) for v in ins),
        tuple(_tensor(file, field, path, v) for v in graph.output),
    )


def _tensor(file: Path, field: str, path: Path, value: onnx.ValueInfoProto) -> Tensor:
    ttype = value.type.tensor_type
    dtype = _ONNX_TO_TRITON.get(ttype.elem_type)
    if dtype is None:
        name = onnx.TensorProto.DataType.Name(ttype.elem_type)
        raise SpecError(
            file,
            field,
            f"tensor {value.name!r} of {path.name} has type {name}, which Chorus cannot serve",
        )
    dims = list(ttype.shape.dim)
    if not dims:
        raise SpecError(
            file,
            field,
            f"tensor {value.name!r} of {path.name} has no batch "
            "dimension; export the model with a dynamic first (batch) axis",
        )
    batch = dims[0]
    if batch.HasField("dim_value") and batch.dim_value > 0:
        raise SpecError(
            file,
            field,
            f"tensor {value.name!r} of {path.name} has a fixed first "
            f"dimension of {batch.dim_value}; Chorus batches along the first "
            "dimension: export the model with a dynamic batch axis",
        )
    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims[1:])
    return Tensor(value.name, dtype, shape)


def _match(
    file: Path,
    where: str,
    kind: str,
    ensemble: tuple[Tensor, ...],
    member: tuple[Tensor, ...],
    explicit: dict[str, str],
    member_name: str,
) -> tuple[tuple[str, str], ...]:
    """Map each ensemble tensor to one of the member's: by the explicit map, by name, or, when
    both sides have a single tensor, to each other. Types and shapes must agree."""
    by_name = {t.name: t for t in member}
    known = {t.name for t in ensemble}
    for ens_name in explicit:
        if ens_name not in known:
            raise SpecError(
                file,
                f"{where}.{kind}",
                f"maps {ens_name!r}, which is not one of "
                f"the ensemble's {kind} ({', '.join(sorted(known))})",
            )
    if kind == "inputs" and len(member) != len(ensemble):
        raise SpecError(
            file,
            where,
            f"member {member_name!r} has {len(member)} inputs "
            f"({', '.join(t.name for t in member)}); the ensemble has "
            f"{len(ensemble)} ({', '.join(sorted(known))})",
        )
    pairs = []
    for t in ensemble:
        if t.name in explicit:
            theirs = explicit[t.name]
        elif t.name in by_name:
            theirs = t.name
        elif len(ensemble) == 1 and len(member) == 1:
            theirs = member[0].name
        else:
            raise SpecError(
                file,
                f"{where}.{kind}",
                f"member {member_name!r} has no {kind[:-1]} "
                f"named {t.name!r}; map it, e.g. {kind}: {{{t.name}: <its name>}}",
            )
        mt = by_name.get(theirs)
        if mt is None:
            raise SpecError(
                file,
                f"{where}.{kind}",
                f"member {member_name!r} has no {kind[:-1]} "
                f"named {theirs!r} (it has {', '.join(by_name)})",
            )
        if mt.dtype != t.dtype:
            raise SpecError(
                file,
                f"{where}.{kind}",
                f"{kind[:-1]} {theirs!r} of member "
                f"{member_name!r} is {mt.dtype}, the ensemble's {t.name!r} "
                f"is {t.dtype}",
            )
        if not _shapes_agree(mt.shape, t.shape):
            raise SpecError(
                file,
                f"{where}.{kind}",
                f"{kind[:-1]} {theirs!r} of member "
                f"{member_name!r} has shape {list(mt.shape)} (after the batch "
                f"dimension), the ensemble's {t.name!r} has {list(t.shape)}",
            )
        pairs.append((t.name, theirs))
    return tuple(pairs)


def _shapes_agree(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b, strict=True))
