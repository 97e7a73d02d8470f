"""Start and stop the processes Chorus runs: tritonserver and the combiner.

Every child is started in its own session (so a terminal's Ctrl-C reaches Chorus, which stops
them in order) with ``PR_SET_PDEATHSIG`` (so it ends with Chorus even if Chorus is killed: the
combiner on SIGTERM, so that it drains and cleans up, Triton on SIGKILL), its output kept in a
log file whose tail goes into every error. Stopping is SIGINT (SIGTERM for the combiner), a
timeout, then SIGKILL. What a child leaves behind in its session when it dies (the Python
backend's stubs outlive a Triton killed with -9) is killed too, as soon as Chorus sees the child
end. If Chorus itself is killed, a watchdog beside each child (``watchdog.py``) kills what is
left in the child's session, and unlinks the shared memory of the stubs it killed; a watchdog
killed by someone is started again; and if Chorus was killed with its watchdogs, the next
start in the same working directory kills what the last one left.

Triton is launched with every API but health (inference included) behind a per-run key that only
Chorus holds (``--grpc-restricted-protocol``, ``--http-restricted-api``): no other local process
can load or unload a model, or infer (and, with the bundled 2.51, crash it by cancelling a call:
server issues #7368, #8034). ``TritonServer.grpc_headers`` opens them for Chorus's own calls.
Triton reads the key from nowhere but its command line (no environment variable, file or
config for it, 2.51 to 2.73), so it is in the server's argv: SECURITY.md says who can read
that. Its metrics, which Chorus does not read and which no key guards, are off.

``tritonserver`` is found in $TRITONSERVER, then on PATH, then in the nvidia-pytriton wheel. The
bundled one needs a backend directory holding the Python backend and the stub built for this
interpreter, the wheel's libraries on LD_LIBRARY_PATH, and this interpreter's ``bin`` first on
PATH so that the stub imports the same numpy and onnxruntime as Chorus.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import psutil

from combiner import KEY_HEADER, die_with_parent, key_metadata
from orchestrator.deploying.watchdog import end_session, started
from orchestrator.errors import LaunchError

__all__ = [
    "RESTRICTED",
    "ManagedProcess",
    "ServerBinary",
    "TritonServer",
    "find_tritonserver",
    "free_port",
    "reclaim_backend_shm",
]


# Triton's API groups behind the key: everything but health (server/model live and ready)
RESTRICTED = (
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


_STOPS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM held until the block ends, then handled as they would have been.
    A KeyboardInterrupt raised inside Popen (while it waits for the child's exec) or before
    its result is stored leaves a running child that no one stops; held, the interrupt comes
    once the child is known. (Python runs signal handlers in the main thread only: elsewhere
    nothing is held, as nothing is interrupted.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[tuple[int, FrameType | None]] = []
    previous: dict[int, Any] = {s: signal.getsignal(s) for s in _STOPS}
    for s, handler in previous.items():
        if callable(handler):  # (an ignored or default one stays as it is)
            signal.signal(s, lambda signum, frame: held.append((signum, frame)))
    try:
        yield
    finally:
        for s, handler in previous.items():
            if callable(handler):
                signal.signal(s, handler)
        for signum, frame in held:
            handler = previous[signum]
            assert callable(handler)
            handler(signum, frame)


class ManagedProcess:
    """A child process with a log file, that dies with its parent and stops in steps."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        env: dict[str, str] | None = None,
        stop_signal: int = signal.SIGINT,
        death_signal: int = signal.SIGKILL,
        stop_timeout: float = 15.0,
    ) -> None:
        """``death_signal``: what the process gets when Chorus dies; ``stop_timeout``: how
        long it has to end on ``stop_signal`` (or on its death signal) before it is killed."""
        self.name = name
        self.argv = list(argv)
        self.log = log
        self.env = env
        self.stop_signal = stop_signal
        self.death_signal = death_signal
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._since = 0  # its start time (clock ticks since boot): what is left of it began after
        self._pidfd: int | None = None  # the process's, while it is not reaped
        self._watchdog: tuple[subprocess.Popen[bytes], int] | None = None  # and its pipe
        self._settled = True  # its end seen to: leftovers killed, watchdog stood down, reaped

    def start(self) -> None:
        self._ended(0)
        self._reap_earlier_run()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        # the log may hold a failed call's values (other clients' rows): this user's alone
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
        flags |= os.O_APPEND if self.proc is not None else os.O_TRUNC
        with open(os.open(self.log, flags, 0o600), "wb") as out, _signals_held():
            os.fchmod(out.fileno(), 0o600)  # (one made by an earlier version)
            try:
                self.proc = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    start_new_session=True,
                    # what it makes is this user's alone (not the Python backend's own shared
                    # memory, whose mode boost sets: SECURITY.md)
                    umask=0o077,
                    preexec_fn=functools.partial(die_with_parent, self.death_signal),
                )
            except OSError as e:
                raise LaunchError(f"cannot start {self.name} ({self.argv[0]}): {e}") from e
            self._settled = False
            self._since = started(self.proc.pid) or 0  # not reaped: the id is its
            self._session_file.write_text(f"{self.proc.pid} {self._since}\n")
            with contextlib.suppress(OSError):  # (no pidfd on this kernel: no watchdog)
                self._pidfd = os.pidfd_open(self.proc.pid)
                self._watchdog = self._new_watchdog()

    def _new_watchdog(self) -> tuple[subprocess.Popen[bytes], int] | None:
        assert self.proc is not None and self._pidfd is not None
        return _watchdog(self._pidfd, self.proc.pid, self._since, self.stop_timeout, self.log)

    def _rewatch(self) -> None:
        """Start a new watchdog where the process's was killed (by someone: it had been left
        a zombie, and the process unwatched); not again where that fails."""
        if self._watchdog is None or self._watchdog[0].poll() is None:
            return
        with _signals_held():  # (interrupted, a watchdog that no one knows of)
            os.close(self._watchdog[1])
            self._watchdog = None
            if self._pidfd is not None:
                self._watchdog = self._new_watchdog()

    def _ended(self, timeout: float | None) -> bool:
        """Whether the process has ended, waiting up to ``timeout`` s (None: until it has).
        Once it has, and before it is reaped (while its id, which is its group's and its
        session's, cannot be a new process's): what it left in its session is killed, and its
        watchdog stood down, so that no watchdog signals a group whose id was given again."""
        if self.proc is None or self._settled:
            return True
        if self.proc.returncode is None:  # (else someone reaped it: only a test does)
            if self._pidfd is not None:
                if not select.select([self._pidfd], [], [], timeout)[0]:  # readable: ended
                    self._rewatch()
                    return False
            else:
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    return False
        with _signals_held():  # (interrupted, a watchdog armed for an id that is free)
            end_session(self.proc.pid, self._since)  # what it left: stubs, their memory
            self._stand_down()
            self.proc.wait()
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
            self._session_file.unlink(missing_ok=True)  # (nothing of it left to find)
            self._settled = True
        return True

    def _signal(self, sig: int) -> None:
        """Send ``sig`` without reaping (``Popen.send_signal`` polls first, which reaps)."""
        with contextlib.suppress(ProcessLookupError):
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)
            elif self.proc is not None and self.proc.returncode is None:
                os.kill(self.proc.pid, sig)

    def _stand_down(self) -> None:
        """Tell the watchdog that Chorus has seen to the process itself; it ends."""
        if self._watchdog is not None:
            watchdog, pipe = self._watchdog
            self._watchdog = None
            with contextlib.suppress(OSError):  # (a watchdog killed by someone: no reader)
                os.write(pipe, b"x")
            os.close(pipe)
            try:
                watchdog.wait(5.0)
            except subprocess.TimeoutExpired:  # (stopped by someone: it ends on the byte)
                watchdog.kill()
                watchdog.wait()

    @property
    def _session_file(self) -> Path:
        return self.log.with_suffix(".session")

    def _reap_earlier_run(self) -> None:
        """Kill what a run of this process in this working directory left when Chorus was
        killed with it: processes of its session (as its session file names it: the id and
        the start time of its leader) whose command line names the directory."""
        try:
            session, since = map(int, self._session_file.read_text().split())
        except (OSError, ValueError):  # none (a clean stop removes it), or from before
            return
        end_session(session, since, naming=str(self.log.parent))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def exited(self) -> int | None:
        """The exit code if the process has ended, else None."""
        return self.proc.returncode if self.proc is not None and self._ended(0) else None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def failure(self, what: str) -> LaunchError:
        return LaunchError(f"{self.name} {what} (log: {self.log})", self.log_tail())

    def stop(self, timeout: float | None = None) -> None:
        """Stop it: its stop signal, ``timeout`` (default: its ``stop_timeout``), SIGKILL."""
        if self._ended(0):
            return
        self._signal(self.stop_signal)
        if not self._ended(self.stop_timeout if timeout is None else timeout):
            self._signal(signal.SIGKILL)
            self._ended(None)


def _watchdog(
    pidfd: int, pid: int, since: int, grace_s: float, log: Path
) -> tuple[subprocess.Popen[bytes], int] | None:
    """Start the watchdog of process ``pid`` (``pidfd`` its pidfd, ``since`` its start time),
    appending to ``log``; it and the write end of its pipe (None, said in the log, if it
    could not be started)."""
    read, write = os.pipe()  # (neither end is inherited by what Chorus starts later)
    script = Path(__file__).with_name("watchdog.py")
    try:
        with open(log, "ab") as out:
            watchdog = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    str(script),
                    str(pidfd),
                    str(pid),
                    str(since),
                    f"{grace_s:g}",
                ],
                stdin=read,
                stdout=out,
                stderr=subprocess.STDOUT,
                pass_fds=(pidfd,),
                start_new_session=True,
            )
    except OSError as e:
        os.close(write)
        with contextlib.suppress(OSError), open(log, "a") as out:
            out.write(f"chorus: no watchdog for this process ({e})\n")
        return None
    finally:
        os.close(read)
    return watchdog, write


@dataclass(frozen=True)
class ServerBinary:
    path: Path
    backend_dir: Path | None  # None: the server's own default
    bundled: bool
    lib_dir: Path | None = None
    backends: frozenset[str] = field(default_factory=frozenset)


def find_tritonserver() -> ServerBinary:
    """$TRITONSERVER, then PATH, then the binary bundled in nvidia-pytriton."""
    given = os.environ.get("TRITONSERVER") or shutil.which("tritonserver")
    if given:
        path = Path(given).resolve()
        if not os.access(path, os.X_OK):
            raise LaunchError(f"tritonserver at {path} (from $TRITONSERVER) is not executable")
        backend_dir = next(
            (
                d
                for d in (path.parent.parent / "backends", Path("/opt/tritonserver/backends"))
                if d.is_dir()
            ),
            None,
        )
        return ServerBinary(path, backend_dir, bundled=False, backends=_backends(backend_dir))
    try:
        import pytriton
    except ImportError:
        raise LaunchError(
            "no tritonserver found: set $TRITONSERVER, put it on PATH, or install nvidia-pytriton"
        ) from None
    root = Path(pytriton.__file__).parent / "tritonserver"
    lib_dir = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    return ServerBinary(
        root / "bin" / "tritonserver",
        root / "backends",
        bundled=True,
        lib_dir=lib_dir if lib_dir.is_dir() else None,
        backends=_backends(root / "backends"),
    )


def _backends(backend_dir: Path | None) -> frozenset[str]:
    if backend_dir is None:
        return frozenset()
    return frozenset(
        d.name for d in backend_dir.iterdir() if d.is_dir() and d.name != "__pycache__"
    )


def _bundled_backend_dir(binary: ServerBinary, workdir: Path) -> Path:
    """A backend directory for the bundled server: its Python backend plus this Python's stub."""
    assert binary.backend_dir is not None
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stubs = binary.path.parent.parent / "python_backend_stubs"
    stub = stubs / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise LaunchError(
            f"the bundled tritonserver has no Python backend stub for Python {version} "
            f"(looked for {stub}); use a Python the nvidia-pytriton wheel supports"
        )
    target = workdir / "backends" / "python"
    for src in (*sorted((binary.backend_dir / "python").glob("*.*")), stub):
        dst = target / src.name
        if not src.is_file() or (dst.is_file() and dst.stat().st_size == src.stat().st_size):
            continue
        # whole or not at all: a copy cut short (a full disk) was loaded by every later start,
        # which died of SIGBUS with no word of why
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")  # (`chorus node`s share a folder)
        try:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tmp)
            tmp.replace(dst)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise LaunchError(
                f"cannot copy Triton's Python backend into {target} ({e.strerror})"
            ) from None
    return target.parent


class TritonServer:
    """tritonserver on a model repository, with explicit model control, on its own ports, its
    APIs but health behind a key of its own (``restricted=False`` opens them to anyone on
    this host, for measuring Triton alone)."""

    def __init__(
        self,
        repo: Path,
        workdir: Path,
        models: Sequence[str],
        host: str = "127.0.0.1",
        binary: ServerBinary | None = None,
        extra_args: Sequence[str] = (),
        restricted: bool = True,
        key: str | None = None,
    ) -> None:
        """``key``: the key to the restricted APIs (default: a new one, unless not
        ``restricted``)."""
        self.repo = repo
        self.workdir = workdir
        self.models = list(models)
        self.host = host
        self.binary = binary or find_tritonserver()
        self.extra_args = list(extra_args)
        if key is None and restricted:
            key = secrets.token_hex(32)  # [0-9a-f]: Triton parses it
        self.key = key
        self.grpc_port = self.http_port = 0
        self.process: ManagedProcess | None = None

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_headers(self) -> dict[str, str]:
        """Headers that open the restricted gRPC APIs (tritonclient's ``headers=``)."""
        return dict(key_metadata(self.key))

    def start(self, timeout: float = 120.0) -> None:
        """Start the server on free ports and wait until it and every model are ready."""
        self.grpc_port, self.http_port = free_port(self.host), free_port(self.host)
        self.restart(timeout)

    def restart(self, timeout: float = 120.0) -> None:
        """Start the server (again) on the ports it had, with the same key; wait until it and
        every model are ready, within ``timeout``."""
        deadline = time.monotonic() + timeout
        argv, env = self.command()
        if self.process is not None:  # a previous run: what it left behind goes first
            self.stop()
        self.process = ManagedProcess("tritonserver", argv, self.workdir / "tritonserver.log", env)
        try:  # (an interrupt held while it started comes at its end: then it is stopped too)
            self.process.start()
            self._wait_ready(deadline)
        except BaseException:
            self.stop()
            raise

    def command(self) -> tuple[list[str], dict[str, str]]:
        """The server's command line and environment (``chorus node`` runs them in place)."""
        env = dict(os.environ)
        backend_dir = self.binary.backend_dir
        if self.binary.bundled:
            backend_dir = _bundled_backend_dir(self.binary, self.workdir)
            if self.binary.lib_dir:
                env["LD_LIBRARY_PATH"] = os.pathsep.join(
                    p for p in (str(self.binary.lib_dir), env.get("LD_LIBRARY_PATH")) if p
                )
        env["PATH"] = os.pathsep.join(
            p for p in (str(Path(sys.executable).parent), env.get("PATH")) if p
        )
        argv = [
            str(self.binary.path),
            f"--model-repository={self.repo}",
            "--model-control-mode=explicit",
            *(f"--load-model={m}" for m in self.models),
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            "--allow-metrics=false",  # nothing of Chorus reads them, and they have no key
            "--exit-timeout-secs=10",
            *self.extra_args,
        ]
        if self.key is not None:
            apis = ",".join(RESTRICTED)
            argv += [
                f"--grpc-restricted-protocol={apis}:{KEY_HEADER}={self.key}",
                f"--http-restricted-api={apis}:{KEY_HEADER}={self.key}",
            ]
        if backend_dir is not None:
            argv.append(f"--backend-directory={backend_dir}")
        if _accepts(str(self.binary.path), "--allow-client-shm", tuple(sorted(env.items()))):
            argv.append("--allow-client-shm=true")  # Triton >= 2.69 refuses client shm without
        return argv, env

    def _wait_ready(self, deadline: float) -> None:
        assert self.process is not None
        paths = ["/v2/health/ready", *(f"/v2/models/{m}/ready" for m in self.models)]
        while paths:
            code = self.process.exited()
            if code is not None:
                raise self.process.failure(f"exited with code {code} before it was ready")
            if time.monotonic() > deadline:
                raise self.process.failure(f"was not ready in time (waiting for {paths[0]})")
            if _http_ok(f"http://{self.http_url}{paths[0]}"):
                paths.pop(0)
            else:
                time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server (and what it left behind: its stubs, and the shared memory they
        shared with it when it was killed and could not clean up)."""
        if self.process is not None:
            self.process.stop(timeout)
            if self.binary.bundled or "python" in self.binary.backends:
                reclaim_backend_shm()

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def reclaim_backend_shm(shm_dir: Path = Path("/dev/shm"), min_age_s: float = 10.0) -> list[str]:
    """Unlink the Python backend's shared-memory regions that no process maps any more: a
    Triton killed with -9 leaves one per model instance (1 MiB or more each). Only this user's,
    and only those older than ``min_age_s`` (a starting Triton creates one, then maps it)."""
    now = time.time()
    stale = set()
    for path in shm_dir.glob("triton_python_backend_shm_region_*"):
        with contextlib.suppress(OSError):
            info = path.stat()
            if info.st_uid == os.geteuid() and now - info.st_mtime > min_age_s:
                stale.add(str(path))
    if not stale:
        return []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            for mapped in process.memory_maps(grouped=True):
                stale.discard(mapped.path)
    for name in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
    return sorted(stale)


@functools.lru_cache(maxsize=8)
def _accepts(binary: str, flag: str, env: tuple[tuple[str, str], ...]) -> bool:
    """Whether this tritonserver knows a command-line flag (read from its --help)."""
    try:
        result = subprocess.run(
            [binary, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(env),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return flag in result.stdout + result.stderr


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False
