"""What the combiner serves: written by the orchestrator, read by the combiner process.

The combiner never plans; this file (``combiner.json`` beside the model repository) tells it the
ensemble's tensors, its members as Triton knows them, the combination rule and where Triton is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["CombinerConfig", "MemberRoute", "TensorInfo"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class CombinerConfig(_Strict):
    name: str = Field(description="the ensemble's model name on the combiner's endpoint")
    triton_url: str = Field(description="host:port of Triton's gRPC endpoint")
    max_batch_size: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    members: tuple[MemberRoute, ...]
    rule: str = Field("mean", description="a rule of combiner.rules, or 'module:function'")
    rule_path: tuple[str, ...] = Field((), description="folders to import a user rule from")
    softmax: bool = False
    uncertainty: tuple[Literal["entropy", "mutual_information", "variance", "agreement"], ...] = ()
    deadline_ms: float | None = Field(
        None, gt=0, description="default time to wait for the members; None waits for all"
    )
    quorum: int | None = Field(None, ge=1, description="members that must answer; None: all")
    shared_memory: bool = Field(
        False, description="Triton shares this host: write each input once into shared memory"
    )
    output_shared_memory_min_bytes: int | None = Field(
        1 << 16,
        ge=0,
        description="with shared_memory: member outputs of at least this many bytes a batch "
        "come back through it too (None: never); only where every member must answer",
    )
    batching: bool = Field(
        True, description="gather concurrent requests into one batch before the fan-out"
    )
    batch_fill_ms: float = Field(
        5.0,
        ge=0,
        description="under load, how long a freed batch slot may wait for more requests to "
        "join while they keep arriving (0: never; an idle combiner never waits)",
    )
    max_in_flight: int = Field(
        1,
        ge=1,
        description="batches out to the members at once; more requests wait and join the next "
        "(the orchestrator sets the instance count of the scarcest member)",
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

    def quorum_count(self) -> int:
        """How many members must answer."""
        return len(self.members) if self.quorum is None else min(self.quorum, len(self.members))

    def save(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> CombinerConfig:
        return cls.model_validate_json(path.read_text())
