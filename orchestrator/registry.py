"""The model registry: every global version, its file, its lineage and how it scored.

Versions are numbered 0, 1, 2, ... (0 is the initial model); each is an ONNX file in the
content-addressed blob store plus a SQLite row recording its sha256, parent, the round that
produced it, the contributing sites with their sample counts, the strategy and training
settings, the differential privacy spent up to it (when the strategy is private), and per-site
evaluations. Writes take a connection inside the caller's transaction so that a version and
the round that produced it are committed together.
"""

from __future__ import annotations

import errno
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.blobstore import BlobStore, BlobStoreError
from shared.protocol import EvalMetrics, PrivacySpent

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY,
    sha256 TEXT NOT NULL,
    parent INTEGER,
    round INTEGER UNIQUE,
    created_at REAL NOT NULL,
    size INTEGER NOT NULL,
    contributors TEXT NOT NULL,
    strategy TEXT NOT NULL,
    training TEXT NOT NULL,
    strategy_state TEXT,
    note TEXT NOT NULL DEFAULT '',
    privacy TEXT
);
CREATE TABLE IF NOT EXISTS evaluations (
    version INTEGER NOT NULL,
    site TEXT NOT NULL,
    metrics TEXT NOT NULL,
    personalized TEXT,
    PRIMARY KEY (version, site)
);
"""


class RegistryError(LookupError):
    """A version that does not exist, or a registry that cannot be opened."""


class StorageError(RegistryError):
    """The state directory cannot be read or written: a damaged database or file, or a full disk."""


@contextmanager
def guarded_storage(state_dir: Path, doing: str) -> Iterator[None]:
    """Turn a failure of the state directory into a ``StorageError`` that says what to do.

    SQLite rolls back the transaction that failed and blobs are written by rename, so after
    any of these the registry holds exactly what it held before: nothing to repair, only the
    cause to remove.
    """
    try:
        yield
    except sqlite3.DatabaseError as e:
        if getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            raise StorageError(f"cannot {doing}: no space left under {state_dir} ({e}); free space there, the "
                               "registry is unchanged") from e
        raise StorageError(f"cannot {doing}: the registry database in {state_dir} is damaged ({e}); restore "
                           "orchestrator.sqlite (with its -wal file) from a backup of the state directory, or "
                           "move the directory away to start a new federation from version 0") from e
    except BlobStoreError as e:
        raise StorageError(f"cannot {doing}: {e}; restore the blobs directory of {state_dir} from a backup") from e
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageError(f"cannot {doing}: no space left under {state_dir} ({e.strerror}); free space "
                               "there, the registry is unchanged") from e
        raise StorageError(f"cannot {doing}: {e}; check the state directory {state_dir} (permissions, the "
                           "disk)") from e


@dataclass(frozen=True)
class ModelVersion:
    version: int
    sha256: str
    parent: int | None
    round: int | None
    created_at: float
    size: int
    contributors: dict[str, int]
    strategy: dict[str, Any]
    training: dict[str, Any]
    strategy_state: str | None
    note: str
    evaluations: dict[str, EvalMetrics] = field(default_factory=dict)
    privacy: PrivacySpent | None = None

    @property
    def pooled(self) -> EvalMetrics | None:
        return pool_metrics(self.evaluations)


def pool_metrics(per_site: dict[str, EvalMetrics]) -> EvalMetrics | None:
    """Metrics on the union of the sites' test sets, from their counts (no data leaves a site)."""
    if not per_site:
        return None
    n = sum(m.num_examples for m in per_site.values())
    if n == 0:
        return None
    loss = sum(m.loss * m.num_examples for m in per_site.values()) / n
    if all(m.correct is not None for m in per_site.values()):
        correct = sum(m.correct or 0 for m in per_site.values())
        return EvalMetrics(num_examples=n, loss=loss, accuracy=correct / n, correct=correct)
    return EvalMetrics(num_examples=n, loss=loss)


def open_database(path: Path) -> sqlite3.Connection:
    """Open (or create) the registry database; a damaged file raises ``StorageError`` before any use.

    ``quick_check`` reads every page once: the registry holds rows, not models, so this costs
    milliseconds and catches a truncated or overwritten file at start instead of mid-round.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with guarded_storage(path.parent, f"open {path}"):
        conn = sqlite3.connect(path, isolation_level="DEFERRED", check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            conn.close()
            raise sqlite3.DatabaseError(f"quick_check found: {'; '.join(problems[:5])}")
    return conn


class ModelRegistry:
    """Read and append global versions. Appends must happen inside ``with conn:`` (one transaction)."""

    def __init__(self, conn: sqlite3.Connection, blobs: BlobStore) -> None:
        self.conn = conn
        self.blobs = blobs
        conn.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Add columns that registries created by older versions lack (their rows read as NULL)."""
        columns = {row[1] for row in self.conn.execute("PRAGMA table_info(versions)")}
        if "privacy" not in columns:
            with self.conn:
                self.conn.execute("ALTER TABLE versions ADD COLUMN privacy TEXT")

    @classmethod
    def open(cls, state_dir: Path) -> "ModelRegistry":
        db = state_dir / "orchestrator.sqlite"
        if not db.exists():
            raise RegistryError(f"no registry at {db}; is FEDMQ_STATE_DIR / --state-dir the orchestrator's?")
        return cls(open_database(db), BlobStore(state_dir / "blobs"))

    def add_version(self, model: bytes, *, parent: int | None, round: int | None, contributors: dict[str, int],
                    strategy: dict[str, Any], training: dict[str, Any], strategy_state: str | None = None,
                    note: str = "", privacy: PrivacySpent | None = None) -> ModelVersion:
        """Store the file and append the next version number (caller commits).

        ``privacy`` is what a private strategy has spent up to and including this version, kept
        with it so that an audit of any version finds its guarantee without replaying rounds.
        """
        sha = self.blobs.put(model)
        row = self.conn.execute("SELECT COALESCE(MAX(version), -1) + 1 FROM versions").fetchone()
        version = int(row[0])
        created = time.time()
        self.conn.execute(
            "INSERT INTO versions (version, sha256, parent, round, created_at, size, contributors, strategy, training,"
            " strategy_state, note, privacy) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (version, sha, parent, round, created, len(model), json.dumps(contributors), json.dumps(strategy),
             json.dumps(training), strategy_state, note, privacy.model_dump_json() if privacy else None))
        return ModelVersion(version, sha, parent, round, created, len(model), contributors, strategy, training,
                            strategy_state, note, privacy=privacy)

    def record_evaluation(self, version: int, site: str, metrics: EvalMetrics,
                          personalized: EvalMetrics | None = None) -> None:
        self.conn.execute("INSERT OR REPLACE INTO evaluations (version, site, metrics, personalized) VALUES (?,?,?,?)",
                          (version, site, metrics.model_dump_json(),
                           personalized.model_dump_json() if personalized else None))

    def personalized(self, version: int) -> dict[str, EvalMetrics]:
        """Each site's score for its own variant of this version (FedBN layers, fine-tuning)."""
        rows = self.conn.execute("SELECT site, personalized FROM evaluations WHERE version=? AND personalized "
                                 "IS NOT NULL ORDER BY site", (version,))
        return {site: EvalMetrics.model_validate_json(m) for site, m in rows}

    def _evaluations(self, version: int) -> dict[str, EvalMetrics]:
        rows = self.conn.execute("SELECT site, metrics FROM evaluations WHERE version=? ORDER BY site", (version,))
        return {site: EvalMetrics.model_validate_json(m) for site, m in rows}

    def _from_row(self, row: tuple) -> ModelVersion:
        v, sha, parent, rnd, created, size, contributors, strategy, training, state, note, privacy = row
        return ModelVersion(v, sha, parent, rnd, created, size, json.loads(contributors), json.loads(strategy),
                            json.loads(training), state, note, self._evaluations(v),
                            PrivacySpent.model_validate_json(privacy) if privacy else None)

    _COLUMNS = ("version, sha256, parent, round, created_at, size, contributors, strategy, training, strategy_state,"
                " note, privacy")

    def get(self, version: int) -> ModelVersion:
        row = self.conn.execute(f"SELECT {self._COLUMNS} FROM versions WHERE version=?", (version,)).fetchone()
        if row is None:
            known = self.latest()
            raise RegistryError(f"model version {version} does not exist"
                                + (f" (latest is {known.version})" if known else " (the registry is empty)"))
        return self._from_row(row)

    def latest(self) -> ModelVersion | None:
        row = self.conn.execute(f"SELECT {self._COLUMNS} FROM versions ORDER BY version DESC LIMIT 1").fetchone()
        return self._from_row(row) if row else None

    def list(self) -> list[ModelVersion]:
        rows = self.conn.execute(f"SELECT {self._COLUMNS} FROM versions ORDER BY version").fetchall()
        return [self._from_row(r) for r in rows]

    def by_round(self, round: int) -> ModelVersion | None:
        row = self.conn.execute(f"SELECT {self._COLUMNS} FROM versions WHERE round=?", (round,)).fetchone()
        return self._from_row(row) if row else None

    def model_bytes(self, version: int) -> bytes:
        """The ONNX file of ``version``; ``StorageError`` when it is missing or corrupted on disk."""
        with guarded_storage(self.blobs.root.parent, f"read the model of version {version}"):
            return self.blobs.get(self.get(version).sha256)
