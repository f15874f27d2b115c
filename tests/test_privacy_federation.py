"""Differential privacy in the federation: DP-FedAvg over a real Mosquitto, and a hospital's own DP-SGD.

Client level (``dp_fedavg``): updates leave the sites clipped, the orchestrator records
(epsilon, delta) with every version exactly as the RDP accountant computes it, publishes it
in the round summary, and ends the federation before the round that would cross the budget.
Sample level (the agent's DP-SGD): the ledger survives a restart and the site refuses the
round that would cross its own budget.
"""

from __future__ import annotations

import math
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from edge_agent.state import AgentRecord
from fedmq.demo import DemoOptions, heart_settings
from fedmq.inprocess import run_federation
from orchestrator.registry import ModelRegistry
from orchestrator.strategies import DPFedAvg, RoundPlan, StrategyConfig, make_strategy
from shared.codec import decode_tensors
from shared.onnx_model import float_initializers, load_model_bytes
from shared.privacy.accountant import ClientLevelAccountant, SampleLevelAccountant
from shared.privacy.dp import split_noise_multiplier
from shared.protocol import OrchestratorStatus, RoundSummary, SiteStatus
from shared.topics import Topics
from tests.mqtt_helpers import retained

SITES = {"cleveland", "hungary", "switzerland", "va"}
DELTA = 1e-5


def _private_heart(broker_url: str, root: Path, federation: str, rounds: int, options: dict):
    orch, agents = heart_settings(broker_url, root, DemoOptions(rounds=rounds))
    orch = orch.model_copy(update={"federation": federation, "strategy": {"name": "dp_fedavg", "options": options}})
    return orch, [a.model_copy(update={"federation": federation}) for a in agents]


def _stored_update_norms(registry: ModelRegistry) -> dict[tuple[str, str], float]:
    """L2 norm of every update the orchestrator stored, decoded as it decodes them."""
    weights = float_initializers(load_model_bytes(registry.model_bytes(0)))
    shapes = {k: v.shape for k, v in weights.items()}
    rows = registry.conn.execute("SELECT round_id, site, blob FROM updates WHERE blob IS NOT NULL").fetchall()
    norms = {}
    for round_id, site, blob in rows:
        update = decode_tensors(registry.blobs.get(blob), shapes, max_decoded_bytes=4 * 1024 * 1024)
        norms[(round_id, site)] = math.sqrt(sum(float(np.sum(t.astype(np.float64) ** 2)) for t in update.values()))
    return norms


def test_central_dp_fedavg_clips_updates_and_records_the_accountants_epsilon(mosquitto, tmp_path):
    clip, z, rounds = 0.3, 0.8, 3
    orch, agents = _private_heart(mosquitto.url, tmp_path, "dp-central", rounds,
                                  {"noise": "central", "clip_norm": clip, "noise_multiplier": z, "delta": DELTA})
    with run_federation(orch, agents) as fed:
        fed.wait_finished(timeout=120)
        updates = [u for r in range(1, rounds + 1) for u in fed.orchestrator.journal.updates(f"dp-central-r{r}-a1")]
    registry = ModelRegistry.open(orch.state_dir)
    versions = registry.list()
    assert [v.version for v in versions] == list(range(rounds + 1))
    assert versions[0].privacy is None

    # Every update the orchestrator received was clipped by its site to the round's bound.
    norms = _stored_update_norms(registry)
    assert len(norms) == 4 * rounds
    assert max(norms.values()) <= clip * (1 + 1e-5), norms
    assert min(norms.values()) > 0
    assert all(u.report.dp_unclipped is not None for u in updates) and len(updates) == 4 * rounds

    # Epsilon per version: growing, and exactly what the accountant gives for that many rounds.
    reference = ClientLevelAccountant(z, 1.0, DELTA)
    epsilons = []
    for v in versions[1:]:
        assert v.training["dp_clip_norm"] == clip and v.training["dp_noise_share_std"] == 0.0
        reference.step()
        assert v.privacy.level == "client" and v.privacy.mechanism == "dp_fedavg/central"
        assert v.privacy.steps == v.round and v.privacy.delta == DELTA and v.privacy.clip_norm == clip
        assert v.privacy.epsilon == pytest.approx(reference.epsilon(), rel=1e-12)
        epsilons.append(v.privacy.epsilon)
    assert epsilons == sorted(epsilons) and len(set(epsilons)) == rounds
    assert set(versions[-1].contributors) == SITES

    # Operators see it: the last (final evaluation) summary carries the final version's privacy.
    summary = retained(mosquitto.url, "dp-central", Topics("dp-central").round_summary, RoundSummary)
    assert summary.evaluated_version == rounds and summary.privacy == versions[-1].privacy


def test_distributed_adaptive_dp_fedavg_stops_when_the_budget_is_spent(mosquitto, tmp_path):
    z, count_std, clip = 1.0, 2.0, 0.2
    accountant = ClientLevelAccountant(z, 1.0, DELTA)
    accountant.step(2)
    budget = (accountant.epsilon() + accountant.epsilon_after(1)) / 2  # room for 2 rounds, not 3
    options = {"noise": "distributed", "clip_norm": clip, "noise_multiplier": z, "adaptive_clipping": True,
               "clip_count_stddev": count_std, "target_quantile": 0.5, "delta": DELTA, "max_epsilon": budget}
    orch, agents = _private_heart(mosquitto.url, tmp_path, "dp-distributed", 10, options)
    with run_federation(orch, agents) as fed:
        fed.wait_finished(timeout=120)
    registry = ModelRegistry.open(orch.state_dir)
    versions = registry.list()
    assert [v.round for v in versions] == [None, 1, 2], "a round ran past the privacy budget"
    assert versions[-1].privacy.epsilon == pytest.approx(accountant.epsilon(), rel=1e-12)
    assert versions[-1].privacy.epsilon <= budget

    status = retained(mosquitto.url, "dp-distributed", Topics("dp-distributed").orchestrator_status,
                       OrchestratorStatus)
    assert status.state == "finished"
    assert "stopped before round 3 of 10: privacy budget spent" in status.detail
    assert f"max_epsilon={budget:.4g}" in status.detail and "raise the dp_fedavg option max_epsilon" in status.detail
    assert status.detail.endswith("final version 2")
    with sqlite3.connect(orch.state_dir / "orchestrator.sqlite") as conn:
        kinds = conn.execute("SELECT kind, round, state FROM rounds ORDER BY announced_at").fetchall()
    assert kinds == [("train", 1, "done"), ("train", 2, "done"), ("evaluate", 3, "done")]

    # Each site's noise share is the update's part of z (the count took the rest) times C over
    # sqrt(4): the quorum of the round, so the sum of any aggregatable set carries the full noise.
    z_update = split_noise_multiplier(z, count_std)
    first, second = (v.training for v in versions[1:])
    assert first["dp_clip_norm"] == clip
    assert first["dp_noise_share_std"] == pytest.approx(z_update * clip / 2, rel=1e-12)
    # Adaptive clipping moved the bound, and the share followed it.
    assert second["dp_clip_norm"] != clip
    assert second["dp_noise_share_std"] == pytest.approx(z_update * second["dp_clip_norm"] / 2, rel=1e-12)
    assert versions[1].privacy.clip_norm == clip and versions[2].privacy.clip_norm == second["dp_clip_norm"]
    assert versions[2].privacy.mechanism == "dp_fedavg/distributed"
    # The updates carry noise: with 14 coordinates a share adds about sqrt(14) * std to the norm.
    norms = _stored_update_norms(registry)
    assert max(norms.values()) > clip


def _strategy(**options) -> DPFedAvg:
    strategy = DPFedAvg(options, rng=np.random.default_rng(7))
    assert isinstance(make_strategy(StrategyConfig(name="dp_fedavg", options=options)), DPFedAvg)
    return strategy


def test_central_noise_has_std_noise_multiplier_times_clip():
    clip, z, sites, size = 2.0, 1.5, 3, 40_000
    strategy = _strategy(noise="central", clip_norm=clip, noise_multiplier=z)
    aggregation = strategy.begin_round({"w": np.zeros(size, np.float32)}, plan=RoundPlan(selected=sites,
                                                                                         min_reports=sites))
    for i in range(sites):
        aggregation.add(f"s{i}", 100 + i, {"w": np.zeros(size, np.float32)})
    noise = aggregation.finish()["w"].astype(np.float64) * sites  # (sum + noise) / sites, the sum being 0
    # The sample std of 40 000 draws is within 1.5 % of the truth with overwhelming probability.
    assert np.std(noise) == pytest.approx(z * clip, rel=0.015)
    assert abs(np.mean(noise)) < 5 * z * clip / math.sqrt(size)


def test_orchestrator_reclips_uniformly_whatever_the_sample_counts():
    clip = 1.0
    strategy = _strategy(noise="central", clip_norm=clip, noise_multiplier=1e-3)
    direction = np.ones(100, np.float32) / 10.0  # unit norm
    aggregation = strategy.begin_round({"w": np.zeros(100, np.float32)})
    aggregation.add("honest", 10, {"w": direction * 0.5})
    aggregation.add("greedy", 1_000_000, {"w": direction * 1000})  # unclipped and claiming many samples
    result = aggregation.finish()["w"].astype(np.float64)
    # (0.5 + 1.0) / 2 along the direction: clipped to C and weighted like everyone else.
    assert float(result @ direction) == pytest.approx(0.75, abs=0.01)


def test_distributed_shares_sum_to_full_noise_and_the_orchestrator_spares_them():
    z, clip, quorum = 1.2, 0.5, 4
    strategy = _strategy(noise="distributed", clip_norm=clip, noise_multiplier=z)
    plan = RoundPlan(selected=5, min_reports=quorum)
    share = strategy.round_overrides(plan)["dp_noise_share_std"]
    assert share == pytest.approx(z * clip / math.sqrt(quorum))
    rng = np.random.default_rng(3)
    size = 10_000
    updates = {f"s{i}": rng.normal(0, share, size).astype(np.float32) for i in range(quorum)}  # zero signal
    aggregation = strategy.begin_round({"w": np.zeros(size, np.float32)}, plan=plan)
    for site, noise in updates.items():
        aggregation.add(site, 1, {"w": noise})
    result = aggregation.finish()["w"].astype(np.float64)
    # No central noise and no re-clipping of honest noisy shares: exactly their mean.
    np.testing.assert_allclose(result, np.mean(list(updates.values()), axis=0), rtol=1e-5, atol=1e-7)
    assert np.std(result * quorum) == pytest.approx(z * clip, rel=0.03)
    # Fewer than the quorum the shares were calibrated to is refused: the sum would lack noise.
    short = strategy.begin_round({"w": np.zeros(size, np.float32)}, plan=plan)
    short.add("s0", 1, {"w": updates["s0"]})
    with pytest.raises(Exception, match="needs at least 4 update"):
        short.finish()


def test_accounting_history_survives_restarts_and_option_changes():
    strategy = _strategy(noise_multiplier=1.0)
    for _ in range(3):
        aggregation = strategy.begin_round({"w": np.zeros(2, np.float32)})
        aggregation.add("a", 1, {"w": np.ones(2, np.float32)})
        aggregation.finish()
    # A restarted orchestrator with more noise per round composes the old rounds with the new ones.
    restarted = _strategy(noise_multiplier=2.0)
    restarted.load_state(strategy.state())
    aggregation = restarted.begin_round({"w": np.zeros(2, np.float32)})
    aggregation.add("a", 1, {"w": np.ones(2, np.float32)})
    aggregation.finish()
    expected = ClientLevelAccountant(2.0, 1.0, DELTA)
    expected.add_earlier_steps(1.0, 1.0, 3)
    expected.step()
    assert restarted.privacy_spent().steps == 4
    assert restarted.privacy_spent().epsilon == pytest.approx(expected.epsilon(), rel=1e-12)
    with pytest.raises(ValueError, match="another strategy"):
        restarted.load_state({"step": np.array(1)})


@pytest.mark.parametrize(("options", "message"), [
    ({"adaptive_clipping": True}, "needs clip_count_stddev"),
    ({"adaptive_clipping": True, "expected_sites": 4}, "too small for noise_multiplier.*raise clip_count_stddev"),
    ({"noise": "local"}, "noise"),
    ({"max_epsilon": float("inf")}, "max_epsilon"),
    ({"sampling_rate": 0.0}, "sampling_rate"),
])
def test_bad_dp_options_are_refused_with_the_reason(options, message):
    with pytest.raises(ValueError, match=message):
        make_strategy(StrategyConfig(name="dp_fedavg", options=options))


def test_registry_created_before_privacy_gains_the_column(tmp_path):
    db = tmp_path / "orchestrator.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE versions (version INTEGER PRIMARY KEY, sha256 TEXT NOT NULL, parent INTEGER, "
                     "round INTEGER UNIQUE, created_at REAL NOT NULL, size INTEGER NOT NULL, contributors TEXT NOT "
                     "NULL, strategy TEXT NOT NULL, training TEXT NOT NULL, strategy_state TEXT, note TEXT NOT NULL "
                     "DEFAULT '')")
        conn.execute("INSERT INTO versions VALUES (0, 'ab', NULL, NULL, 1.0, 2, '{}', '{}', '{}', NULL, '')")
    (tmp_path / "blobs").mkdir()
    registry = ModelRegistry.open(tmp_path)
    assert registry.get(0).privacy is None


def _agent_record(state_dir: Path) -> AgentRecord:
    return AgentRecord.model_validate_json((state_dir / "agent.json").read_text())


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_dp_sgd_site_keeps_its_ledger_across_a_restart_and_refuses_past_its_budget(mosquitto, tmp_path):
    fed_id, z, batch, rows, steps = "dp-sgd", 1.0, 4, 85, 100
    reference = SampleLevelAccountant(z, batch, rows, DELTA)
    reference.step(2 * steps)
    budget = (reference.epsilon() + reference.epsilon_after(steps)) / 2  # two rounds fit, the third does not
    orch, (cleveland, va) = heart_settings(mosquitto.url, tmp_path, DemoOptions(rounds=3), sites=("cleveland", "va"))
    orch = orch.model_copy(update={"federation": fed_id, "quorum": 1, "round_timeout": 30.0,
                                   "final_evaluation": False})
    cleveland = cleveland.model_copy(update={"federation": fed_id})
    va = va.model_copy(update={"federation": fed_id, "dp_sgd_noise_multiplier": z, "dp_sgd_max_epsilon": budget,
                               "dp_sgd_delta": DELTA})
    with run_federation(orch, [cleveland, va]) as fed:
        journal = fed.orchestrator.journal
        _wait(lambda: len(journal.updates(f"{fed_id}-r1-a1")) == 2, 60, "both round 1 updates")
        fed.stop("va")
        after_one = _agent_record(va.state_dir).dp_sgd_spent
        # The stop lands after round 1, or after round 2 if that was announced and trained meanwhile.
        assert after_one.steps in (steps, 2 * steps)
        assert after_one.level == "sample" and after_one.mechanism == "dp_sgd"
        assert after_one.sampling_rate == batch / rows and after_one.max_epsilon == budget

        restarted = fed.start_agent(va)  # a new process on the same state directory
        assert restarted._status_message("idle").privacy == after_one, "the restarted agent forgot its epsilon"
        _wait(lambda: len(journal.updates(f"{fed_id}-r2-a1")) == 2, 60, "both round 2 updates")
        after_two = _agent_record(va.state_dir).dp_sgd_spent
        # Round 2's steps were composed with round 1's, not counted from zero.
        assert after_two.steps == 2 * steps
        assert after_two.epsilon == pytest.approx(reference.epsilon(), rel=1e-12)
        stored = {u.site: u for u in journal.updates(f"{fed_id}-r2-a1")}
        assert stored["va"].report.privacy == after_two
        assert "loss_mean" not in stored["va"].report.train_metrics, "DP-SGD site leaked its training loss"

        _wait(lambda: restarted.current_state == "error", 60, "the site to refuse round 3")
        status = retained(mosquitto.url, fed_id, Topics(fed_id).site("va", "status"), SiteStatus)
        assert [u.site for u in journal.updates(f"{fed_id}-r3-a1")] in ([], ["cleveland"])
    assert status.state == "error" and status.detail.startswith("privacy budget spent: round 3 was refused")
    assert "raises dp_sgd_max_epsilon" in status.detail
    assert status.privacy == after_two
    assert _agent_record(va.state_dir).dp_sgd_spent == after_two, "the refused round was charged"
