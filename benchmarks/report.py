"""How every benchmark publishes its results: printed, and kept in benchmarks/results/."""

from __future__ import annotations

from pathlib import Path


def publish(lines: list[str], out: Path) -> None:
    text = "\n".join(lines).rstrip("\n") + "\n"
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
