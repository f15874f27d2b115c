"""What an agent keeps on disk so a restart loses nothing: models, the unacknowledged update, progress.

The state directory holds a content-addressed blob store (models received, updates not yet
acknowledged) and ``agent.json``, rewritten atomically. An update is written here *before*
it is published, and dropped only when the orchestrator acknowledges it, so a crash between
training and acknowledgement resends the same bytes instead of retraining or losing work.

A damaged state directory is never used as if it were whole: an unreadable ``agent.json``
stops the agent with ``StateError`` (it holds the privacy ledger, which must not silently
start afresh), and an unacknowledged update whose file is missing or corrupted is dropped
with a warning, so the round is trained again instead of sending wrong bytes.

``agent.json`` also holds the site's DP-SGD privacy ledger: every step ever charged, written
*before* the steps are taken, so a crash can only over-count (the safe side) and a restarted
or reinstalled agent with the same state directory never starts its budget afresh.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from shared.blobstore import BlobStore
from shared.protocol import PrivacySpent, UpdateReport

log = logging.getLogger(__name__)

MAX_REMEMBERED_ROUNDS = 1000


class StateError(RuntimeError):
    """The agent's state directory cannot be used as it is; the message says how to repair it."""


class PendingUpdate(BaseModel):
    report: UpdateReport
    blob: str | None


class PrivacySegment(BaseModel):
    """DP-SGD steps charged at one (noise multiplier, sampling rate); the accountant composes them all."""

    noise_multiplier: float = Field(gt=0)
    sampling_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=0)


class AgentRecord(BaseModel):
    model_version: int | None = None
    model_sha256: str | None = None
    completed_rounds: list[str] = Field(default_factory=list)
    pending: PendingUpdate | None = None
    dp_sgd_history: list[PrivacySegment] = Field(default_factory=list)
    dp_sgd_spent: PrivacySpent | None = None


class AgentState:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(self.root / "blobs")
        self._file = self.root / "agent.json"
        self.record = self._load()
        pending = self.record.pending
        if pending is not None and pending.blob is not None and pending.blob not in self.blobs:
            log.warning("the unacknowledged update for %s is missing or corrupted in %s; dropped, the round will be "
                        "trained again", pending.report.round_id, self.blobs.root)
            self.record.pending = None
            self.save()

    def _load(self) -> AgentRecord:
        if not self._file.exists():
            return AgentRecord()
        try:
            return AgentRecord.model_validate_json(self._file.read_bytes())
        except (ValidationError, OSError) as e:
            raise StateError(f"{self._file} is unreadable ({str(e).splitlines()[0]}); it holds this site's "
                             "unacknowledged update and its DP-SGD privacy ledger. Restore it from a backup; if "
                             "there is none and the site does not use DP-SGD, move it away and restart (the agent "
                             "starts afresh and trains the next round)") from None

    def save(self) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".agent-")
        with os.fdopen(fd, "w") as f:
            f.write(self.record.model_dump_json(indent=1))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._file)

    def set_model(self, version: int, sha256: str) -> None:
        self.record.model_version, self.record.model_sha256 = version, sha256
        self.save()

    def set_pending(self, report: UpdateReport, blob: bytes | None) -> None:
        sha = self.blobs.put(blob) if blob is not None else None
        self.record.pending = PendingUpdate(report=report, blob=sha)
        self.save()

    def complete(self, round_id: str) -> None:
        """The orchestrator holds our answer for this round: forget the pending copy."""
        if round_id not in self.record.completed_rounds:
            self.record.completed_rounds = (self.record.completed_rounds + [round_id])[-MAX_REMEMBERED_ROUNDS:]
        pending = self.record.pending
        if pending is not None and pending.report.round_id == round_id:
            self.record.pending = None
            if pending.blob:
                self.blobs.path(pending.blob).unlink(missing_ok=True)
        self.save()

    def charge_dp_sgd(self, history: list[tuple[float, float, int]], spent: PrivacySpent) -> None:
        """Persist the accountant's whole ``history()`` and what it has spent, before the steps are taken."""
        self.record.dp_sgd_history = [PrivacySegment(noise_multiplier=z, sampling_rate=q, steps=n)
                                      for z, q, n in history]
        self.record.dp_sgd_spent = spent
        self.save()

    def dp_sgd_history(self) -> list[tuple[float, float, int]]:
        """The persisted ledger in the form ``accountant.restore`` takes."""
        return [(s.noise_multiplier, s.sampling_rate, s.steps) for s in self.record.dp_sgd_history]

    def is_complete(self, round_id: str) -> bool:
        return round_id in self.record.completed_rounds

    def save_local_parameters(self, arrays: dict[str, np.ndarray]) -> None:
        """This site's own values of the tensors it never shares (FedBN), kept across rounds and restarts."""
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".local-", suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, self.root / "local_parameters.npz")

    def local_parameters(self) -> dict[str, np.ndarray]:
        path = self.root / "local_parameters.npz"
        if not path.exists():
            return {}
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def health_file(self) -> Path:
        return self.root / "health.json"
