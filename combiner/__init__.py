"""Chorus's data plane: serve an ensemble over KServe v2, fanning each request out to its
members on Triton and combining their answers.

Sub-packages, in the order a request meets them: ``endpoints`` (gRPC, HTTP, auth, client
shared memory), ``stages`` (batching, prediction, combination, rules) and ``triton`` (the
channels, nodes, health and shared-memory pool facing Triton). At top level: the processes
(``python -m combiner`` runs ``supervisor``, which starts and restarts ``combiner.worker``
processes with the help of ``workers``), the config file (``config``), and the client SDK
(``sdk``), which needs nothing of the server.

The names below are the combiner's public surface, all the orchestrator may use (an import
contract). They load on first use, so that ``import combiner.sdk`` brings in none of the
server's dependencies.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    "combiner.config": [
        "CascadeRoute",
        "CombinerConfig",
        "DAY_MS",
        "MemberRoute",
        "NodeRoute",
        "TensorInfo",
        "config_digest",
        "is_served",
        "served_file",
    ],
    "combiner.stages.rules": ["load_rule", "combine"],
    "combiner.stages.cascade": ["EXITS", "exits", "scores"],
    "combiner.triton.upstream": ["KEY_HEADER", "key_metadata"],
    "combiner.workers": ["PortInUse", "Restarts", "claim_ports", "die_with_parent"],
    "combiner.sdk": ["Answer", "AsyncEnsembleClient", "EnsembleClient", "EnsembleError"],
}
_WHERE = {name: module for module, names in _PUBLIC.items() for name in names}

# what ``from combiner import *`` gives: the SDK, which every install has (the other names
# need the server stack: ask for them by name)
__all__ = ["Answer", "AsyncEnsembleClient", "EnsembleClient", "EnsembleError", "__version__"]

if TYPE_CHECKING:  # what the names are, for type checkers (they load lazily below)
    from combiner.config import DAY_MS as DAY_MS
    from combiner.config import CascadeRoute as CascadeRoute
    from combiner.config import CombinerConfig as CombinerConfig
    from combiner.config import MemberRoute as MemberRoute
    from combiner.config import NodeRoute as NodeRoute
    from combiner.config import TensorInfo as TensorInfo
    from combiner.config import config_digest as config_digest
    from combiner.config import is_served as is_served
    from combiner.config import served_file as served_file
    from combiner.sdk import Answer, AsyncEnsembleClient, EnsembleClient, EnsembleError
    from combiner.stages.cascade import EXITS as EXITS
    from combiner.stages.cascade import exits as exits
    from combiner.stages.cascade import scores as scores
    from combiner.stages.rules import combine as combine
    from combiner.stages.rules import load_rule as load_rule
    from combiner.triton.upstream import KEY_HEADER as KEY_HEADER
    from combiner.triton.upstream import key_metadata as key_metadata
    from combiner.workers import PortInUse as PortInUse
    from combiner.workers import Restarts as Restarts
    from combiner.workers import claim_ports as claim_ports
    from combiner.workers import die_with_parent as die_with_parent


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'combiner' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:  # a client-only install: the SDK alone
        raise ModuleNotFoundError(
            f"combiner.{name} needs the server stack ({e.name!r} is missing): "
            "pip install 'chorus-ensembles[server]'",
            name=e.name,
        ) from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
