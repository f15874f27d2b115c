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
