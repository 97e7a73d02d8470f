"""The ``chorus`` console script: the command needs the server stack, which a client-only
install (``pip install chorus-ensembles``, the SDK alone) does not have; say so plainly."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from orchestrator.cli import main as run
    except ModuleNotFoundError as e:
        sys.stderr.write(
            f"chorus: {e.name!r} is missing: the chorus command needs the server stack, "
            "which the client-only install leaves out: pip install 'chorus-ensembles[server]'\n"
        )
        raise SystemExit(1) from None
    run()
