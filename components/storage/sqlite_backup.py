"""Copies of a live SQLite store: SQLite's online backup API, from a snapshot that the writer does not disturb.

:func:`backup` opens one read transaction on the store and copies its pages from that snapshot, a step of
:data:`STEP_PAGES` pages at a time (the progress callback is called after each). In WAL mode a reader never
blocks the writer, so storage goes on committing meanwhile; its commits go to the WAL and are not in the copy,
which is exactly the store as it was when the backup began. The copy is written next to its destination and
renamed into place once it is complete and checked, so a backup that fails leaves nothing half written.

:func:`restore` copies a checked copy over the store with the same API in the other direction: one write
transaction, so the store is either the old one or the copy, never a mix. :func:`key_samples` lists the keys a
store's records are sealed with (one record of each, to open) and a few device rows, for the caller to check the
configured keys against before anything is replaced.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from components.core.errors import StorageUnavailable
from components.storage.interface import SealedBatch, SealedState

STEP_PAGES = 1024
"""Pages copied per backup step (4 MiB at SQLite's default page size)."""
Progress = Callable[[int, int], None]
"""Called with (pages copied, pages in all) after each step."""


@dataclass(frozen=True)
class KeySamples:
    """What a store's keys must open: one record per data key id (its kind and record), and some device rows."""

    records: dict[str, tuple[str, SealedBatch | SealedState]]
    device_rows: list[SealedState]
    counts: dict[str, int]
    """Records and named records sealed with each key id."""


def _open(path: str, what: str) -> sqlite3.Connection:
    if not Path(path).is_file():
        raise StorageUnavailable(f"{what} {path} does not exist")
    try:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=10000")
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.DatabaseError as err:
        raise StorageUnavailable(f"{what} {path} is not a sensor hub store: {err}") from err
    if version is None:
        conn.close()
        raise StorageUnavailable(f"{what} {path} is not a sensor hub store: it has no schema version")
    return conn


def backup(store_path: str, target: str, progress: Progress | None = None, step_pages: int = STEP_PAGES) -> int:
    """Copy the store at ``store_path`` (which may be written meanwhile) into the new file ``target``; the pages
    copied. ``target`` is replaced if it exists (the caller decides whether it may)."""
    source = _open(store_path, "SQLite store")
    tmp = f"{target}.partial"
    Path(tmp).unlink(missing_ok=True)
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    try:
        source.execute("BEGIN")  # one snapshot for every step: a commit meanwhile does not restart the copy
        source.execute("SELECT count(*) FROM meta").fetchone()
        dest = sqlite3.connect(tmp)
        try:
            def step(status: int, remaining: int, total: int) -> None:
                if progress is not None:
                    progress(total - remaining, total)

            source.backup(dest, pages=step_pages, progress=step)
            copied = dest.execute("PRAGMA page_count").fetchone()[0]
            check = dest.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise StorageUnavailable(f"the copy of {store_path} failed SQLite's check: {check}")
        finally:
            dest.close()
        source.execute("COMMIT")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except sqlite3.Error as err:
        raise StorageUnavailable(f"backup of {store_path} to {target} failed: {err}") from err
    finally:
        source.close()
        Path(tmp).unlink(missing_ok=True)
    return int(copied)


_NAMED = ("SELECT key_id, count(*), min(name), body FROM states GROUP BY key_id",
          "SELECT name, key_id, body FROM states WHERE name >= 'device/' AND name < 'device0' LIMIT ?")
_LOGGED = ("SELECT key_id, count(*), min(name), body FROM state_log GROUP BY key_id",
           "SELECT name, key_id, body FROM state_log WHERE name >= 'device/' AND name < 'device0' LIMIT ?")


def key_samples(path: str, rows: int = 3) -> KeySamples:
    """One record sealed with each key id in the store at ``path``, and up to ``rows`` device rows."""
    conn = _open(path, "backup")
    try:
        records: dict[str, tuple[str, SealedBatch | SealedState]] = {}
        counts: dict[str, int] = {}
        for key_id, n, first in conn.execute("SELECT key_id, count(*), min(id) FROM records GROUP BY key_id"):
            r = conn.execute("SELECT kind, uid, bucket, lo, hi, rec_lo, rec_hi, n, key_id, body, fmt, grp "
                             "FROM records WHERE id = ?", (first,)).fetchone()
            records[key_id] = (r[0], SealedBatch(r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], bytes(r[9]), r[10],
                                                 r[11]))
            counts[key_id] = n
        logged = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'state_log'").fetchone() is not None
        device_rows: list[SealedState] = []
        # named records not folded yet are in the log (a copy of a version before it has none)
        for by_key, first_rows in (_NAMED, _LOGGED) if logged else (_NAMED,):
            for key_id, n, name, body in conn.execute(by_key):
                counts[key_id] = counts.get(key_id, 0) + n
                if key_id not in records:  # SQLite takes body from the row that gave min(name)
                    records[key_id] = ("state", SealedState(name, key_id, bytes(body)))
            device_rows += [SealedState(r[0], r[1], bytes(r[2]))
                            for r in conn.execute(first_rows, (rows - len(device_rows),))]
    except sqlite3.Error as err:
        raise StorageUnavailable(f"cannot read the backup {path}: {err}") from err
    finally:
        conn.close()
    return KeySamples(records, device_rows, counts)


def restore(copy: str, store_path: str) -> int:
    """Replace the store at ``store_path`` (created if missing) by ``copy`` in one transaction; the pages copied.

    Nothing may have the store open meanwhile: stop storage and the query callees first.
    """
    source = _open(copy, "backup")
    Path(store_path).parent.mkdir(parents=True, exist_ok=True)
    try:
        dest = sqlite3.connect(store_path, timeout=10)
        try:
            source.backup(dest)  # every page in one step: one write transaction on the store
            pages = int(dest.execute("PRAGMA page_count").fetchone()[0])
        finally:
            dest.close()
    except sqlite3.Error as err:
        raise StorageUnavailable(f"restore of {copy} into {store_path} failed: {err}") from err
    finally:
        source.close()
    return pages
