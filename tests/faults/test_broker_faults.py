"""Broker faults against a real federation: down at start, refusing us, killed mid-round (with
and without persistence), down longer than a round's deadline.

Each case runs the Heart Disease federation (logistic regression, a few short rounds) over a
Mosquitto this test owns on a port it chose, so the broker can be killed (SIGKILL) and started
again on the same port. Each asserts the federation finishes, the lineage is contiguous, every
version's contributors are exactly the updates stored for its round, and nothing is counted twice.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmq.demo import DemoOptions, heart_settings, settings_env
from fedmq.inprocess import Federation, run_federation
from orchestrator.journal import RoundJournal
from orchestrator.registry import ModelRegistry
from shared.broker import Broker, free_port, start_mosquitto
from shared.config import AgentSettings, OrchestratorSettings
from tests.mqtt_helpers import open_round_updates

SITES = ("cleveland", "hungary", "switzerland", "va")
# Reconnect quickly: the tests measure what the daemons do once the broker is back, not the backoff.
FAST_RECONNECT = {"reconnect_min_delay": 0.2, "reconnect_max_delay": 1.0, "keepalive": 5}
# The unfavourable order after a restart: the sites are back (and send what they queued) before
# the orchestrator has subscribed again, so a broker without persistence drops their reports.
SITES_FIRST = ({"reconnect_min_delay": 1.5, "reconnect_max_delay": 1.5},
               {"reconnect_min_delay": 0.2, "reconnect_max_delay": 0.2})


def _settings(url: str, root: Path, *, rounds: int, round_timeout: float, local_steps: int = 100,
              sites: tuple[str, ...] = SITES, reconnect: tuple[dict, dict] = (FAST_RECONNECT, FAST_RECONNECT),
              ack_timeout: float = 20.0) -> tuple[OrchestratorSettings, list[AgentSettings]]:
    orch, agents = heart_settings(url, root, DemoOptions(rounds=rounds, local_steps=local_steps,
                                                         round_timeout=round_timeout), sites=sites)
    return (orch.model_copy(update={**FAST_RECONNECT, **reconnect[0], "final_evaluation": False}),
            [a.model_copy(update={**FAST_RECONNECT, **reconnect[1], "ack_timeout": ack_timeout}) for a in agents])


def _check_lineage(state_dir: Path, rounds: int) -> list[tuple[str, int, str, list[str]]]:
    """Versions 0..rounds in one chain, each made of exactly the updates stored for its round.

    Returns every train round attempt as (round_id, attempt, state, sites that reported).
    """
    registry = ModelRegistry.open(state_dir)
    journal = RoundJournal(registry.conn)
    versions = registry.list()
    assert [v.version for v in versions] == list(range(rounds + 1)), "a version is missing or duplicated"
    done = {r.round: r for r in journal.done("train")}
    for v in versions[1:]:
        assert v.parent == v.version - 1 and v.round == v.version, f"v{v.version} breaks the lineage"
        stored = journal.updates(done[v.round].round_id)
        assert v.contributors == {u.site: u.num_samples for u in stored}, \
            f"v{v.version}'s contributors are not the updates accepted for round {v.round}"
    rows = registry.conn.execute("SELECT round_id, attempt, state FROM rounds WHERE kind='train' "
                                 "ORDER BY announced_at").fetchall()
    # The updates table keys on (round_id, site): a resend can never be stored, nor counted, twice.
    return [(rid, attempt, state, [u.site for u in journal.updates(rid)]) for rid, attempt, state in rows]


def _wait_training(fed: Federation, db: Path, first_round: int, timeout: float) -> int:
    """Until, in a round from ``first_round`` on (returned), no update is stored yet and at least
    half the sites train: their reports will be sent while the broker is down."""
    deadline = time.monotonic() + timeout
    while True:
        rnd, stored = open_round_updates(db)
        training = sum(a.current_state == "training" for a in fed.agents.values())
        if rnd >= first_round and stored == 0 and 2 * training >= len(fed.agents):
            return rnd
        assert time.monotonic() < deadline, f"the sites never trained together in a round from {first_round} on"
        time.sleep(0.01)


def _wait_saved(fed: Federation, store: Path, timeout: float) -> None:
    """Until the broker saved its state after every daemon connected and subscribed (it saves every second)."""
    deadline = time.monotonic() + timeout
    transports = [fed.orchestrator.transport, *(a.transport for a in fed.agents.values())]
    while not all(t.connected.is_set() for t in transports):
        assert time.monotonic() < deadline, "the daemons did not connect"
        time.sleep(0.05)
    everyone_in = time.time() + 0.5  # their subscriptions follow the connection within milliseconds
    saved = store / "mosquitto.db"
    while not saved.exists() or saved.stat().st_mtime < everyone_in:
        assert time.monotonic() < deadline, f"mosquitto did not save its state in {store}"
        time.sleep(0.1)


def _last_report_at(db: Path, round_id: str) -> float:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT MAX(received_at) FROM updates WHERE round_id=?", (round_id,)).fetchone()[0]


def test_daemons_started_before_the_broker_wait_for_it(tmp_path: Path) -> None:
    """`fedmq orchestrator run` and `fedmq agent run` keep trying (and say so) until the broker is up."""
    port = free_port()
    sites = ("va",)  # one process per daemon costs seconds of start-up: one of each kind is enough here
    orch, agents = _settings(f"mqtt://127.0.0.1:{port}", tmp_path, rounds=2, round_timeout=60.0, sites=sites)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_")}
    procs: dict[str, tuple[subprocess.Popen, Path]] = {}
    for name, settings, command in [("orchestrator", orch, "orchestrator"),
                                    *[(a.site_id, a, "agent") for a in agents]]:
        log_path = tmp_path / f"{name}.log"
        procs[name] = (subprocess.Popen([sys.executable, "-m", "fedmq", command, "run"],
                                        env={**env, **settings_env(settings)}, stdout=open(log_path, "wb"),
                                        stderr=subprocess.STDOUT), log_path)
    broker: Broker | None = None
    started = time.monotonic()
    try:
        deadline = time.monotonic() + 60
        # Every daemon must be seen waiting (more than one attempt) before the broker starts.
        while not all(p[1].read_text().count("not reachable") >= 2 for p in procs.values()):
            for name, (proc, log_path) in procs.items():
                assert proc.poll() is None, f"{name} exited without a broker:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the daemons did not log their waiting"
            time.sleep(0.2)
        for _, log_path in procs.values():
            text = log_path.read_text()
            assert f"broker at mqtt://127.0.0.1:{port} not reachable" in text and "retrying in" in text, text
        broker = start_mosquitto(port=port)
        up = time.monotonic()
        orchestrator, orch_log = procs["orchestrator"]
        assert orchestrator.wait(timeout=90) == 0, orch_log.read_text()[-3000:]
        print(f"\ndaemons waited {up - started:.1f} s; federation of 2 rounds done {time.monotonic() - up:.1f} s "
              "after the broker came up")
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc, _ in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if broker is not None:
            broker.stop()
    attempts = _check_lineage(tmp_path / "orchestrator", 2)
    assert [(a, state, reported) for _, a, state, reported in attempts] == [(1, "done", list(sites))] * 2


def test_a_daemon_the_broker_refuses_stops_with_the_reason(tmp_path: Path) -> None:
    """Waiting is for an absent broker; one that refuses us (not authorized) needs an operator: exit 2, say why."""
    with start_mosquitto(extra_config="allow_anonymous false") as closed:
        orch, _ = _settings(closed.url, tmp_path, rounds=1, round_timeout=10.0)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_")}
        done = subprocess.run([sys.executable, "-m", "fedmq", "orchestrator", "run"], env={**env, **settings_env(orch)},
                              capture_output=True, text=True, timeout=60)
    said = " ".join(done.stderr.split())  # the error console wraps long lines
    assert done.returncode == 2, said[-3000:]
    assert "refused fedmq-heart-demo-orchestrator: Not authorized. Retrying cannot fix this" in said, said[-3000:]


def _kill_mid_round(tmp_path: Path, caplog: pytest.LogCaptureFixture, *, persistence: bool) -> dict[str, float]:
    """Kill the broker while the sites train (round 2 or later), start it again 3 s later on the same port.

    The round in flight must close without its deadline; returns the figures measured.
    """
    caplog.set_level(logging.INFO)
    port = free_port()
    store = tmp_path / "mosquitto-db" if persistence else None
    if store is not None:
        store.mkdir()
    # Far beyond the test's own timeout: a round that needs its deadline, or a site that needs its
    # periodic resend, to recover from the restart fails the test.
    round_timeout = 300.0
    rounds = 5
    orch, agents = _settings(f"mqtt://127.0.0.1:{port}", tmp_path, rounds=rounds, round_timeout=round_timeout,
                             local_steps=300, reconnect=SITES_FIRST, ack_timeout=round_timeout)
    db = tmp_path / "orchestrator" / "orchestrator.sqlite"
    broker = start_mosquitto(port=port, persistence_dir=store)
    try:
        with run_federation(orch, agents) as fed:
            if store is not None:
                _wait_saved(fed, store, timeout=60)
            killed_round = _wait_training(fed, db, max(2, open_round_updates(db)[0] + 1), timeout=60)
            broker.kill()
            killed = time.time()
            assert killed_round < rounds, "the kill came too late to leave rounds after it"
            assert open_round_updates(db)[0] == killed_round and open_round_updates(db)[1] < len(SITES), \
                f"round {killed_round} closed before the kill"
            time.sleep(3.0)
            broker = start_mosquitto(port=port, persistence_dir=store)
            restarted = time.time()
            fed.wait_finished(timeout=90)
    finally:
        broker.stop()
    attempts = _check_lineage(tmp_path / "orchestrator", rounds)
    # Every round closed at its first attempt with every selected site's report.
    assert [(a, state, reported) for _, a, state, reported in attempts] == [(1, "done", list(SITES))] * rounds
    assert "reconnected to 127.0.0.1" in caplog.text
    return {"round": killed_round, "down_s": restarted - killed, "deadline_s": round_timeout,
            "closed_after_restart_s": _last_report_at(db, attempts[killed_round - 1][0]) - restarted}


def test_broker_killed_mid_round_without_persistence(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The broker forgets sessions, subscriptions and retained messages; the round in flight still completes."""
    figures = _kill_mid_round(tmp_path, caplog, persistence=False)
    assert "the broker had no session for us" in caplog.text
    assert f"re-announcing round {figures['round']} attempt 1" in caplog.text
    print(f"\nbroker killed mid-round, no persistence: {figures}")


def test_broker_killed_mid_round_with_persistence(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The broker comes back with the sessions it saved; the round in flight completes all the same."""
    figures = _kill_mid_round(tmp_path, caplog, persistence=True)
    assert "the broker kept our session" in caplog.text
    print(f"\nbroker killed mid-round, persistence: {figures}")


def test_broker_down_longer_than_a_deadline(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The round in flight misses its deadline and is retried; the federation then finishes."""
    caplog.set_level(logging.INFO)
    port = free_port()
    round_timeout = 8.0
    orch, agents = _settings(f"mqtt://127.0.0.1:{port}", tmp_path, rounds=3, round_timeout=round_timeout,
                             local_steps=300)
    db = tmp_path / "orchestrator" / "orchestrator.sqlite"
    broker = start_mosquitto(port=port)
    try:
        with run_federation(orch, agents) as fed:
            _wait_training(fed, db, 2, timeout=60)
            broker.kill()
            time.sleep(round_timeout + 2.0)
            broker = start_mosquitto(port=port)
            restarted = time.monotonic()
            fed.wait_finished(timeout=90)
            finished_after = time.monotonic() - restarted
    finally:
        broker.stop()
    attempts = _check_lineage(tmp_path / "orchestrator", 3)
    by_round = {rid: (a, state) for rid, a, state, _ in attempts}
    assert by_round[f"{orch.federation}-r2-a1"] == (1, "failed"), attempts
    assert "missed its quorum" in caplog.text
    # The retried round and every other one closed with all the sites.
    assert [(state, reported) for _, _, state, reported in attempts if state == "done"] == [("done", list(SITES))] * 3
    print(f"\nbroker down {round_timeout + 2.0:.0f} s, deadline {round_timeout:.0f} s: attempts "
          f"{[(rid, state) for rid, _, state, _ in attempts]}; finished {finished_after:.1f} s after the restart")
