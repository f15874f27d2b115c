"""``fedmq exporter``: the federation's monitoring topics as Prometheus metrics on ``/metrics``.

Why a separate process reading MQTT: Prometheus pulls over HTTP, the federation pushes over
MQTT, and hospitals' IT already runs Prometheus and Grafana. The exporter subscribes as a
read-only monitor (``fedmq pki issue-monitor``) to the retained monitoring topics only (site
statuses, the orchestrator's status, round summaries, the latest model, alerts), keeps the
latest message of each, and renders the metrics from that state on every scrape. Rendering
per scrape (a custom collector rather than gauges set as messages arrive) means a site, an
error code or an alert that is gone leaves no stale series behind.

Naming follows Prometheus' conventions: base units as suffixes (``_bytes``, ``_seconds``,
``_ratio``), ``_total`` only on counters, a state as a 0/1 series per possible value. The
one counter computed here, ``fedmq_round_bytes_total``, sums the round summaries seen since
the exporter started, each round number counted once (a summary re-delivered as retained
after a reconnect is not counted again); it starts from the retained summary, i.e. the last
round, as a counter does after a restart.

Malformed payloads (not JSON, not a message, the wrong message for the topic) are logged
and skipped, and counted in ``fedmq_exporter_rejected_messages_total``; an empty retained
payload clears what the exporter held for that topic.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer
from typing import get_args

from prometheus_client import start_http_server
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.config import CommonSettings
from shared.protocol import (AlertState, EvalMetrics, Message, ModelPublished, OrchestratorStatus, ProtocolError, RoundSummary,
                             SiteState, SiteStatus, parse_message)
from shared.topics import Topics
from shared.transport import Transport

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:9464"  # loopback: metrics name sites and errors; serve wider on purpose only
ORCHESTRATOR_STATES = get_args(OrchestratorStatus.model_fields["state"].annotation)


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9464`` for IPv6) -> (host, port); a clear ValueError otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen {value!r} is not HOST:PORT (e.g. {DEFAULT_LISTEN}, or 0.0.0.0:9464 to serve "
                         "every interface)")
    return host.strip("[]"), int(port)


@dataclass
class FleetState:
    """The latest monitoring message of each topic, as the exporter saw them; thread-safe."""

    topics: Topics
    sites: dict[str, SiteStatus] = field(default_factory=dict)
    heartbeats: dict[str, float] = field(default_factory=dict)  # kept across a last will (its time is unknown)
    orchestrator: OrchestratorStatus | None = None
    round: tuple[int, int | None] | None = None  # (round, attempt) last announced: kept while none is open
    summary: RoundSummary | None = None
    model: ModelPublished | None = None
    alerts: AlertState | None = None
    bytes_by_round: dict[int, tuple[int, int]] = field(default_factory=dict)  # round -> (down, up), first seen
    rejected: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def subscriptions(self) -> list[str]:
        """The topics the exporter reads: the monitor ACL's, minus the round command it does not need."""
        t = self.topics
        return [f"{t.base}/site/+/status", t.orchestrator_status, t.round_summary, t.model, t.alerts]

    def apply(self, topic: str, payload: bytes) -> None:
        """Take one message; anything malformed is logged, counted and skipped."""
        site = self.topics.site_of(topic)
        if site is not None and topic != self.topics.site(site, "status"):
            return self._reject(topic, "not a site status topic")
        if not payload:  # a retained message cleared: forget it
            with self._lock:
                self._clear(topic, site)
            return
        try:
            message = parse_message(payload)
        except ProtocolError as e:
            return self._reject(topic, str(e))
        expected = self._expected_type(topic, site)
        if expected is None or not isinstance(message, expected):
            return self._reject(topic, f"a {type(message).__name__} message, expected "
                                       f"{expected.__name__ if expected else 'nothing'} there")
        with self._lock:
            self._store(topic, site, message)

    def _expected_type(self, topic: str, site: str | None) -> type[Message] | None:
        if site is not None:
            return SiteStatus
        t = self.topics
        return {t.orchestrator_status: OrchestratorStatus, t.round_summary: RoundSummary, t.model: ModelPublished,
                t.alerts: AlertState}.get(topic)

    def _reject(self, topic: str, why: str) -> None:
        with self._lock:
            self.rejected += 1
        log.warning("skipped a message on %s: %s; the sender may run another fedmq release (upgrade the older "
                    "side) or something else publishes there", topic, why)

    def _clear(self, topic: str, site: str | None) -> None:
        t = self.topics
        if site is not None:
            self.sites.pop(site, None)
            self.heartbeats.pop(site, None)
        elif topic == t.orchestrator_status:
            self.orchestrator = None
        elif topic == t.round_summary:
            self.summary = None
        elif topic == t.model:
            self.model = None
        elif topic == t.alerts:
            self.alerts = None

    def _store(self, topic: str, site: str | None, message: Message) -> None:
        if isinstance(message, SiteStatus):
            assert site is not None
            self.sites[site] = message
            beat = message.heartbeat_at
            if beat is None and message.state != "offline":
                beat = message.sent_at  # a live status without one (schema 1) was sent when it was produced
            if beat is not None:
                self.heartbeats[site] = max(beat, self.heartbeats.get(site, beat))
        elif isinstance(message, OrchestratorStatus):
            self.orchestrator = message
            if message.round is not None:
                self.round = (message.round, message.attempt)
        elif isinstance(message, RoundSummary):
            self.summary = message
            self.bytes_by_round.setdefault(message.round, (message.bytes_down, message.bytes_up))
        elif isinstance(message, ModelPublished):
            self.model = message
        elif isinstance(message, AlertState):
            self.alerts = message

    def snapshot(self) -> FleetState:
        """A consistent copy for one scrape (messages are frozen, so the containers are all we copy)."""
        with self._lock:
            return FleetState(self.topics, dict(self.sites), dict(self.heartbeats), self.orchestrator, self.round,
                              self.summary, self.model, self.alerts, dict(self.bytes_by_round), self.rejected)


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels or [])


class FleetCollector(Collector):
    """Renders a ``FleetState`` as metric families at each scrape."""

    def __init__(self, state: FleetState, connected: threading.Event) -> None:
        self.state = state
        self.connected = connected

    def collect(self) -> Iterator[Metric]:
        s = self.state.snapshot()
        now = time.time()
        yield from self._exporter(s)
        yield from self._sites(s, now)
        yield from self._orchestrator(s)
        yield from self._summary(s)
        yield from self._alerts(s)

    def _exporter(self, s: FleetState) -> Iterator[Metric]:
        connected = _gauge("fedmq_exporter_broker_connected", "1 while the exporter is connected to the broker")
        connected.add_metric([], 1.0 if self.connected.is_set() else 0.0)
        rejected = CounterMetricFamily("fedmq_exporter_rejected_messages", "malformed or unexpected messages skipped")
        rejected.add_metric([], s.rejected)
        yield from (connected, rejected)

    def _sites(self, s: FleetState, now: float) -> Iterator[Metric]:
        up = _gauge("fedmq_site_up", "1 when the site is up: not offline, not in error, heartbeat fresh", ["site"])
        state = _gauge("fedmq_site_state", "1 for the state the site reports, 0 for the others", ["site", "state"])
        error = _gauge("fedmq_site_error", "the code of the site's last error: 1 while the site is in state error, "
                       "0 once it recovered", ["site", "code"])
        error_at = _gauge("fedmq_site_last_error_timestamp_seconds", "when the site's last error happened",
                          ["site", "code"])
        version = _gauge("fedmq_site_model_version", "the global model version active at the site", ["site"])
        candidate = _gauge("fedmq_site_candidate_model_version", "a version the site fetches or evaluates, not yet "
                           "active", ["site"])
        progress = _gauge("fedmq_site_progress_ratio", "share of the current phase done (steps, else bytes)",
                          ["site", "phase"])
        rss = _gauge("fedmq_site_rss_bytes", "resident memory of the agent process", ["site"])
        cpu = _gauge("fedmq_site_cpu_ratio", "CPU of the agent process since its last sample (1 = one core busy)",
                     ["site"])
        disk = _gauge("fedmq_site_disk_free_bytes", "free space in the agent's state directory", ["site"])
        epsilon = _gauge("fedmq_site_epsilon", "sample-level DP-SGD epsilon spent at the site", ["site"])
        ceiling = _gauge("fedmq_site_epsilon_max", "the site's sample-level epsilon budget", ["site"])
        beat = _gauge("fedmq_site_last_heartbeat_timestamp_seconds", "the latest heartbeat seen from the site (a last "
                      "will keeps it: the site went offline after it)", ["site"])
        for site, status in sorted(s.sites.items()):
            last_beat = s.heartbeats.get(site)
            up.add_metric([site], 1.0 if status.health(now) == "up" else 0.0)
            for value in get_args(SiteState):
                state.add_metric([site, value], 1.0 if status.state == value else 0.0)
            if status.last_error is not None:
                error.add_metric([site, status.last_error.code], 1.0 if status.state == "error" else 0.0)
                error_at.add_metric([site, status.last_error.code], status.last_error.at)
            active = status.active_model_version if status.active_model_version is not None else status.model_version
            if active is not None:
                version.add_metric([site], active)
            if status.candidate_model_version is not None:
                candidate.add_metric([site], status.candidate_model_version)
            p = status.progress
            if p is not None and status.state != "offline":
                done, total = (p.steps_done, p.steps_total) if p.steps_total else (p.bytes_done, p.bytes_total)
                if total:
                    progress.add_metric([site, p.phase], min(done / total, 1.0))
            if status.resources is not None:
                rss.add_metric([site], status.resources.rss_bytes)
                cpu.add_metric([site], status.resources.cpu_percent / 100.0)
                disk.add_metric([site], status.resources.disk_free_bytes)
            if status.privacy is not None:
                epsilon.add_metric([site], status.privacy.epsilon)
                if status.privacy.max_epsilon is not None:
                    ceiling.add_metric([site], status.privacy.max_epsilon)
            if last_beat is not None:
                beat.add_metric([site], last_beat)
        yield from (up, state, error, error_at, version, candidate, progress, rss, cpu, disk, epsilon, ceiling, beat)

    def _orchestrator(self, s: FleetState) -> Iterator[Metric]:
        o = s.orchestrator
        state = _gauge("fedmq_orchestrator_state", "1 for the orchestrator's state, 0 for the others", ["state"])
        rnd = _gauge("fedmq_round", "the round the orchestrator announced last (open, or the last one run)",
                     ["federation"])
        planned = _gauge("fedmq_rounds_planned", "rounds the federation plans to run")
        attempt = _gauge("fedmq_round_attempt", "attempt of that round (above 1: it was retried)")
        selected = _gauge("fedmq_round_sites", "sites of the current round: selected, and reported so far", ["kind"])
        model = _gauge("fedmq_model_version", "the latest global model version published")
        refusals = CounterMetricFamily("fedmq_refusals", "messages the orchestrator refused since it started",
                                       labels=["site", "reason"])
        if o is not None:
            for value in ORCHESTRATOR_STATES:
                state.add_metric([value], 1.0 if o.state == value else 0.0)
            if o.rounds_total is not None:
                planned.add_metric([], o.rounds_total)
            selected.add_metric(["selected"], len(o.selected))
            selected.add_metric(["reported"], len(o.reported))
            for site, reasons in sorted(o.refusals.items()):
                for reason, count in sorted(reasons.items()):
                    refusals.add_metric([site, reason], count)
        if s.round is not None:
            rnd.add_metric([s.topics.federation], s.round[0])
            if s.round[1] is not None:
                attempt.add_metric([], s.round[1])
        if s.model is not None:
            model.add_metric([], s.model.version)
        yield from (state, rnd, planned, attempt, selected, model, refusals)

    def _summary(self, s: FleetState) -> Iterator[Metric]:
        summary = s.summary
        summary_round = _gauge("fedmq_summary_round", "the round of the latest round summary")
        evaluated = _gauge("fedmq_summary_evaluated_model_version", "the version the latest summary evaluated")
        duration = _gauge("fedmq_round_duration_seconds", "time spent by the last summarized round",
                          ["part"])
        pooled = _gauge("fedmq_pooled_metric", "the evaluated version's metric pooled over every site's test set",
                        ["metric"])
        per_site = _gauge("fedmq_site_metric", "the evaluated version's metric on each site's test set",
                          ["site", "metric"])
        epsilon = _gauge("fedmq_epsilon", "client-level epsilon the federation spent up to the new version")
        ceiling = _gauge("fedmq_epsilon_max", "the federation's client-level epsilon budget")
        transferred = CounterMetricFamily("fedmq_round_bytes", "model bytes sent to sites (down) and received from "
                                          "them (up), summed over the rounds summarized since the exporter started",
                                          labels=["direction"])
        transferred.add_metric(["down"], sum(down for down, _ in s.bytes_by_round.values()))
        transferred.add_metric(["up"], sum(up for _, up in s.bytes_by_round.values()))
        if summary is not None:
            summary_round.add_metric([], summary.round)
            evaluated.add_metric([], summary.evaluated_version)
            for part, seconds in sorted(summary.seconds.items()):
                duration.add_metric([part], seconds)
            if summary.pooled is not None:
                for name, value in _metric_values(summary.pooled):
                    pooled.add_metric([name], value)
            for site, metrics in sorted(summary.site_metrics.items()):
                for name, value in _metric_values(metrics):
                    per_site.add_metric([site, name], value)
            if summary.privacy is not None:
                epsilon.add_metric([], summary.privacy.epsilon)
                if summary.privacy.max_epsilon is not None:
                    ceiling.add_metric([], summary.privacy.max_epsilon)
        yield from (summary_round, evaluated, duration, pooled, per_site, epsilon, ceiling, transferred)

    def _alerts(self, s: FleetState) -> Iterator[Metric]:
        active = _gauge("fedmq_alert_active", "active alerts of each kind, severity and site (absent once cleared)",
                        ["kind", "severity", "site"])
        counts: dict[tuple[str, str, str], int] = {}
        for alert in s.alerts.alerts if s.alerts is not None else []:
            key = (alert.kind, alert.severity, alert.site or "")
            counts[key] = counts.get(key, 0) + 1
        for key, count in sorted(counts.items()):
            active.add_metric(list(key), count)
        yield active


def _metric_values(metrics: EvalMetrics) -> Iterator[tuple[str, float]]:
    """(name, value) of the accuracy (classification only) and the loss."""
    if metrics.accuracy is not None:
        yield "accuracy", metrics.accuracy
    yield "loss", metrics.loss


class Exporter:
    """Subscribes as a monitor, serves ``/metrics``; ``run`` until a stop event, like the other daemons."""

    def __init__(self, settings: CommonSettings, listen: str = DEFAULT_LISTEN) -> None:
        self.settings = settings
        self.host, self.port = parse_listen(listen)
        self.state = FleetState(Topics(settings.federation))
        # A random client id: several exporters (or a restarted one) must not take over each other's session.
        self.transport = Transport(settings, f"fedmq-exporter-{uuid.uuid4().hex[:8]}", persistent_session=False)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FleetCollector(self.state, self.transport.connected))
        # Bound here, so a port in use fails at start with a clear message; port 0 picks a free one.
        try:
            self._server: WSGIServer | None = start_http_server(self.port, addr=self.host, registry=self.registry)[0]
        except OSError as e:
            raise ValueError(f"cannot serve metrics on {listen}: {e}; choose another --listen address or stop "
                             "what uses it") from None
        self.port = self._server.server_port
        log.info("serving Prometheus metrics on http://%s:%d/metrics for federation %s", self.host, self.port,
                 settings.federation)

    def run(self, stop: threading.Event) -> None:
        """Follow the topics until ``stop`` (an unreachable broker is retried meanwhile), then shut down."""
        for topic in self.state.subscriptions():
            self.transport.subscribe(topic)
        self.transport.start_retrying()
        try:
            while not stop.is_set():
                self.transport.raise_if_refused()
                msg = self.transport.get(0.2)
                if msg is not None:
                    self.state.apply(msg.topic, msg.payload)
        finally:
            self.transport.stop()
            self.shutdown()

    def shutdown(self) -> None:
        """Stop serving /metrics (``run`` does it on its way out)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
