"""The distribution as a user installs it: its name, what it puts at top level, and the
client-only install (the SDK with numpy and Triton's gRPC client, none of the server).

These build the wheel and install it into empty virtual environments (packages come from the
configured index, as any user's would)."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# what a client-only install must not bring: the server stack
SERVER = {
    "aiohttp", "jinja2", "matplotlib", "nvidia_pytriton", "onnx", "onnxruntime",
    "prometheus_client", "psutil", "pydantic", "pytriton", "rich", "torch", "typer", "uvloop",
    "yaml",
}  # fmt: skip


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*build, "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("*.whl")
    return path


def test_the_wheel_is_ours_and_installs_only_the_design_cards_names(wheel: Path) -> None:
    # "chorus" on PyPI is a chemistry toolkit; a wheel of that name would install over it
    assert wheel.name.startswith("chorus_ensembles-"), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"orchestrator", "combiner", "model_repository_templates"}, top
    assert "orchestrator/examples/digits/ensemble.yaml" in names  # `chorus example` writes it
    assert not [n for n in names if n.endswith(".onnx")], "trained models are not shipped"


def _venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True).create(path)
    return path / "bin" / "python"


def test_the_client_only_install_imports_the_sdk_and_nothing_of_the_server(
    wheel: Path, tmp_path: Path
) -> None:
    python = _venv(tmp_path / "client")
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
        check=True,
        capture_output=True,
        text=True,
    )
    installed = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(*sorted("
         "d.metadata['Name'].lower() for d in m.distributions()))"],
        check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    assert "chorus-ensembles" in installed
    assert not SERVER & {n.replace("-", "_") for n in installed}, installed
    probe = (
        "import sys, numpy as np\n"
        "from combiner.sdk import AsyncEnsembleClient, EnsembleClient, EnsembleError\n"
        "client = EnsembleClient('127.0.0.1:1')\n"
        "try:\n"
        "    client.predict(np.zeros((1, 4), np.float32), timeout_s=2.0)\n"
        "except EnsembleError as e:\n"
        "    print(type(e).__name__)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in " + repr(sorted(SERVER)) + "))\n"
    )
    run = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    error, loaded = run.stdout.strip().splitlines()
    assert error in {"Unavailable", "EnsembleUnavailable"} or "Unavailable" in error, run.stdout
    assert loaded == "[]", loaded
    star = "from combiner import *; print(EnsembleClient.__name__)"
    run = subprocess.run([str(python), "-c", star], capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "EnsembleClient", run.stderr
    server_name = "import combiner; combiner.CombinerConfig"
    run = subprocess.run([str(python), "-c", server_name], capture_output=True, text=True)
    assert "pip install 'chorus-ensembles[server]'" in run.stderr, run.stderr
    # the commands say what they lack, not a traceback
    for command in ([str(python.parent / "chorus"), "--help"], [str(python), "-m", "combiner"]):
        run = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert run.returncode == 1, command
        assert "pip install 'chorus-ensembles[server]'" in run.stderr, run.stderr
        assert "Traceback" not in run.stderr


def test_the_example_without_its_trainers_says_which_extra_to_install(tmp_path: Path) -> None:
    """A [server] install has no torch or scikit-learn: `chorus example` names the extra."""
    run = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['torch'] = sys.modules['sklearn'] = None; "
         f"sys.argv = ['chorus', 'example', {str(tmp_path / 'ex')!r}]; "
         "from orchestrator.command import main; main()"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    said = run.stdout + run.stderr
    assert "pip install 'chorus-ensembles[demo]'" in said and "torch" in said, said
    assert "Traceback" not in said
    assert not (tmp_path / "ex").exists()
