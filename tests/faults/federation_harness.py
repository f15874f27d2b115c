"""A federation of real processes to break: Mosquitto, the orchestrator and agents, each killable.

The fault-injection tests and ``bench/soak.py`` run the daemons exactly as an operator does
(``python -m fedmq orchestrator run`` / ``agent run`` configured by ``FEDMQ_*``), so a SIGKILL
here is a real crash: nothing in memory survives, only the state directories. An operator's
view of the topics (``FederationHarness.watch``) tells the tests *when* to strike — the
orchestrator saying ``aggregating``, a ``ModelPublished``, a site ``training`` or its update
chunks crossing the broker — instead of guessing with sleeps.

``check_outcome`` is the one verdict every case ends with: the registry's lineage is
contiguous, each version's contributors are exactly the updates the journal accepted for the
round that produced it, nothing is counted twice, and the honest sites took part.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedmq.demo import DemoOptions, heart_settings, settings_env
from orchestrator.journal import RoundJournal
from orchestrator.registry import ModelRegistry
from shared.broker import Broker, start_mosquitto
from shared.config import AgentSettings, CommonSettings, OrchestratorSettings
from shared.protocol import Message, OrchestratorStatus, ProtocolError, parse_message
from shared.topics import Topics
from shared.transport import Transport

SITES = ("cleveland", "hungary", "switzerland", "va")
ORCHESTRATOR = "orchestrator"


@dataclass(frozen=True)
class Event:
    """One thing the operator saw: a control message, or a chunk of ``blob`` sent by ``site``."""

    at: float
    topic: str
    message: Message | None = None
    chunk_of: str | None = None

    @property
    def site(self) -> str | None:
        parts = self.topic.split("/")
        return parts[parts.index("site") + 1] if "site" in parts else None


@dataclass
class Watch:
    """Every event on the federation's topics, in order; tests wait on predicates over it."""

    events: list[Event] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def add(self, event: Event) -> None:
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

    def mark(self) -> int:
        """Position after which ``wait_for`` looks; take it before causing what you wait for."""
        with self.cond:
            return len(self.events)

    def wait_for(self, predicate: Callable[[Event], bool], timeout: float, since: int = 0,
                 what: str = "the expected event") -> Event:
        deadline = time.monotonic() + timeout
        seen = since
        with self.cond:
            while True:
                for event in self.events[seen:]:
                    if predicate(event):
                        return event
                seen = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{what} did not happen within {timeout:.0f}s; last events: "
                                         f"{[describe(e) for e in self.events[-8:]]}")
                self.cond.wait(min(left, 0.5))


def describe(event: Event) -> str:
    if event.chunk_of:
        return f"chunk {event.chunk_of[:8]} from {event.site}"
    m = event.message
    state = getattr(m, "state", "")
    return f"{type(m).__name__} {getattr(m, 'sender', '')} {state} {getattr(m, 'detail', '')}".strip()


def orchestrator_state(state: str, round_no: int | None = None) -> Callable[[Event], bool]:
    return lambda e: (isinstance(e.message, OrchestratorStatus) and e.message.state == state
                      and (round_no is None or e.message.round == round_no))


def site_state(site: str, state: str) -> Callable[[Event], bool]:
    return lambda e: e.site == site and e.message is not None and getattr(e.message, "state", None) == state


class FederationHarness:
    """The processes of one federation on a broker of its own; ``close()`` ends all of them."""

    def __init__(self, broker: Broker, root: Path, orchestrator: OrchestratorSettings,
                 agents: list[AgentSettings]) -> None:
        self.broker = broker
        self.root = root
        self.settings: dict[str, CommonSettings] = {ORCHESTRATOR: orchestrator}
        self.settings.update({a.site_id: a for a in agents})
        self.procs: dict[str, subprocess.Popen] = {}
        self.stopped: set[str] = set()
        self.watch = Watch()
        self.topics = Topics(orchestrator.federation)
        self._monitor: Transport | None = None

    # set-up ---------------------------------------------------------------------------------
    @classmethod
    def heart(cls, broker: Broker, root: Path, *, rounds: int = 3, sites: tuple[str, ...] = SITES,
              local_steps: int = 20, round_timeout: float = 60.0, orchestrator: dict | None = None,
              agent: dict | None = None, training: dict | None = None, seed: int = 0) -> "FederationHarness":
        """The demo's Heart Disease federation, small: few rounds, short local training.

        ``orchestrator`` and ``agent`` override settings of every daemon of that kind, ``training``
        fields of the rounds' training settings.
        """
        orch, agents = heart_settings(broker.url, root, DemoOptions(rounds=rounds, local_steps=local_steps,
                                                                    round_timeout=round_timeout, seed=seed),
                                      sites=sites)
        rounds_training = orch.training.model_copy(update=training or {})
        orch = orch.model_copy(update={"federation": "faults", "training": rounds_training, **(orchestrator or {})})
        agents = [a.model_copy(update={"federation": "faults", "heartbeat_seconds": 2.0, "ack_timeout": 5.0,
                                       **(agent or {})}) for a in agents]
        return cls(broker, root, orch, agents)

    @property
    def orchestrator(self) -> OrchestratorSettings:
        return self.settings[ORCHESTRATOR]  # type: ignore[return-value]

    @property
    def sites(self) -> list[str]:
        return [name for name in self.settings if name != ORCHESTRATOR]

    @property
    def state_dir(self) -> Path:
        return Path(self.orchestrator.state_dir)

    def log_path(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def log(self, name: str) -> str:
        path = self.log_path(name)
        return path.read_text(errors="replace") if path.exists() else ""

    def start_watching(self) -> None:
        """Subscribe as an operator; every message from now on (and the retained ones) lands in ``watch``."""
        settings = CommonSettings(broker_url=self.broker.url, federation=self.orchestrator.federation)
        monitor = Transport(settings, f"fault-monitor-{os.getpid()}-{id(self)}", persistent_session=False)
        monitor.start()
        monitor.subscribe(self.topics.everything)
        self._monitor = monitor
        threading.Thread(target=self._pump, args=(monitor,), daemon=True, name="fault-monitor").start()

    def _pump(self, monitor: Transport) -> None:
        while self._monitor is monitor:
            msg = monitor.get(0.2)
            if msg is None:
                continue
            if Topics.is_chunk(msg.topic):
                self.watch.add(Event(time.monotonic(), msg.topic, chunk_of=msg.topic.split("/")[-2]))
                continue
            try:
                self.watch.add(Event(time.monotonic(), msg.topic, parse_message(msg.payload)))
            except ProtocolError:
                continue

    # processes ------------------------------------------------------------------------------
    def start(self, name: str) -> subprocess.Popen:
        """Start (or restart, on the same state directory) one daemon as its own process."""
        assert name not in self.procs or self.procs[name].poll() is not None, f"{name} is already running"
        settings = self.settings[name]
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_")}
        env.update(settings_env(settings))
        env["FEDMQ_BROKER_URL"] = self.broker.url  # the broker may have been restarted elsewhere
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "1"  # 2 cores shared by 5 processes
        args = ["orchestrator", "run"] if name == ORCHESTRATOR else ["agent", "run"]
        with open(self.log_path(name), "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "fedmq", *args], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2])
        self.procs[name] = proc
        return proc

    def start_all(self) -> None:
        if self._monitor is None:
            self.start_watching()
        self.start(ORCHESTRATOR)
        for site in self.sites:
            self.start(site)

    def running(self, name: str) -> bool:
        return name in self.procs and self.procs[name].poll() is None

    def kill(self, name: str) -> None:
        """SIGKILL: the process gets no chance to say goodbye (its last will fires at the broker)."""
        proc = self.procs[name]
        if name in self.stopped:
            self.cont(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def restart(self, name: str) -> subprocess.Popen:
        self.kill(name)
        return self.start(name)

    def stop(self, name: str) -> None:
        """SIGSTOP: frozen, but its connection stays open until the broker's keepalive gives up."""
        self.procs[name].send_signal(signal.SIGSTOP)
        self.stopped.add(name)

    def cont(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGCONT)
        self.stopped.discard(name)

    def restart_broker(self, down_seconds: float = 0.0) -> None:
        """Kill Mosquitto and start a new one on the same port (no persistence: sessions are gone)."""
        port = self.broker.port
        proc = self.broker.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        self.broker.stop()
        time.sleep(down_seconds)
        self.broker = start_mosquitto(port)

    def wait_exit(self, name: str, timeout: float) -> int:
        """The daemon's exit code; raises with its log's tail when it does not exit in time."""
        try:
            return self.procs[name].wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still running after {timeout:.0f}s; its log ends with:\n"
                                 f"{self.log(name)[-3000:]}") from None

    def wait_finished(self, timeout: float) -> None:
        """The orchestrator (``exit_when_done``) ended with the federation finished."""
        code = self.wait_exit(ORCHESTRATOR, timeout)
        assert code == 0, f"orchestrator exited with {code}:\n{self.log(ORCHESTRATOR)[-3000:]}"
        self.watch.wait_for(orchestrator_state("finished"), 10, what="orchestrator status 'finished'")

    def close(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is None:
                if name in self.stopped:
                    proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.stop(graceful=False)

    def __enter__(self) -> "FederationHarness":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Outcome:
    """What the registry and the journal say after a run."""

    versions: int
    accepted: dict[int, set[str]]
    failed_attempts: int
    final_accuracy: float | None


def check_outcome(state_dir: Path, rounds: int, honest: set[str] | None = None,
                  min_contributors: int = 1) -> Outcome:
    """The verdict every fault case ends with (see the module docstring); returns what it read.

    ``honest`` sites must have contributed to the last version (they were up at the end);
    ``min_contributors`` is the fewest updates any version may be built from (the quorum).
    """
    registry = ModelRegistry.open(state_dir)
    journal = RoundJournal(registry.conn)
    versions = registry.list()
    assert [v.version for v in versions] == list(range(rounds + 1)), \
        f"lineage not contiguous: versions {[v.version for v in versions]}, expected 0..{rounds}"
    assert versions[0].round is None and versions[0].parent is None
    done = {r.round: r for r in journal.done("train")}
    assert sorted(done) == list(range(1, rounds + 1)), f"rounds closed: {sorted(done)}"
    rows = registry.conn.execute("SELECT round, COUNT(*) FROM rounds WHERE state='done' AND kind='train' "
                                 "GROUP BY round HAVING COUNT(*) > 1").fetchall()
    assert rows == [], f"a round was closed twice: {rows}"
    accepted: dict[int, set[str]] = {}
    for v in versions[1:]:
        assert v.parent == v.version - 1, f"v{v.version} has parent {v.parent}"
        assert v.round == v.version, f"v{v.version} came from round {v.round}"
        record = done[v.round]
        assert record.result_version == v.version, f"round {v.round} closed as v{record.result_version}"
        assert record.base_version == v.parent, f"round {v.round} trained v{record.base_version}, not v{v.parent}"
        stored = {u.site: u.num_samples for u in journal.updates(record.round_id)}
        assert v.contributors == stored, \
            f"v{v.version} contributors {v.contributors} != updates accepted for {record.round_id}: {stored}"
        assert len(stored) >= min_contributors, f"v{v.version} built from {len(stored)} updates"
        assert hashlib.sha256(registry.model_bytes(v.version)).hexdigest() == v.sha256
        accepted[v.round] = set(stored)
    # Every stored update belongs to exactly one attempt, and only done attempts made versions.
    dupes = registry.conn.execute("SELECT round_id, site, COUNT(*) FROM updates GROUP BY round_id, site "
                                  "HAVING COUNT(*) > 1").fetchall()
    assert dupes == [], f"updates stored twice: {dupes}"
    if honest:
        last = versions[-1]
        assert honest <= set(last.contributors), f"honest sites {sorted(honest - set(last.contributors))} " \
                                                 f"missing from v{last.version}"
    failed = registry.conn.execute("SELECT COUNT(*) FROM rounds WHERE state='failed'").fetchone()[0]
    final = versions[-1].pooled
    registry.conn.close()
    return Outcome(len(versions), accepted, int(failed), final.accuracy if final else None)

