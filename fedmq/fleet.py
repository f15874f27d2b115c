"""The fleet as a monitor sees it: read from the broker's retained monitoring topics alone.

Why from the broker alone: hospital IT and the federation's operators have no access to each
other's state directories or hosts, but both may hold a read-only monitor identity. Everything
here comes from the retained messages of the monitoring contract (docs/monitoring.md):
``site/+/status``, ``orch/all/status``, ``orch/all/summary``, ``orch/all/model`` and
``orch/all/alerts``. A reader subscribes to exactly these (what the monitor ACL allows), folds
what arrives into a ``FleetView``, and classifies each site as up, error or offline.

Every field added in schema 2 may be absent (an agent of an earlier release): the view then
shows less, never fails. ``fedmq status`` takes one snapshot (``read_snapshot``); ``fedmq
watch`` and the demo keep applying messages to the same view as they arrive.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from shared.config import CommonSettings
from shared.protocol import (Alert, AlertState, Message, ModelPublished, OrchestratorStatus, ProtocolError,
                             RoundSummary, SiteHealth, SiteStatus, parse_message)
from shared.topics import Topics
from shared.transport import Transport

ROUND_PHASES = ("downloading", "evaluating", "training", "uploading")
SITE_ALERTS = ("site_offline", "site_error")  # alerts that repeat what a site's own status says


def monitor_topics(topics: Topics) -> list[str]:
    """The topics a monitor subscribes to; the monitor identity's ACL allows these and nothing more."""
    return [f"{topics.base}/site/+/status", topics.orchestrator_status, topics.round_summary, topics.model,
            topics.alerts]


@dataclass(frozen=True)
class SiteRow:
    """One site as a monitor classifies it at a given time."""

    site: str
    health: SiteHealth
    status: SiteStatus
    last_seen: float | None
    last_seen_exact: bool  # False: the agent was alive at ``last_seen`` or later (a last will's time is unknown)
    stale: bool  # offline because its heartbeat is older than STALE_HEARTBEATS periods (shared/protocol.py), not because it said so
    model_version: int | None  # the version it runs, or (a last will says none) the last one it was seen running


@dataclass
class FleetView:
    """Everything read so far from one federation's monitoring topics."""

    federation: str
    orchestrator: OrchestratorStatus | None = None
    sites: dict[str, SiteStatus] = field(default_factory=dict)
    summaries: dict[int, RoundSummary] = field(default_factory=dict)  # by the version they evaluated
    model: ModelPublished | None = None
    alerts: AlertState | None = None
    _heartbeats: dict[str, float] = field(default_factory=dict)  # the latest live time seen per site
    _versions: dict[str, int] = field(default_factory=dict)  # the latest model version a live site said it runs

    def apply(self, message: Message) -> bool:
        """Fold one message in; False when it is not a monitoring message (ignored)."""
        if isinstance(message, SiteStatus):
            self.sites[message.sender] = message
            live = _live_time(message)
            if live is not None:  # a last will's fields are those of its connection, not of its end
                self._heartbeats[message.sender] = max(live, self._heartbeats.get(message.sender, live))
                if (version := active_model_version(message)) is not None:
                    self._versions[message.sender] = version
        elif isinstance(message, OrchestratorStatus):
            self.orchestrator = message
        elif isinstance(message, RoundSummary):
            self.summaries[message.evaluated_version] = message
        elif isinstance(message, ModelPublished):
            self.model = message
        elif isinstance(message, AlertState):
            self.alerts = message
        else:
            return False
        return True

    # classification ---------------------------------------------------------------------------
    def site_row(self, site: str, now: float) -> SiteRow:
        status = self.sites[site]
        live = _live_time(status)
        if live is not None:
            last_seen, exact = live, True
        else:  # offline without a heartbeat time (a last will): only a lower bound of when it was last alive
            last_seen = max(t for t in (self._heartbeats.get(site), status.connected_at, status.sent_at)
                            if t is not None)
            exact = False
        return SiteRow(site, status.health(now), status, last_seen, exact, status.stale(now),
                       self._versions.get(site, active_model_version(status)))

    def site_rows(self, now: float) -> list[SiteRow]:
        return [self.site_row(site, now) for site in sorted(self.sites)]

    def expected_sites(self) -> set[str]:
        """The sites the orchestrator named in its status (selected for or reported in the open round)."""
        o = self.orchestrator
        return set(o.selected) | set(o.reported) if o is not None else set()

    def complete(self) -> bool:
        """Whether the orchestrator's status and the status of every site it names have arrived."""
        return self.orchestrator is not None and self.expected_sites() <= set(self.sites)

    def finished(self) -> bool:
        return self.orchestrator is not None and self.orchestrator.state == "finished"

    def rounds(self) -> list[RoundSummary]:
        """Round summaries in the order of the versions they evaluated (a version is evaluated once)."""
        return [self.summaries[v] for v in sorted(self.summaries)]

    def final_summary(self) -> RoundSummary | None:
        """The evaluation of the last version after the last round (it creates no new version)."""
        finals = [s for s in self.summaries.values() if s.new_version is None]
        return max(finals, key=lambda s: s.evaluated_version) if finals else None

    def problems(self, now: float) -> list[str]:
        """What is wrong, one sentence each with what to check; empty when all is well (exit code 0)."""
        found: list[str] = []
        o = self.orchestrator
        if o is None:
            found.append(f"no orchestrator status on the broker for federation {self.federation!r}: check "
                         "--federation (FEDMQ_FEDERATION) and that the orchestrator has run")
        elif o.state == "offline":
            found.append("the orchestrator is offline: check its process or container and its log")
        if not self.sites:
            found.append(f"no site has published a status in federation {self.federation!r}: check the agents' "
                         "FEDMQ_FEDERATION and broker settings")
        flagged: set[str] = set()
        for row in self.site_rows(now):
            if row.health != "up":
                flagged.add(row.site)
            if row.health == "offline":
                why = "its heartbeat stopped" if row.stale else "it is offline"
                found.append(f"site {row.site}: {why}; check the agent's host or container (fedmq agent status) "
                             "and its network to the broker")
            elif row.health == "error":
                err = row.status.last_error
                found.append(f"site {row.site} is in error [{err.code}]: {err.message}; {err.action}" if err
                             else f"site {row.site} is in error: {row.status.detail}; see the agent's log")
        for alert in self.active_alerts():
            if alert.kind in SITE_ALERTS and alert.site in flagged:
                continue  # the site's own line above says it, with the same code and action
            if alert.severity == "critical" or alert.kind == "round_failed":
                found.append(f"alert {alert.id}: {alert.message}; {alert.action}")
        return found

    def active_alerts(self) -> list[Alert]:
        return list(self.alerts.alerts) if self.alerts is not None else []

    # machine-readable ---------------------------------------------------------------------------
    def to_dict(self, now: float) -> dict[str, Any]:
        """The document ``fedmq status --json`` prints; absent information is null, never a missing key.

        Keys: ``federation``; ``read_at`` (epoch s); ``ok`` (false exactly when the exit code is 1)
        and ``problems`` (one sentence each, with what to check); ``orchestrator`` (null when it
        never published: state, round, rounds_total, attempt, kind, round_id, model_version,
        deadline, started_at, selected, reported, detail, refusals {site: {reason: count}},
        schema_version); ``sites``, one object per site sorted by id: site, health (up | error |
        offline), stale (offline because its heartbeat is older than 3 periods), state, detail,
        agent_version, schema_version, active_model_version, candidate_model_version, round_id,
        progress {round_id, round, rounds_total, phase, steps_done, steps_total, bytes_done,
        bytes_total}, last_seen (epoch s), last_seen_exact (false: the agent was alive then or
        later; a last will's time is unknown), connected_at, heartbeat_seconds, last_error {code,
        message, action, round_id, at}, data {rows_train, rows_test, schema_hash, label_counts},
        rows_train, epsilon (sample-level DP-SGD spent), resources {cpu_percent, rss_bytes,
        disk_free_bytes}; ``model`` (the latest ModelPublished: version, sha256, parent, round,
        contributors, sent_at); ``rounds``, the round summaries seen, by evaluated version: round,
        evaluated_version, new_version (null: the final evaluation), pooled and sites {site:
        {num_examples, loss, accuracy, correct}}, bytes_down, bytes_up, seconds, epsilon
        (client-level); ``alerts``, the active alerts: id, kind, severity, site, message, action,
        since.
        """
        problems = self.problems(now)
        o = self.orchestrator
        return {
            "federation": self.federation,
            "read_at": now,
            "ok": not problems,
            "problems": problems,
            "orchestrator": None if o is None else {
                "state": o.state, "round": o.round, "rounds_total": o.rounds_total, "attempt": o.attempt,
                "kind": o.kind, "round_id": o.round_id, "model_version": o.model_version, "deadline": o.deadline,
                "started_at": o.started_at, "selected": o.selected, "reported": o.reported, "detail": o.detail,
                "refusals": o.refusals, "schema_version": o.schema_version},
            "sites": [_site_dict(row) for row in self.site_rows(now)],
            "model": None if self.model is None else self.model.model_dump(
                include={"version", "sha256", "parent", "round", "contributors", "sent_at"}),
            "rounds": [_round_dict(s) for s in self.rounds()],
            "alerts": [a.model_dump() for a in self.active_alerts()],
        }


def _live_time(status: SiteStatus) -> float | None:
    """When a live agent produced this status; None for an offline one, whose time may be its connection's.

    A last will is built when the agent connects, so its ``sent_at`` says nothing of when the
    agent died. A status without ``heartbeat_at`` (schema 1) that is not offline was sent live.
    """
    if status.heartbeat_at is not None:
        return status.heartbeat_at
    return status.sent_at if status.state != "offline" else None


def active_model_version(status: SiteStatus) -> int | None:
    """The version the site runs; a schema-1 agent says it only as ``model_version``."""
    return status.active_model_version if status.active_model_version is not None else status.model_version


def _site_dict(row: SiteRow) -> dict[str, Any]:
    s = row.status
    return {
        "site": row.site, "health": row.health, "stale": row.stale, "state": s.state, "detail": s.detail,
        "agent_version": s.agent_version, "schema_version": s.schema_version,
        "active_model_version": row.model_version,
        "candidate_model_version": s.candidate_model_version, "round_id": s.round_id,
        "progress": s.progress.model_dump() if s.progress else None,
        "last_seen": row.last_seen, "last_seen_exact": row.last_seen_exact,
        "connected_at": s.connected_at, "heartbeat_seconds": s.heartbeat_seconds,
        "last_error": s.last_error.model_dump() if s.last_error else None,
        "data": s.data.model_dump() if s.data else None,
        "rows_train": s.data.rows_train if s.data else s.num_samples,
        "epsilon": s.privacy.epsilon if s.privacy else None,
        "resources": s.resources.model_dump() if s.resources else None,
    }


def _round_dict(s: RoundSummary) -> dict[str, Any]:
    return {
        "round": s.round, "evaluated_version": s.evaluated_version, "new_version": s.new_version,
        "pooled": s.pooled.model_dump() if s.pooled else None,
        "sites": {site: m.model_dump() for site, m in s.site_metrics.items()},
        "bytes_down": s.bytes_down, "bytes_up": s.bytes_up, "seconds": s.seconds,
        "epsilon": s.privacy.epsilon if s.privacy else None,
    }


class FleetReader:
    """A monitor's connection: subscribes to the monitoring topics and applies what arrives to ``view``.

    A clean session (nothing queued for a monitor while it is away: the retained messages tell
    it the current state as soon as it subscribes). Use as a context manager.
    """

    def __init__(self, settings: CommonSettings) -> None:
        self.view = FleetView(settings.federation)
        self.transport = Transport(settings, f"fedmq-{settings.federation}-monitor-{uuid.uuid4().hex[:8]}",
                                   persistent_session=False)
        self.rejected = 0  # payloads on our topics that are not valid messages (a newer or broken sender)
        for topic in monitor_topics(Topics(settings.federation)):
            self.transport.subscribe(topic)

    def __enter__(self) -> "FleetReader":
        self.transport.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.transport.stop()

    def poll(self, timeout: float) -> bool:
        """Apply the next message, waiting up to ``timeout`` s; False when none arrived."""
        incoming = self.transport.get(timeout)
        if incoming is None:
            return False
        try:
            self.view.apply(parse_message(incoming.payload))
        except ProtocolError:
            self.rejected += 1
        return True


def read_snapshot(settings: CommonSettings, wait: float = 3.0, grace: float = 0.2) -> FleetView:
    """The fleet as the retained messages tell it right after subscribing (``fedmq status``).

    Retained messages arrive at once: stop ``grace`` seconds (for the rest of that burst, such
    as sites the orchestrator does not name) after the orchestrator's status and those of all
    the sites it names are in, or after ``wait`` seconds. Raises ``TransportError`` when the
    broker cannot be reached.
    """
    with FleetReader(settings) as reader:
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            reader.poll(min(0.05, left))
            if reader.view.complete():
                deadline = min(deadline, time.monotonic() + grace)
        return reader.view
