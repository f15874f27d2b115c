"""A hospital's client-level DP floor: rounds asking for less are refused by the site, not negotiated.

The orchestrator decides the round's clip norm and distributed noise share, but each hospital
may set the least it accepts (``FEDMQ_DP_MAX_CLIP_NORM``, ``FEDMQ_DP_MIN_NOISE_SHARE_STD``).
Unit tests pin the rule; the federation tests run over a real Mosquitto and check what the
orchestrator sees: the refusing site's error status for the round (so the round does not wait
for it), the other sites' rounds completing with their quorum, and not one update message from
the refusing site.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import pytest

from edge_agent.agent import check_client_dp_floor
from edge_agent.trainer import TrainingError
from fedmq.demo import DemoOptions, heart_settings, with_secure_aggregation
from fedmq.inprocess import run_federation
from orchestrator.registry import ModelRegistry
from shared.blobs import make_manifest
from shared.config import AgentSettings, load_settings
from shared.protocol import (ProtocolError, RoundCommand, SecureAggregationRound, SiteStatus, TaskSpec,
                             TrainingConfig, UpdateReport, parse_message)
from shared.topics import Topics
from shared.transport import Transport


def _agent(tmp_path: Path, **floor) -> AgentSettings:
    return AgentSettings(site_id="a", data_train=tmp_path / "train.csv", **floor)


def _train_round(**training) -> RoundCommand:
    return RoundCommand(federation="demo", sender="orchestrator", round=3, attempt=1, round_id="demo-r3-a1",
                        model_version=2, model_sha256="0" * 64, model=make_manifest(b"model", "application/onnx"),
                        selected=["a", "b", "c"], training=TrainingConfig(**training),
                        task=TaskSpec(features=["x"], label="y"), deadline=time.time() + 60)


def test_without_a_floor_the_site_follows_the_round(tmp_path):
    site = _agent(tmp_path)
    for training in ({}, {"dp_clip_norm": 100.0}, {"dp_clip_norm": 0.1, "dp_noise_share_std": 1e-9}):
        try:
            check_client_dp_floor(site, _train_round(**training))
        except TrainingError as e:
            pytest.fail(f"a site without a floor refused a round asking for {training or 'no DP'}: {e}")


def test_a_clip_ceiling_refuses_rounds_without_clipping_or_with_a_larger_bound(tmp_path):
    site = _agent(tmp_path, dp_max_clip_norm=1.0)
    with pytest.raises(TrainingError, match="asks for no client-level DP at all") as refused:
        check_client_dp_floor(site, _train_round())
    message = str(refused.value)
    assert "this site requires client-level DP" in message and "demo-r3-a1" in message
    assert "nothing was sent" in message and "raise FEDMQ_DP_MAX_CLIP_NORM" in message
    with pytest.raises(TrainingError, match="asks for a clip norm of 1.5"):
        check_client_dp_floor(site, _train_round(dp_clip_norm=1.5))
    # At or under the ceiling the round is fine, with or without noise (no noise floor set).
    check_client_dp_floor(site, _train_round(dp_clip_norm=1.0))
    check_client_dp_floor(site, _train_round(dp_clip_norm=0.2, dp_noise_share_std=0.01))


def test_a_noise_floor_refuses_smaller_shares_central_noise_and_a_larger_clip(tmp_path):
    site = _agent(tmp_path, dp_max_clip_norm=1.0, dp_min_noise_share_std=0.3)
    with pytest.raises(TrainingError, match="asks for a noise share std of 0.2") as refused:
        check_client_dp_floor(site, _train_round(dp_clip_norm=1.0, dp_noise_share_std=0.2))
    assert "lower FEDMQ_DP_MIN_NOISE_SHARE_STD" in str(refused.value)
    assert "noise 'distributed'" in str(refused.value)
    # Central DP: the orchestrator would add the noise, which the site cannot check.
    with pytest.raises(TrainingError, match="no noise added by the sites"):
        check_client_dp_floor(site, _train_round(dp_clip_norm=0.5))
    with pytest.raises(TrainingError, match="a clip norm of 2 and a noise share std of 0.1"):
        check_client_dp_floor(site, _train_round(dp_clip_norm=2.0, dp_noise_share_std=0.1))
    with pytest.raises(TrainingError, match="no client-level DP at all"):
        check_client_dp_floor(site, _train_round())
    check_client_dp_floor(site, _train_round(dp_clip_norm=1.0, dp_noise_share_std=0.3))
    check_client_dp_floor(site, _train_round(dp_clip_norm=0.5, dp_noise_share_std=0.4))


def test_secure_aggregation_rounds_meet_the_same_floor(tmp_path):
    site = _agent(tmp_path, dp_max_clip_norm=1.0, dp_min_noise_share_std=0.3)
    secure = SecureAggregationRound(threshold=2, bound=4.0, index_seed=secrets.token_hex(32))
    with pytest.raises(TrainingError, match="a noise share std of 0.1"):
        check_client_dp_floor(site, _train_round(dp_clip_norm=1.0, dp_noise_share_std=0.1,
                                                 secure_aggregation=secure))
    with pytest.raises(TrainingError, match="no client-level DP at all"):
        check_client_dp_floor(site, _train_round(secure_aggregation=secure))
    check_client_dp_floor(site, _train_round(dp_clip_norm=1.0, dp_noise_share_std=0.5, secure_aggregation=secure))


def test_the_floor_is_a_site_setting_and_a_noise_floor_needs_a_clip_ceiling(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMQ_DP_MAX_CLIP_NORM", "0.8")
    monkeypatch.setenv("FEDMQ_DP_MIN_NOISE_SHARE_STD", "0.25")
    settings = load_settings(AgentSettings, site_id="a", data_train=tmp_path / "train.csv")
    assert (settings.dp_max_clip_norm, settings.dp_min_noise_share_std) == (0.8, 0.25)
    monkeypatch.delenv("FEDMQ_DP_MAX_CLIP_NORM")
    with pytest.raises(ValueError, match="dp_min_noise_share_std needs dp_max_clip_norm"):
        load_settings(AgentSettings, site_id="a", data_train=tmp_path / "train.csv")
    with pytest.raises(ValueError):
        _agent(tmp_path, dp_max_clip_norm=0.0)


# -- over Mosquitto ---------------------------------------------------------------------------------

CLIP, Z, QUORUM = 0.5, 0.5, 3
SHARE = Z * CLIP / QUORUM ** 0.5  # what dp_fedavg asks of each site: 0.144


def _floored_heart(broker_url: str, root: Path, federation: str, floors: dict[str, dict], *, secure: bool):
    orch, agents = heart_settings(broker_url, root, DemoOptions(rounds=1))
    strategy = {"name": "dp_fedavg", "options": {"noise": "distributed", "clip_norm": CLIP, "noise_multiplier": Z}}
    orch = orch.model_copy(update={"federation": federation, "strategy": strategy, "quorum": QUORUM,
                                   "round_timeout": 600.0})
    agents = [a.model_copy(update={"federation": federation, **floors.get(a.site_id, {})}) for a in agents]
    if secure:
        orch, agents = with_secure_aggregation(orch, agents, root / "pki", phase_timeout=600.0)
    return orch, agents


def _sent_by(transport: Transport) -> list[tuple[str, object]]:
    """Everything one site published while the federation ran: (topic, parsed message or raw chunk)."""
    sent = []
    while (msg := transport.get(0.5)) is not None:
        if Topics.is_chunk(msg.topic):
            sent.append((msg.topic, msg.payload))
            continue
        try:
            sent.append((msg.topic, parse_message(msg.payload)))
        except ProtocolError:
            sent.append((msg.topic, msg.payload))
    return sent


@pytest.mark.parametrize("secure", [False, True], ids=["distributed_noise", "secure_aggregation"])
def test_a_site_whose_floor_the_round_misses_refuses_and_the_others_complete(mosquitto, tmp_path, caplog, secure):
    federation = f"floor-{'secure' if secure else 'plain'}"
    floors = {"va": {"dp_max_clip_norm": 1.0, "dp_min_noise_share_std": 3 * SHARE},  # asks three times more
              "cleveland": {"dp_max_clip_norm": CLIP, "dp_min_noise_share_std": SHARE * 0.99}}  # met
    orch, agents = _floored_heart(mosquitto.url, tmp_path, federation, floors, secure=secure)
    topics = Topics(federation)
    with Transport(orch, f"test-{federation}-watch-va", persistent_session=False) as watch:
        watch.subscribe(f"{topics.base}/site/va/#")
        with run_federation(orch, agents) as fed:
            # The deadline is 600 s: finishing at all means the round stopped waiting for va.
            fed.wait_finished(timeout=120)
            journal = fed.orchestrator.journal
            updates = {u.site for u in journal.updates(f"{federation}-r1-a1")}
            evaluation = journal.done("evaluate")[-1].round_id
            evaluated = {u.site for u in journal.updates(evaluation)}
        sent = _sent_by(watch)

    registry = ModelRegistry.open(orch.state_dir)
    assert [v.version for v in registry.list()] == [0, 1]
    assert set(registry.get(1).contributors) == {"cleveland", "hungary", "switzerland"}
    assert updates == {"cleveland", "hungary", "switzerland"}
    assert registry.get(1).training["dp_noise_share_std"] == pytest.approx(SHARE)

    # va said why, for that round, on its retained status; and it published nothing else but status.
    errors = [m for _, m in sent if isinstance(m, SiteStatus) and m.state == "error"]
    assert errors and errors[0].round_id == f"{federation}-r1-a1", sent
    assert "this site requires client-level DP" in errors[0].detail
    assert "lower FEDMQ_DP_MIN_NOISE_SHARE_STD" in errors[0].detail
    reports = [m for _, m in sent if isinstance(m, UpdateReport)]
    assert [(r.round_id, r.update) for r in reports] == [(evaluation, None)], "va sent an update for training"
    allowed = {topics.site("va", n) for n in ("status", "request", "update")}  # request: missing model chunks
    assert {topic for topic, _ in sent} <= allowed, f"va published more: {sorted({t for t, _ in sent})}"
    # Still up: va scored the final version in the evaluation round that followed.
    assert "va" in evaluated
    logged = [r.getMessage() for r in caplog.records]
    assert any("this site requires client-level DP" in m for m in logged), "the refusal must be in the agent's log"
    if not secure:
        assert any("aggregating without ['va'], which reported errors" in m for m in logged), logged


def test_too_many_refusals_fail_the_round_at_once_with_the_sites_reasons(mosquitto, tmp_path):
    federation = "floor-no-quorum"
    too_high = {"dp_max_clip_norm": 1.0, "dp_min_noise_share_std": 1.0}
    orch, agents = _floored_heart(mosquitto.url, tmp_path, federation, {"va": too_high, "hungary": too_high},
                                  secure=False)
    orch = orch.model_copy(update={"max_attempts": 1})
    with run_federation(orch, agents) as fed:
        fed.wait_finished(timeout=120)  # deadline 600 s: it did not wait
        state, detail = fed.orchestrator.journal.conn.execute(
            "SELECT state, detail FROM rounds WHERE round_id = ?", (f"{federation}-r1-a1",)).fetchone()
    assert state == "failed"
    assert f"cannot reach its quorum of {QUORUM}" in detail and "['hungary', 'va']" in detail, detail
    assert "this site requires client-level DP" in detail, "the operator must see the sites' reason"
    assert [v.version for v in ModelRegistry.open(orch.state_dir).list()] == [0]
