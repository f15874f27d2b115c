"""Per-site message budget and refusal counts of the orchestrator (no broker needed: pure bookkeeping)."""

from __future__ import annotations

import logging

import pytest

from orchestrator.site_limits import LOG_BURST, LOG_INTERVAL, Refusals, SiteRateLimits


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_a_burst_then_the_rate_per_site() -> None:
    clock = Clock()
    limits = SiteRateLimits(rate=10.0, burst=5, clock=clock)
    assert [limits.allow("a") for _ in range(7)] == [True] * 5 + [False] * 2
    assert limits.allow("b"), "each site has its own bucket"
    clock.now += 0.25  # 2.5 tokens back
    assert [limits.allow("a") for _ in range(3)] == [True, True, False]
    clock.now += 60
    assert sum(limits.allow("a") for _ in range(20)) == 5, "an idle site saves up to the burst, not more"


def test_refusals_are_counted_per_site_and_reason_and_logged_with_the_site(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    refusals = Refusals(clock=clock)
    with caplog.at_level(logging.WARNING, logger="orchestrator.site_limits"):
        for _ in range(LOG_BURST + 20):
            refusals.refuse("evil", "rate_limited", "flood")
        refusals.refuse("evil", "wrong_sender", "sender 'good' on evil's topic")
        refusals.refuse("clumsy", "round_not_open", "round r1 is not open")
        assert len(caplog.records) == LOG_BURST + 2, "a flood is logged a few times per interval, not per message"
        assert all("site evil" in r.getMessage() or "site clumsy" in r.getMessage() for r in caplog.records)
        clock.now += LOG_INTERVAL
        refusals.refuse("evil", "rate_limited", "flood")
    assert "rate_limited, 26 so far, 20 not logged" in caplog.records[-1].getMessage()
    assert refusals.count("evil", "rate_limited") == LOG_BURST + 21
    assert refusals.count("evil") == LOG_BURST + 22
    assert refusals.total == LOG_BURST + 23
    assert refusals.snapshot() == {"clumsy": {"round_not_open": 1},
                                   "evil": {"rate_limited": LOG_BURST + 21, "wrong_sender": 1}}


def test_a_monitor_identity_publishing_as_a_site_is_refused_not_taken_for_a_site(tmp_path) -> None:
    """A monitor certificate the broker's ACL does not name yet gets a site's rights there; the orchestrator refuses it."""
    from orchestrator.service import OrchestratorService
    from shared.config import OrchestratorSettings
    from shared.protocol import SiteStatus
    from shared.topics import Topics
    from shared.transport import Incoming

    settings = OrchestratorSettings(broker_url="mqtt://127.0.0.1:1", federation="f", state_dir=tmp_path,
                                    task_features=["x"])
    service = OrchestratorService(settings)
    status = SiteStatus(federation="f", sender="monitor-grafana", state="idle", agent_version="1")
    service.handle(Incoming(Topics("f").site("monitor-grafana", "status"), status.to_bytes(), True))
    assert "monitor-grafana" not in service.presence
    assert service.refusals.count("monitor-grafana", "monitor_identity") == 1
    honest = SiteStatus(federation="f", sender="site-a", state="idle", agent_version="1")
    service.handle(Incoming(Topics("f").site("site-a", "status"), honest.to_bytes(), True))
    assert "site-a" in service.presence, "the control: a site's status is taken"
