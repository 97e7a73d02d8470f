"""One combiner worker: serves the ensemble until SIGINT or SIGTERM.

    python -m combiner.worker --config combiner.json [--host H] [--grpc-port P]
                              [--http-port P] [--reuse-port]

Normally started by ``python -m combiner``, which runs several and serves their metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

import uvloop

from .config import CombinerConfig
from .service import serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m combiner.worker", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="combiner.json to serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--grpc-port", type=int, default=8100)
    parser.add_argument("--http-port", type=int, default=None, help="also serve HTTP/REST")
    parser.add_argument("--reuse-port", action="store_true", help="share the port (SO_REUSEPORT)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = CombinerConfig.load(args.config)
    # uvloop: measured 15-20% less CPU per request than asyncio's loop under grpc.aio
    uvloop.run(_run(config, args.host, args.grpc_port, args.http_port, args.reuse_port))


async def _run(
    config: CombinerConfig, host: str, port: int, http_port: int | None, reuse_port: bool
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await serve(config, host, port, stop, reuse_port=reuse_port, http_port=http_port)


if __name__ == "__main__":
    main()
