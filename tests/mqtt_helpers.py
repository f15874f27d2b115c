"""Reading the federation's topics from a test, as an operator would."""

from __future__ import annotations

import time
from collections.abc import Iterator

from shared.config import CommonSettings
from shared.protocol import Message, ProtocolError, parse_message
from shared.topics import Topics
from shared.transport import Transport


def messages(transport: Transport, timeout: float) -> Iterator[Message]:
    """Control messages arriving within ``timeout`` seconds (chunks and unparsable payloads skipped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = transport.get(0.2)
        if msg is None or Topics.is_chunk(msg.topic):
            continue
        try:
            yield parse_message(msg.payload)
        except ProtocolError:
            continue


def next_message(transport: Transport, kind: type, timeout: float = 20.0):
    for parsed in messages(transport, timeout):
        if isinstance(parsed, kind):
            return parsed
    raise AssertionError(f"no {kind.__name__} within {timeout}s")


def retained(broker_url: str, federation: str, topic: str, kind: type, timeout: float = 10.0):
    """The retained message of ``kind`` on ``topic``."""
    settings = CommonSettings(broker_url=broker_url, federation=federation)
    with Transport(settings, f"test-monitor-{federation}-{kind.__name__}", persistent_session=False) as monitor:
        monitor.subscribe(topic)
        return next_message(monitor, kind, timeout)
