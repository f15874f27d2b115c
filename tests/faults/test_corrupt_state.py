"""Damaged state directories: the daemon recovers, or stops with a message that says what to do.

Never a traceback, never a wrong result: a corrupted file the daemon can fetch or recompute
again (an agent's model, its unsent update) is moved aside and replaced; one it cannot (the
agent's privacy ledger, the orchestrator's registry and model files) stops the daemon with
exit code 2 and instructions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from edge_agent.state import AgentState
from fedmq.demo import DATA_DIR, heart_features
from orchestrator.architectures import build_onnx
from orchestrator.journal import RoundJournal
from orchestrator.registry import ModelRegistry, open_database
from shared.blobstore import BlobStore
from shared.protocol import UpdateAck
from tests.faults.federation_harness import ORCHESTRATOR, FederationHarness, check_outcome, orchestrator_state, \
    site_state

ROOT = Path(__file__).resolve().parents[2]


def run_daemon(kind: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    """``fedmq <kind> run`` as an operator starts it; returns its exit code and output."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_")} | env
    return subprocess.run([sys.executable, "-m", "fedmq", kind, "run"], env=full, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def damage(path: Path) -> None:
    """Overwrite the middle of a file, as a bad disk or a torn copy would."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = os.urandom(64)
    path.write_bytes(bytes(data))


def assert_clear_stop(result: subprocess.CompletedProcess, *phrases: str) -> None:
    out = result.stdout + result.stderr
    assert result.returncode == 2, f"exit code {result.returncode}:\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    for phrase in phrases:
        assert phrase in " ".join(out.split()), f"{phrase!r} not in:\n{out[-3000:]}"


def make_registry(state_dir: Path, versions: int) -> ModelRegistry:
    """A registry with ``versions`` real models and closed rounds, as a finished federation leaves it."""
    registry = ModelRegistry(open_database(state_dir / "orchestrator.sqlite"), BlobStore(state_dir / "blobs"))
    journal = RoundJournal(registry.conn)
    model = build_onnx("logreg", num_features=len(heart_features()), num_outputs=1)
    with registry.conn:
        registry.add_version(model, parent=None, round=None, contributors={}, strategy={"name": "fedavg"},
                             training={})
    for v in range(1, versions):
        journal.begin(round_id=f"faults-r{v}-a1", round=v, attempt=1, kind="train", base_version=v - 1,
                      selected=["cleveland"], training={}, deadline=0.0)
        with registry.conn:
            registry.add_version(model + bytes([v]), parent=v - 1, round=v, contributors={"cleveland": 1},
                                 strategy={"name": "fedavg"}, training={})
            journal.close(f"faults-r{v}-a1", v)
    return registry


def test_unreadable_agent_state_stops_the_agent_with_what_to_do(tmp_path):
    state = AgentState(tmp_path / "va")
    state.set_model(3, "ab" * 32)
    ledger = state._file
    ledger.write_bytes(ledger.read_bytes()[: len(ledger.read_bytes()) // 2])  # torn write
    result = run_daemon("agent", {"FEDMQ_SITE_ID": "va", "FEDMQ_STATE_DIR": str(tmp_path / "va"),
                                  "FEDMQ_DATA_TRAIN": str(DATA_DIR / "va_train.csv"),
                                  "FEDMQ_BROKER_URL": "mqtt://127.0.0.1:9"})
    assert_clear_stop(result, "agent.json is unreadable", "Restore it from a backup")


def test_damaged_registry_database_stops_the_orchestrator_with_what_to_do(tmp_path):
    state_dir = tmp_path / "orchestrator"
    registry = make_registry(state_dir, 40)
    registry.conn.close()
    db = state_dir / "orchestrator.sqlite"
    assert not Path(f"{db}-wal").exists() or Path(f"{db}-wal").stat().st_size == 0
    damage(db)
    env = {"FEDMQ_STATE_DIR": str(state_dir), "FEDMQ_TASK_FEATURES": json.dumps(heart_features()),
           "FEDMQ_BROKER_URL": "mqtt://127.0.0.1:9"}
    assert_clear_stop(run_daemon("orchestrator", env), "is damaged", "restore orchestrator.sqlite")
    listing = subprocess.run([sys.executable, "-m", "fedmq", "models", "list", "--state-dir", str(state_dir)],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert_clear_stop(listing, "is damaged")


def test_corrupted_model_file_stops_the_orchestrator_with_what_to_do(mosquitto, tmp_path):
    state_dir = tmp_path / "orchestrator"
    registry = make_registry(state_dir, 3)
    damage(registry.blobs.path(registry.latest().sha256))
    registry.conn.close()
    env = {"FEDMQ_STATE_DIR": str(state_dir), "FEDMQ_TASK_FEATURES": json.dumps(heart_features()),
           "FEDMQ_BROKER_URL": mosquitto.url, "FEDMQ_FEDERATION": "corrupt-model"}
    assert_clear_stop(run_daemon("orchestrator", env), "model of version 2", "corrupted",
                      "restore the blobs directory")
    assert list((state_dir / "blobs").rglob("*.corrupt")), "the corrupted file was not moved aside"


def test_agent_with_corrupted_model_and_update_files_fetches_and_retrains(fresh_mosquitto, tmp_path):
    with FederationHarness.heart(fresh_mosquitto, tmp_path, rounds=2, sites=("cleveland", "hungary")) as fed:
        fed.start_all()
        fed.watch.wait_for(orchestrator_state("collecting", 1), 90, what="round 1")
        fed.stop(ORCHESTRATOR)  # no ack can reach hungary: its update stays pending on disk
        fed.watch.wait_for(site_state("hungary", "uploading"), 60, what="hungary sending its update")
        fed.kill("hungary")
        agent = AgentState(tmp_path / "hungary").record
        assert agent.pending is not None and agent.pending.blob is not None
        damage(BlobStore(tmp_path / "hungary" / "blobs").path(agent.pending.blob))
        damage(BlobStore(tmp_path / "hungary" / "blobs").path(agent.model_sha256))
        mark = fed.watch.mark()
        fed.start("hungary")
        fed.watch.wait_for(site_state("hungary", "downloading"), 60, since=mark,
                           what="hungary fetching the model again")
        fed.cont(ORCHESTRATOR)
        fed.wait_finished(120)
        assert fed.running("hungary"), f"hungary exited:\n{fed.log('hungary')[-3000:]}"
    outcome = check_outcome(fed.state_dir, 2, {"cleveland", "hungary"})
    assert outcome.accepted == {1: {"cleveland", "hungary"}, 2: {"cleveland", "hungary"}}
    log = fed.log("hungary")
    assert "missing or corrupted" in log and "Traceback" not in log, log[-3000:]
    assert len(list((tmp_path / "hungary" / "blobs").rglob("*.corrupt"))) == 2


def test_orchestrator_drops_a_stored_update_whose_file_was_damaged(fresh_mosquitto, tmp_path):
    with FederationHarness.heart(fresh_mosquitto, tmp_path, rounds=2, sites=("cleveland", "hungary"),
                                 round_timeout=4.0, orchestrator={"quorum": 1}) as fed:
        fed.start_all()
        fed.watch.wait_for(lambda e: site_state("cleveland", "training")(e) and "round 2" in e.message.detail, 90,
                           what="cleveland training round 2")
        fed.stop("cleveland")  # round 2 stays open with hungary's update alone
        ack = fed.watch.wait_for(lambda e: isinstance(e.message, UpdateAck) and "/to/hungary/" in e.topic
                                 and e.message.round_id.endswith("r2-a1") and e.message.accepted, 60,
                                 what="hungary's round-2 update accepted")
        fed.kill(ORCHESTRATOR)
        damage(BlobStore(fed.state_dir / "blobs").path(ack.message.blob_id))
        fed.start(ORCHESTRATOR)
        fed.cont("cleveland")
        fed.wait_finished(120)
    outcome = check_outcome(fed.state_dir, 2, {"cleveland"})
    assert outcome.accepted[2] == {"cleveland"}, "a damaged update was aggregated or the good one lost"
    log = fed.log(ORCHESTRATOR)
    assert "stored update of hungary" in log and "Traceback" not in log, log[-3000:]
