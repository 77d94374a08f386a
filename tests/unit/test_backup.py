"""Backups of a live SQLite store (``python -m components backup``/``restore``), with the real ingest service
writing to it through the whole copy, and restores checked against the configured keys."""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from components.__main__ import main
from components.core.query import QueryService
from components.core.sealing import KeyFile
from components.core.settings import Settings
from components.ops import backups
from components.ops.waiting import wait_until
from components.storage import sqlite_backup
from components.storage.sqlite import SqliteBatchStore
from tests.support.corefill import BATCHING, QUERY, STORAGE, H, T, ingest, topic
from tests.support.harness import derive_settings, stack_settings

COMMITTED_BEFORE = (0.0, 999.0)
"""The window of ts fully committed before the backup begins."""


def events(first_ts: float, n: int, seq0: int) -> list[tuple[str, Any, float]]:
    """``n`` events of 5 readings of devices 1 and 2, from ``first_ts``."""
    out = []
    for i in range(n):
        ts = first_ts + i
        readings: Any = [{"value": ts + k, "ts": ts + k / 10, "seq": seq0 + 5 * i + k + 1} for k in range(5)]
        out.append((topic("1", H), readings, ts + 1))
        out.append((topic("2", T), {"value": -ts, "ts": ts + 0.5}, ts + 1))
    return out


def digest(path: str) -> str:
    """A digest of the database file and its WAL, if any."""
    h = hashlib.sha256()
    for part in sorted(Path(path).parent.glob(Path(path).name + "*")):
        h.update(part.name.encode() + part.read_bytes())
    return h.hexdigest()


def answers(settings: Settings, path: str) -> list[Any]:
    """What the store at ``path`` answers about the window committed before the backup."""
    store = SqliteBatchStore(path)
    try:
        q = QueryService(QUERY, store, KeyFile(settings.keys.file).load)
        start, end = COMMITTED_BEFORE
        return [q.fetch_between_window(start, end), q.fetch_between_window(start, end, device_id="1"),
                q.aggregate(start, end, 60.0), q.fetch_between_window(start, end, device_id="2", sensor_type=T)]
    finally:
        store.close()


def test_a_backup_taken_while_storage_writes_restores_elsewhere_with_the_same_answers(tmp_path: Path) -> None:
    settings = stack_settings(tmp_path / "live")
    ring = KeyFile(settings.keys.file).load()
    store = SqliteBatchStore(settings.storage.sqlite_path)
    ingested = ingest(store, ring, replace(STORAGE, writer_queue=1000),
                      replace(BATCHING, max_readings=50, max_age_s=0.01))
    service = ingested.service
    ingested.events(events(0.0, 200, 0))  # ts 0 .. 999.9: one window, committed before the backup begins
    service.tick()
    first = service.stats()["received"]
    stop, during = threading.Event(), []

    def keep_writing() -> None:  # the caller thread of the ingest service from now on; bounded
        for n in range(2000):
            if stop.is_set():
                return
            ingested.events(events(5000.0 + 10 * n, 1, 1000 + 5 * n))
            service.tick()
            stop.wait(0.002)


    def committed() -> bool:
        service.tick()
        return bool(service.stats()["stored"] >= first)

    wait_until(committed, 30, "the first window to be committed")
    writer = threading.Thread(target=keep_writing)
    writer.start()

    def progress(done: int, total: int) -> None:  # hold each step until storage has committed again
        stored = service.stats()["stored"]
        for _ in range(500):
            if service.stats()["stored"] > stored:
                break
            stop.wait(0.01)
        during.append(service.stats()["stored"])

    copy = str(tmp_path / "copies" / "iot.backup")
    try:
        sqlite_backup.backup(settings.storage.sqlite_path, copy, progress, step_pages=2)
    finally:
        stop.set()
        writer.join(30)
        assert service.flush(30)
        store.close()
    assert len(during) >= 3 and during[-1] > during[0]  # storage committed while the copy was made
    elsewhere = derive_settings(settings, tmp_path / "elsewhere", {"keys": {"file": settings.keys.file}})
    assert backups.restore(elsewhere, copy) == 0
    assert answers(settings, elsewhere.storage.sqlite_path) == answers(settings, settings.storage.sqlite_path)
    assert len(answers(settings, elsewhere.storage.sqlite_path)[0]) == 200 * 6


def test_backup_refuses_a_path_that_exists_unless_forced_and_reports_progress(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = stack_settings(tmp_path / "live")
    ring = KeyFile(settings.keys.file).load()
    ingest(SqliteBatchStore(settings.storage.sqlite_path), ring).events(events(0.0, 50, 0)).flush()
    taken = tmp_path / "taken.sqlite3"
    taken.write_bytes(b"keep me")
    argv = ["--config", settings.config_path, "backup", str(taken)]
    assert main(argv) == 2
    assert f"{taken} exists; choose another path or pass --force" in capsys.readouterr().err
    assert taken.read_bytes() == b"keep me"
    assert main([*argv, "--force"]) == 0
    out = capsys.readouterr().out
    assert "pages (100%)" in out and f"copied to {taken}" in out
    assert answers(settings, str(taken)) == answers(settings, settings.storage.sqlite_path)


def test_a_restore_with_a_missing_data_key_names_it_and_changes_nothing(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    settings = stack_settings(tmp_path / "live")
    ring = KeyFile(settings.keys.file).load()
    ingest(SqliteBatchStore(settings.storage.sqlite_path), ring).events(events(0.0, 20, 0)).flush()
    copy = str(tmp_path / "copy.sqlite3")
    assert backups.backup(settings, copy) == 0
    other = derive_settings(settings, tmp_path / "other")  # a key file of its own: other keys
    other_ring = KeyFile(other.keys.file).load()
    other_store = SqliteBatchStore(other.storage.sqlite_path)
    ingest(other_store, other_ring).events(events(0.0, 3, 0)).flush()
    other_store.close()  # the last connection checkpoints the WAL: the files stay as they are from here on
    before = digest(other.storage.sqlite_path)
    assert main(["--config", other.config_path, "restore", copy]) == 1
    err = capsys.readouterr().err
    assert f"data key {ring.active_id} is missing" in err and "is unchanged" in err
    assert digest(other.storage.sqlite_path) == before


def test_a_restore_with_the_right_data_key_but_another_index_key_says_so_and_changes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    settings = stack_settings(tmp_path / "live")
    ring = KeyFile(settings.keys.file).load()
    ingest(SqliteBatchStore(settings.storage.sqlite_path), ring).events(events(0.0, 20, 0)).flush()
    copy = str(tmp_path / "copy.sqlite3")
    assert backups.backup(settings, copy) == 0
    target = derive_settings(settings, tmp_path / "target")
    target = replace(target, keys=replace(target.keys, source="env"))
    monkeypatch.setenv("IOT_KEYS", base64.b64encode(ring.keys[ring.active_id]).decode())
    monkeypatch.setenv("IOT_INDEX_KEY", base64.b64encode(os.urandom(32)).decode())
    assert not Path(target.storage.sqlite_path).exists()
    assert backups.restore(target, copy) == 1
    err = capsys.readouterr().err
    assert "the index key is not the one this store was written with" in err
    assert not Path(target.storage.sqlite_path).exists()
    monkeypatch.setenv("IOT_INDEX_KEY", base64.b64encode(ring.index_key).decode())
    assert backups.restore(target, copy) == 0
    assert answers(settings, target.storage.sqlite_path) == answers(settings, settings.storage.sqlite_path)


def test_backup_and_restore_say_what_to_use_on_dynamodb(tmp_path: Path) -> None:
    settings = stack_settings(tmp_path / "live", overrides={"storage": {"backend": "dynamodb"}})
    with pytest.raises(Exception, match="point-in-time recovery or an export to S3"):
        backups.backup(settings, str(tmp_path / "x"))
