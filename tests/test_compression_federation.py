"""Compressed updates both ways, over a real Mosquitto: sparse uplink, model-delta downlink.

Short digits federations (4 sites, CNN of 119k parameters, 2 local steps): the uplink of
top-1% int8 with error feedback against a dense run in the same test, the delta downlink
and the rebuilt models' hashes, a site that lost its state dir, and the error-feedback
residual across an agent restart.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")

from edge_agent.agent import EdgeAgent
from fedmq.digits import DigitsOptions, digits_settings
from fedmq.inprocess import Federation, run_federation
from orchestrator.journal import RoundJournal
from orchestrator.registry import ModelRegistry
from shared.codec import CompressionSettings
from shared.compression import ErrorFeedback
from shared.onnx_model import float_initializers, load_model_bytes, pack_model
from shared.protocol import ProtocolError, RoundSummary, parse_message

SITES = 4
SPARSE = CompressionSettings(mode="sparse", topk_fraction=0.01, quantization="int8", error_feedback=True)
DENSE = CompressionSettings()


class _Tap:
    """Counts what the orchestrator publishes, by topic, on top of its real transport."""

    def __init__(self, fed: Federation) -> None:
        assert fed.orchestrator is not None
        self.transport = fed.orchestrator.transport
        self._publish = self.transport.publish
        self.sent: list[tuple[str, int, bytes | None]] = []
        self.transport.publish = self  # type: ignore[method-assign]

    def __call__(self, topic: str, payload: bytes, **kwargs):
        keep = payload if topic.endswith("/orch/all/summary") else None
        self.sent.append((topic, len(payload), keep))
        return self._publish(topic, payload, **kwargs)

    def unicast_blob_bytes(self, site: str) -> int:
        """Model chunks sent to one site on request (the full model for a site without the base)."""
        return sum(n for topic, n, _ in self.sent if f"/orch/to/{site}/blob/" in topic)

    def summaries(self) -> dict[int, RoundSummary]:
        out = {}
        for _topic, _n, payload in self.sent:
            if payload is None:
                continue
            try:
                msg = parse_message(payload)
            except ProtocolError:
                continue
            if isinstance(msg, RoundSummary) and msg.new_version is not None:
                out[msg.round] = msg
        return out


def _settings(url: str, tmp_path: Path, name: str, compression: CompressionSettings, rounds: int):
    opts = DigitsOptions(sites=SITES, local_steps=2, round_timeout=120.0, federation=name)
    return digits_settings(url, tmp_path / name, rounds, compression, opts, data_dir=tmp_path / "data")


def _check_registry(state_dir: Path, rounds: int) -> ModelRegistry:
    registry = ModelRegistry.open(state_dir)
    versions = registry.list()
    assert [v.version for v in versions] == list(range(rounds + 1))
    for v in versions:
        assert hashlib.sha256(registry.model_bytes(v.version)).hexdigest() == v.sha256, f"v{v.version}"
        if v.version:
            assert v.parent == v.version - 1 and len(v.contributors) == SITES
    return registry


def _uplink_payload_by_round(registry: ModelRegistry) -> dict[int, int]:
    journal = RoundJournal(registry.conn)
    out: dict[int, int] = {}
    for rec in journal.done("train"):
        out[rec.round] = out.get(rec.round, 0) + sum(u.report.update.size for u in journal.updates(rec.round_id))
    return out


def test_sparse_uplink_is_50x_smaller_and_the_delta_downlink_rebuilds_registry_models(mosquitto, tmp_path):
    rounds = 2
    runs = {}
    # The dense reference needs one round only: a dense update's size does not change between rounds.
    for label, compression, n in (("dense", DENSE, 1), ("sparse", SPARSE, rounds)):
        name = f"cf-{label}"
        orch, agents = _settings(mosquitto.url, tmp_path, name, compression, n)
        with run_federation(orch, agents) as fed:
            tap = _Tap(fed)
            fed.wait_finished(timeout=120)
            live_agents = dict(fed.agents)
        registry = _check_registry(tmp_path / name / "orchestrator", n)
        runs[label] = (registry, tap, live_agents)

    # Uplink: the update payloads, per round, against the dense run's.
    dense_up, sparse_up = (_uplink_payload_by_round(runs[k][0]) for k in ("dense", "sparse"))
    assert sorted(dense_up) == [1] and sorted(sparse_up) == list(range(1, rounds + 1))
    assert dense_up[1] >= 0.6 * 4 * 118_986 * SITES  # dense float32 (zstd shaves 10-20%)
    for r, size in sparse_up.items():
        assert dense_up[1] >= 50 * size, f"round {r}: dense {dense_up[1]} B vs sparse {size} B"
    # The orchestrator's own per-round count (payloads and control messages) shrinks too.
    dense_wire = runs["dense"][1].summaries()[1].bytes_up
    sparse_wire = {r: s.bytes_up for r, s in runs["sparse"][1].summaries().items()}
    assert set(sparse_wire) >= {2} and all(dense_wire >= 20 * b for b in sparse_wire.values()), (dense_wire,
                                                                                                 sparse_wire)

    # Downlink: from round 2 on every site holds the parent, so only the delta is broadcast.
    registry, tap, agents = runs["sparse"]
    packed_full = len(pack_model(registry.model_bytes(1)))
    summary = tap.summaries()[2]
    assert summary.bytes_down < packed_full, (summary.bytes_down, packed_full)
    assert summary.bytes_down < packed_full * SITES
    assert all(tap.unicast_blob_bytes(site) == 0 for site in agents), "a site had to ask for the full model"
    # Each agent rebuilt every version from the deltas; its copies hash to the registry's.
    for agent in agents.values():
        for v in registry.list():
            held = agent.state.blobs.get(v.sha256)  # BlobStore.get re-hashes the content
            assert hashlib.sha256(held).hexdigest() == v.sha256
        assert agent.state.record.model_sha256 == registry.get(rounds).sha256
        assert agent.state.record.model_version == rounds


def test_wiped_site_gets_the_full_model_and_the_residual_survives_a_restart(mosquitto, tmp_path):
    """Two runs over the same state dirs: rounds 1-2, then every agent restarts (site02 wiped) for rounds 3-4.

    The restart happens between runs, when no update is waiting for an acknowledgement (a
    restart in the middle of a round trips over the agent bug described in the report).
    """
    name = "cf-restart"
    wiped, kept = "site02", "site01"
    orch, agents = _settings(mosquitto.url, tmp_path, name, SPARSE, 2)
    by_site = {a.site_id: a for a in agents}
    with run_federation(orch, agents) as fed:
        fed.wait_finished(timeout=90)
    _check_registry(tmp_path / name / "orchestrator", 2)
    residual_files = {site: Path(a.state_dir) / "residual.npz" for site, a in by_site.items()}
    assert all(path.exists() for path in residual_files.values())
    before = ErrorFeedback(residual_files[kept]).residual
    assert before and any(np.any(v != 0) for v in before.values()), "error feedback left no residual"
    # A restarted agent (a fresh object on the same state dir) starts from the committed residual.
    after = EdgeAgent(by_site[kept]).feedback.residual
    assert sorted(after) == sorted(before)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])
    shutil.rmtree(by_site[wiped].state_dir)  # same site id, nothing on disk

    orch = orch.model_copy(update={"rounds": 4})
    with run_federation(orch, agents) as fed:
        tap = _Tap(fed)
        fed.wait_finished(timeout=120)
        final_agents = dict(fed.agents)
    registry = _check_registry(tmp_path / name / "orchestrator", 4)
    # The wiped site had no base for the delta: it asked for, and got, the whole packed model ...
    packed = min(len(pack_model(registry.model_bytes(v))) for v in (2, 3, 4))
    assert tap.unicast_blob_bytes(wiped) >= packed, (tap.unicast_blob_bytes(wiped), packed)
    assert all(tap.unicast_blob_bytes(s) == 0 for s in by_site if s != wiped), "a site with the base got the model"
    # ... and caught up: it contributed to rounds 3 and 4 and holds the final version.
    assert wiped in registry.get(3).contributors and wiped in registry.get(4).contributors
    final = registry.get(4)
    for site, agent in final_agents.items():
        assert agent.state.record.model_sha256 == final.sha256
        assert hashlib.sha256(agent.state.blobs.get(final.sha256)).hexdigest() == final.sha256
        assert residual_files[site].exists()
    # The kept site's residual carried on from where it was (later rounds committed new ones).
    later = ErrorFeedback(residual_files[kept]).residual
    assert any(not np.array_equal(later[k], before[k]) for k in before)
    shapes = {k: v.shape for k, v in float_initializers(load_model_bytes(registry.model_bytes(0))).items()}
    assert {k: v.shape for k, v in later.items()} == shapes
