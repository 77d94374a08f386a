"""SQLite's log of named records: a commit appends them, a later commit folds the log into the clustered table,
and every reader (this process or another) sees the newest version of each, whichever of the two holds it."""

from __future__ import annotations

import os
import random
import sqlite3
from pathlib import Path

import pytest

from components.storage import sqlite as sqlite_store
from components.storage.interface import SealedState
from components.storage.sqlite import SqliteBatchStore


def log_rows(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT count(*) FROM state_log").fetchone()[0])
    finally:
        conn.close()


@pytest.mark.parametrize("seed", range(4))
def test_readers_in_other_processes_see_the_newest_version_across_folds(tmp_path: Path, seed: int,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_store, "LOG_FOLD_ROWS", 7)
    monkeypatch.setattr(sqlite_store, "LOG_MIN_FOLD_ROWS", 3)
    path = tmp_path / "iot.sqlite3"
    writer, reader = SqliteBatchStore(path), SqliteBatchStore(path)  # two views of the log, as two processes
    rnd = random.Random(seed)
    names = [f"device/{i:04x}" for i in range(40)] + ["storage/0-of-1", "storage/1-of-2"]
    model: dict[str, SealedState] = {}
    folds = 0
    for step in range(300):
        op = rnd.random()
        if op < 0.45:
            batch = [SealedState(n, f"k{step % 3}", os.urandom(rnd.randrange(1, 300)))
                     for n in rnd.sample(names, rnd.randrange(1, 6))]
            before = log_rows(path)
            writer.commit([], batch)
            after = log_rows(path)
            folds += after < before + len(batch)
            assert after < 7  # folded once it reached the limit
            model.update((s.name, s) for s in batch)
        elif op < 0.55 and model:
            name = rnd.choice(sorted(model))
            new = SealedState(name, "k9", os.urandom(20))
            store = rnd.choice((writer, reader))
            assert store.replace("state", model[name], new)
            assert not store.replace("state", model[name], SealedState(name, "k8", b"late"))  # stale now
            model[name] = new
        else:
            store = rnd.choice((writer, reader))
            wanted = [*rnd.sample(names, rnd.randrange(0, 8)), "device/ffff"]
            assert sorted(store.get_states(wanted), key=lambda s: s.name) == sorted(
                (model[n] for n in set(wanted) if n in model), key=lambda s: s.name)
            prefix = rnd.choice(("", "device/", "device/000", "storage/"))
            assert store.states(prefix) == [model[n] for n in sorted(model) if n.startswith(prefix)]
    assert folds >= 10
    assert sorted((s for _, s in reader.records() if isinstance(s, SealedState)), key=lambda s: s.name) == [
        model[n] for n in sorted(model)]
    assert log_rows(path) == 0  # records() folded the log: no earlier version is left under an older key


def test_a_commit_appends_its_rows_instead_of_rewriting_pages_all_over_a_large_table(tmp_path: Path) -> None:
    path = tmp_path / "iot.sqlite3"
    store = SqliteBatchStore(path)
    rows = [SealedState(f"device/{os.urandom(8).hex()}", "k0", os.urandom(150)) for _ in range(20_000)]
    for i in range(0, len(rows), 5_000):
        store.commit([], rows[i:i + 5_000])
    store.fold()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    store.commit([], [SealedState(r.name, "k1", os.urandom(150)) for r in random.Random(1).sample(rows, 100)])
    frames = (path.with_name(path.name + "-wal").stat().st_size - 32) // (page + 24)
    conn.close()
    # 100 rows of 150 bytes fill 5 pages; rewritten in place they would dirty about 100 of the table's 900
    assert frames <= 20, frames
    assert len(store.states("device/")) == len(rows)


def test_a_store_of_schema_version_2_gains_the_log_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "iot.sqlite3"
    SqliteBatchStore(path).close()
    conn = sqlite3.connect(path)
    conn.executescript("DROP TABLE state_log; UPDATE meta SET value = '2' WHERE key = 'schema_version';"
                       "INSERT INTO states VALUES ('device/1', 'k0', x'0102');")
    conn.close()
    store = SqliteBatchStore(path)
    assert store.states("") == [SealedState("device/1", "k0", b"\x01\x02")]
    store.commit([], [SealedState("device/1", "k1", b"\x03")])
    assert store.get_states(["device/1"]) == [SealedState("device/1", "k1", b"\x03")]
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "3"
    conn.close()
