"""Shared fixtures: a real Mosquitto broker on a free port with the tests' own config."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from shared.broker import Broker, start_mosquitto


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[Broker]:
    """One Mosquitto for the session; tests isolate themselves by federation id / topic prefix."""
    broker = start_mosquitto()
    yield broker
    broker.stop()


@pytest.fixture()
def fresh_mosquitto() -> Iterator[Broker]:
    """A broker of the test's own, for tests that kill or restart things."""
    broker = start_mosquitto()
    yield broker
    broker.stop()


@pytest.fixture()
def no_fedmq_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No FEDMQ_* variable of the developer's shell may leak into a test that reads settings."""
    for name in list(os.environ):
        if name.startswith("FEDMQ_"):
            monkeypatch.delenv(name)
