"""SqliteBatchStore: sealed records in one SQLite file, WAL mode, one transaction per commit and per swap.

Finding the records that overlap a window must not scan the table. Each record stores the class of its
span (see :func:`components.storage.interface.span_class`); an index on (class, lower bound, upper bound) answers
"overlaps [start, end]" with one range seek per class present: lower bound in [start - 2**class, end]. A second
index leads with the device group, so a one-device read seeks inside its group only.

Named records (device rows, shard states) are appended to a log, ``state_log``, and folded into their clustered
table, ``states``, once the log holds :data:`LOG_FOLD_ROWS` of them: in a fleet of many devices, rewriting each row
in place would dirty one page of the table per device a commit names, where appending dirties a few, and a fold
writes each page once for thousands of rows. A read takes the newest of the two (see :class:`_LogView`).

New files use incremental auto-vacuum, so the pages that compaction frees are given back to the file system.
Schema version 1 (before device groups) is upgraded in place: its records become group 0 (any device). Version
2 (before the log) gains the empty log.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from components.core.errors import StorageUnavailable
from components.storage.interface import (
    AUDIT,
    BATCH,
    SEGMENT,
    Groups,
    Kind,
    Removed,
    SealedBatch,
    SealedState,
    span_class,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
LOG_FOLD_ROWS = 16_384
"""Most named records the log holds before a commit folds it into ``states`` (newest version of each name, in
name order, in the commit's transaction)."""
LOG_MIN_FOLD_ROWS = 256
"""A log of at least this many rows, and of four times as many as ``states`` holds, is folded even below
:data:`LOG_FOLD_ROWS`: a small fleet's rows fold cheaply, and their earlier versions would otherwise fill the file."""
BUSY_TIMEOUT_MS = 10_000
_COLS = "uid, bucket, lo, hi, rec_lo, rec_hi, n, key_id, body, fmt, grp"
_IN_CHUNK = 500
CACHE_KIB = 8_192
"""Page cache per connection: device rows are rewritten at random places of their table, and a page read back
from disk for each of them costs more than the write."""

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
    body BLOB NOT NULL,
    grp INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS records_by_ts ON records (kind, lo_class, lo, hi);
CREATE INDEX IF NOT EXISTS records_by_received ON records (kind, rec_class, rec_lo, rec_hi);
CREATE INDEX IF NOT EXISTS records_by_hi ON records (kind, hi);
CREATE TABLE IF NOT EXISTS span_classes (kind TEXT NOT NULL, axis TEXT NOT NULL, class INTEGER NOT NULL,
                                         PRIMARY KEY (kind, axis, class)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS states (name TEXT PRIMARY KEY, key_id TEXT NOT NULL, body BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state_log (seq INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL,
                                      key_id TEXT NOT NULL, body BLOB NOT NULL);
"""
_FOLD = """
INSERT OR REPLACE INTO states (name, key_id, body)
    SELECT name, key_id, body FROM state_log WHERE seq IN (SELECT max(seq) FROM state_log GROUP BY name)
    ORDER BY name;
DELETE FROM state_log;
"""
_CLUSTER_STATES = """
CREATE TABLE states_clustered (name TEXT PRIMARY KEY, key_id TEXT NOT NULL, body BLOB NOT NULL) WITHOUT ROWID;
INSERT INTO states_clustered SELECT name, key_id, body FROM states;
DROP TABLE states;
ALTER TABLE states_clustered RENAME TO states;
"""
_GROUP_INDEXES = """
CREATE INDEX IF NOT EXISTS records_by_group_ts ON records (kind, grp, lo_class, lo, hi);
CREATE INDEX IF NOT EXISTS records_by_group_received ON records (kind, grp, rec_class, rec_lo, rec_hi);
CREATE INDEX IF NOT EXISTS records_by_group_hi ON records (kind, grp, hi);
"""


_SPAN = "CASE WHEN c.class < 63 THEN 1 << c.class ELSE 1e999 END"
"""The longest span of a record of class ``c.class`` in SQL (2**class; infinite past 64-bit integers)."""
_OVERLAPPING: dict[tuple[str, int], str] = {}
"""The overlap statement per axis and number of groups (built once)."""


def _groups_sql(groups: Groups) -> tuple[str, list[int]]:
    """A ``grp IN (...)`` condition for ``groups`` (empty for every group)."""
    if groups is None:
        return "", []
    ids = sorted(set(groups))
    return f" AND grp IN ({','.join('?' * len(ids))})", ids


def _row(r: Sequence[Any]) -> SealedBatch:
    """A record from its columns (``_COLS``, in the field order of SealedBatch)."""
    return SealedBatch(*r)


class SqliteBatchStore:
    """Implements :class:`components.storage.interface.BatchStore` on a SQLite file (one connection per thread)."""

    max_body_bytes: int | None = None
    expires_itself = False

    def __init__(self, path: str | Path) -> None:
        """Open (creating or upgrading the schema of) the database at ``path``."""
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._known_classes: set[tuple[str, str, int]] = set()
        self._log = _LogView()
        self._fold_at = min(LOG_FOLD_ROWS, LOG_MIN_FOLD_ROWS)  # until the first fold has counted the rows
        conn = self._conn()
        with conn:
            conn.executescript(_SCHEMA)
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StorageUnavailable(f"database {self.path} has schema version {row[0]}, newer than this "
                                         f"version of the sensor hub understands ({SCHEMA_VERSION})")
            elif int(row[0]) < SCHEMA_VERSION:
                columns = {r[1] for r in conn.execute("PRAGMA table_info(records)")}
                if "grp" not in columns:
                    conn.execute("ALTER TABLE records ADD COLUMN grp INTEGER NOT NULL DEFAULT 0")
                conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
                log.info("upgraded %s from schema version %s to %d", self.path, row[0], SCHEMA_VERSION)
            conn.executescript(_GROUP_INDEXES)
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'states'").fetchone()[0]
        if "WITHOUT ROWID" not in sql.upper():  # files of earlier versions: rows in name order, one b-tree
            conn.executescript(f"BEGIN IMMEDIATE; {_CLUSTER_STATES} COMMIT;")
            log.info("%s: named records clustered by name", self.path)

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                       check_same_thread=False)
                conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect on a new file only (before WAL)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
                conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            except sqlite3.Error as err:
                raise StorageUnavailable(f"cannot open SQLite database {self.path}: {err}") from err
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _insert(self, conn: sqlite3.Connection, kind: str, records: Sequence[SealedBatch],
                classes: set[tuple[str, str, int]]) -> int:
        """Insert records (those whose uid is stored already are skipped); the body bytes written. Span classes
        the table gains are added to ``classes``, for the caller to remember once its transaction commits."""
        rows = []
        for b in records:
            lo_class, rec_class = span_class(b.hi - b.lo), span_class(b.rec_hi - b.rec_lo)
            rows.append((kind, b.uid, b.bucket, b.lo, b.hi, lo_class, b.rec_lo, b.rec_hi, rec_class, b.count,
                         b.key_id, b.fmt, b.body, b.group))
            for entry in ((kind, "ts", lo_class), (kind, "rec", rec_class)):
                if entry not in self._known_classes and entry not in classes:  # the table only grows
                    conn.execute("INSERT OR IGNORE INTO span_classes VALUES (?, ?, ?)", entry)
                    classes.add(entry)
        last = conn.execute("SELECT max(id) FROM records").fetchone()[0] or 0
        changes = conn.total_changes
        conn.executemany("INSERT OR IGNORE INTO records (kind, uid, bucket, lo, hi, lo_class, rec_lo, rec_hi, "
                         "rec_class, n, key_id, fmt, body, grp) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
        if conn.total_changes - changes == len(rows):  # the usual case: every record is new
            return sum(len(b.body) for b in records)
        # some uids were stored already; ids only grow, so what this call added lies above the last id before it
        written: int = conn.execute("SELECT coalesce(sum(length(body)), 0) FROM records WHERE id > ?",
                                    (last,)).fetchone()[0]
        return written

    @property
    def atomic_commit(self) -> bool:
        """A commit is one transaction."""
        return True

    def setting(self, name: str, default: str) -> str:
        """The store's value of ``name`` (``default`` from its first use), kept in the meta table."""
        key = f"setting:{name}"
        try:
            conn = self._conn()
            conn.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, default))
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error as err:
            raise StorageUnavailable(f"SQLite write to {self.path} failed: {err}") from err
        return str(row[0])

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``) on this thread's connection: committed when the block
        ends, rolled back when it raises; a SQLite error becomes StorageUnavailable."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as err:
            raise StorageUnavailable(f"SQLite write to {self.path} failed: {err}") from err

    def _vacuum(self) -> None:
        """Give freed pages back to the file system (stepped to the end: ``execute`` would free one page)."""
        try:
            self._conn().executescript("PRAGMA incremental_vacuum;")
        except sqlite3.Error as err:
            raise StorageUnavailable(f"SQLite write to {self.path} failed: {err}") from err

    def commit(self, batches: Sequence[SealedBatch], states: Sequence[SealedState]) -> int:
        """Store batches and named records in one transaction."""
        classes: set[tuple[str, str, int]] = set()
        with self._writing() as conn:
            written = self._insert(conn, BATCH, batches, classes)
            conn.executemany("INSERT INTO state_log (name, key_id, body) VALUES (?, ?, ?)",
                             [(st.name, st.key_id, st.body) for st in states])
            written += sum(len(st.body) for st in states)
            first, last = conn.execute("SELECT (SELECT min(seq) FROM state_log), "
                                       "(SELECT max(seq) FROM state_log)").fetchone()
            if first is not None and last - first + 1 >= self._fold_at:
                self._fold(conn)
        self._known_classes |= classes
        return written

    def append_audit(self, chunk: SealedBatch) -> None:
        """Store a sealed chunk of audit entries."""
        classes: set[tuple[str, str, int]] = set()
        with self._writing() as conn:
            self._insert(conn, AUDIT, [chunk], classes)
        self._known_classes |= classes

    def _overlapping(self, kind: str, axis: str, start: float, end: float, groups: Groups
                     ) -> list[SealedBatch]:
        """One statement (one snapshot): for each span class present, one range seek (per group when limited to
        groups, ``grp`` leading the index) of lower bounds in [start - 2**class, end]."""
        if groups is not None and not groups:
            return []
        ids = () if groups is None else tuple(sorted(set(groups)))
        sql = _OVERLAPPING.get((axis, len(ids)))
        if sql is None:
            lo_col, hi_col, class_col = ("lo", "hi", "lo_class") if axis == "ts" else ("rec_lo", "rec_hi", "rec_class")
            in_groups = f" AND r.grp IN ({','.join('?' * len(ids))})" if ids else ""
            sql = (f"SELECT {', '.join('r.' + c for c in _COLS.split(', '))} FROM span_classes AS c CROSS JOIN "
                   f"records AS r WHERE c.kind = ? AND c.axis = '{axis}' AND r.kind = c.kind{in_groups} AND "
                   f"r.{class_col} = c.class AND r.{lo_col} BETWEEN ? - {_SPAN} AND ? AND r.{hi_col} >= ? "
                   "ORDER BY r.lo")
            _OVERLAPPING[axis, len(ids)] = sql
        try:
            return list(map(_row, self._conn().execute(sql, (kind, *ids, start, end, start))))
        except sqlite3.Error as err:
            raise StorageUnavailable(f"SQLite read of {self.path} failed: {err}") from err

    def batches_by_ts(self, start: float, end: float, kind: Kind = BATCH, groups: Groups = None
                      ) -> list[SealedBatch]:
        """Records whose [lo, hi] overlaps [start, end], ordered by lo."""
        return self._overlapping(kind, "ts", start, end, groups)

    def batches_by_received(self, start: float, end: float, kind: Kind = BATCH, groups: Groups = None
                            ) -> list[SealedBatch]:
        """Records whose [rec_lo, rec_hi] overlaps [start, end], ordered by lo."""
        return self._overlapping(kind, "rec", start, end, groups)

    def batches_by_hi_desc(self, below: float | None = None, kind: Kind = BATCH, groups: Groups = None
                           ) -> Iterator[SealedBatch]:
        """Records in descending order of hi, fetched page by page."""
        if groups is not None and not groups:
            return
        hi, last_id = (float("inf") if below is None else below), -1
        in_groups, group_ids = _groups_sql(groups)
        sql = (f"SELECT id, {_COLS} FROM records WHERE kind = ? AND (hi < ? OR (hi = ? AND id < ?)){in_groups} "
               "ORDER BY hi DESC, id DESC LIMIT 64")
        while True:
            try:
                rows = self._conn().execute(sql, (kind, hi, hi, last_id, *group_ids)).fetchall()
            except sqlite3.Error as err:
                raise StorageUnavailable(f"SQLite read of {self.path} failed: {err}") from err
            if not rows:
                return
            for r in rows:
                yield _row(r[1:])
            hi, last_id = rows[-1][4], rows[-1][0]

    def max_ts(self) -> float | None:
        """The greatest hi of all batches and segments (two index seeks)."""
        try:
            conn = self._conn()
            his = [conn.execute("SELECT max(hi) FROM records WHERE kind = ?", (kind,)).fetchone()[0]
                   for kind in (BATCH, SEGMENT)]
        except sqlite3.Error as err:
            raise StorageUnavailable(f"SQLite read of {self.path} failed: {err}") from err
        return max((float(hi) for hi in his if hi is not None), default=None)

    def pending_windows(self, window_s: int, before: float) -> list[tuple[int, int]]:
        """(window, group) of write batches with hi below ``before`` (a range of the hi index)."""
        try:
            rows = self._conn().execute("SELECT DISTINCT lo, grp FROM records WHERE kind = ? AND hi < ?",
                                        (BATCH, before)).fetchall()
        except sqlite3.Error as err:
            raise StorageUnavailable(f"SQLite read of {self.path} failed: {err}") from err
        return sorted({(int(lo // window_s), grp) for lo, grp in rows})

    def swap(self, old: Sequence[SealedBatch], new: Sequence[SealedBatch]) -> bool:
        """Delete ``old`` and insert segments ``new`` in one transaction, then give freed pages back."""
        classes: set[tuple[str, str, int]] = set()
        try:
            with self._writing() as conn:
                for b in old:
                    cur = conn.execute("DELETE FROM records WHERE uid = ? AND key_id = ? AND kind IN (?, ?)",
                                       (b.uid, b.key_id, BATCH, SEGMENT))
                    if cur.rowcount != 1:
                        raise _Gone
                self._insert(conn, SEGMENT, new, classes)
        except _Gone:  # rolled back: one of the old records was swapped or deleted meanwhile
            return False
        self._known_classes |= classes
        self._vacuum()
        return True

    def delete_before(self, before: float, limit: int) -> Removed:
        """Delete up to ``limit`` batches and segments with hi below ``before`` (oldest first, ranges of the hi
        index) in one transaction, then give the freed pages back."""
        rows: list[tuple[int, int, int]] = []
        with self._writing() as conn:
            for kind in (BATCH, SEGMENT):
                rows += conn.execute("SELECT id, n, length(body) FROM records WHERE kind = ? AND hi < ? "
                                     "ORDER BY hi LIMIT ?", (kind, before, limit - len(rows))).fetchall()
                if len(rows) >= limit:
                    break
            for i in range(0, len(rows), _IN_CHUNK):
                ids = [r[0] for r in rows[i:i + _IN_CHUNK]]
                conn.execute(f"DELETE FROM records WHERE id IN ({','.join('?' * len(ids))})", ids)
        if rows:
            self._vacuum()
        return Removed(len(rows), sum(r[1] for r in rows), sum(r[2] for r in rows))

    def _fold(self, conn: sqlite3.Connection) -> None:
        """Fold the log into ``states``, inside the caller's write transaction."""
        for statement in _FOLD.strip().split(";\n"):
            conn.execute(statement)
        rows = conn.execute("SELECT count(*) FROM states").fetchone()[0]
        self._fold_at = min(LOG_FOLD_ROWS, max(LOG_MIN_FOLD_ROWS, 4 * rows))

    def fold(self) -> None:
        """Fold the log into ``states`` now (before re-sealing every record)."""
        with self._writing() as conn:
            self._fold(conn)

    def _read_states(self, names: Sequence[str] | None, prefix: str) -> list[SealedState]:
        """The newest version of named records, from the log or from ``states``: those of ``names``, or (names
        None) those whose name starts with ``prefix``, in name order. One read transaction, so that the log and
        the table are seen at the same instant."""
        conn = self._conn()
        try:
            with self._log.lock:
                conn.execute("BEGIN")
                try:
                    logged = self._log.refresh(conn)
                    if names is None:
                        sql = "SELECT name, key_id, body FROM states"
                        params: tuple[str, ...] = ()
                        if prefix:
                            sql += " WHERE name >= ? AND name < ?"
                            params = (prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1))
                        rows = {r[0]: r for r in conn.execute(sql, params)}
                        seqs = [seq for name, seq in logged.items() if name.startswith(prefix)]
                    else:
                        wanted = list(dict.fromkeys(names))
                        base = [n for n in wanted if n not in logged]
                        rows = {}
                        for i in range(0, len(base), _IN_CHUNK):
                            chunk = base[i:i + _IN_CHUNK]
                            rows.update((r[0], r) for r in conn.execute(
                                f"SELECT name, key_id, body FROM states WHERE name IN ({','.join('?' * len(chunk))})",
                                tuple(chunk)))
                        seqs = [logged[n] for n in wanted if n in logged]
                    for i in range(0, len(seqs), _IN_CHUNK):
                        part = seqs[i:i + _IN_CHUNK]
                        rows.update((r[0], r) for r in conn.execute(
                            f"SELECT name, key_id, body FROM state_log WHERE seq IN ({','.join('?' * len(part))})",
                            tuple(part)))
                finally:
                    conn.execute("COMMIT")
        except sqlite3.Error as err:
            raise StorageUnavailable(f"SQLite read of {self.path} failed: {err}") from err
        return [SealedState(r[0], r[1], bytes(r[2])) for _, r in sorted(rows.items())]

    def states(self, prefix: str) -> list[SealedState]:
        """Named records whose name starts with ``prefix`` (a range of the primary key, and the log)."""
        return self._read_states(None, prefix)

    def get_states(self, names: Sequence[str]) -> list[SealedState]:
        """The named records of ``names`` that exist (primary-key lookups, and the log)."""
        return self._read_states(names, "")

    def records(self) -> Iterator[tuple[Kind | Literal["state"], SealedBatch | SealedState]]:
        """Every record, for re-sealing (paged by id, so it sees a consistent order while rows change). The log
        is folded first, so that no earlier version of a named record stays sealed under a retired key."""
        self.fold()
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
        """Compare-and-swap the key and body of one record (of a named record: of its newest version, and the
        new one is logged like a commit's)."""
        with self._writing() as conn:
            if not isinstance(old, SealedState):
                cur = conn.execute("UPDATE records SET key_id = ?, body = ? WHERE kind = ? AND uid = ? "
                                   "AND key_id = ? AND body = ?",
                                   (new.key_id, new.body, kind, old.uid, old.key_id, old.body))
                return cur.rowcount == 1
            current = conn.execute("SELECT key_id, body FROM state_log WHERE name = ? ORDER BY seq DESC LIMIT 1",
                                   (old.name,)).fetchone()
            if current is None:
                current = conn.execute("SELECT key_id, body FROM states WHERE name = ?", (old.name,)).fetchone()
            swapped = current is not None and (current[0], bytes(current[1])) == (old.key_id, old.body)
            if swapped:
                conn.execute("INSERT INTO state_log (name, key_id, body) VALUES (?, ?, ?)",
                             (old.name, new.key_id, new.body))
        return swapped

    def close(self) -> None:
        """Close every connection this store opened."""
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()


class _Gone(Exception):
    """A record a swap would delete is no longer there: the transaction is rolled back."""


class _LogView:
    """One process's view of the log: the seq of the newest logged version of each name in it.

    ``refresh`` reads only what was appended since the last call (seqs only grow: the log is AUTOINCREMENT),
    and forgets names that a fold has moved into ``states`` (below the log's first seq). Reads hold ``lock``
    from the start of their transaction to its end, so the view always matches the snapshot they read.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._seqs: dict[str, int] = {}  # of strings to ints: never walked by the garbage collector
        self._seen = 0  # every seq up to this one is in the view (or was folded)
        self._first = 0  # the log's first seq at the last look: only a fold moves it, by emptying the log

    def refresh(self, conn: sqlite3.Connection) -> dict[str, int]:
        """Bring the view up to the snapshot of ``conn``'s open read transaction, and return it."""
        first = conn.execute("SELECT min(seq) FROM state_log").fetchone()[0]
        if first is None:
            self._seqs.clear()
            return self._seqs
        if first != self._first:  # folded since the last look: what the view holds is in states now
            self._seqs.clear()
            self._first = first
            self._seen = max(self._seen, first - 1)
        for seq, name in conn.execute("SELECT seq, name FROM state_log WHERE seq > ?", (self._seen,)):
            self._seqs[name] = seq
            self._seen = seq
        return self._seqs
