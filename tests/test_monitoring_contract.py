"""The monitoring contract (docs/monitoring.md) read as an operator reads it: retained topics on a real Mosquitto.

One small heart-disease federation (three hospitals, logistic regression, three rounds) in
which one hospital exported a bad CSV and another hits a bug in its first training. A
subscriber on the status and alert topics sees: progress that moves during training, the
data summary, resources and heartbeat of every site, the bad site's error with its stable
code and a ``site_error`` alert, the bug as ``agent.internal`` (the agent lives on), the
failed and retried round as alerts that clear when it completes, the orchestrator's "round r
of N", and, once the bad site's agent is killed, its last will (offline, no heartbeat) and
its alert cleared.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from pathlib import Path

import edge_agent.agent as agent_module
from fedmq.demo import DATA_DIR, DemoOptions, heart_settings
from fedmq.inprocess import run_federation
from shared.config import CommonSettings
from shared.protocol import ERROR_CODES, AlertState, Message, OrchestratorStatus, ProtocolError, SiteStatus, \
    parse_message
from shared.topics import Topics
from shared.transport import Transport
from tests.mqtt_helpers import retained

FED = "monitoring"
ROUNDS = 3
LOCAL_STEPS = 1500
HEARTBEAT = 1.0


class _Operator:
    """Everything published on the monitoring topics, in arrival order."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.seen: list[Message] = []

    def drain(self, seconds: float = 0.0) -> None:
        deadline = time.monotonic() + seconds
        while True:
            msg = self.transport.get(0.05)
            if msg is not None:
                try:
                    self.seen.append(parse_message(msg.payload))
                except ProtocolError as e:
                    raise AssertionError(f"unparsable monitoring message on {msg.topic}: {e}") from None
            elif time.monotonic() >= deadline:
                return

    def sites(self, site: str) -> list[SiteStatus]:
        return [m for m in self.seen if isinstance(m, SiteStatus) and m.sender == site]

    def alerts(self) -> list[AlertState]:
        return [m for m in self.seen if isinstance(m, AlertState)]


def _bad_csv(path: Path) -> Path:
    """va's training data with one cell that is not a number (an export gone wrong)."""
    lines = (DATA_DIR / "va_train.csv").read_text().splitlines()
    cells = lines[5].split(",")
    cells[2] = "n/a"
    lines[5] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_an_operator_reads_progress_errors_alerts_and_presence_from_the_retained_topics(mosquitto, tmp_path,
                                                                                         caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    real_train, hungary_trainings = agent_module.train, []

    def buggy_once_at_hungary(*args, **kwargs):
        if threading.current_thread().name == "hungary":
            hungary_trainings.append(1)
            if len(hungary_trainings) == 1:
                raise KeyError("a bug")  # nothing the agent expects: it must not end the agent
        return real_train(*args, **kwargs)

    monkeypatch.setattr(agent_module, "train", buggy_once_at_hungary)
    orch, agents = heart_settings(mosquitto.url, tmp_path, DemoOptions(rounds=ROUNDS, local_steps=LOCAL_STEPS,
                                                                        round_timeout=60.0),
                                  sites=("cleveland", "hungary", "va"))
    orch = orch.model_copy(update={"federation": FED, "quorum": 2, "final_evaluation": False,
                                   "exit_when_done": False})
    bad = _bad_csv(tmp_path / "va_export.csv")
    agents = [a.model_copy(update={"federation": FED, "progress_interval": 0.05, "heartbeat_seconds": HEARTBEAT,
                                   **({"data_train": bad} if a.site_id == "va" else {})}) for a in agents]
    topics = Topics(FED)
    watch = Transport(CommonSettings(broker_url=mosquitto.url, federation=FED), "test-monitoring-operator",
                      persistent_session=False)
    with watch, run_federation(orch, agents) as fed:
        operator = _Operator(watch)
        for topic in (f"{topics.base}/site/+/status", topics.orchestrator_status, topics.alerts):
            watch.subscribe(topic)
        deadline = time.monotonic() + 180
        while fed.orchestrator.engine.state != "finished":
            assert time.monotonic() < deadline, "the federation did not finish"
            assert not fed.errors, fed.errors
            operator.drain(0.2)
        operator.drain(3 * HEARTBEAT)  # idle sites keep publishing their heartbeat

        # Progress moves during training: several step counts for one round, of the planned steps.
        cleveland = operator.sites("cleveland")
        training = defaultdict(set)
        for status in cleveland:
            if status.progress is not None and status.progress.phase == "training":
                assert status.state == "training" and status.progress.steps_total == LOCAL_STEPS
                training[status.progress.round_id].add(status.progress.steps_done)
        assert training and all(len(steps) >= 3 for steps in training.values()), training
        assert all(max(steps) <= LOCAL_STEPS for steps in training.values())
        uploads = [s.progress for s in cleveland if s.progress is not None and s.progress.phase == "uploading"]
        assert uploads and all(0 <= p.bytes_done <= p.bytes_total and p.bytes_total > 0 for p in uploads)
        assert {s.progress.rounds_total for s in cleveland if s.progress is not None} == {ROUNDS}

        # Data summary (counts only), resources and heartbeat on every live status.
        rows = len((DATA_DIR / "cleveland_train.csv").read_text().splitlines()) - 1
        last = cleveland[-1]
        assert last.state == "idle" and last.schema_version == 2
        assert last.data is not None and last.data.rows_train == rows
        assert sum(last.data.label_counts.values()) == rows and set(last.data.label_counts) == {"0", "1"}
        assert len(last.data.schema_hash) == 16
        assert last.resources is not None and last.resources.rss_bytes > 10_000_000
        assert last.resources.disk_free_bytes > 0
        assert last.heartbeat_seconds == HEARTBEAT and last.connected_at <= last.heartbeat_at
        assert last.active_model_version == last.model_version == ROUNDS - 1  # it trained on v2 last
        idle_beats = [s.heartbeat_at for s in cleveland if s.state == "idle" and s.heartbeat_at >= last.heartbeat_at
                      - 2.5 * HEARTBEAT]
        assert len(idle_beats) >= 2, "an idle agent re-publishes its status every heartbeat"

        # The bad export: error state, stable code, what to do; no local path in what is published.
        va_errors = [s for s in operator.sites("va") if s.state == "error"]
        assert va_errors, [s.state for s in operator.sites("va")]
        error = va_errors[-1].last_error
        assert error is not None and error.code == "data.invalid" and error.action == ERROR_CODES["data.invalid"]
        assert "not a number" in error.message and error.round_id is not None
        assert str(tmp_path) not in va_errors[-1].to_bytes().decode(), "a local path was published"
        assert va_errors[-1].data is not None and va_errors[-1].data.rows_train == rows_of(bad)
        site_errors = [a for state in operator.alerts() for a in state.alerts if a.id == "site_error:va"]
        assert site_errors and "data.invalid" in site_errors[0].message and site_errors[0].severity == "critical"

        # The bug at hungary: its round 1 status says agent.internal; it trained the later rounds.
        internal = [s.last_error for s in operator.sites("hungary") if s.state == "error"]
        assert internal and internal[0].code == "agent.internal" and "KeyError" in internal[0].message
        assert len(hungary_trainings) == ROUNDS + 1
        # Round 1 attempt 1 lost two sites of three (quorum 2): failed, retried, then completed.
        alert_ids = [{a.id for a in state.alerts} for state in operator.alerts()]
        assert any({"round_failed:1", "round_retried:1"} <= ids for ids in alert_ids), alert_ids
        assert not any(i.startswith("round_") for i in alert_ids[-1]), "cleared when round 1 completed"

        # The orchestrator says "round r of N", of which kind, since when.
        orch_statuses = [m for m in operator.seen if isinstance(m, OrchestratorStatus)]
        collecting = [m for m in orch_statuses if m.state == "collecting"]
        assert collecting and all(m.rounds_total == ROUNDS and m.kind == "train" and m.started_at for m in collecting)
        assert orch_statuses[-1].state == "finished" and orch_statuses[-1].rounds_total == ROUNDS

        # A killed agent: its will says offline, with no heartbeat (its time of death is unknown); it is
        # no longer in error, so its alert clears.
        va = fed.agents["va"]
        va.transport.stop(graceful=False)
        fed.stop("va")
        will = retained(mosquitto.url, FED, topics.site("va", "status"), SiteStatus)
        assert will.state == "offline" and will.heartbeat_at is None and will.resources is None
        # Built when it connected: it knows what the agent knew then (its data), not what came later.
        assert will.connected_at == va.connected_at and will.data is not None and will.last_error is None
        deadline = time.monotonic() + 10
        while True:
            alerts = retained(mosquitto.url, FED, topics.alerts, AlertState)
            if "site_error:va" not in {a.id for a in alerts.alerts}:
                break
            assert time.monotonic() < deadline, alerts
            time.sleep(0.2)

    # The agent's own log says what it did each round, in one line, and how the round ended.
    logged = [r.getMessage() for r in caplog.records if r.name == "edge_agent.agent"]
    rounds = [m for m in logged if m.startswith(f"round 1/{ROUNDS}: model v0") and "update" in m]
    assert rounds and "test accuracy" in rounds[0] and f"trained {LOCAL_STEPS} steps" in rounds[0], logged
    assert "kB sent" in rounds[0]
    assert any(m == "round 1: update accepted" for m in logged), logged
    bug = [r for r in caplog.records if r.name == "edge_agent.agent" and "reported as agent.internal" in r.getMessage()]
    assert bug and bug[0].exc_info is not None, "the traceback is in the agent's log"


def rows_of(path: Path) -> int:
    return len(path.read_text().splitlines()) - 1
