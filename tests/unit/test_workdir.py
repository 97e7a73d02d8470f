"""One live owner per working directory (orchestrator.deploying.workdir): another process is
refused while the owner lives, and not once it is gone, however it went."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from orchestrator.deploying.workdir import WorkdirInUse, hold, owning, release
from orchestrator.errors import ChorusError

HOLDER = """
import sys, time
from pathlib import Path
from orchestrator.deploying.workdir import hold
hold(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(600)
"""


def other_process_holds(workdir):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(workdir)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    return holder


def test_a_folder_another_live_process_holds_is_refused_naming_it(tmp_path):
    holder = other_process_holds(tmp_path / "work")
    try:
        with pytest.raises(WorkdirInUse) as refused:
            hold(tmp_path / "work")
        assert refused.value.exit_code == 2
        said = str(refused.value)
        assert f"{(tmp_path / 'work').resolve()} is in use by another deployment" in said
        assert f"pid {holder.pid}:" in said and "--workdir" in said
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
    with owning(tmp_path / "work"):  # killed (-9): its lock went with it
        pass


def test_holds_in_one_process_count_and_the_last_release_lets_go(tmp_path):
    folder = hold(tmp_path)
    assert hold(tmp_path) == folder
    release(folder)
    holder = subprocess.run(
        [sys.executable, "-c", HOLDER.replace("time.sleep(600)", ""), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert holder.returncode != 0 and "is in use" in holder.stderr  # one hold left
    release(folder)
    holder = subprocess.run(
        [sys.executable, "-c", HOLDER.replace("time.sleep(600)", ""), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert holder.returncode == 0, holder.stderr


def test_what_it_starts_does_not_hold_it(tmp_path):
    """Triton and the combiner, left running by a killed ``chorus up``, must not keep the next
    run out (it stops them)."""
    with owning(tmp_path):
        child = subprocess.Popen(["sleep", "600"])
    try:
        with owning(tmp_path):
            pass
    finally:
        child.kill()
        child.wait()


def test_a_lock_file_that_is_not_a_file_is_refused_by_name(tmp_path):
    """A FIFO in its place (a traceback before: an illegal seek reading who held it)."""
    os.mkfifo(tmp_path / "owner.lock")
    with pytest.raises(ChorusError, match=r"owner\.lock is not a file"):
        hold(tmp_path)
