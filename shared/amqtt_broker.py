"""Child-process entry point for the embedded amqtt broker: ``python -m shared.amqtt_broker HOST PORT``."""

from __future__ import annotations

import asyncio
import logging
import sys


async def _serve(host: str, port: int) -> None:
    from amqtt.broker import Broker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 200}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    await asyncio.Event().wait()


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    host, port = sys.argv[1], int(sys.argv[2])
    asyncio.run(_serve(host, port))


if __name__ == "__main__":
    main()
