"""The secure round's message checks on both sides, without a broker: each bad message is refused alone.

The orchestrator (``SecureRound``) must refuse keys that no federation certificate vouches
for, and the agent (``SecureUpdate``) must refuse a roster in which the orchestrator slipped
in keys of its own: otherwise a curious orchestrator could unmask single updates. The full
protocol over Mosquitto is in ``test_secure_aggregation_federation.py``.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import numpy as np
import pytest

from edge_agent.secure_update import SecureUpdate, SecureUpdateError, SiteIdentity
from orchestrator.architectures import build_onnx
from orchestrator.journal import RoundJournal
from orchestrator.registry import ModelRegistry, open_database
from orchestrator.rounds import RoundEngine
from orchestrator.secure_round import SecureRound, SecureRoundError
from orchestrator.strategies import StrategyConfig, make_strategy
from shared.blobs import make_manifest
from shared.blobstore import BlobStore
from shared.compression import ErrorFeedback
from shared.config import AgentSettings, OrchestratorSettings, SecureAggregationSettings
from shared.pki import FederationPki, FederationTrust, load_ca_certificate, load_identity_key
from shared.privacy.secagg import quantize
from shared.privacy.secagg_layout import UpdateLayout
from shared.protocol import (RoundCommand, SecAggKeys, SecAggRoster, SecAggShares,
                             SecureAggregationRound, TaskSpec, TrainingConfig, UpdateReport)

SITES = ["a", "b", "c"]
SHAPES = {"w": (3, 2), "b": (2,)}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> FederationPki:
    pki = FederationPki.init(tmp_path_factory.mktemp("pki"), "demo")
    for site in SITES:
        pki.issue_site(site)
    return pki


def _identity(pki: FederationPki, site: str) -> SiteIdentity:
    return SiteIdentity(pki.cert_path(site).read_text(), load_identity_key(pki.key_path(site)),
                        FederationTrust(pki.ca_cert, pki.crl_path))


def _command(**secure) -> RoundCommand:
    settings = SecureAggregationRound(threshold=2, bound=4.0, index_seed=secrets.token_hex(32), **secure)
    return RoundCommand(federation="demo", sender="orchestrator", round=1, attempt=1, round_id="demo-r1-a1",
                        model_version=0, model_sha256="0" * 64, model=make_manifest(b"model", "application/onnx"),
                        selected=SITES, training=TrainingConfig(secure_aggregation=settings),
                        task=TaskSpec(features=["x"], label="y"), deadline=time.time() + 60)


def _session(pki: FederationPki, cmd: RoundCommand, site: str) -> SecureUpdate:
    layout = UpdateLayout.for_round(SHAPES, [], cmd.training.secure_aggregation)
    update = {k: np.full(s, 0.1, dtype=np.float32) for k, s in SHAPES.items()}
    vector = quantize(layout.pack(update, 1.0), 4.0, len(SITES))
    report = UpdateReport(federation="demo", sender=site, round_id=cmd.round_id, round=1, base_version=0,
                          num_samples=10)
    return SecureUpdate(site, cmd, vector, report, _identity(pki, site))


def _round(pki: FederationPki, cmd: RoundCommand) -> SecureRound:
    return SecureRound(cmd, UpdateLayout.for_round(SHAPES, [], cmd.training.secure_aggregation),
                       FederationTrust(pki.ca_cert, pki.crl_path), time.time)


def test_the_orchestrator_refuses_keys_without_a_valid_federation_certificate(pki, tmp_path):
    cmd = _command()
    server = _round(pki, cmd)
    advert = _session(pki, cmd, "a").advert()
    server.on_advert("a", advert)

    other = FederationPki.init(tmp_path / "other", "demo")
    forged = other.issue_site("b")
    session_b = _session(pki, cmd, "b")
    advert_b = session_b.advert()
    with_foreign_cert = advert_b.model_copy(update={"keys": advert_b.keys.model_copy(
        update={"certificate": forged.cert_path.read_text()})})
    with pytest.raises(SecureRoundError, match="does not chain to the federation CA"):
        server.on_advert("b", with_foreign_cert)
    # c's genuine certificate with keys signed by someone else (here b): the signature fails.
    with_c_cert = advert_b.model_copy(update={"keys": advert_b.keys.model_copy(
        update={"site": "c", "certificate": pki.cert_path("c").read_text()})})
    with pytest.raises(SecureRoundError, match="does not verify"):
        server.on_advert("c", with_c_cert)
    # b's certificate presented as a's: the name does not match.
    stolen = advert_b.model_copy(update={"keys": advert_b.keys.model_copy(update={"site": "c"})})
    with pytest.raises(SecureRoundError, match="names \\['b'\\], not that site"):
        server.on_advert("c", stolen)
    with pytest.raises(SecureRoundError, match="already advertised"):
        server.on_advert("a", advert)
    with pytest.raises(SecureRoundError, match="not selected"):
        server.on_advert("z", advert)
    server.on_advert("b", advert_b)  # the genuine one still gets in after the forgeries
    assert server.waiting_for == ["c"]


def test_the_agent_refuses_a_roster_with_substituted_keys(pki):
    cmd = _command()
    sessions = {s: _session(pki, cmd, s) for s in SITES}
    keys = [sessions[s].advert().keys for s in SITES]
    genuine = SecAggRoster(federation="demo", sender="orchestrator", round_id=cmd.round_id, keys=keys)

    # The orchestrator swaps c's encryption key for one it holds the private key of.
    swapped = [k if k.site != "c" else k.model_copy(update={"encryption_public": secrets.token_bytes(32)})
               for k in keys]
    with pytest.raises(SecureUpdateError, match="does not verify"):
        _session(pki, cmd, "a").on_roster(genuine.model_copy(update={"keys": swapped}))
    # ... or invents a site with its own certificate authority.
    impostor = SecAggKeys(site="c", encryption_public=secrets.token_bytes(32), mask_public=secrets.token_bytes(32),
                          signature=b"x" * 64, certificate=pki.cert_path("orchestrator").read_text())
    with pytest.raises(SecureUpdateError, match="names \\['orchestrator'\\]"):
        _session(pki, cmd, "b").on_roster(genuine.model_copy(update={"keys": [*keys[:2], impostor]}))
    shares = sessions["a"].on_roster(genuine)
    assert sorted(s.peer for s in shares.shares) == ["b", "c"]


def test_a_revoked_certificate_vouches_for_nothing_at_the_orchestrator_nor_at_peers(tmp_path):
    own = FederationPki.init(tmp_path / "pki", "demo")
    for site in SITES:
        own.issue_site(site)
    cmd = _command()
    sessions = {s: _session(own, cmd, s) for s in SITES}
    keys = [sessions[s].advert().keys for s in SITES]  # all advertised before c's revocation reached anyone
    server = _round(own, cmd)
    own.revoke("c")
    with pytest.raises(SecureRoundError, match="site c .* was revoked on"):
        server.on_advert("c", sessions["c"].advert())
    server.on_advert("a", sessions["a"].advert())
    assert server.waiting_for == ["b", "c"]
    # An orchestrator that puts c's keys in the roster anyway: every peer refuses the roster.
    roster = SecAggRoster(federation="demo", sender="orchestrator", round_id=cmd.round_id, keys=keys)
    with pytest.raises(SecureUpdateError, match="refusing the roster: .*site c .* was revoked"):
        sessions["a"].on_roster(roster)
    # And c itself, told by its CRL, takes no part rather than advertise keys nobody accepts.
    settings = AgentSettings(site_id="c", data_train=tmp_path / "t.csv", tls_ca=own.ca_cert_path,
                             tls_cert=own.cert_path("c"), tls_key=own.key_path("c"))
    with pytest.raises(SecureUpdateError, match="cannot use this site's identity .* revoked"):
        SiteIdentity.from_settings(settings)
    assert SiteIdentity.from_settings(settings.model_copy(update={"site_id": "a", "tls_cert": own.cert_path("a"),
                                                                  "tls_key": own.key_path("a")}))


def test_masked_updates_and_shares_are_checked_before_they_count(pki):
    cmd = _command()
    server = _round(pki, cmd)
    sessions = {s: _session(pki, cmd, s) for s in SITES}
    with pytest.raises(SecureRoundError, match="arrived in phase 'advertise'"):
        server.accept_masked("a", b"\0" * 4 * server.layout.vector_length)
    for site, session in sessions.items():
        server.on_advert(site, session.advert())

    class Outbox:
        def __init__(self) -> None:
            self.broadcast, self.direct = [], {}

        def secagg_broadcast(self, message) -> None:
            self.broadcast.append(message)

        def secagg_to_site(self, site, message) -> None:
            self.direct[site] = message

    out = Outbox()
    server.advance(out, quorum=2)
    assert server.phase == "share" and isinstance(out.broadcast[-1], SecAggRoster)
    shares = {s: sessions[s].on_roster(out.broadcast[-1]) for s in SITES}
    with pytest.raises(SecureRoundError, match="one share set to each other site"):
        server.on_shares("a", shares["a"].model_copy(update={"shares": shares["a"].shares[:1]}))
    for site in SITES:
        server.on_shares(site, shares[site])
    server.advance(out, quorum=2)
    assert server.phase == "mask" and set(out.direct) == set(SITES)
    assert isinstance(out.direct["a"], SecAggShares)
    masked = sessions["a"].on_shares(out.direct["a"])
    with pytest.raises(SecureRoundError, match="the round needs 36 \\(9 uint32 values\\)"):
        server.accept_masked("a", masked[:-4])
    server.accept_masked("a", masked)
    with pytest.raises(SecureRoundError, match="already sent its masked update"):
        server.accept_masked("a", masked)
    assert server.waiting_for == ["b", "c"]


def test_an_orchestrator_restarted_mid_secure_round_retries_it_with_fresh_keys(pki, tmp_path):
    settings = OrchestratorSettings(state_dir=tmp_path, task_features=["x"], rounds=1, min_sites=3,
                                    secure_aggregation=SecureAggregationSettings(enabled=True,
                                                                                 identity_ca=pki.ca_cert_path))
    conn = open_database(tmp_path / "orchestrator.sqlite")
    journal = RoundJournal(conn)
    registry = ModelRegistry(conn, BlobStore(tmp_path / "blobs"))
    training = TrainingConfig(secure_aggregation=_command().training.secure_aggregation)
    journal.begin(round_id="demo-r1-a1", round=1, attempt=1, kind="train", base_version=0, selected=SITES,
                  training=training.model_dump(mode="json"), deadline=time.time() + 60)

    class Quiet:
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    engine = RoundEngine(settings, registry, journal, make_strategy(StrategyConfig()), Quiet())
    engine.start(_tiny_model)
    assert engine.current is None
    state, detail = conn.execute("SELECT state, detail FROM rounds WHERE round_id='demo-r1-a1'").fetchone()
    assert state == "failed" and "retrying the round with fresh keys" in detail


def test_secure_aggregation_refuses_strategies_that_need_each_update(pki, tmp_path):
    settings = OrchestratorSettings(state_dir=tmp_path, task_features=["x"],
                                    secure_aggregation=SecureAggregationSettings(enabled=True,
                                                                                 identity_ca=pki.ca_cert_path))
    conn = open_database(tmp_path / "orchestrator.sqlite")
    with pytest.raises(ValueError, match="'median' needs each site's update"):
        RoundEngine(settings, ModelRegistry(conn, BlobStore(tmp_path / "blobs")), RoundJournal(conn),
                    make_strategy(StrategyConfig(name="median")), None)
    with pytest.raises(ValueError, match="identity_ca"):
        OrchestratorSettings(secure_aggregation=SecureAggregationSettings(enabled=True))


def _tiny_model() -> bytes:
    return build_onnx("logreg", num_features=1, num_outputs=1)


def test_the_ca_loader_says_what_to_do(tmp_path: Path):
    with pytest.raises(ValueError, match="fedmq pki init"):
        load_ca_certificate(tmp_path / "missing.crt")


def test_a_site_signs_with_its_tls_identity_unless_told_otherwise(pki, tmp_path):
    tls = AgentSettings(site_id="a", data_train=tmp_path / "t.csv", tls_ca=pki.ca_cert_path,
                        tls_cert=pki.cert_path("a"), tls_key=pki.key_path("a"))
    assert SiteIdentity.from_settings(tls).certificate_pem == pki.cert_path("a").read_text()
    # b's files configured for site a: refused before any key leaves the site.
    wrong = tls.model_copy(update={"identity_cert": pki.cert_path("b"), "identity_key": pki.key_path("b")})
    with pytest.raises(SecureUpdateError, match="names \\['b'\\], not that site"):
        SiteIdentity.from_settings(wrong)
    with pytest.raises(SecureUpdateError, match="FEDMQ_TLS_CERT"):
        SiteIdentity.from_settings(AgentSettings(site_id="a", data_train=tmp_path / "t.csv"))


def test_error_feedback_carries_positions_outside_the_shared_index_set(tmp_path):
    settings = SecureAggregationRound(threshold=2, bound=4.0, index_fraction=0.25, index_seed="ab" * 32)
    layout = UpdateLayout.for_round(SHAPES, [], settings)
    assert layout.indices is not None and layout.indices.size == 2
    delta = {"w": np.arange(6, dtype=np.float32).reshape(3, 2), "b": np.array([10.0, 20.0], dtype=np.float32)}
    feedback = ErrorFeedback(tmp_path / "residual.npz")
    sent = feedback.stage(delta, update_id="r1", sent=layout.received)
    assert all(np.array_equal(sent[k], delta[k]) for k in delta), "no residual yet"
    feedback.commit("r1")
    flat = np.concatenate([delta[k].ravel() for k in sorted(delta)])
    kept = np.zeros_like(flat)
    kept[layout.indices] = flat[layout.indices]
    residual = ErrorFeedback(tmp_path / "residual.npz").residual  # survives a restart
    assert np.array_equal(np.concatenate([residual[k].ravel() for k in sorted(residual)]), flat - kept)

    again = ErrorFeedback(tmp_path / "residual.npz").stage(delta, update_id="r2", sent=layout.received)
    assert np.array_equal(np.concatenate([again[k].ravel() for k in sorted(again)]), 2 * flat - kept)


def test_running_statistics_are_sent_whole_even_with_an_index_set():
    shapes = {"bn.var": (4,), "w": (10, 10)}
    settings = SecureAggregationRound(threshold=2, bound=4.0, index_fraction=0.1, index_seed="cd" * 32,
                                      dense_tensors=["bn.var"])
    layout = UpdateLayout.for_round(shapes, [], settings)
    # Name order: bn.var occupies positions 0-3, w 4-103; 10% of w's 100 positions come on top.
    assert set(range(4)) <= set(layout.indices.tolist())
    assert layout.indices.size == 4 + 10 and layout.vector_length == 15
    update = {"bn.var": np.full(4, -0.5, dtype=np.float32), "w": np.ones((10, 10), dtype=np.float32)}
    received = layout.received(update)
    assert np.array_equal(received["bn.var"], update["bn.var"]) and received["w"].sum() == 10
