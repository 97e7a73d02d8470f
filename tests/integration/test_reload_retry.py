"""The combiner's config changing under it, with a real tritonserver: a reload that fails is
tried again by the supervisor on its own (every 10 s) until the new config is served; and
``regenerate-configs`` (:func:`orchestrator.deploying.deploy.switch`) loads no member on Triton
while the running combiner has not taken the narrowed config."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from combiner.config import CombinerConfig
from combiner.sdk import EnsembleClient
from orchestrator.deploying.deploy import switch
from orchestrator.errors import ChorusError
from orchestrator.planning.hardware import LOCAL_NODE, Device
from orchestrator.planning.plan import Plan
from tests.integration.toy import combiner, python_member, sleeping, toy_config, toy_triton

GIB = 1 << 30
RETRY = "trying the reload again in"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("reload-retry")
    with toy_triton(root, {}) as (_, triton):
        yield root, triton


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def served(config: Path) -> str:
    return config.with_name(config.name + ".served").read_text().strip()


def wait_for(what: str, test: Callable[[], object], timeout: float, log: Path) -> float:
    """Wait (bounded) until ``test()``; the seconds it took."""
    began = time.monotonic()
    while not test():
        waited = time.monotonic() - began
        assert waited < timeout, f"{what}: not within {timeout} s\n{log.read_text()}"
        time.sleep(0.1)
    return time.monotonic() - began


def test_a_reload_that_failed_is_tried_again_until_the_new_config_is_served(stack):
    """The new config names a user rule whose module is not there yet: its workers exit, the
    old config is served meanwhile. Once the module is there, the supervisor's own retry (no
    signal, no change to the config) brings the new config up."""
    root, triton = stack
    old = toy_config(triton, root, ["a", "b"])
    rules = root / "late-rules"  # does not exist yet
    x = np.random.default_rng(1).random((2, 4), np.float32)
    with combiner(root, "retry", old) as (process, address):
        path, log = root / "retry.json", root / "retry.log"
        first = digest(path)
        assert served(path) == first
        with EnsembleClient(address) as client:
            before = client.predict(x)
        assert not np.allclose(before, 0.25)

        new = CombinerConfig.model_validate(
            {**old, "rule": "chorus_late_rule:quarter", "rule_path": [str(rules)]}
        )
        tmp = path.with_name("retry.json.tmp")
        new.save(tmp)
        tmp.replace(path)
        wanted = digest(path)
        wait_for("the reload to fail", lambda: RETRY in log.read_text(), 30.0, log)
        assert "cannot import module 'chorus_late_rule'" in log.read_text()
        assert served(path) == first  # the old config is served meanwhile, and answers
        with EnsembleClient(address) as client:
            np.testing.assert_allclose(client.predict(x), before, rtol=1e-6)

        rules.mkdir()
        (rules / "chorus_late_rule.py").write_text(
            "import numpy as np\n\n\ndef quarter(stacked, weights):\n"
            "    return np.full(stacked.shape[1:], 0.25, dtype=np.float32)\n"
        )
        wait_for("the retried reload", lambda: served(path) == wanted, 25.0, log)
        assert process.exited() is None
        assert digest(path) == wanted  # nobody touched the config meanwhile
        text = log.read_text()
        assert text.count(f"{path} changed: starting 1 worker(s) on it") == 2, text
        with EnsembleClient(address) as client:  # a new connection: the new worker
            np.testing.assert_allclose(client.predict(x), np.full((2, 3), 0.25), rtol=1e-6)


def model_state(triton, name: str) -> str:
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        index = client.get_model_repository_index(headers=triton.grpc_headers, as_json=True)
    return next((m.get("state", "") for m in index.get("models", []) if m["name"] == name), "")


def batch_limit(triton, name: str) -> int:
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        config = client.get_model_config(name, headers=triton.grpc_headers, as_json=True)
    return int(config["config"]["max_batch_size"])


@pytest.mark.parametrize("how", ["frozen", "killed"])
def test_switch_loads_no_member_while_the_combiner_has_not_taken_the_narrowed_config(stack, how):
    """A combiner served the config (its ``.served`` says so), then stopped taking changes:
    its supervisor is frozen (SIGSTOP), or it was killed and left its ``.served`` behind. The
    new plan adds member ``c_<how>`` and lowers ``a``'s batch limit; the switch must stop with
    an error naming the config, and Triton must have loaded neither."""
    root, triton = stack
    repo = root / "repo"
    newcomer = f"c_{how}"
    old = toy_config(triton, root, ["a", "b"])
    with combiner(root, f"switch-{how}", old) as (process, _):
        path = root / f"switch-{how}.json"
        assert served(path) == digest(path)
        assert process.proc is not None
        if how == "frozen":
            process.proc.send_signal(signal.SIGSTOP)
        else:
            process.proc.kill()
            process.proc.wait()
        try:
            # what rendering the new plan wrote: a new member, and a's config changed
            python_member(repo, newcomer, sleeping(0.0, 5.0))
            a_config = repo / "a" / "config.pbtxt"
            text, n = re.subn(r"max_batch_size: \d+", "max_batch_size: 8", a_config.read_text())
            assert n == 1, a_config.read_text()
            a_config.write_text(text)
            written = [a_config, repo / newcomer / "config.pbtxt", repo / newcomer / "1/model.py"]
            cpu = Device(LOCAL_NODE, "cpu", 0, "cpu", 4 * GIB, 4 * GIB, cores=1)
            members = ("a", "b", newcomer)
            plan = Plan(
                ensemble="toy",
                devices=(cpu,),
                planned_memory_bytes={},
                members=members,
                instances={m: {cpu.id: 1} for m in members},
                max_batch_size={"a": 8, "b": 16, newcomer: 16},
                predicted_throughput=0.0,
            )
            new = CombinerConfig.model_validate(toy_config(triton, root, list(members)))
            new = new.model_copy(
                update={
                    "members": tuple(
                        m.model_copy(update={"max_batch_size": plan.max_batch_size[m.name]})
                        for m in new.members
                    )
                }
            )
            said: list[str] = []
            began = time.monotonic()
            with pytest.raises(ChorusError) as refused:
                switch(
                    repo,
                    plan,
                    written,
                    {LOCAL_NODE: triton.grpc_url},
                    triton.key,
                    (path, new),
                    said.append,
                    wait_s=3.0,
                )
            took = time.monotonic() - began
        finally:
            if how == "frozen":
                process.proc.send_signal(signal.SIGCONT)
    message = str(refused.value)
    assert refused.value.exit_code == 1
    assert f"did not take the narrowed config {path} within 3 s" in message, message
    assert "no member was loaded" in message, message
    assert not any("loading" in line for line in said), said
    assert f"the combiner did not report serving {path} within 3 s" in said[-1], said
    # the narrowed config was written (a at 8, the newcomer routed), but nothing followed
    narrowed = json.loads(path.read_text())
    assert {m["name"]: m["max_batch_size"] for m in narrowed["members"]} == plan.max_batch_size
    assert model_state(triton, newcomer) != "READY"
    assert model_state(triton, "a") == "READY"
    assert batch_limit(triton, "a") == 16  # still the config Triton loaded at its start
    assert took < 10.0
