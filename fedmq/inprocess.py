"""Run an orchestrator and agents as threads of this process, against a real broker.

The same services as in separate processes or containers, with an explicit lifetime: the
federation runs inside a ``with`` block; leaving it stops and joins every thread. Tests,
examples and benchmarks use this to avoid process start-up costs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from edge_agent.agent import EdgeAgent
from orchestrator.service import OrchestratorService
from shared.config import AgentSettings, CommonSettings, OrchestratorSettings
from shared.protocol import ProtocolError, RoundSummary, parse_message
from shared.topics import Topics
from shared.transport import Transport

log = logging.getLogger(__name__)


@dataclass
class Federation:
    orchestrator: OrchestratorService | None
    agents: dict[str, EdgeAgent]
    threads: dict[str, threading.Thread] = field(default_factory=dict)
    stops: dict[str, threading.Event] = field(default_factory=dict)
    errors: dict[str, BaseException] = field(default_factory=dict)

    def _start(self, name: str, target) -> None:
        stop = threading.Event()

        def body() -> None:
            try:
                target(stop)
            except BaseException as e:  # surfaced by wait_finished / the test
                log.exception("%s crashed", name)
                self.errors[name] = e

        thread = threading.Thread(target=body, name=name, daemon=True)
        self.stops[name], self.threads[name] = stop, thread
        thread.start()

    def stop(self, name: str, timeout: float = 30.0) -> None:
        self.stops[name].set()
        self.threads[name].join(timeout)

    def start_agent(self, settings: AgentSettings) -> EdgeAgent:
        """(Re)start one agent; a fresh object reads the same state directory, as after a restart."""
        agent = EdgeAgent(settings)
        self.agents[settings.site_id] = agent
        self._start(settings.site_id, agent.run)
        return agent

    def wait_finished(self, timeout: float) -> None:
        """Block until the orchestrator reports ``finished``; raise if anything crashed or time ran out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.errors:
                name, err = next(iter(self.errors.items()))
                raise RuntimeError(f"{name} crashed: {err!r}") from err
            if self.orchestrator is not None and self.orchestrator.engine.state == "finished":
                return
            time.sleep(0.1)
        state = self.orchestrator.engine.state if self.orchestrator else "external"
        raise TimeoutError(f"federation not finished after {timeout:.0f}s (orchestrator state {state})")


@contextmanager
def run_federation(orchestrator: OrchestratorSettings | None,
                   agents: Sequence[AgentSettings]) -> Iterator[Federation]:
    """Start the orchestrator (unless it runs elsewhere: ``None``) and the agents; stop all on exit."""
    fed = Federation(OrchestratorService(orchestrator) if orchestrator else None, {})
    if fed.orchestrator is not None:
        fed._start("orchestrator", fed.orchestrator.run)
    try:
        for settings in agents:
            fed.start_agent(settings)
        yield fed
    finally:
        for name in list(fed.threads):
            fed.stops[name].set()
        for thread in fed.threads.values():
            thread.join(30)


@contextmanager
def round_summaries(broker_url: str, federation: str) -> Iterator[list[RoundSummary]]:
    """Collect the round summaries the orchestrator publishes while the block runs, as an operator would."""
    transport = Transport(CommonSettings(broker_url=broker_url, federation=federation),
                          f"fedmq-{federation}-summary-monitor", persistent_session=False)
    collected: list[RoundSummary] = []
    with transport:
        transport.subscribe(Topics(federation).round_summary)
        yield collected
        deadline = time.monotonic() + 2.0  # the last summary may still be on its way
        while time.monotonic() < deadline:
            msg = transport.get(0.2)
            if msg is None:
                continue
            try:
                parsed = parse_message(msg.payload)
            except ProtocolError:
                continue
            if isinstance(parsed, RoundSummary):
                collected.append(parsed)
