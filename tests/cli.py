"""Run the real ``chorus`` command line in a subprocess, as a user would."""

from __future__ import annotations

import subprocess
import sys


def chorus(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
