"""A client's shared memory, as the combiner opens it: only what a client may rightly hand it,
never mapped, per connection, capped. Real files in a folder standing for /dev/shm."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from tritonclient.grpc import service_pb2

from combiner.config import CombinerConfig
from combiner.endpoints.client_shm import Caller, ClientRegions
from combiner.errors import RequestError
from combiner.stages.batching import Rows
from combiner.stages.request import RequestReader
from combiner.triton.shm import unlink_stale

PEER = Caller("a" * 32, "ipv4:127.0.0.1:40001")
OTHER = Caller("b" * 32, "ipv4:127.0.0.1:40002")


def region_file(folder: Path, name: str, size: int = 4096) -> Path:
    path = folder / name
    path.write_bytes(bytes(size))
    return path


@contextmanager
def refused(
    code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT, match: str = ""
) -> Iterator[pytest.ExceptionInfo[RequestError]]:
    with pytest.raises(RequestError, match=match) as info:
        yield info
    assert info.value.code == code, info.value


def test_only_keys_with_the_client_prefix_are_opened(tmp_path):
    regions = ClientRegions(enabled=True, shm_dir=tmp_path)
    for name in ("chorus_4242_0", "triton_python_backend_shm_region_1", "passwd"):
        region_file(tmp_path, name)
    for key in ("/chorus_4242_0", "/triton_python_backend_shm_region_1", "/passwd", "/..", ""):
        with refused(match="opens only keys '/chorus_client_<name>'"):
            regions.register(PEER, "r", key, 0, 64)
    with refused(match="opens only keys"):
        regions.register(PEER, "r", "/chorus_client_a/../../etc/passwd", 0, 64)
    assert len(regions) == 0


def test_a_line_break_ends_neither_a_key_nor_a_name(tmp_path):
    """``$`` matches before a final line break: the key named the file without it, and the name
    kept it (a forged line wherever it is shown)."""
    regions = ClientRegions(enabled=True, shm_dir=tmp_path)
    region_file(tmp_path, "chorus_client_a")
    with refused(match="opens only keys"):
        regions.register(PEER, "r", "/chorus_client_a\n", 0, 64)
    with refused(match="1-256 printable characters"):
        regions.register(PEER, "r\n", "/chorus_client_a", 0, 64)
    with refused(match="session"):
        Caller("a" * 32 + "\n", "ipv4:127.0.0.1:1").required_owner()
    assert len(regions) == 0


def test_a_link_or_anything_but_a_regular_file_is_refused_without_saying_what_it_is(tmp_path):
    target = region_file(tmp_path, "secret.txt")
    (tmp_path / "chorus_client_link").symlink_to(target)
    (tmp_path / "chorus_client_dir").mkdir()
    os.mkfifo(tmp_path / "chorus_client_fifo")
    regions = ClientRegions(enabled=True, shm_dir=tmp_path)
    messages = set()
    for key in ("link", "dir", "fifo", "missing"):
        with refused(match="names no region this endpoint may open") as e:
            regions.register(PEER, "r", f"/chorus_client_{key}", 0, 64)
        messages.add(str(e.value))
    assert len(messages) == 1  # the same words whether it is missing, a link or a folder
    assert target.read_bytes() == bytes(4096)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can make a file of another user")
def test_a_file_of_another_user_is_refused(tmp_path):
    path = region_file(tmp_path, "chorus_client_theirs")
    os.chown(path, 65534, 65534)
    regions = ClientRegions(enabled=True, shm_dir=tmp_path)
    with refused(match="names no region this endpoint may open"):
        regions.register(PEER, "r", "/chorus_client_theirs", 0, 64)


def test_a_region_truncated_after_registration_is_refused_not_a_crash(tmp_path):
    path = region_file(tmp_path, "chorus_client_t", 4096)
    regions = ClientRegions(enabled=True, shm_dir=tmp_path)
    regions.register(PEER, "r", "/chorus_client_t", 0, 4096)
    region = regions.get(PEER, "r")
    region.write(100, b"\x01\x02\x03", "output 'y'")
    assert region.read(100, 3, "input 'x'") == b"\x01\x02\x03"
    os.truncate(path, 64)
    with refused(match="shrank to 64 bytes"):
        region.read(100, 3, "input 'x'")
    with refused(match="shrank to 64 bytes"):
        region.write(100, b"\x09", "output 'y'")
    assert path.stat().st_size == 64  # nothing written past its end
    with refused(match="do not fit"):
        region.read(4000, 200, "input 'x'")
    regions.close()


def test_registrations_belong_to_their_session(tmp_path):
    region_file(tmp_path, "chorus_client_a")
    region_file(tmp_path, "chorus_client_b")
    regions = ClientRegions(enabled=True, shm_dir=tmp_path)
    regions.register(PEER, "mine", "/chorus_client_a", 0, 4096)
    regions.register(OTHER, "mine", "/chorus_client_b", 0, 4096)  # same name, other session
    with refused(grpc.StatusCode.FAILED_PRECONDITION, "unknown shared-memory region 'theirs'"):
        regions.get(OTHER, "theirs")
    same_port = Caller("d" * 32, PEER.peer)  # another session from the same address
    with refused(grpc.StatusCode.FAILED_PRECONDITION, "unknown shared-memory region 'mine'"):
        regions.get(same_port, "mine")
    assert [r.key for r in regions.status(OTHER)] == ["/chorus_client_b"]
    regions.unregister(OTHER)  # "all": all of the caller's
    assert regions.status(OTHER) == []
    assert [r.name for r in regions.status(PEER)] == ["mine"]
    with refused(code=grpc.StatusCode.ALREADY_EXISTS, match="already registered"):
        regions.register(PEER, "mine", "/chorus_client_a", 0, 4096)
    regions.close()


def test_registrations_are_capped_per_connection_and_per_process(tmp_path):
    for i in range(6):
        region_file(tmp_path, f"chorus_client_{i}")
    regions = ClientRegions(
        enabled=True,
        max_per_connection=2,
        max_bytes_per_connection=6000,
        max_total=3,
        shm_dir=tmp_path,
    )
    regions.register(PEER, "r0", "/chorus_client_0", 0, 4096)
    with refused(grpc.StatusCode.RESOURCE_EXHAUSTED, match="over 6000 bytes"):
        regions.register(PEER, "r1", "/chorus_client_1", 0, 4096)
    regions.register(PEER, "r1", "/chorus_client_1", 0, 1000)
    with refused(grpc.StatusCode.RESOURCE_EXHAUSTED, match="the most allowed"):
        regions.register(PEER, "r2", "/chorus_client_2", 0, 100)
    regions.register(OTHER, "r", "/chorus_client_3", 0, 100)
    # at the process's cap, registrations of connections that no longer exist (these peers
    # never did) make room; here all of them go, and the newcomer fits
    regions.register(Caller("c" * 32, "ipv4:127.0.0.1:40003"), "r", "/chorus_client_4", 0, 100)
    assert regions.status(PEER) == [] and len(regions) == 1
    regions.close()


def test_client_shared_memory_is_off_unless_enabled(tmp_path):
    region_file(tmp_path, "chorus_client_a")
    regions = ClientRegions(enabled=False, shm_dir=tmp_path)
    with refused(match="off on this endpoint"):
        regions.register(PEER, "r", "/chorus_client_a", 0, 64)
    with refused(match="off on this endpoint"):
        regions.status(PEER)


def test_stale_pool_regions_are_removed_and_what_cannot_be_is_skipped(tmp_path, caplog):
    dead = 2**22 + 12345  # above pid_max's default: no such process
    region_file(tmp_path, f"chorus_{dead}_0")
    (tmp_path / f"chorus_{dead}_1").mkdir()  # cannot be unlinked
    region_file(tmp_path, f"chorus_{os.getpid()}_0")  # alive: kept
    region_file(tmp_path, "chorus_client_1_0")  # a client's: never the combiner's to remove
    with caplog.at_level(logging.WARNING):
        removed = unlink_stale(tmp_path)
    assert removed == [f"chorus_{dead}_0"]
    assert "skipped" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"chorus_{dead}_1", f"chorus_{os.getpid()}_0", "chorus_client_1_0"]
    )


def test_a_grpc_caller_without_a_session_header_is_told_to_send_one(tmp_path):
    region_file(tmp_path, "chorus_client_a")
    regions = ClientRegions(enabled=True, shm_dir=tmp_path)
    with refused(match="needs the header 'chorus-shm-session'"):
        regions.register(Caller(None, "ipv4:127.0.0.1:40001"), "r", "/chorus_client_a", 0, 64)
    with refused(match="must be 32-128 letters"):
        regions.register(Caller("short", "ipv4:127.0.0.1:40001"), "r", "/chorus_client_a", 0, 64)


def test_a_hard_link_is_refused_whatever_it_points_at(tmp_path):
    pool = region_file(tmp_path, "chorus_4242_0")
    os.link(pool, tmp_path / "chorus_client_x")
    regions = ClientRegions(enabled=True, shm_dir=tmp_path)
    with refused(match="names no region this endpoint may open"):
        regions.register(PEER, "r", "/chorus_client_x", 0, 64)


def test_an_unregistered_region_stays_open_until_its_last_request_ends(tmp_path):
    """The fd of a region a request still writes through is never closed under it (its number
    could go to the next file opened, another client's region)."""
    path = region_file(tmp_path, "chorus_client_a")
    region_file(tmp_path, "chorus_client_b")
    regions = ClientRegions(enabled=True, shm_dir=tmp_path)
    regions.register(PEER, "a", "/chorus_client_a", 0, 4096)
    region = regions.get(PEER, "a")
    with region.held():
        regions.unregister(PEER, "a")  # the client lets go while its request is running
        regions.register(OTHER, "b", "/chorus_client_b", 0, 4096)  # opens the next free fd
        assert regions.get(OTHER, "b").fd != region.fd
        region.write(0, b"\x07" * 8, "output 'y'")  # the answer still goes to a's file
    assert path.read_bytes()[:8] == b"\x07" * 8
    assert (tmp_path / "chorus_client_b").read_bytes() == bytes(4096)
    with pytest.raises(OSError):
        os.fstat(region.fd)  # closed by its last user
    regions.close()


def test_an_input_from_shared_memory_is_bounded_before_it_is_read(tmp_path):
    region_file(tmp_path, "chorus_client_a", 1 << 16)
    regions = ClientRegions(enabled=True, shm_dir=tmp_path)
    regions.register(PEER, "a", "/chorus_client_a", 0, 1 << 16)
    config = CombinerConfig.model_validate(
        {
            "name": "e",
            "triton_url": "127.0.0.1:1",
            "max_batch_size": 4,
            "max_request_bytes": 4096,
            "inputs": [{"name": "x", "dtype": "FP32", "shape": [-1]}],
            "outputs": [{"name": "y", "dtype": "FP32", "shape": [3]}],
            "members": [
                {"name": "m", "max_batch_size": 4, "inputs": {"x": "x"}, "outputs": {"y": "y"}}
            ],
        }
    )
    reader = RequestReader(config, {t.name: t for t in config.outputs}, regions)
    request = service_pb2.ModelInferRequest(model_name="e")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[4, 1 << 28])
    tensor.parameters["shared_memory_region"].string_param = "a"
    with refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "over this endpoint's limit of 4096"):
        reader.parse(request, PEER)
    tensor.shape[:] = [1, 16]
    rows = reader.parse(request, PEER)
    assert isinstance(rows, Rows) and rows.nbytes("x") == 64
    regions.close()


def test_a_file_registered_by_one_client_is_refused_to_another(tmp_path):
    """Two clients on one file would read and write each other's tensors (two SDK clients of
    the same pid in two PID namespaces named their regions alike)."""
    region_file(tmp_path, "chorus_client_1_0")
    regions = ClientRegions(enabled=True, shm_dir=tmp_path)
    regions.register(PEER, "a", "/chorus_client_1_0", 0, 4096)
    regions.register(PEER, "again", "/chorus_client_1_0", 0, 4096)  # its own, twice: fine
    with refused(match="registered by another client"):
        regions.register(OTHER, "b", "/chorus_client_1_0", 0, 4096)
    regions.unregister(PEER)
    regions.register(OTHER, "b", "/chorus_client_1_0", 0, 4096)  # free again
    regions.close()
