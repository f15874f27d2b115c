"""The round journal: which round attempt is open, who was selected, which updates arrived.

It lives in the registry's SQLite database so that a restarted orchestrator reopens the same
attempt with the updates it had already stored, and so that closing a round and adding the
version it produced are one transaction (no version lost, no round counted twice). A closed
round also keeps the summary published for it (metrics, bytes each way, seconds), so that
``fedmq report`` can draw the federation's history from the state directory alone.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass

from shared.protocol import RoundSummary, UpdateReport

SCHEMA = """
CREATE TABLE IF NOT EXISTS rounds (
    round_id TEXT PRIMARY KEY,
    round INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    base_version INTEGER NOT NULL,
    selected TEXT NOT NULL,
    training TEXT NOT NULL,
    announced_at REAL NOT NULL,
    deadline REAL NOT NULL,
    result_version INTEGER,
    detail TEXT NOT NULL DEFAULT '',
    summary TEXT
);
CREATE TABLE IF NOT EXISTS updates (
    round_id TEXT NOT NULL,
    site TEXT NOT NULL,
    blob TEXT,
    num_samples INTEGER NOT NULL,
    report TEXT NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (round_id, site)
);
"""


@dataclass(frozen=True)
class RoundRecord:
    round_id: str
    round: int
    attempt: int
    kind: str
    state: str
    base_version: int
    selected: list[str]
    training: dict
    announced_at: float
    deadline: float
    result_version: int | None


@dataclass(frozen=True)
class StoredUpdate:
    site: str
    blob: str | None
    num_samples: int
    report: UpdateReport


class RoundJournal:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        conn.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Add the summary column that journals created by older versions lack (their rounds read as unsummarised)."""
        if "summary" not in {row[1] for row in self.conn.execute("PRAGMA table_info(rounds)")}:
            with self.conn:
                self.conn.execute("ALTER TABLE rounds ADD COLUMN summary TEXT")

    _COLUMNS = ("round_id, round, attempt, kind, state, base_version, selected, training, announced_at, deadline,"
                " result_version")

    def _record(self, row: tuple) -> RoundRecord:
        rid, rnd, attempt, kind, state, base, selected, training, at, deadline, result = row
        return RoundRecord(rid, rnd, attempt, kind, state, base, json.loads(selected), json.loads(training), at,
                           deadline, result)

    def open_round(self) -> RoundRecord | None:
        row = self.conn.execute(f"SELECT {self._COLUMNS} FROM rounds WHERE state='open' "
                                "ORDER BY announced_at DESC LIMIT 1").fetchone()
        return self._record(row) if row else None

    def attempts(self, round: int, kind: str) -> int:
        row = self.conn.execute("SELECT COUNT(*) FROM rounds WHERE round=? AND kind=?", (round, kind)).fetchone()
        return int(row[0])

    def done(self, kind: str) -> list[RoundRecord]:
        rows = self.conn.execute(f"SELECT {self._COLUMNS} FROM rounds WHERE state='done' AND kind=? ORDER BY round",
                                 (kind,)).fetchall()
        return [self._record(r) for r in rows]

    def begin(self, *, round_id: str, round: int, attempt: int, kind: str, base_version: int, selected: list[str],
              training: dict, deadline: float) -> RoundRecord:
        with self.conn:
            self.conn.execute(
                "INSERT INTO rounds (round_id, round, attempt, kind, state, base_version, selected, training,"
                " announced_at, deadline) VALUES (?,?,?,?, 'open', ?,?,?,?,?)",
                (round_id, round, attempt, kind, base_version, json.dumps(selected), json.dumps(training),
                 time.time(), deadline))
        return self.get(round_id)

    def get(self, round_id: str) -> RoundRecord | None:
        row = self.conn.execute(f"SELECT {self._COLUMNS} FROM rounds WHERE round_id=?", (round_id,)).fetchone()
        return self._record(row) if row else None

    def extend(self, round_id: str, deadline: float) -> None:
        with self.conn:
            self.conn.execute("UPDATE rounds SET deadline=? WHERE round_id=?", (deadline, round_id))

    def fail(self, round_id: str, detail: str) -> None:
        with self.conn:
            self.conn.execute("UPDATE rounds SET state='failed', detail=? WHERE round_id=?", (detail, round_id))

    def close(self, round_id: str, result_version: int | None) -> None:
        """Mark done; call inside the transaction that adds the version."""
        self.conn.execute("UPDATE rounds SET state='done', result_version=? WHERE round_id=?",
                          (result_version, round_id))

    def record_summary(self, round_id: str, summary: RoundSummary) -> None:
        """Keep what was published when the round closed: the report's only source for bytes and seconds."""
        with self.conn:
            self.conn.execute("UPDATE rounds SET summary=? WHERE round_id=?", (summary.model_dump_json(), round_id))

    def summaries(self) -> list[str]:
        """The stored summaries (JSON) of the closed rounds, in the order they were announced.

        Returned unparsed: a reader validates each one itself, so one it cannot read (written by
        a newer fedmq, or damaged) costs that round only.
        """
        rows = self.conn.execute("SELECT summary FROM rounds WHERE state='done' AND summary IS NOT NULL "
                                 "ORDER BY announced_at").fetchall()
        return [r[0] for r in rows]

    def failed(self) -> list[RoundRecord]:
        """Every attempt that missed its quorum or failed, oldest first (retried as a new attempt)."""
        rows = self.conn.execute(f"SELECT {self._COLUMNS} FROM rounds WHERE state='failed' ORDER BY announced_at"
                                 ).fetchall()
        return [self._record(r) for r in rows]

    def add_update(self, round_id: str, site: str, blob: str | None, report: UpdateReport) -> bool:
        """Record an update; False when this site's update for the round was already stored."""
        with self.conn:
            cur = self.conn.execute(
                "INSERT OR IGNORE INTO updates (round_id, site, blob, num_samples, report, received_at)"
                " VALUES (?,?,?,?,?,?)", (round_id, site, blob, report.num_samples, report.model_dump_json(),
                                           time.time()))
        return cur.rowcount == 1

    def drop_update(self, round_id: str, site: str) -> None:
        """Forget a stored update whose file was lost: the round must not count what it cannot read."""
        with self.conn:
            self.conn.execute("DELETE FROM updates WHERE round_id=? AND site=?", (round_id, site))

    def updates(self, round_id: str) -> list[StoredUpdate]:
        rows = self.conn.execute("SELECT site, blob, num_samples, report FROM updates WHERE round_id=? ORDER BY site",
                                 (round_id,)).fetchall()
        return [StoredUpdate(s, b, n, UpdateReport.model_validate_json(r)) for s, b, n, r in rows]
