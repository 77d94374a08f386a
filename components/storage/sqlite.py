"""SqliteBatchStore: sealed batches in one SQLite file, WAL mode, one transaction per commit.

Finding the batches that overlap a window must not scan the table. Each record stores the class of its
span (see :func:`components.storage.interface.span_class`); an index on (class, lower bound, upper bound) answers
"overlaps [start, end]" with one range seek per class present: lower bound in [start - 2**class, end].
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from components.core.errors import StorageUnavailable
from components.storage.interface import AUDIT, BATCH, Kind, SealedBatch, SealedState, span_class

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 10_000
_COLS = "uid, bucket, lo, hi, rec_lo, rec_hi, n, key_id, body, fmt"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    uid TEXT NOT NULL UNIQUE,
    bucket INTEGER NOT NULL,
    lo REAL NOT NULL, hi REAL NOT NULL, lo_class INTEGER NOT NULL,
    rec_lo REAL NOT NULL, rec_hi REAL NOT NULL, rec_class INTEGER NOT NULL,
    n INTEGER NOT NULL,
    key_id TEXT NOT NULL,
    fmt INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_ts ON records (kind, lo_class, lo, hi);
CREATE INDEX IF NOT EXISTS records_by_received ON records (kind, rec_class, rec_lo, rec_hi);
CREATE INDEX IF NOT EXISTS records_by_hi ON records (kind, hi);
CREATE TABLE IF NOT EXISTS span_classes (kind TEXT NOT NULL, axis TEXT NOT NULL, class INTEGER NOT NULL,
                                         PRIMARY KEY (kind, axis, class)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS states (name TEXT PRIMARY KEY, key_id TEXT NOT NULL, body BLOB NOT NULL);
"""


def _row(r: Sequence[Any]) -> SealedBatch:
    """A record from its columns (``_COLS``, in the field order of SealedBatch)."""
    return SealedBatch(*r)


class SqliteBatchStore:
    """Implements :class:`components.storage.interface.BatchStore` on a SQLite file (one connection per thread)."""

    max_body_bytes: int | None = None

    def __init__(self, path: str | Path) -> None:
        """Open (creating or upgrading the schema of) the database at ``path``."""
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        conn = self._conn()
        with conn:
            conn.executescript(_SCHEMA)
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StorageUnavailable(f"database {self.path} has schema version {row[0]}, newer than this "
                                         f"version of the sensor hub understands ({SCHEMA_VERSION})")

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                       check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            except sqlite3.Error as err:
                raise StorageUnavailable(f"cannot open SQLite database {self.path}: {err}") from err
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _span_classes(self, kind: str, axis: str) -> set[int]:
        rows = self._conn().execute("SELECT class FROM span_classes WHERE kind = ? AND axis = ?",
                                    (kind, axis)).fetchall()
        return {r[0] for r in rows}

    def _insert(self, conn: sqlite3.Connection, kind: str, b: SealedBatch) -> int:
        lo_class, rec_class = span_class(b.hi - b.lo), span_class(b.rec_hi - b.rec_lo)
        cur = conn.execute(
            "INSERT OR IGNORE INTO records (kind, uid, bucket, lo, hi, lo_class, rec_lo, rec_hi, rec_class, n, "
            "key_id, fmt, body) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (kind, b.uid, b.bucket, b.lo, b.hi, lo_class, b.rec_lo, b.rec_hi, rec_class, b.count, b.key_id,
             b.fmt, b.body))
        conn.executemany("INSERT OR IGNORE INTO span_classes VALUES (?, ?, ?)",
                         [(kind, "ts", lo_class), (kind, "rec", rec_class)])
        return len(b.body) if cur.rowcount else 0

    def commit(self, batches: Sequence[SealedBatch], state: SealedState | None) -> int:
        """Store batches and the state record in one transaction."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                written = sum(self._insert(conn, BATCH, b) for b in batches)
                if state is not None:
                    conn.execute("INSERT OR REPLACE INTO states VALUES (?, ?, ?)",
                                 (state.name, state.key_id, state.body))
                    written += len(state.body)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as err:
            raise StorageUnavailable(f"SQLite write to {self.path} failed: {err}") from err
        return written

    def append_audit(self, chunk: SealedBatch) -> None:
        """Store a sealed chunk of audit entries."""
        conn = self._conn()
        try:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                self._insert(conn, AUDIT, chunk)
        except sqlite3.Error as err:
            raise StorageUnavailable(f"SQLite write to {self.path} failed: {err}") from err

    def _overlapping(self, kind: str, axis: str, start: float, end: float) -> list[SealedBatch]:
        lo_col, hi_col, class_col = ("lo", "hi", "lo_class") if axis == "ts" else ("rec_lo", "rec_hi", "rec_class")
        classes = sorted(self._span_classes(kind, axis))
        if not classes:
            return []
        parts, params = [], []
        for c in classes:
            parts.append(f"SELECT {_COLS} FROM records WHERE kind = ? AND {class_col} = ? "
                         f"AND {lo_col} BETWEEN ? AND ? AND {hi_col} >= ?")
            params += [kind, c, start - 2.0**c, end, start]
        sql = " UNION ALL ".join(parts) + " ORDER BY lo"
        try:
            return list(map(_row, self._conn().execute(sql, params)))
        except sqlite3.Error as err:
            raise StorageUnavailable(f"SQLite read of {self.path} failed: {err}") from err

    def batches_by_ts(self, start: float, end: float, kind: Kind = BATCH) -> list[SealedBatch]:
        """Records whose [lo, hi] overlaps [start, end], ordered by lo."""
        return self._overlapping(kind, "ts", start, end)

    def batches_by_received(self, start: float, end: float) -> list[SealedBatch]:
        """Batches whose [rec_lo, rec_hi] overlaps [start, end], ordered by lo."""
        return self._overlapping(BATCH, "rec", start, end)

    def batches_by_hi_desc(self, below: float | None = None) -> Iterator[SealedBatch]:
        """Batches in descending order of hi, fetched page by page."""
        hi, last_id = (float("inf") if below is None else below), -1
        sql = (f"SELECT id, {_COLS} FROM records WHERE kind = ? AND (hi < ? OR (hi = ? AND id < ?)) "
               "ORDER BY hi DESC, id DESC LIMIT 64")
        while True:
            try:
                rows = self._conn().execute(sql, (BATCH, hi, hi, last_id)).fetchall()
            except sqlite3.Error as err:
                raise StorageUnavailable(f"SQLite read of {self.path} failed: {err}") from err
            if not rows:
                return
            for r in rows:
                yield _row(r[1:])
            hi, last_id = rows[-1][4], rows[-1][0]

    def max_ts(self) -> float | None:
        """The greatest hi of all batches."""
        try:
            row = self._conn().execute("SELECT max(hi) FROM records WHERE kind = ?", (BATCH,)).fetchone()
        except sqlite3.Error as err:
            raise StorageUnavailable(f"SQLite read of {self.path} failed: {err}") from err
        return None if row is None or row[0] is None else float(row[0])

    def states(self, prefix: str) -> list[SealedState]:
        """State records whose name starts with ``prefix``."""
        try:
            rows = self._conn().execute("SELECT name, key_id, body FROM states WHERE substr(name, 1, ?) = ?",
                                        (len(prefix), prefix)).fetchall()
        except sqlite3.Error as err:
            raise StorageUnavailable(f"SQLite read of {self.path} failed: {err}") from err
        return [SealedState(r[0], r[1], bytes(r[2])) for r in rows]

    def records(self) -> Iterator[tuple[Kind | Literal["state"], SealedBatch | SealedState]]:
        """Every record, for re-sealing (paged by id, so it sees a consistent order while rows change)."""
        last = 0
        while True:
            rows = self._conn().execute(f"SELECT id, kind, {_COLS} FROM records WHERE id > ? ORDER BY id LIMIT 256",
                                        (last,)).fetchall()
            if not rows:
                break
            for r in rows:
                last = r[0]
                yield r[1], _row(r[2:])
        for state in self.states(""):
            yield "state", state

    def replace(self, kind: Kind | Literal["state"], old: SealedBatch | SealedState,
                new: SealedBatch | SealedState) -> bool:
        """Compare-and-swap the key and body of one record."""
        conn = self._conn()
        try:
            with conn:
                if isinstance(old, SealedState):
                    cur = conn.execute("UPDATE states SET key_id = ?, body = ? WHERE name = ? AND key_id = ? "
                                       "AND body = ?", (new.key_id, new.body, old.name, old.key_id, old.body))
                else:
                    cur = conn.execute("UPDATE records SET key_id = ?, body = ? WHERE kind = ? AND uid = ? "
                                       "AND key_id = ? AND body = ?",
                                       (new.key_id, new.body, kind, old.uid, old.key_id, old.body))
        except sqlite3.Error as err:
            raise StorageUnavailable(f"SQLite write to {self.path} failed: {err}") from err
        return cur.rowcount == 1

    def close(self) -> None:
        """Close every connection this store opened."""
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()
