"""Serving a plan outside ``chorus up``: one Triton per node started by ``chorus node`` (a compose
service, a pod), the combiner's config written for them, and configs changed in place.

``chorus regenerate-configs`` renders each node's repository and, given the running Tritons,
switches them to the new plan without a restart, in an order that never sends a call that
either side would refuse:

1. the combiner's config is narrowed to what both plans allow (each member's smaller batch
   limit, the nodes it has in both) and the command waits until the combiner serves it (its
   supervisor writes ``<config>.served`` with the config's SHA-256 once every worker runs it);
2. each Triton loads the members whose files changed (explicit model control: the old version
   answers until the new one is ready), then the fan-out model;
3. the combiner's config becomes the new plan's; once served,
4. members that left a node are unloaded there.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NoReturn

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from combiner import CombinerConfig, is_served, key_metadata
from orchestrator.deploying.launch import ServerBinary, TritonServer, find_tritonserver
from orchestrator.deploying.render import NODE_MARKER
from orchestrator.errors import ChorusError, SpecError
from orchestrator.planning.plan import Plan

__all__ = [
    "FANOUT_SUFFIX",
    "node_models",
    "node_repository",
    "read_key",
    "serve_node",
    "switch",
    "wait_served",
    "write_key",
]

FANOUT_SUFFIX = "__fanout"


def node_repository(repo: Path, plan: Plan, node: str) -> Path:
    """Where a node's part of the plan is rendered: ``repo`` itself for a single node."""
    return repo if len(plan.nodes()) == 1 else repo / node


def node_models(repo: Path) -> list[str]:
    """The models a rendered repository holds: members first, the fan-out model last (it
    needs them)."""
    names = sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))
    return sorted(names, key=lambda n: n.endswith(FANOUT_SUFFIX))


def read_key(path: Path) -> str:
    """The key to Triton's restricted APIs, from its file (hex digits, one line)."""
    try:
        key = path.read_text().strip()
    except OSError as e:
        raise SpecError(path, "", f"cannot read the Triton key: {e.strerror}") from e
    if not key or any(c not in "0123456789abcdef" for c in key):
        raise SpecError(path, "", "the Triton key must be one line of lowercase hex digits")
    return key


def new_key(path: Path) -> str:
    """The key in ``path``, made (random) if there is none."""
    if not path.exists():
        import secrets

        write_key(path, secrets.token_hex(32))
    return read_key(path)


def write_key(path: Path, key: str) -> None:
    """Write a new key file, readable by this user only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key + "\n")


def serve_node(
    repo: Path,
    workdir: Path,
    key_file: Path,
    host: str,
    grpc_port: int,
    http_port: int,
    binary: ServerBinary | None = None,
) -> NoReturn:
    """Become this node's tritonserver (exec): the rendered repository, every model in it
    loaded, explicit model control, every API but health behind the key."""
    if not repo.is_dir():
        problem = "is not a folder" if repo.exists() else "does not exist"
        raise SpecError(repo, "", f"the node's repository {problem}: render the plan first")
    models = node_models(repo)
    if not models:
        if not (repo / NODE_MARKER).is_file():  # a wrong path, or a host never sent its part
            raise SpecError(
                repo, "", f"no model and no {NODE_MARKER}: not a rendered node's repository"
            )
        print(f"{repo}: the plan places no model on this node; serving none", file=sys.stderr)
    key = read_key(key_file)
    server = TritonServer(repo, workdir, models, host, binary or find_tritonserver(), key=key)
    server.grpc_port, server.http_port = grpc_port, http_port
    argv, env = server.command()
    os.umask(0o077)  # what it makes is this user's alone, as under chorus up (launch.py)
    os.execve(argv[0], argv, env)


def wait_served(config: Path, timeout_s: float) -> bool:
    """Wait until the combiner serves ``config`` as it is now; whether it did in time."""
    until = time.monotonic() + timeout_s
    while time.monotonic() < until:
        if is_served(config):
            return True
        time.sleep(0.1)
    return False


def narrowed(old: CombinerConfig, new: CombinerConfig) -> CombinerConfig:
    """A config both plans' Tritons accept: each member's smaller batch limit, and its nodes in
    both plans (the old ones if it has none in both)."""
    if {n.name for n in old.node_routes()} != {n.name for n in new.node_routes()}:
        return new  # other nodes: nothing in common to narrow to
    before = {m.name: m for m in old.members}
    members = []
    for m in new.members:
        was = before.get(m.name)
        if was is None:
            members.append(m)
            continue
        limit = min(
            (x for x in (was.max_batch_size, m.max_batch_size) if x is not None), default=None
        )
        both = {n: c for n, c in m.nodes.items() if n in was.nodes}
        members.append(
            m.model_copy(update={"max_batch_size": limit, "nodes": both or dict(was.nodes)})
        )
    fanout = min(
        (x for x in (old.fanout_max_batch_size, new.fanout_max_batch_size) if x is not None),
        default=None,
    )
    return new.model_copy(update={"members": tuple(members), "fanout_max_batch_size": fanout})


def switch(
    repo: Path,
    plan: Plan,
    written: list[Path],
    tritons: Mapping[str, str],
    key: str | None,
    combiner: tuple[Path, CombinerConfig] | None,
    say: Callable[[str], None],
    wait_s: float = 60.0,
) -> list[str]:
    """Make the running Tritons (node -> gRPC address) and combiner serve ``plan``, whose
    repository was just rendered (``written``: the paths that changed). Returns the models
    loaded or unloaded, as ``node/model`` (``model`` for one node)."""
    nodes = plan.nodes()
    changed: dict[str, set[str]] = {n: set() for n in nodes}
    removed: dict[str, set[str]] = {n: set() for n in nodes}
    for path in written:
        parts = path.relative_to(repo).parts
        node, rest = (nodes[0], parts) if len(nodes) == 1 else (parts[0], parts[1:])
        if node not in changed or not rest:
            continue
        (changed if (node_repository(repo, plan, node) / rest[0]).is_dir() else removed)[node].add(
            rest[0]
        )
    config_path, new_config = combiner if combiner else (None, None)
    if tritons and config_path is not None and new_config is not None and config_path.is_file():
        old_config = CombinerConfig.load(config_path)
        if not _serve_config(config_path, narrowed(old_config, new_config), say, wait_s):
            raise ChorusError(
                f"the running combiner did not take the narrowed config {config_path} within "
                f"{wait_s:g} s, so no member was loaded again (its batches could exceed the new "
                "limits); see the combiner's log, then run regenerate-configs again"
            )
    done = []
    headers = dict(key_metadata(key))
    for node in nodes:
        names = sorted(changed[node], key=lambda n: n.endswith(FANOUT_SUFFIX))
        fanout = [p.parent.name for p in node_repository(repo, plan, node).glob("*/config.pbtxt")]
        fanout = [f for f in fanout if f.endswith(FANOUT_SUFFIX) and f not in names]
        if names and fanout:  # its members' limits may have changed: it follows them
            names += fanout
        if not names or node not in tritons:
            continue
        with _client(tritons, node) as client:
            for name in names:
                say(f"[{node}] loading {name}")
                _control(client.load_model, name, headers, node)
                done.append(name if len(nodes) == 1 else f"{node}/{name}")
    if (
        config_path is not None
        and new_config is not None
        and not _serve_config(config_path, new_config, say, wait_s)
    ):
        raise ChorusError(
            f"the running combiner did not take the new config {config_path} within "
            f"{wait_s:g} s, so no member was unloaded (it may still send them calls); see the "
            "combiner's log, then run regenerate-configs again"
        )
    for node in nodes:
        if not removed[node] or node not in tritons:
            continue
        with _client(tritons, node) as client:
            for name in sorted(removed[node]):
                say(f"[{node}] unloading {name}")
                _control(client.unload_model, name, headers, node)
                done.append(name if len(nodes) == 1 else f"{node}/{name}")
    return done


def _serve_config(
    path: Path, config: CombinerConfig, say: Callable[[str], None], wait_s: float
) -> bool:
    """Write the combiner's config; if a combiner served the one it replaces, wait until it
    serves this one. False if it did not in time."""
    text = config.model_dump_json(indent=2) + "\n"
    if path.is_file() and path.read_text() == text:
        return True
    running = is_served(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    say(f"wrote {path}")
    if running and not wait_served(path, wait_s):
        say(
            f"the combiner did not report serving {path} within {wait_s:g} s "
            "(is one running with this config?)"
        )
        return False
    return True


def _client(tritons: Mapping[str, str], node: str) -> grpcclient.InferenceServerClient:
    if node not in tritons:
        raise ChorusError(f"no Triton address for node {node!r} (give --triton {node}=HOST:PORT)")
    return grpcclient.InferenceServerClient(tritons[node])


def _control(call: Callable[..., None], name: str, headers: dict[str, str], node: str) -> None:
    try:
        call(name, headers=headers)
    except InferenceServerException as e:
        raise ChorusError(f"Triton of {node} refused to (un)load {name!r}: {e.message()}") from e
