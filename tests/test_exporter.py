"""``fedmq exporter`` over a real Mosquitto, scraped over HTTP and parsed with prometheus-client's parser.

The figures must equal what the orchestrator published on the broker (round summaries read
by a separate subscriber), a killed agent must turn ``fedmq_site_up`` to 0 through its last
will, and the exporter must work with a monitor certificate behind the production ACL.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fedmq.demo import DemoOptions, heart_settings, settings_env
from fedmq.exporter import Exporter, FleetCollector, FleetState
from fedmq.inprocess import round_summaries, run_federation
from shared.broker import Broker, start_mosquitto
from shared.broker_acl import start_tls_mosquitto
from shared.config import CommonSettings
from shared.pki import FederationPki
from shared.protocol import (Alert, AlertState, ErrorInfo, EvalMetrics, OrchestratorStatus, RoundProgress,
                             RoundSummary, SiteStatus)
from shared.topics import Topics
from shared.transport import Transport

WAIT = 30.0
DASHBOARD = Path(__file__).resolve().parents[1] / "containers" / "grafana" / "fedmq-dashboard.json"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def names(samples: Samples, name: str) -> list[dict[str, str]]:
    """The label sets of every sample of ``name``."""
    return [dict(labels) for sample, labels in samples if sample == name]


def wait_scrape(port: int, ready: Callable[[Samples], bool], what: str) -> Samples:
    """Scrape until ``ready`` holds (the exporter follows the broker asynchronously)."""
    deadline = time.monotonic() + WAIT
    while True:
        samples = scrape(port)
        if ready(samples):
            return samples
        assert time.monotonic() < deadline, f"never saw {what}; last scrape: {sorted(samples.items())}"
        time.sleep(0.1)


@contextmanager
def running_exporter(settings: CommonSettings) -> Iterator[Exporter]:
    exporter = Exporter(settings, listen="127.0.0.1:0")
    stop = threading.Event()
    thread = threading.Thread(target=exporter.run, args=(stop,), name="exporter", daemon=True)
    thread.start()
    try:
        yield exporter
    finally:
        stop.set()
        thread.join(10)


def test_exporter_figures_equal_the_round_summaries_and_a_killed_agent_goes_down(mosquitto: Broker,
                                                                                tmp_path: Path) -> None:
    federation = f"exporter-{uuid.uuid4().hex[:6]}"
    orch, agents = heart_settings(mosquitto.url, tmp_path, DemoOptions(rounds=2, local_steps=20))
    orch = orch.model_copy(update={"federation": federation, "round_timeout": 60.0})
    agents = [a.model_copy(update={"federation": federation}) for a in agents]
    in_process, killed = agents[:-1], agents[-1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_")} | settings_env(killed)
    log_path = tmp_path / "killed-agent.log"
    with running_exporter(CommonSettings(broker_url=mosquitto.url, federation=federation)) as exporter:
        proc = subprocess.Popen([sys.executable, "-m", "fedmq", "agent", "run"], env=env,
                                stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
        try:
            with round_summaries(mosquitto.url, federation) as summaries:
                with run_federation(orch, in_process) as fed:
                    fed.wait_finished(timeout=240)
                    samples = wait_scrape(exporter.port, lambda s: value(s, "fedmq_summary_round") == 3
                                          and value(s, "fedmq_orchestrator_state", state="finished") == 1,
                                          "the final evaluation's summary and the finished orchestrator")
                    # Every site is up while the federation idles.
                    assert {labels["site"]: value(samples, "fedmq_site_up", **labels)
                            for labels in names(samples, "fedmq_site_up")} == {a.site_id: 1.0 for a in agents}
                    proc.kill()  # no DISCONNECT: the broker publishes the agent's last will
                    proc.wait(10)
                    down = wait_scrape(exporter.port, lambda s: value(s, "fedmq_site_up", site=killed.site_id) == 0,
                                       f"{killed.site_id} going down after it was killed")
        finally:
            if proc.poll() is None:
                proc.kill()
    assert value(down, "fedmq_site_state", site=killed.site_id, state="offline") == 1
    assert all(value(down, "fedmq_site_up", site=a.site_id) == 1 for a in in_process)
    # The killed agent's last heartbeat stays: it went offline after it.
    assert value(down, "fedmq_site_last_heartbeat_timestamp_seconds", site=killed.site_id) is not None

    by_round = {s.round: s for s in summaries}
    assert sorted(by_round) == [1, 2, 3], f"summaries seen on the broker: {sorted(by_round)}"
    final = by_round[3]
    assert value(samples, "fedmq_round_bytes_total", direction="up") == sum(s.bytes_up for s in by_round.values())
    assert value(samples, "fedmq_round_bytes_total", direction="down") == \
        sum(s.bytes_down for s in by_round.values())
    assert sum(s.bytes_up for s in by_round.values()) > 0
    assert final.pooled is not None and final.pooled.accuracy is not None
    assert value(samples, "fedmq_pooled_metric", metric="accuracy") == pytest.approx(final.pooled.accuracy)
    assert value(samples, "fedmq_pooled_metric", metric="loss") == pytest.approx(final.pooled.loss)
    for site, metrics in final.site_metrics.items():
        assert value(samples, "fedmq_site_metric", site=site, metric="accuracy") == pytest.approx(metrics.accuracy)
    assert {labels["part"]: value(samples, "fedmq_round_duration_seconds", **labels)
            for labels in names(samples, "fedmq_round_duration_seconds")} == pytest.approx(final.seconds)
    assert value(samples, "fedmq_summary_evaluated_model_version") == final.evaluated_version == 2
    assert value(samples, "fedmq_round", federation=federation) == 3
    assert value(samples, "fedmq_model_version") == 2
    assert value(samples, "fedmq_exporter_broker_connected") == 1
    assert value(samples, "fedmq_exporter_rejected_messages_total") == 0
    # What the agents say about themselves (schema 2) reaches the metrics too.
    assert value(samples, "fedmq_rounds_planned") == 2
    for agent in agents:
        assert value(samples, "fedmq_site_model_version", site=agent.site_id) == 2
        assert (value(samples, "fedmq_site_rss_bytes", site=agent.site_id) or 0) > 0
        assert (value(samples, "fedmq_site_disk_free_bytes", site=agent.site_id) or 0) > 0


def _publish(transport: Transport, topic: str, payload: bytes) -> None:
    transport.publish(topic, payload, retain=True).wait_for_publish(10)


def test_exporter_skips_malformed_messages_and_drops_series_that_are_gone(mosquitto: Broker) -> None:
    federation = f"exporter-{uuid.uuid4().hex[:6]}"
    topics = Topics(federation)
    settings = CommonSettings(broker_url=mosquitto.url, federation=federation)
    now = time.time()
    with Transport(settings, f"publisher-{federation}", persistent_session=False) as publisher, \
            running_exporter(settings) as exporter:
        _publish(publisher, topics.site("va", "status"), b"{not json")
        _publish(publisher, topics.site("hungary", "status"),  # the wrong message for the topic
                 OrchestratorStatus(federation=federation, sender="orchestrator", state="waiting").to_bytes())
        error = ErrorInfo.of("data.invalid", "column 'age' is missing", round_id="r1")
        _publish(publisher, topics.site("cleveland", "status"), SiteStatus(
            federation=federation, sender="cleveland", state="error", agent_version="1", last_error=error,
            heartbeat_at=now, heartbeat_seconds=10).to_bytes())
        _publish(publisher, topics.site("switzerland", "status"), SiteStatus(  # silent for 10 heartbeats: stale
            federation=federation, sender="switzerland", state="training", agent_version="1",
            heartbeat_at=now - 100, heartbeat_seconds=10).to_bytes())
        _publish(publisher, topics.site("longbeach", "status"), SiteStatus(
            federation=federation, sender="longbeach", state="training", agent_version="1", heartbeat_at=now,
            heartbeat_seconds=10, active_model_version=4, progress=RoundProgress(
                round_id="r5", round=5, phase="training", steps_done=25, steps_total=100)).to_bytes())
        alert = Alert(id="site_offline:va", kind="site_offline", severity="critical", site="va",
                      message="va offline for 2 min", action="check the agent", since=now)
        _publish(publisher, topics.alerts, AlertState(federation=federation, sender="orchestrator",
                                                      alerts=[alert]).to_bytes())
        samples = wait_scrape(exporter.port, lambda s: value(s, "fedmq_exporter_rejected_messages_total") == 2
                              and len(names(s, "fedmq_site_up")) == 3 and names(s, "fedmq_alert_active"),
                              "two rejected messages, three sites and an alert")
        assert value(samples, "fedmq_site_up", site="cleveland") == 0  # in error: not up
        assert value(samples, "fedmq_site_error", site="cleveland", code="data.invalid") == 1
        assert value(samples, "fedmq_site_up", site="switzerland") == 0  # stale heartbeat
        assert value(samples, "fedmq_site_up", site="longbeach") == 1
        assert value(samples, "fedmq_site_progress_ratio", site="longbeach", phase="training") == 0.25
        assert value(samples, "fedmq_site_model_version", site="longbeach") == 4
        assert value(samples, "fedmq_alert_active", kind="site_offline", severity="critical", site="va") == 1

        # Cleared: the alert set empties, cleveland recovers, longbeach's status is deleted.
        _publish(publisher, topics.alerts, AlertState(federation=federation, sender="orchestrator").to_bytes())
        _publish(publisher, topics.site("cleveland", "status"), SiteStatus(
            federation=federation, sender="cleveland", state="idle", agent_version="1", heartbeat_at=time.time(),
            heartbeat_seconds=10).to_bytes())
        _publish(publisher, topics.site("longbeach", "status"), b"")
        samples = wait_scrape(exporter.port, lambda s: not names(s, "fedmq_alert_active")
                              and value(s, "fedmq_site_up", site="cleveland") == 1
                              and value(s, "fedmq_site_up", site="longbeach") is None,
                              "the cleared alert, cleveland recovered and longbeach forgotten")
        assert names(samples, "fedmq_site_error") == []
        assert names(samples, "fedmq_site_progress_ratio") == []


def test_exporter_reads_as_a_monitor_behind_the_production_acl(tmp_path: Path) -> None:
    pki = FederationPki.init(tmp_path / "pki", "demo")
    monitor = pki.issue_monitor("prometheus")
    topics = Topics("demo")
    with start_tls_mosquitto(pki.root) as broker:
        def tls(cn: str) -> CommonSettings:
            return CommonSettings(broker_url=broker.url, federation="demo", tls_ca=pki.ca_cert_path,
                                  tls_cert=pki.cert_path(cn), tls_key=pki.key_path(cn))

        with Transport(tls("orchestrator"), "orchestrator-test", persistent_session=False) as orch:
            summary = RoundSummary(federation="demo", sender="orchestrator", round=4, evaluated_version=3,
                                   new_version=4, site_metrics={}, bytes_down=1000, bytes_up=250,
                                   pooled=EvalMetrics(num_examples=10, loss=0.5, accuracy=0.7))
            _publish(orch, topics.round_summary, summary.to_bytes())
            _publish(orch, topics.orchestrator_status, OrchestratorStatus(
                federation="demo", sender="orchestrator", state="collecting", round=5, rounds_total=20,
                attempt=2).to_bytes())
            with running_exporter(tls(monitor.name)) as exporter:
                samples = wait_scrape(exporter.port, lambda s: value(s, "fedmq_round", federation="demo") == 5
                                      and value(s, "fedmq_summary_round") == 4, "the retained state")
    assert value(samples, "fedmq_rounds_planned") == 20
    assert value(samples, "fedmq_round_attempt") == 2
    assert value(samples, "fedmq_pooled_metric", metric="accuracy") == 0.7
    assert value(samples, "fedmq_round_bytes_total", direction="down") == 1000


def test_the_grafana_dashboard_queries_only_metrics_the_exporter_exposes() -> None:
    registry = CollectorRegistry()
    registry.register(FleetCollector(FleetState(Topics("demo")), threading.Event()))
    families = list(text_string_to_metric_families(generate_latest(registry).decode()))
    exposed = {f.name + ("_total" if f.type == "counter" else "") for f in families}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\bfedmq_[a-z_]+", expr)}
    assert len(exprs) >= 15 and len(used) >= 15
    assert used - exposed == set(), f"the dashboard queries metrics the exporter does not expose: {used - exposed}"
    for wanted in ("fedmq_site_up", "fedmq_pooled_metric", "fedmq_round_bytes_total", "fedmq_round_duration_seconds",
                   "fedmq_epsilon", "fedmq_alert_active", "fedmq_round"):
        assert wanted in used, f"the dashboard shows no {wanted}"
    assert all(panel["datasource"]["uid"] == "${DS_PROMETHEUS}" for panel in dashboard["panels"])


def test_exporter_keeps_serving_through_a_broker_restart_and_reads_the_new_state() -> None:
    """Broker killed: /metrics still answers, says the broker is gone; restarted: the exporter resubscribes."""
    federation = f"exporter-{uuid.uuid4().hex[:6]}"
    topics = Topics(federation)
    broker = start_mosquitto()
    try:
        settings = CommonSettings(broker_url=broker.url, federation=federation, reconnect_min_delay=0.2,
                                  reconnect_max_delay=0.5)

        def publish_status(state: str) -> None:
            with Transport(settings, f"site-{uuid.uuid4().hex[:6]}", persistent_session=False) as site:
                _publish(site, topics.site("va", "status"), SiteStatus(
                    federation=federation, sender="va", state=state, agent_version="1", heartbeat_at=time.time(),
                    heartbeat_seconds=30).to_bytes())

        with running_exporter(settings) as exporter:
            publish_status("training")
            wait_scrape(exporter.port, lambda s: value(s, "fedmq_site_state", site="va", state="training") == 1,
                        "va training")
            broker.kill()
            held = wait_scrape(exporter.port, lambda s: value(s, "fedmq_exporter_broker_connected") == 0,
                               "the lost broker")
            assert value(held, "fedmq_site_state", site="va", state="training") == 1  # the last state it knew
            broker = start_mosquitto(broker.port)  # no persistence: the retained state is gone
            publish_status("idle")
            wait_scrape(exporter.port, lambda s: value(s, "fedmq_exporter_broker_connected") == 1
                        and value(s, "fedmq_site_state", site="va", state="idle") == 1, "va idle after the restart")
    finally:
        broker.stop()
