"""Run the combiner: ``python -m combiner --config combiner.json [--host H] [--grpc-port P]``.

Stops cleanly on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from .config import CombinerConfig
from .service import serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m combiner", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="combiner.json to serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--grpc-port", type=int, default=8100)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = CombinerConfig.load(args.config)
    asyncio.run(_run(config, args.host, args.grpc_port))


async def _run(config: CombinerConfig, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await serve(config, host, port, stop)


if __name__ == "__main__":
    main()
