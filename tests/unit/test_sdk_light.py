"""The SDK installs without the server stack: ``combiner.sdk`` imports, and builds its clients,
with only numpy and tritonclient[grpc] to lean on (the server's dependencies blocked)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# the server stack's distributions (their import names), none of them the client's
SERVER_STACK = (
    "aiohttp",
    "jinja2",
    "matplotlib",
    "onnx",
    "onnxruntime",
    "prometheus_client",
    "psutil",
    "pydantic",
    "pynvml",
    "pytriton",
    "rich",
    "typer",
    "uvloop",
    "yaml",
)

# Run with ``python -c``: block the server stack, import the SDK, build its clients, report.
PROBE = textwrap.dedent(
    """
    import asyncio, json, sys

    BLOCKED = set(sys.argv[1].split(","))
    tried = []

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                tried.append(name)
                raise ModuleNotFoundError(f"blocked: {name}", name=name)
            return None

    sys.meta_path.insert(0, Blocker())

    from combiner.sdk import AsyncEnsembleClient, EnsembleClient

    for options in ({}, {"shared_memory": True, "token": "t"}):
        EnsembleClient("127.0.0.1:1", **options).close()

    async def build():
        await AsyncEnsembleClient("127.0.0.1:1", shared_memory=True).close()

    asyncio.run(build())
    print(json.dumps({"tried": tried, "modules": sorted(sys.modules)}))
    """
)


def probe() -> dict[str, list[str]]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, ",".join(SERVER_STACK)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, list[str]] = json.loads(done.stdout.splitlines()[-1])
    return report


def test_the_sdk_imports_and_builds_clients_without_the_server_stack():
    report = probe()
    assert report["tried"] == []  # not even an optional import of one of them
    loaded = {m.partition(".")[0] for m in report["modules"]}
    assert loaded.isdisjoint(SERVER_STACK)
    ours = {m for m in report["modules"] if m.partition(".")[0] in ("combiner", "orchestrator")}
    assert ours == {"combiner"} | {m for m in ours if m.startswith("combiner.sdk")}, ours
