"""Alert rules (orchestrator/alerts.py) on a fake clock: raised when the contract says, cleared when resolved."""

from __future__ import annotations

import logging

import pytest

from orchestrator.alerts import AlertMonitor
from shared.config import AlertSettings
from shared.protocol import (AgentResources, Alert, EvalMetrics, ErrorInfo, PrivacySpent, RoundSummary,
                             SiteStatus)

FED = "alerts"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def published() -> list[list[Alert]]:
    return []


@pytest.fixture
def monitor(clock: Clock, published: list[list[Alert]]) -> AlertMonitor:
    return AlertMonitor(AlertSettings(), published.append, clock)


def _status(state: str = "idle", **fields: object) -> SiteStatus:
    return SiteStatus(federation=FED, sender="va", state=state, agent_version="t", **fields)


def _ids(alerts: list[Alert]) -> list[str]:
    return [a.id for a in alerts]


def _summary(round_no: int, version: int, accuracy: float | None = None, loss: float = 0.5,
             privacy: PrivacySpent | None = None) -> RoundSummary:
    metrics = EvalMetrics(num_examples=100, loss=loss, accuracy=accuracy,
                          correct=None if accuracy is None else round(accuracy * 100))
    return RoundSummary(federation=FED, sender="orchestrator", round=round_no, evaluated_version=version,
                        new_version=version + 1, site_metrics={"va": metrics}, pooled=metrics, bytes_down=0,
                        bytes_up=0, privacy=privacy)


def test_start_publishes_the_empty_set_to_replace_an_earlier_runs_alerts(monitor, published):
    monitor.start()
    assert published == [[]]


def test_a_site_offline_longer_than_the_threshold_alerts_and_clears_when_it_returns(monitor, clock, published,
                                                                                      caplog):
    caplog.set_level(logging.INFO, logger="orchestrator.alerts")
    monitor.site_status("va", _status(connected_at=clock.now))
    monitor.site_status("va", _status("offline", connected_at=clock.now))  # its last will
    clock.now += 59
    monitor.tick()
    assert published == [], "not before offline_after_seconds (60)"
    clock.now += 2
    monitor.tick()
    (alert,) = published[-1]
    assert (alert.id, alert.kind, alert.severity, alert.site) == ("site_offline:va", "site_offline", "critical", "va")
    assert "offline for 61 s" in alert.message and "fedmq agent status" in alert.action
    clock.now += 30
    monitor.tick()
    assert len(published) == 1, "time passing alone does not re-publish the same alert"
    monitor.site_status("va", _status("idle", heartbeat_at=clock.now, heartbeat_seconds=10))
    assert published[-1] == []
    assert caplog.text.count("alert raised") == 1 and caplog.text.count("alert cleared: site_offline:va") == 1


def test_a_silent_site_counts_as_offline_after_three_heartbeats_and_the_threshold(monitor, clock, published):
    monitor.site_status("va", _status("training", heartbeat_at=clock.now, heartbeat_seconds=10))
    clock.now += 59
    monitor.tick()
    assert published == []
    clock.now += 2
    monitor.tick()
    assert _ids(published[-1]) == ["site_offline:va"] and "silent" in published[-1][0].message
    # A schema-1 agent (no heartbeat) is judged only on its state: silence is normal for it.
    monitor.site_status("old", SiteStatus(federation=FED, sender="old", state="idle", agent_version="0.9"))
    clock.now += 1000
    monitor.tick()
    assert _ids(published[-1]) == ["site_offline:va"]


def test_a_site_in_error_alerts_with_its_code_and_clears_when_it_recovers_or_goes(monitor, clock, published):
    error = ErrorInfo.of("data.invalid", "the training CSV, line 7: a needed cell is missing or not a number",
                         round_id="r1")
    monitor.site_status("va", _status("error", last_error=error))
    (alert,) = published[-1]
    assert alert.kind == "site_error" and "(data.invalid)" in alert.message and alert.action == error.action
    monitor.site_status("va", _status("error", last_error=error))
    assert len(published) == 1, "the same error again changes nothing"
    monitor.site_status("va", _status("idle", last_error=error))
    assert published[-1] == [], "recovered: last_error stays on the status, the alert goes"
    monitor.site_status("va", _status("error", detail="bad things"))  # a schema-1 agent: no code
    assert "bad things" in published[-1][0].message
    monitor.site_status("va", _status("offline"))
    assert published[-1] == [], "gone: the offline rule takes over"


def test_low_disk_alerts_and_clears(monitor, published):
    low = AgentResources(cpu_percent=1, rss_bytes=1, disk_free_bytes=500_000_000)
    monitor.site_status("va", _status(resources=low))
    assert published[-1][0].kind == "disk_low" and "0.50 GB free" in published[-1][0].message
    monitor.site_status("va", _status())  # a status without resources (a will) leaves it as it was
    assert len(published) == 1
    monitor.site_status("va", _status(resources=low.model_copy(update={"disk_free_bytes": 2 * 1024 ** 3})))
    assert published[-1] == []


def test_a_failed_round_and_its_retry_alert_until_the_round_completes(monitor, published):
    monitor.round_announced(3, 1)
    assert published == [], "a first attempt is no retry"
    monitor.round_failed(3, 1, "missed its quorum: 1/4 reports")
    assert _ids(published[-1]) == ["round_failed:3"] and published[-1][0].severity == "critical"
    monitor.round_announced(3, 2)
    assert set(_ids(published[-1])) == {"round_failed:3", "round_retried:3"}
    monitor.round_summary(_summary(2, 1, accuracy=0.8))
    assert set(_ids(published[-1])) == {"round_failed:3", "round_retried:3"}, "another round's completion"
    monitor.round_summary(_summary(3, 2, accuracy=0.8))
    assert published[-1] == []


def test_a_metric_drop_between_consecutive_versions_alerts_until_it_recovers(monitor, published):
    monitor.round_summary(_summary(1, 0, accuracy=0.80))
    monitor.round_summary(_summary(2, 1, accuracy=0.76))  # -0.04: within 0.05
    assert published == []
    monitor.round_summary(_summary(3, 2, accuracy=0.70))  # -0.06
    (alert,) = published[-1]
    assert alert.kind == "metric_drop" and "0.760 (v1) to 0.700 (v2)" in alert.message
    monitor.round_summary(_summary(3, 2, accuracy=0.70))  # the same version again: no new comparison
    monitor.round_summary(_summary(4, 3, accuracy=0.70))
    assert len(published) == 1, "still down: the alert stays"
    monitor.round_summary(_summary(5, 4, accuracy=0.75))  # within 0.05 of the 0.76 before the drop
    assert published[-1] == []


def test_a_regression_metric_is_judged_on_its_loss(monitor, published):
    monitor.round_summary(_summary(1, 0, loss=0.20))
    monitor.round_summary(_summary(2, 1, loss=0.30))
    assert published[-1][0].kind == "metric_drop" and "loss went from 0.200 (v0) to 0.300 (v1)" in \
        published[-1][0].message


def _spent(epsilon: float, level: str = "client") -> PrivacySpent:
    return PrivacySpent(level=level, mechanism="dp_fedavg/central" if level == "client" else "dp_sgd",
                        epsilon=epsilon, delta=1e-5, steps=3, noise_multiplier=1.0, sampling_rate=1.0, clip_norm=1.0,
                        max_epsilon=10.0)


def test_privacy_above_its_share_of_the_ceiling_alerts_per_level(monitor, published):
    monitor.client_privacy(_spent(7.9))
    monitor.round_summary(_summary(1, 0, accuracy=0.8, privacy=_spent(8.0)))
    assert published == [], "0.8 of the ceiling is the threshold, not above it"
    monitor.round_summary(_summary(2, 1, accuracy=0.8, privacy=_spent(8.5)))
    (alert,) = published[-1]
    assert (alert.id, alert.severity, alert.site) == ("privacy_budget:federation", "warning", None)
    monitor.site_status("va", _status(privacy=_spent(10.0, "sample")))
    by_id = {a.id: a for a in published[-1]}
    sample = by_id["privacy_budget:va"]
    assert sample.severity == "critical" and "dp_sgd_max_epsilon" in sample.action


def test_thresholds_come_from_the_settings(clock, published):
    monitor = AlertMonitor(AlertSettings(offline_after_seconds=5, metric_drop=0.5), published.append, clock)
    monitor.site_status("va", _status("offline"))
    clock.now += 6
    monitor.tick()
    assert _ids(published[-1]) == ["site_offline:va"]
    monitor.round_summary(_summary(1, 0, accuracy=0.9))
    monitor.round_summary(_summary(2, 1, accuracy=0.5))
    assert _ids(published[-1]) == ["site_offline:va"], "a 0.4 drop is within 0.5"
