"""Model registry, round journal, blob store and the agent's on-disk state."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from edge_agent.state import AgentState
from orchestrator.journal import RoundJournal
from orchestrator.registry import ModelRegistry, RegistryError, StorageError, open_database, pool_metrics
from shared.blobstore import BlobStore, BlobStoreError
from shared.protocol import EvalMetrics, UpdateReport

STRATEGY = {"name": "fedavg"}
TRAINING = {"local_steps": 10, "learning_rate": 0.05}


class Orchestrator:
    """The pieces of the orchestrator's state directory, as the service wires them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conn = open_database(root / "orchestrator.sqlite")
        self.registry = ModelRegistry(self.conn, BlobStore(root / "blobs"))
        self.journal = RoundJournal(self.conn)

    def add(self, model: bytes, *, parent: int | None, round: int | None, **kw: object):
        with self.conn:
            return self.registry.add_version(model, parent=parent, round=round, contributors=kw.pop("contributors", {}),
                                             strategy=STRATEGY, training=TRAINING, **kw)

    def begin(self, round_id: str, round: int, attempt: int = 1, kind: str = "train"):
        return self.journal.begin(round_id=round_id, round=round, attempt=attempt, kind=kind, base_version=0,
                                  selected=["site-a", "site-b"], training=TRAINING, deadline=1e12)


@pytest.fixture()
def orch(tmp_path: Path) -> Orchestrator:
    return Orchestrator(tmp_path / "state")


def _report(round_id: str = "r1a1", site: str = "site-a", n: int = 50) -> UpdateReport:
    return UpdateReport(federation="fed", sender=site, round_id=round_id, round=1, base_version=0, num_samples=n,
                        train_metrics={"loss_last": 0.3})


# registry ---------------------------------------------------------------------------------------

def test_versions_are_numbered_from_zero_and_stored_by_hash(orch: Orchestrator) -> None:
    models = [b"initial model", b"after round 1", b"after round 2"]
    v0 = orch.add(models[0], parent=None, round=None, note="initial")
    v1 = orch.add(models[1], parent=0, round=1, contributors={"site-a": 50, "site-b": 70})
    v2 = orch.add(models[2], parent=1, round=2)
    assert [v.version for v in (v0, v1, v2)] == [0, 1, 2]
    for v, data in zip((v0, v1, v2), models):
        assert v.sha256 == hashlib.sha256(data).hexdigest()
        assert v.size == len(data)
        assert orch.registry.blobs.path(v.sha256).read_bytes() == data
        assert orch.registry.model_bytes(v.version) == data
    got = orch.registry.get(1)
    assert (got.parent, got.round, got.contributors) == (0, 1, {"site-a": 50, "site-b": 70})
    assert got.strategy == STRATEGY and got.training == TRAINING
    assert orch.registry.get(0).note == "initial"


def test_latest_list_and_by_round(orch: Orchestrator) -> None:
    assert orch.registry.latest() is None
    assert orch.registry.list() == []
    orch.add(b"m0", parent=None, round=None)
    orch.add(b"m1", parent=0, round=1)
    orch.add(b"m2", parent=1, round=2)
    assert orch.registry.latest().version == 2
    assert [v.version for v in orch.registry.list()] == [0, 1, 2]
    assert orch.registry.by_round(2).version == 2
    assert orch.registry.by_round(1).sha256 == hashlib.sha256(b"m1").hexdigest()
    assert orch.registry.by_round(7) is None


def test_registry_survives_reopening(orch: Orchestrator) -> None:
    orch.add(b"m0", parent=None, round=None)
    orch.add(b"m1", parent=0, round=1, contributors={"site-a": 5})
    orch.conn.close()
    reopened = ModelRegistry.open(orch.root)
    assert [v.contributors for v in reopened.list()] == [{}, {"site-a": 5}]
    assert reopened.model_bytes(1) == b"m1"


def test_same_round_twice_fails_and_rolls_back(orch: Orchestrator) -> None:
    orch.add(b"m0", parent=None, round=None)
    orch.begin("r1a1", 1)
    with orch.conn:
        orch.journal.close("r1a1", 1)
        orch.registry.add_version(b"m1", parent=0, round=1, contributors={}, strategy=STRATEGY, training=TRAINING)
    orch.begin("r1a2", 1, attempt=2)
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        with orch.conn:
            orch.journal.close("r1a2", 2)
            orch.registry.add_version(b"m1 again", parent=1, round=1, contributors={}, strategy=STRATEGY,
                                      training=TRAINING)
    # neither the version nor the round's closing was committed
    assert [v.version for v in orch.registry.list()] == [0, 1]
    assert orch.journal.get("r1a2").state == "open"
    assert orch.journal.get("r1a2").result_version is None
    assert orch.journal.get("r1a1").state == "done" and orch.journal.get("r1a1").result_version == 1
    # numbering continues without a gap
    assert orch.add(b"m2", parent=1, round=2).version == 2


def test_registry_errors(orch: Orchestrator, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=r"model version 3 does not exist \(the registry is empty\)"):
        orch.registry.get(3)
    orch.add(b"m0", parent=None, round=None)
    orch.add(b"m1", parent=0, round=1)
    with pytest.raises(RegistryError, match=r"model version 3 does not exist \(latest is 1\)"):
        orch.registry.get(3)
    with pytest.raises(RegistryError, match=r"model version 3 does not exist"):
        orch.registry.model_bytes(3)
    empty = tmp_path / "elsewhere"
    with pytest.raises(RegistryError, match=r"no registry at .*elsewhere.*orchestrator.sqlite.*--state-dir"):
        ModelRegistry.open(empty)


def test_evaluations_are_recorded_and_pooled_from_counts(orch: Orchestrator) -> None:
    orch.add(b"m0", parent=None, round=None)
    assert orch.registry.get(0).pooled is None
    with orch.conn:
        orch.registry.record_evaluation(0, "site-a", EvalMetrics(num_examples=100, loss=0.5, accuracy=0.8, correct=80))
        orch.registry.record_evaluation(0, "site-b", EvalMetrics(num_examples=300, loss=0.3, accuracy=0.6, correct=180))
    v = orch.registry.get(0)
    assert set(v.evaluations) == {"site-a", "site-b"}
    assert v.evaluations["site-b"].correct == 180
    pooled = v.pooled
    assert pooled.num_examples == 400 and pooled.correct == 260
    assert pooled.accuracy == pytest.approx(260 / 400)  # not the mean of 0.8 and 0.6
    assert pooled.loss == pytest.approx((0.5 * 100 + 0.3 * 300) / 400)
    # re-recording a site's evaluation replaces it
    with orch.conn:
        orch.registry.record_evaluation(0, "site-a", EvalMetrics(num_examples=100, loss=0.1, accuracy=1.0, correct=100))
    assert orch.registry.get(0).pooled.correct == 280


def test_pool_metrics_edge_cases() -> None:
    assert pool_metrics({}) is None
    assert pool_metrics({"a": EvalMetrics(num_examples=0, loss=0.0)}) is None
    mixed = pool_metrics({"a": EvalMetrics(num_examples=10, loss=1.0, accuracy=0.5, correct=5),
                          "b": EvalMetrics(num_examples=30, loss=2.0)})
    assert mixed.num_examples == 40 and mixed.loss == pytest.approx(1.75)
    assert mixed.accuracy is None and mixed.correct is None


# journal ----------------------------------------------------------------------------------------

def test_journal_round_lifecycle(orch: Orchestrator) -> None:
    assert orch.journal.open_round() is None
    rec = orch.begin("r1a1", 1)
    assert (rec.round_id, rec.round, rec.attempt, rec.state, rec.kind) == ("r1a1", 1, 1, "open", "train")
    assert rec.selected == ["site-a", "site-b"] and rec.training == TRAINING
    assert orch.journal.open_round().round_id == "r1a1"
    orch.journal.extend("r1a1", 2e12)
    assert orch.journal.get("r1a1").deadline == 2e12

    orch.journal.fail("r1a1", "quorum not reached")
    assert orch.journal.get("r1a1").state == "failed"
    assert orch.journal.open_round() is None

    orch.begin("r1a2", 1, attempt=2)
    assert orch.journal.attempts(1, "train") == 2
    assert orch.journal.attempts(1, "evaluate") == 0
    with orch.conn:
        orch.journal.close("r1a2", 1)
    assert orch.journal.get("r1a2").state == "done"
    assert [r.round_id for r in orch.journal.done("train")] == ["r1a2"]
    assert orch.journal.get("nope") is None


def test_journal_round_survives_restart(orch: Orchestrator) -> None:
    orch.begin("r3a1", 3)
    assert orch.journal.add_update("r3a1", "site-a", "ab" * 32, _report("r3a1"))
    orch.conn.close()
    again = Orchestrator(orch.root)
    assert again.journal.open_round().round_id == "r3a1"
    assert [u.site for u in again.journal.updates("r3a1")] == ["site-a"]


def test_add_update_is_idempotent(orch: Orchestrator) -> None:
    orch.begin("r1a1", 1)
    first = _report(n=50)
    assert orch.journal.add_update("r1a1", "site-a", "ab" * 32, first) is True
    assert orch.journal.add_update("r1a1", "site-a", "cd" * 32, _report(n=999)) is False
    assert orch.journal.add_update("r1a1", "site-b", None, _report(site="site-b", n=70)) is True
    updates = orch.journal.updates("r1a1")
    assert [(u.site, u.blob, u.num_samples) for u in updates] == [("site-a", "ab" * 32, 50), ("site-b", None, 70)]
    assert updates[0].report == first
    assert orch.journal.updates("other") == []


# blob store -------------------------------------------------------------------------------------

def test_blobstore_put_get_and_dedup(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    sha = store.put(b"model bytes")
    assert sha == hashlib.sha256(b"model bytes").hexdigest()
    assert store.put(b"model bytes") == sha
    assert sha in store and store.get(sha) == b"model bytes"
    assert [p.name for p in (tmp_path / "blobs").rglob("*") if p.is_file()] == [sha]  # no temp files left


def test_blobstore_detects_corruption(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    sha = store.put(b"model bytes")
    store.path(sha).write_bytes(b"model bytez")
    with pytest.raises(BlobStoreError, match=rf"blob {sha} in .* was corrupted .*; moved aside to {sha}.corrupt"):
        store.get(sha)
    assert sha not in store and store.path(sha).with_name(f"{sha}.corrupt").read_bytes() == b"model bytez"
    assert store.put(b"model bytes") == sha and store.get(sha) == b"model bytes"  # written again, served again
    store.path(sha).write_bytes(b"model bytez")
    assert sha not in store, "a corrupted blob counted as present"
    missing = "0" * 64
    with pytest.raises(BlobStoreError, match=rf"blob {missing} is not in"):
        store.get(missing)


def test_registry_refuses_a_corrupted_model(orch: Orchestrator) -> None:
    v = orch.add(b"m0", parent=None, round=None)
    orch.registry.blobs.path(v.sha256).write_bytes(b"tampered")
    with pytest.raises(StorageError, match="corrupted.*restore the blobs directory"):
        orch.registry.model_bytes(0)


# agent state ------------------------------------------------------------------------------------

def test_agent_pending_update_persists_until_complete(tmp_path: Path) -> None:
    root = tmp_path / "agent"
    state = AgentState(root)
    assert state.record.pending is None
    report = _report("r2a1")
    state.set_pending(report, b"update bytes")
    state.set_model(4, "ef" * 32)

    reopened = AgentState(root)
    pending = reopened.record.pending
    assert pending is not None and pending.report == report
    assert reopened.blobs.get(pending.blob) == b"update bytes"
    assert (reopened.record.model_version, reopened.record.model_sha256) == (4, "ef" * 32)

    reopened.complete("some-other-round")
    assert reopened.record.pending is not None  # another round's ack does not drop this update
    reopened.complete("r2a1")
    assert reopened.record.pending is None
    assert pending.blob not in reopened.blobs
    assert reopened.is_complete("r2a1") and not reopened.is_complete("r9a1")

    final = AgentState(root)
    assert final.record.pending is None and final.is_complete("r2a1")


def test_agent_pending_without_blob(tmp_path: Path) -> None:
    state = AgentState(tmp_path / "agent")
    state.set_pending(_report("eval1"), None)
    assert AgentState(tmp_path / "agent").record.pending.blob is None
    state.complete("eval1")
    assert AgentState(tmp_path / "agent").record.pending is None
