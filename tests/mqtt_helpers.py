"""Reading the federation's topics (and the orchestrator's journal) from a test, as an operator would."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

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


def open_round_updates(db: Path) -> tuple[int, int]:
    """(round number of the open attempt, updates stored for it) from the orchestrator's database; (0, 0) before."""
    if not db.exists():
        return 0, 0
    try:
        with sqlite3.connect(db) as conn:
            row = conn.execute("SELECT round_id, round FROM rounds WHERE state='open'").fetchone()
            if row is None:
                return 0, 0
            return row[1], conn.execute("SELECT COUNT(*) FROM updates WHERE round_id=?", (row[0],)).fetchone()[0]
    except sqlite3.OperationalError:  # the orchestrator has not created its tables yet
        return 0, 0
