"""The device spool: numbered readings survive a crash until acknowledged; the file stays small."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from devices.spool import COMPACT_MIN_RECORDS, Spool, SpoolLocked


def readings(n: int, start: int = 0) -> list[dict]:
    return [{"value": float(i), "ts": 100.0 + i} for i in range(start, start + n)]


def test_readings_are_numbered_from_one_and_released_by_acks(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "7", max_pending=100)
    taken = spool.add("humidity", readings(3)) + spool.add("temperature", readings(2))
    assert [r["seq"] for r in taken] == [1, 2, 3, 4, 5]
    assert spool.ack(3) == 3 and spool.first_pending == 4
    assert spool.ack(2) == 0  # an old ack changes nothing
    assert [seq for seq, _, _ in spool.from_seq(5)] == [5]
    spool.close()


def test_a_restarted_device_resumes_its_seq_its_pending_readings_and_its_counts(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "7", max_pending=100)
    spool.add("humidity", readings(4))
    spool.add("temperature", readings(3))
    spool.ack(5)
    spool.close()  # a crash loses nothing either: every add is written at once
    again = Spool(tmp_path, "7", max_pending=100)
    assert [(seq, t) for seq, t, _ in again.pending] == [(6, "temperature"), (7, "temperature")]
    assert again.add("humidity", readings(1))[0]["seq"] == 8
    assert again.produced == {"humidity": 5, "temperature": 3}
    again.close()


def test_a_torn_last_frame_from_a_crash_is_cut_off(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "7", max_pending=100)
    spool.add("humidity", readings(2))
    spool.close()
    path = tmp_path / "7.spool"
    path.write_bytes(path.read_bytes() + b"\x94\xa1r\x03")  # half of a third frame
    again = Spool(tmp_path, "7", max_pending=100)
    assert [seq for seq, _, _ in again.pending] == [1, 2]
    assert again.add("humidity", readings(1))[0]["seq"] == 3
    again.close()
    assert [seq for seq, _, _ in Spool(tmp_path, "7", max_pending=100).pending] == [1, 2, 3]


def test_a_full_spool_takes_no_more_and_counts_what_it_dropped(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "7", max_pending=5)
    assert len(spool.add("humidity", readings(4))) == 4
    assert [r["seq"] for r in spool.add("humidity", readings(3))] == [5]
    assert spool.dropped == 2 and len(spool.pending) == 5
    spool.ack(5)
    assert [r["seq"] for r in spool.add("humidity", readings(1))] == [6]  # no gap after the drop
    spool.close()


def test_the_file_is_compacted_and_keeps_what_matters(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "7", max_pending=10 * COMPACT_MIN_RECORDS)
    for _ in range(3):
        spool.add("humidity", readings(COMPACT_MIN_RECORDS // 2))
        spool.ack(spool.last_seq - 2)
    with open(tmp_path / "7.spool", "rb") as fh:
        frames = sum(1 for _ in msgpack.Unpacker(fh))
    assert frames < COMPACT_MIN_RECORDS  # the acknowledged frames were dropped along the way, not all 15,000 kept
    spool.close()
    again = Spool(tmp_path, "7", max_pending=100)
    assert [seq for seq, _, _ in again.pending] == [again.last_seq - 1, again.last_seq]
    assert again.last_seq == 3 * (COMPACT_MIN_RECORDS // 2) and again.produced["humidity"] == again.last_seq
    again.close()


def test_two_processes_cannot_share_a_device_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "7", max_pending=10)
    with pytest.raises(SpoolLocked, match="already running"):
        Spool(tmp_path, "7", max_pending=10)
    spool.close()


def test_a_spool_gets_an_epoch_when_created_and_keeps_it_across_restarts_and_compaction(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "7", max_pending=10 * COMPACT_MIN_RECORDS)
    epoch = spool.epoch
    assert epoch is not None and len(epoch) == 16
    spool.add("humidity", readings(COMPACT_MIN_RECORDS + 10))
    spool.ack(spool.last_seq - 1)  # compacts the file
    spool.close()
    again = Spool(tmp_path, "7", max_pending=100)
    assert again.epoch == epoch and [seq for seq, _, _ in again.pending] == [again.last_seq]
    again.close()
    (tmp_path / "7.spool").unlink()  # the device lost its spool (re-flashed)
    fresh = Spool(tmp_path, "7", max_pending=100)
    assert fresh.epoch not in (None, epoch)
    assert fresh.add("humidity", readings(1))[0]["seq"] == 1
    fresh.close()


def test_a_spool_of_an_older_version_has_no_epoch_and_keeps_its_sequence(tmp_path: Path) -> None:
    frames = [["r", 1, "humidity", {"value": 1.0, "ts": 1.0, "seq": 1}], ["a", 1],
              ["r", 2, "humidity", {"value": 2.0, "ts": 2.0, "seq": 2}]]
    (tmp_path / "7.spool").write_bytes(b"".join(msgpack.packb(f) for f in frames))
    spool = Spool(tmp_path, "7", max_pending=100)
    assert spool.epoch is None and [seq for seq, _, _ in spool.pending] == [2]
    assert spool.add("humidity", readings(1))[0]["seq"] == 3
    spool.close()
