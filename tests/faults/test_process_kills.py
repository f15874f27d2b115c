"""Daemons killed (SIGKILL) or frozen (SIGSTOP) at chosen moments of a federation of real processes.

Each case runs the Heart Disease federation as separate processes on a broker of its own,
strikes when the topics show the moment it wants (an upload's chunks crossing the broker,
the orchestrator saying ``aggregating``, a ``ModelPublished``, a site ``training``), brings
the victim back on the same state directory and ends with ``check_outcome``.
"""

from __future__ import annotations

import random

import pytest

from shared.protocol import ModelPublished, UpdateAck
from tests.faults.federation_harness import (ORCHESTRATOR, FederationHarness, check_outcome,
                                             orchestrator_state, site_state)

SITES = ("cleveland", "hungary")
# An MLP whose updates travel as ~130 chunks of 2 KiB, so that an upload lasts long enough to strike into.
BIG = {"orchestrator": {"architecture": "mlp", "hidden": [256, 256], "chunk_size": 2048},
       "agent": {"chunk_size": 2048}, "training": {"loss": "bce_logits"}, "local_steps": 5}


def first_chunk_from(site: str | None = None):
    """An update chunk on its way from ``site`` (any site when None) to the orchestrator."""
    return lambda e: e.chunk_of is not None and e.site is not None and (site is None or e.site == site)


def published(version: int):
    return lambda e: isinstance(e.message, ModelPublished) and e.message.version == version


@pytest.fixture()
def harness(fresh_mosquitto, tmp_path):
    made: list[FederationHarness] = []

    def make(**kwargs) -> FederationHarness:
        fed = FederationHarness.heart(fresh_mosquitto, tmp_path, **kwargs)
        made.append(fed)
        return fed

    yield make
    for fed in made:
        fed.close()


def test_orchestrator_killed_while_chunks_arrive_while_aggregating_and_after_a_version(harness):
    fed = harness(rounds=3, sites=SITES, **BIG)
    fed.start_all()
    fed.watch.wait_for(first_chunk_from(), 90, what="an update chunk in round 1")
    fed.restart(ORCHESTRATOR)
    fed.watch.wait_for(orchestrator_state("aggregating", 2), 90, what="aggregation of round 2")
    fed.restart(ORCHESTRATOR)
    fed.watch.wait_for(published(2), 90, what="version 2")
    fed.restart(ORCHESTRATOR)
    fed.wait_finished(120)
    outcome = check_outcome(fed.state_dir, 3, set(SITES))
    assert "resuming round 1" in fed.log(ORCHESTRATOR)
    assert outcome.failed_attempts == 0, "a restart cost a retried round"
    assert all(sites == set(SITES) for sites in outcome.accepted.values()), "an update was lost in a restart"


def test_orchestrator_killed_at_random_moments(harness):
    """Moments drawn by a seeded RNG on the federation's own clock (messages seen), so any machine speed works."""
    rng = random.Random(13)
    fed = harness(rounds=5, sites=SITES)
    fed.start_all()
    fed.watch.wait_for(orchestrator_state("collecting", 1), 60, what="round 1")
    kills = 0
    for _ in range(3):
        later = fed.watch.mark() + rng.randint(1, 15)
        fed.watch.wait_for(lambda e: True, 60, since=later - 1, what="the next random moment")
        if not fed.running(ORCHESTRATOR):
            break
        fed.restart(ORCHESTRATOR)
        kills += 1
    fed.wait_finished(150)
    check_outcome(fed.state_dir, 5, set(SITES))
    assert kills == 3, "the federation finished before the kills: make it longer"


def test_agent_killed_mid_upload_then_mid_training(harness):
    fed = harness(rounds=2, sites=SITES, **{**BIG, "local_steps": 200})
    fed.start_all()
    fed.watch.wait_for(first_chunk_from("hungary"), 90, what="an update chunk from hungary")
    fed.restart("hungary")  # its update is on disk: it must be sent again, not retrained
    mark = fed.watch.mark()
    fed.watch.wait_for(lambda e: site_state("hungary", "training")(e) and "round 2" in e.message.detail, 90,
                       since=mark, what="hungary training round 2")
    fed.restart("hungary")  # nothing to resend: it must train round 2 again
    fed.wait_finished(120)
    outcome = check_outcome(fed.state_dir, 2, set(SITES))
    assert outcome.accepted == {1: set(SITES), 2: set(SITES)}, "a round went on without the restarted site"
    assert outcome.failed_attempts == 0
    assert "was not acknowledged before the restart" in fed.log("hungary")


def test_agent_frozen_past_a_deadline_then_offline_for_rounds_catches_up(harness):
    timeout = 4.0
    # 500 local steps: the freeze must land while hungary trains, not after it sent its update.
    fed = harness(rounds=6, sites=SITES, local_steps=500, round_timeout=timeout,
                  orchestrator={"min_sites": 1, "quorum": 1})
    fed.start_watching()
    fed.start(ORCHESTRATOR)
    fed.start("hungary")  # alone at first, so that round 1 is the one it is frozen in
    fed.watch.wait_for(site_state("hungary", "training"), 90, what="hungary training round 1")
    fed.stop("hungary")
    fed.start("cleveland")
    mark = fed.watch.mark()
    fed.watch.wait_for(published(1), timeout + 30, since=mark, what="the round closing without hungary")
    fed.cont("hungary")
    late = fed.watch.wait_for(lambda e: isinstance(e.message, UpdateAck) and "/to/hungary/" in e.topic, 30,
                              since=mark, what="an answer to hungary's late update")
    assert not late.message.accepted and "not open" in (late.message.reason or "")
    fed.kill("hungary")
    mark = fed.watch.mark()
    fed.watch.wait_for(published(3), 120, since=mark, what="two more rounds without hungary")
    # Hold the federation while hungary starts, or the last rounds are over before it is up.
    fed.stop(ORCHESTRATOR)
    mark = fed.watch.mark()
    fed.start("hungary")
    fed.watch.wait_for(site_state("hungary", "idle"), 60, since=mark, what="hungary back online")
    fed.cont(ORCHESTRATOR)
    fed.wait_finished(120)
    outcome = check_outcome(fed.state_dir, 6, set(SITES))
    assert outcome.accepted[1] == {"cleveland"}, "a late update was counted"
    assert all("hungary" not in outcome.accepted[r] for r in (2, 3)), \
        "hungary contributed while it was down"
