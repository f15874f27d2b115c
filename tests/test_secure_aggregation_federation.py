"""Secure aggregation as a round mode over a real Mosquitto: the orchestrator learns only the sum.

Four Heart Disease hospitals with federation certificates from ``fedmq pki``. The sites' exact
fixed-point inputs are captured in the test (``UpdateLayout.pack`` runs in each agent's thread)
so the new global version can be checked against the plain weighted mean of what the sites
meant to send, while the orchestrator itself stored only masked vectors.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_agent.agent import EdgeAgent
from fedmq.demo import DemoOptions, heart_settings, with_secure_aggregation
from fedmq.inprocess import run_federation
from orchestrator.registry import ModelRegistry
from shared.codec import CodecError, decode_tensors
from shared.onnx_model import float_initializers, load_model_bytes
from shared.pki import FederationPki
from shared.privacy.secagg_layout import UpdateLayout
from shared.protocol import OrchestratorStatus, SecAggShares, SecAggUnmask
from shared.topics import Topics
from tests.mqtt_helpers import retained

SITES = ("cleveland", "hungary", "switzerland", "va")


def _secure_heart(broker_url: str, root: Path, federation: str, rounds: int, *, strategy: dict | None = None,
                  secure: dict | None = None, **orchestrator):
    orch, agents = heart_settings(broker_url, root, DemoOptions(rounds=rounds))
    orch = orch.model_copy(update={"federation": federation, "strategy": strategy or {"name": "fedavg"},
                                   **orchestrator})
    agents = [a.model_copy(update={"federation": federation}) for a in agents]
    return with_secure_aggregation(orch, agents, root / "pki", phase_timeout=3.0, **(secure or {}))


@pytest.fixture
def captured(monkeypatch):
    """Each site's float vector (weight * update, weight) just before it is quantized and masked."""
    vectors: dict[str, list[np.ndarray]] = {}
    positions: dict[str, list[np.ndarray | None]] = {}
    vectors_and_positions = (vectors, positions)
    original = UpdateLayout.pack

    def pack(self, update, weight):
        vector = original(self, update, weight)
        vectors.setdefault(threading.current_thread().name, []).append(vector)
        positions.setdefault(threading.current_thread().name, []).append(self.indices)
        return vector

    monkeypatch.setattr(UpdateLayout, "pack", pack)
    return vectors_and_positions


def _drop_shares_at(monkeypatch, dropped: set[str]) -> None:
    """These sites lose their link after sharing keys: their peers' shares (and so their mask) never come."""
    original = EdgeAgent._on_secure_step

    def on_step(self, message):
        if self.site in dropped and isinstance(message, SecAggShares):
            return
        original(self, message)

    monkeypatch.setattr(EdgeAgent, "_on_secure_step", on_step)


def _step(registry: ModelRegistry, version: int) -> np.ndarray:
    """The change from the previous version, flattened in the secure layout's order (sorted names)."""
    new = float_initializers(load_model_bytes(registry.model_bytes(version)))
    old = float_initializers(load_model_bytes(registry.model_bytes(version - 1)))
    return np.concatenate([(new[k].astype(np.float64) - old[k]).ravel() for k in sorted(new)])


@pytest.mark.parametrize("strategy, secure", [
    ({"name": "fedavg"}, {}),
    ({"name": "fedavg"}, {"index_fraction": 0.5}),
    ({"name": "dp_fedavg", "options": {"noise": "distributed", "clip_norm": 0.5, "noise_multiplier": 0.5}}, {}),
], ids=["fedavg", "fedavg_shared_index_set", "dp_fedavg_distributed"])
def test_secure_round_yields_the_weighted_mean_and_stores_only_masked_vectors(mosquitto, tmp_path, captured,
                                                                              strategy, secure):
    captured, positions = captured
    federation = f"sa-{strategy['name'].replace('_', '-')}{'-sparse' if secure else ''}"
    orch, agents = _secure_heart(mosquitto.url, tmp_path, federation, 2, strategy=strategy, secure=secure)
    with run_federation(orch, agents) as fed:
        fed.wait_finished(timeout=120)
        journal = fed.orchestrator.journal
        stored = {u.site: u for r in (1, 2) for u in journal.updates(f"{federation}-r{r}-a1") if r == 1}
    registry = ModelRegistry.open(orch.state_dir)
    assert [v.version for v in registry.list()] == [0, 1, 2]
    assert set(registry.get(1).contributors) == set(SITES)
    assert set(captured) == set(SITES) and all(len(v) == 2 for v in captured.values())

    for version in (1, 2):
        sent = [captured[site][version - 1] for site in SITES]
        total = np.sum(sent, axis=0)
        expected = total[:-1] / total[-1]
        step = _step(registry, version)
        indices = {None if p is None else p.tobytes() for p in (positions[s][version - 1] for s in SITES)}
        assert len(indices) == 1, "every site must send the same positions"
        index = positions[SITES[0]][version - 1]
        if secure.get("index_fraction"):
            assert index is not None and index.size == round(secure["index_fraction"] * step.size)
            outside = np.setdiff1d(np.arange(step.size), index)
            assert np.all(step[outside] == 0), "positions outside the round's index set must not move"
            step = step[index]
        else:
            assert index is None
        # One quantization step per site at most: bound 4 over (2^31 - 1) // 4 levels.
        np.testing.assert_allclose(step, expected, rtol=0, atol=4 * 4 / (2**31 // 4) + 1e-7)
    if strategy["name"] == "dp_fedavg":
        privacy = registry.get(2).privacy
        assert privacy is not None and privacy.mechanism == "dp_fedavg/distributed" and privacy.steps == 2
        assert all(v[-1] == 1.0 for vs in captured.values() for v in vs), "DP weights every site equally"
    else:
        weights = [captured[site][0][-1] for site in SITES]
        assert all(0 < w < 1 for w in weights) and len(set(weights)) == 4, "weights follow sample counts"

    # What the orchestrator holds is a masked ring vector, not an update in any codec format.
    shapes = {k: v.shape for k, v in float_initializers(load_model_bytes(registry.model_bytes(0))).items()}
    for site, update in stored.items():
        blob = registry.blobs.get(update.blob)
        first = positions[site][0]
        positions_sent = first.size if first is not None else sum(int(np.prod(s)) for s in shapes.values())
        assert len(blob) == 4 * (positions_sent + 1)
        with pytest.raises(CodecError):
            decode_tensors(blob, shapes, max_decoded_bytes=1 << 20)
        masked = np.frombuffer(blob, dtype="<u4").astype(np.float64)
        assert masked.max() > 2**28, f"{site}'s stored vector looks unmasked: {masked[:5]}"


def test_a_site_dropping_after_sharing_keys_is_recovered_without_its_input(mosquitto, tmp_path, captured,
                                                                          monkeypatch):
    captured, _ = captured
    _drop_shares_at(monkeypatch, {"va"})
    orch, agents = _secure_heart(mosquitto.url, tmp_path, "sa-dropout", 1, quorum=3)
    with run_federation(orch, agents) as fed:
        fed.wait_finished(timeout=120)
    registry = ModelRegistry.open(orch.state_dir)
    assert [v.version for v in registry.list()] == [0, 1]
    survivors = ("cleveland", "hungary", "switzerland")
    assert set(registry.get(1).contributors) == set(survivors)
    total = np.sum([captured[site][0] for site in survivors], axis=0)
    np.testing.assert_allclose(_step(registry, 1), total[:-1] / total[-1], rtol=0, atol=1e-6)
    # va's update was quantized but never left: the sum above excludes it, and it differs.
    with_va = total + captured["va"][0]
    assert not np.allclose(_step(registry, 1), with_va[:-1] / with_va[-1], rtol=0, atol=1e-6)


def test_fewer_survivors_than_the_threshold_fail_the_round_and_reveal_nothing(mosquitto, tmp_path, monkeypatch):
    _drop_shares_at(monkeypatch, {"hungary", "va"})
    reveals = []
    original = EdgeAgent._on_secure_step

    def spy(self, message):
        if isinstance(message, SecAggUnmask):
            reveals.append(self.site)
        original(self, message)

    monkeypatch.setattr(EdgeAgent, "_on_secure_step", spy)
    orch, agents = _secure_heart(mosquitto.url, tmp_path, "sa-threshold", 1, max_attempts=1, quorum=2)
    with run_federation(orch, agents) as fed:
        fed.wait_finished(timeout=120)
        state, detail = fed.orchestrator.journal.conn.execute(
            "SELECT state, detail FROM rounds WHERE round_id = 'sa-threshold-r1-a1'").fetchone()
    assert state == "failed"
    assert "secure aggregation failed in phase 'mask'" in detail
    assert "only 2 masked inputs, below the threshold 3" in detail, detail
    assert reveals == [], "no unmasking request may go out below the threshold"
    assert [v.version for v in ModelRegistry.open(orch.state_dir).list()] == [0]
    status = retained(mosquitto.url, "sa-threshold", Topics("sa-threshold").orchestrator_status, OrchestratorStatus)
    assert status.state == "finished" and "failed 1 attempts" in status.detail


def test_keys_vouched_for_by_another_ca_are_refused_and_the_round_goes_on(mosquitto, tmp_path):
    orch, agents = _secure_heart(mosquitto.url, tmp_path, "sa-intruder", 1, quorum=3, round_timeout=20.0)
    other = FederationPki.init(tmp_path / "other-pki", "sa-intruder")  # same federation name, another CA
    forged = other.issue_site("va")
    agents = [a.model_copy(update={"identity_cert": forged.cert_path, "identity_key": forged.key_path,
                                   "identity_ca": other.ca_cert_path}) if a.site_id == "va" else a
              for a in agents]
    with run_federation(orch, agents) as fed:
        fed.wait_finished(timeout=120)
        rejected = fed.orchestrator.rejected
    registry = ModelRegistry.open(orch.state_dir)
    assert [v.version for v in registry.list()] == [0, 1]
    assert set(registry.get(1).contributors) == {"cleveland", "hungary", "switzerland"}
    assert rejected >= 1, "the orchestrator must refuse keys whose certificate does not chain to its CA"


def test_a_site_without_an_identity_is_not_waited_for(mosquitto, tmp_path):
    orch, agents = _secure_heart(mosquitto.url, tmp_path, "sa-no-identity", 1, quorum=3, round_timeout=600.0)
    agents = [a.model_copy(update={"identity_cert": None, "identity_key": None}) if a.site_id == "va" else a
              for a in agents]
    started = time.monotonic()
    with run_federation(orch, agents) as fed:
        fed.wait_finished(timeout=120)
    assert time.monotonic() - started < 120, "the round waited for its 600 s deadline"
    registry = ModelRegistry.open(orch.state_dir)
    assert set(registry.get(1).contributors) == {"cleveland", "hungary", "switzerland"}


@pytest.mark.parametrize("site_has_crl", [False, True], ids=["stale_site", "site_knows"])
def test_a_revoked_site_takes_no_part(mosquitto, tmp_path, caplog, site_has_crl):
    """va's certificate is revoked after issue. Without the new CRL, va advertises keys and the
    orchestrator refuses them ("revoked"); with it, va refuses itself and says so for the round,
    so the round does not wait for its deadline."""
    federation = f"sa-revoked-{'known' if site_has_crl else 'stale'}"
    orch, agents = _secure_heart(mosquitto.url, tmp_path, federation, 1, quorum=3,
                                 round_timeout=600.0 if site_has_crl else 15.0)
    FederationPki(tmp_path / "pki").revoke("va")
    if not site_has_crl:
        stale = tmp_path / "va-trust" / "ca.crt"  # va was handed ca.crt before the revocation, no crl.pem
        stale.parent.mkdir()
        shutil.copy(tmp_path / "pki" / "ca.crt", stale)
        agents = [a.model_copy(update={"identity_ca": stale}) if a.site_id == "va" else a for a in agents]
    with run_federation(orch, agents) as fed:
        fed.wait_finished(timeout=120)
        rejected = fed.orchestrator.rejected
    registry = ModelRegistry.open(orch.state_dir)
    assert [v.version for v in registry.list()] == [0, 1]
    assert set(registry.get(1).contributors) == {"cleveland", "hungary", "switzerland"}
    logged = [r.getMessage() for r in caplog.records]
    refused_by_orchestrator = [m for m in logged if m.startswith("refused from site va (secagg") and "revoked" in m]
    if site_has_crl:
        assert any("cannot use this site's identity for secure aggregation" in m and "revoked" in m
                   for m in logged), logged
        assert not refused_by_orchestrator, "va must not advertise keys its own CRL says nobody accepts"
    else:
        assert rejected >= 1 and refused_by_orchestrator, logged
