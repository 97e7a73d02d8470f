"""What the combiner serves: written by the orchestrator, read by the combiner process.

The combiner never plans; this file (``combiner.json`` beside the model repository) tells it the
ensemble's tensors, its members as Triton knows them, the combination rule and where Triton is.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tritonclient.utils import triton_to_np_dtype

__all__ = [
    "CascadeRoute",
    "CombinerConfig",
    "MemberRoute",
    "NodeRoute",
    "TensorInfo",
    "config_digest",
    "is_served",
    "served_file",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# the longest any of its times may be (a day): beyond, a stop's wait overflows a timeout
# (threading's), and a manifest's grace period an int64
DAY_MS = 86_400_000.0

_HEADER_ROOM = 1 << 16
_VARIABLE_LIMIT = 64 << 20
# protobuf bytes of one value of a typed contents field (packed), at most: floats are fixed,
# integers varints; raw contents are the itemsize, never more
_WIRE_BYTES = {"FP16": 4, "BF16": 4, "FP32": 4, "FP64": 8, "BOOL": 1}


class TensorInfo(_Strict):
    name: str
    dtype: str = Field(description="Triton data type name, e.g. FP32")
    shape: tuple[int, ...] = Field(description="dimensions after the batch one; -1 is variable")


class MemberRoute(_Strict):
    name: str = Field(description="the member's model name on Triton")
    weight: float = 1.0
    inputs: dict[str, str] = Field(description="ensemble input name -> member input name")
    outputs: dict[str, str] = Field(description="ensemble output name -> member output name")
    max_batch_size: int | None = Field(
        None, ge=1, description="the member's batch limit on Triton; larger requests are split"
    )
    nodes: dict[str, int] = Field(
        default_factory=dict,
        description="node name -> the member's instances there: its calls go to these nodes in "
        "proportion (empty: every node, equally)",
    )


class NodeRoute(_Strict):
    name: str = Field(description="the node's name in the plan")
    url: str = Field(description="host:port of the node's Triton gRPC endpoint")
    shared_memory: bool = Field(
        False, description="this Triton shares the combiner's host (IPC namespace)"
    )


class CascadeRoute(_Strict):
    """The members in tiers, cheapest first: after each tier, the rows whose members so far
    meet the exit rule (:mod:`combiner.stages.cascade`) are answered; the others go on."""

    tiers: tuple[tuple[str, ...], ...] = Field(
        min_length=2, description="member names per tier, in order; every member in one tier"
    )
    exit: Literal["agreement", "confidence"] = "agreement"
    threshold: float = Field(ge=0, le=1, description="the exit rule's score a row must reach")
    output: str = Field(description="the ensemble output the exit rule reads (a class axis)")


class CombinerConfig(_Strict):
    name: str = Field(description="the ensemble's model name on the combiner's endpoint")
    triton_url: str | None = Field(
        None, description="host:port of Triton's gRPC endpoint (one node; else ``nodes``)"
    )
    nodes: tuple[NodeRoute, ...] = Field(
        (), description="one Triton per node, for a plan over several nodes"
    )
    max_batch_size: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    members: tuple[MemberRoute, ...]
    rule: str = Field("mean", description="a rule of combiner.stages.rules, or 'module:function'")
    rule_path: tuple[str, ...] = Field((), description="folders to import a user rule from")
    softmax: bool = False
    uncertainty: tuple[Literal["entropy", "mutual_information", "variance", "agreement"], ...] = ()
    deadline_ms: float | None = Field(
        None,
        gt=0,
        le=DAY_MS,
        description="default time to wait for the members; None waits for all",
    )
    member_timeout_ms: float = Field(
        30_000.0,
        gt=0,
        le=DAY_MS,
        description="how long a batch waits for a member before counting it missing; its call "
        "is left to finish on Triton (never cancelled) and its answer dropped",
    )
    quorum: int | None = Field(None, ge=1, description="members that must answer; None: all")
    shared_memory: bool = Field(
        False,
        description="Triton (``triton_url``) shares this host: write each input once into "
        "shared memory (with ``nodes``, each node says)",
    )
    output_shared_memory_min_bytes: int | None = Field(
        1 << 16,
        ge=0,
        description="with shared_memory: member outputs of at least this many bytes a batch "
        "come back through it too (None: never); only where every member must answer",
    )
    triton_key_file: str | None = Field(
        None, description="file holding the key to Triton's restricted APIs (only Chorus has it)"
    )
    max_request_bytes: int | None = Field(
        None,
        ge=1,
        description="largest request accepted, before and after decompression (None: what "
        "max_batch_size rows of the inputs need, plus room for headers; 64 MiB if a dimension "
        "is variable)",
    )
    client_shared_memory: bool = Field(
        False, description="let clients on this host register their own shared-memory regions"
    )
    client_shm_max_regions: int = Field(
        64, ge=1, description="shared-memory regions one connection may register"
    )
    client_shm_max_bytes: int = Field(
        1 << 32, ge=1, description="bytes of shared memory one connection may register"
    )
    client_shm_max_total: int = Field(
        1024, ge=1, description="shared-memory regions one combiner process holds at most"
    )
    max_requests_in_flight: int = Field(
        1024, ge=1, description="requests one worker serves at once; more get RESOURCE_EXHAUSTED"
    )
    max_connections: int = Field(
        4096,
        ge=1,
        description="client connections one worker keeps open, per protocol (also bounded by "
        "its file descriptors); past it, the longest-idle HTTP connection is closed and gRPC "
        "refuses new connections",
    )
    idle_timeout_s: float = Field(
        30.0,
        gt=0,
        le=DAY_MS / 1000,
        description="a client connection with no request for this long is closed",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        le=DAY_MS / 1000,
        description="an HTTP request body, or a gRPC request message, must arrive within this "
        "(slow senders)",
    )
    drain_timeout_s: float = Field(
        30.0,
        ge=0,
        le=DAY_MS / 1000,
        description="on SIGTERM, how long requests in flight may take to finish",
    )
    batching: bool = Field(
        True, description="gather concurrent requests into one batch before the fan-out"
    )
    batch_fill_ms: float = Field(
        5.0,
        ge=0,
        le=DAY_MS,
        description="under load, how long a freed batch slot may wait for more requests to "
        "join while they keep arriving (0: never; an idle combiner never waits)",
    )
    max_in_flight: int = Field(
        1,
        ge=1,
        description="batches out to the members at once; more requests wait and join the next "
        "(the orchestrator sets the instance count of the scarcest member)",
    )
    workers: int = Field(
        1,
        ge=1,
        le=256,
        strict=True,
        description="combiner processes the plan needs to carry its throughput (python -m "
        "combiner --workers auto, the default, starts this many)",
    )
    fanout_model: str | None = Field(
        None,
        description="a Triton ensemble returning every member's outputs (<member>__<output>): "
        "one call instead of one per member, used when no deadline or quorum needs per-member "
        "calls",
    )
    fanout_max_batch_size: int | None = Field(None, ge=1)
    fan_out: Literal["concurrent", "sequential"] = Field(
        "concurrent",
        description="call the members all at once, or one after another (the paper's baseline)",
    )
    cascade: CascadeRoute | None = Field(
        None, description="call the members tier by tier; None: every member, every row"
    )

    @model_validator(mode="after")
    def _one_upstream(self) -> CombinerConfig:
        if (self.triton_url is None) == (not self.nodes):
            raise ValueError("give either triton_url (one node) or nodes, not both")
        if sum(n.shared_memory for n in self.nodes) > 1:
            raise ValueError("shared memory with one node at most (the one on this host)")
        names = {n.name for n in self.nodes}
        if len(names) != len(self.nodes):
            raise ValueError("node names must differ")
        if self.cascade is not None:
            placed = [name for tier in self.cascade.tiers for name in tier]
            members = [m.name for m in self.members]
            if sorted(placed) != sorted(members) or any(not t for t in self.cascade.tiers):
                raise ValueError(
                    f"cascade tiers {[list(t) for t in self.cascade.tiers]} must hold every "
                    f"member ({', '.join(members)}) exactly once, in non-empty tiers"
                )
            if self.cascade.output not in {o.name for o in self.outputs}:
                raise ValueError(f"cascade output {self.cascade.output!r} is not an output")
        for m in self.members:
            unknown = set(m.nodes) - names if self.nodes else set(m.nodes) - {"local"}
            if unknown:
                raise ValueError(f"member {m.name!r} names unknown node(s) {sorted(unknown)}")
            if any(c < 1 for c in m.nodes.values()):
                raise ValueError(f"member {m.name!r}: instances per node must be at least 1")
        return self

    def node_routes(self) -> tuple[NodeRoute, ...]:
        """Every Triton the members run on (one node: ``triton_url``, named 'local')."""
        if self.nodes:
            return self.nodes
        assert self.triton_url is not None
        return (NodeRoute(name="local", url=self.triton_url, shared_memory=self.shared_memory),)

    def uncertainty_outputs(self) -> dict[str, tuple[TensorInfo, str, str]]:
        """Each uncertainty output: name -> (its tensor, the output it measures, the measure).
        Served as ``<output>_<measure>``, FP32, the output's shape without its class axis."""
        return {
            f"{o.name}_{u}": (
                TensorInfo(name=f"{o.name}_{u}", dtype="FP32", shape=o.shape[:-1]),
                o.name,
                u,
            )
            for o in self.outputs
            for u in self.uncertainty
        }

    def bases(self, wanted: tuple[str, ...] | list[str]) -> tuple[str, ...]:
        """The members' outputs needed for these ensemble outputs (an uncertainty output
        needs the output it measures)."""
        derived = self.uncertainty_outputs()
        return tuple(dict.fromkeys(derived[n][1] if n in derived else n for n in wanted))

    def input_bytes(self) -> int | None:
        """Bytes of max_batch_size rows of every input; None if a dimension is variable."""
        total = 0
        for t in self.inputs:
            if any(d < 0 for d in t.shape):
                return None
            itemsize = np.dtype(triton_to_np_dtype(t.dtype)).itemsize
            total += self.max_batch_size * math.prod(t.shape) * itemsize
        return total

    def request_limit(self) -> int:
        """The largest request body accepted (gRPC message; HTTP body, decompressed), with
        room for headers and for tensors written as JSON text (up to 32 bytes a value)."""
        if self.max_request_bytes is not None:
            return self.max_request_bytes
        data = self.input_bytes()
        if data is None:
            return _VARIABLE_LIMIT
        elements = sum(self.max_batch_size * math.prod(t.shape) for t in self.inputs)
        return max(data, 32 * elements) + _HEADER_ROOM

    def grpc_request_limit(self) -> int:
        """The largest gRPC message accepted: the inputs' bytes as protobuf carries them (raw,
        or typed contents: at most 10 bytes a value, a varint), not JSON's allowance."""
        if self.max_request_bytes is not None:
            return self.max_request_bytes
        if self.input_bytes() is None:
            return _VARIABLE_LIMIT
        wire = sum(
            self.max_batch_size * math.prod(t.shape) * _WIRE_BYTES.get(t.dtype, 10)
            for t in self.inputs
        )
        return wire + _HEADER_ROOM

    def stop_s(self) -> float:
        """The longest a worker takes to stop: the drain (requests in flight), then the
        requests parked meanwhile (up to the drain again, 5 s at least), then the calls still
        running on Triton (never cancelled: kept up to the member timeout), and a margin."""
        drain = self.drain_timeout_s
        return drain + max(drain, 5.0) + max(drain, self.member_timeout_ms / 1000.0) + 5.0

    def quorum_count(self) -> int:
        """How many members must answer."""
        return len(self.members) if self.quorum is None else min(self.quorum, len(self.members))

    def save(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> CombinerConfig:
        # strict: a number is a number (JSON's `true` had been read as 1), a name a string
        return cls.model_validate_json(path.read_text(), strict=True)


# -- what the supervisor reports serving: <config>.served holds the SHA-256 of the config file
#    every worker runs (``chorus up`` and ``regenerate-configs`` wait for it)


def config_digest(config: Path) -> str | None:
    """The SHA-256 of the config file as it is now; None if it cannot be read."""
    try:
        return hashlib.sha256(config.read_bytes()).hexdigest()
    except OSError:
        return None


def served_file(config: Path) -> Path:
    return config.with_name(config.name + ".served")


def is_served(config: Path) -> bool:
    """Whether the combiner reports serving ``config`` as it is now."""
    try:
        reported = served_file(config).read_text().strip()
    except OSError:
        return False
    return reported == config_digest(config)
