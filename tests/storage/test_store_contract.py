"""The storage contract: one suite, run against every backend through ``any_store``.

Records are built directly (bodies are random bytes: a backend never opens them), except in the end-to-end
tests, which seal real readings and open them again after the round trip.
"""

from __future__ import annotations

import math
import os
import random
import secrets
import struct
from dataclasses import replace

from components.core.batches import OpenBatch, open_groups, seal_batch
from components.core.ingest import IngestService
from components.core.readings import Columns
from components.core.sealing import KeyRing
from components.core.settings import BatchingSettings, StorageSettings
from components.storage.interface import AUDIT, BATCH, SEGMENT, BatchStore, SealedBatch, SealedState
from tests.support.store_fixtures import CONTRACT_BUCKET_S

B = CONTRACT_BUCKET_S
INF = math.inf


def rec(lo: float, hi: float, *, uid: str | None = None, rec_lo: float | None = None, rec_hi: float | None = None,
        body: bytes | None = None, key_id: str = "k0", group: int = 0, fmt: int = 1) -> SealedBatch:
    """A record as storage would seal it (bucket of lo); received bounds default to a second after hi."""
    rec_lo = hi + 1 if rec_lo is None else rec_lo
    return SealedBatch(uid or secrets.token_hex(16), int(lo // B), lo, hi, rec_lo,
                       rec_lo if rec_hi is None else rec_hi, 1, key_id, os.urandom(64) if body is None else body,
                       fmt, group)


def uids(records: list[SealedBatch]) -> list[str]:
    """The uids, in the order given."""
    return [r.uid for r in records]


def bits(x: float) -> bytes:
    """A float's exact bits (== would call 0.0 and -0.0 equal)."""
    return struct.pack(">d", x)


def test_a_window_includes_records_that_touch_either_of_its_edges(any_store: BatchStore) -> None:
    r = rec(10.0, 20.0)
    any_store.commit([r], [])
    assert uids(any_store.batches_by_ts(20.0, 30.0)) == [r.uid]  # window starts at the record's hi
    assert uids(any_store.batches_by_ts(0.0, 10.0)) == [r.uid]  # window ends at the record's lo
    assert uids(any_store.batches_by_ts(15.0, 15.0)) == [r.uid]  # a single instant inside
    assert any_store.batches_by_ts(math.nextafter(20.0, INF), 30.0) == []
    assert any_store.batches_by_ts(0.0, math.nextafter(10.0, -INF)) == []


def test_a_window_inside_a_record_or_starting_or_ending_inside_it_finds_it(any_store: BatchStore) -> None:
    long, short = rec(110.0, 190.0), rec(150.0, 150.25)
    any_store.commit([long, short], [])
    assert uids(any_store.batches_by_ts(140.0, 160.0)) == [long.uid, short.uid]
    assert uids(any_store.batches_by_ts(180.0, 400.0)) == [long.uid]
    assert uids(any_store.batches_by_ts(0.0, 115.0)) == [long.uid]
    assert uids(any_store.batches_by_ts(150.25, 150.25)) == [long.uid, short.uid]


def test_records_in_several_buckets_are_found_and_ordered_by_lo(any_store: BatchStore) -> None:
    records = [rec(q * B + 30.0, q * B + 40.0) for q in range(6)]
    any_store.commit(list(reversed(records)), [])
    assert uids(any_store.batches_by_ts(B + 35.0, 4 * B + 30.0)) == uids(records[1:5])
    assert uids(any_store.batches_by_ts(-INF, INF)) == uids(records)
    assert uids(any_store.batches_by_ts(3 * B + 41.0, INF)) == uids(records[4:])


def test_records_of_every_span_from_sub_second_to_a_full_bucket_are_found_at_their_edges(
        any_store: BatchStore) -> None:
    spans = [0.001, 0.5, 1.0, 1.5, 3.0, 8.0, 9.0, 60.0, float(B)]
    records = [rec(q * B, q * B + span) for q, span in enumerate(spans)]  # a full-bucket span ends on the next one
    any_store.commit(records, [])
    for r in records:
        assert r.uid in uids(any_store.batches_by_ts(r.hi, r.hi + 0.5)), r
        assert r.uid in uids(any_store.batches_by_ts(r.lo - 5.0, r.lo)), r
        assert r.uid not in uids(any_store.batches_by_ts(math.nextafter(r.hi, INF), r.hi + 0.5)), r
        assert r.uid not in uids(any_store.batches_by_ts(r.lo - 5.0, math.nextafter(r.lo, -INF))), r


def test_overlap_matches_a_brute_force_model_on_random_records_and_windows(any_store: BatchStore) -> None:
    rnd = random.Random(7)
    records = []
    for _ in range(120):
        lo = round(rnd.uniform(-50.0, 6 * B), 3)
        span = rnd.choice([0.0, 0.2, 0.9, 1.0, 2.5, 7.9, 8.0, 20.0, 99.0, 250.0])  # up to 2.5 buckets
        records.append(rec(lo, lo + span, rec_lo=lo + rnd.uniform(0, 30), rec_hi=lo + 30 + rnd.uniform(0, 10)))
    any_store.commit(records, [])
    for _ in range(40):
        a, b = sorted(round(rnd.uniform(-100.0, 7 * B), 2) for _ in range(2))
        expected = {r.uid for r in records if r.lo <= b and r.hi >= a}
        got = any_store.batches_by_ts(a, b)
        assert {r.uid for r in got} == expected, (a, b)
        assert [r.lo for r in got] == sorted(r.lo for r in got)
        expected = {r.uid for r in records if r.rec_lo <= b and r.rec_hi >= a}
        got = any_store.batches_by_received(a, b)
        assert {r.uid for r in got} == expected, (a, b)
        assert [r.lo for r in got] == sorted(r.lo for r in got)


def test_audit_chunks_and_batches_are_kept_apart(any_store: BatchStore) -> None:
    batch, audit = rec(10.0, 20.0), rec(10.0, 500.0)
    any_store.commit([batch], [])
    any_store.append_audit(audit)
    assert uids(any_store.batches_by_ts(0.0, 1000.0)) == [batch.uid]
    assert uids(any_store.batches_by_ts(0.0, 1000.0, kind=AUDIT)) == [audit.uid]
    assert uids(any_store.batches_by_ts(100.0, INF, kind=AUDIT)) == [audit.uid]
    assert uids(any_store.batches_by_received(0.0, 1000.0)) == [batch.uid]
    assert uids(list(any_store.batches_by_hi_desc())) == [batch.uid]
    assert any_store.max_ts() == 20.0
    assert any_store.batches_by_ts(0.0, 1000.0, kind=AUDIT)[0] == audit


def test_batches_by_received_selects_on_arrival_time_and_orders_by_lo(any_store: BatchStore) -> None:
    late = rec(10.0, 11.0, rec_lo=900.0, rec_hi=901.0)  # read early, received late (a resend)
    prompt = rec(500.0, 501.0, rec_lo=501.5, rec_hi=502.0)
    other = rec(600.0, 601.0, rec_lo=2000.0, rec_hi=2000.0)
    any_store.commit([prompt, late, other], [])
    assert uids(any_store.batches_by_received(501.0, 901.0)) == [late.uid, prompt.uid]
    assert uids(any_store.batches_by_received(901.0, 1000.0)) == [late.uid]  # inclusive at rec_hi
    assert uids(any_store.batches_by_received(1000.0, 2000.0)) == [other.uid]  # inclusive at rec_lo
    assert any_store.batches_by_received(math.nextafter(901.0, INF), 1999.0) == []
    assert uids(any_store.batches_by_received(0.0, INF)) == [late.uid, prompt.uid, other.uid]
    assert any_store.batches_by_received(0.0, 11.0) == []  # reading time does not count here


def test_batches_by_hi_desc_yields_every_batch_by_descending_hi_and_honours_below(any_store: BatchStore) -> None:
    rnd = random.Random(3)
    records = [rec(lo, lo + rnd.choice([0.1, 1.0, 5.0, 30.0])) for lo in (rnd.uniform(0, 5 * B) for _ in range(40))]
    wide = rec(5.0, 4 * B + 99.5)  # starts first, ends nearly last: found by its hi, not its lo
    records.append(wide)
    any_store.commit(records, [])
    his = [r.hi for r in any_store.batches_by_hi_desc()]
    assert his == sorted((r.hi for r in records), reverse=True)
    below = sorted(r.hi for r in records)[20]
    his = [r.hi for r in any_store.batches_by_hi_desc(below)]
    assert his == sorted((r.hi for r in records if r.hi < below), reverse=True)  # strictly below
    assert next(any_store.batches_by_hi_desc(wide.hi)).uid != wide.uid
    newest = any_store.batches_by_hi_desc()
    assert next(newest).hi == max(r.hi for r in records)  # an iterator: the caller stops when it has enough
    assert list(any_store.batches_by_hi_desc(-INF)) == []


def test_max_ts_is_none_on_an_empty_store_then_the_greatest_hi(any_store: BatchStore) -> None:
    assert any_store.max_ts() is None
    any_store.append_audit(rec(0.0, 10_000.0))
    assert any_store.max_ts() is None  # audit chunks are not readings
    any_store.commit([rec(100.0, 350.0), rec(300.0, 301.0)], [])
    assert any_store.max_ts() == 350.0
    any_store.commit([rec(10.0, 20.0)], [])
    assert any_store.max_ts() == 350.0
    any_store.commit([rec(380.0, 380.5)], [])
    assert any_store.max_ts() == 380.5


def test_committing_a_stored_uid_again_is_a_no_op(any_store: BatchStore) -> None:
    r = rec(10.0, 11.0)
    assert any_store.commit([r], []) == len(r.body)
    assert any_store.commit([r], []) == 0
    assert any_store.commit([replace(r, key_id="k9", body=b"other")], []) == 0  # the first write stays
    assert any_store.commit([r, r], []) == 0
    assert any_store.batches_by_ts(-INF, INF) == [r]
    assert [x for _, x in any_store.records()] == [r]
    new = rec(12.0, 13.0, body=os.urandom(99))
    assert any_store.commit([r, new, r], []) == 99  # only what this commit added counts
    assert any_store.batches_by_ts(-INF, INF) == [r, new]


def test_states_are_found_by_prefix_and_a_commit_replaces_them(any_store: BatchStore) -> None:
    assert any_store.states("") == []
    a1, a2, b1 = (SealedState(n, "k0", os.urandom(40)) for n in ("storage/0-of-2", "storage/1-of-2", "other/x"))
    for s in (a1, a2, b1):
        any_store.commit([], [s])
    assert sorted(any_store.states("storage/"), key=lambda s: s.name) == [a1, a2]
    assert len(any_store.states("")) == 3
    assert any_store.states("storage/9") == []
    newer = SealedState(a1.name, "k1", b"newer")
    any_store.commit([rec(1.0, 2.0)], [newer])
    assert sorted(any_store.states("storage/"), key=lambda s: s.name) == [newer, a2]


def test_a_state_larger_than_400_kb_round_trips_and_can_shrink_and_grow(any_store: BatchStore) -> None:
    big = SealedState("storage/0-of-1", "k0", os.urandom(1_200_000))
    any_store.commit([], [big])
    assert any_store.states("storage/") == [big]
    small = SealedState(big.name, "k0", b"small")
    any_store.commit([], [small])
    assert any_store.states("storage/") == [small]
    bigger = SealedState(big.name, "k1", os.urandom(900_001))
    any_store.commit([], [bigger])
    assert any_store.states("") == [bigger]


def test_replace_swaps_a_record_once_and_refuses_a_stale_old_one(any_store: BatchStore) -> None:
    batch, audit = rec(10.0, 11.0), rec(12.0, 13.0)
    state = SealedState("storage/0-of-1", "k0", os.urandom(500_000))
    any_store.commit([batch], [state])
    any_store.append_audit(audit)
    for kind, old in ((BATCH, batch), (AUDIT, audit)):
        new = replace(old, key_id="k1", body=os.urandom(80))
        assert any_store.replace(kind, old, new)
        assert not any_store.replace(kind, old, replace(old, key_id="k2", body=b"late"))  # old is stale now
        assert any_store.batches_by_ts(old.lo, old.hi, kind=kind) == [new]  # still found: index fields kept
    new_state = SealedState(state.name, "k1", b"resealed")
    assert any_store.replace("state", state, new_state)
    assert not any_store.replace("state", state, SealedState(state.name, "k2", b"late"))
    assert any_store.states("storage/") == [new_state]
    assert not any_store.replace(BATCH, rec(50.0, 51.0), rec(50.0, 51.0))  # never stored


def test_records_lists_every_batch_audit_chunk_and_state(any_store: BatchStore) -> None:
    batches = [rec(float(i), i + 0.5) for i in range(0, 300, 7)]
    audit = rec(5.0, 6.0)
    states = [SealedState("storage/0-of-1", "k0", os.urandom(30)), SealedState("big", "k0", os.urandom(450_000))]
    any_store.commit(batches, [states[0]])
    any_store.commit([], [states[1]])
    any_store.append_audit(audit)
    listed = list(any_store.records())
    assert sorted((k, x.uid) for k, x in listed if isinstance(x, SealedBatch)) == sorted(
        [("batch", b.uid) for b in batches] + [("audit", audit.uid)])
    listed_states = [x for _, x in listed if isinstance(x, SealedState)]
    assert sorted(listed_states, key=lambda s: s.name) == sorted(states, key=lambda s: s.name)
    assert {x.uid: x for _, x in listed if isinstance(x, SealedBatch)}[batches[3].uid] == batches[3]


def test_time_bounds_come_back_with_the_same_bits(any_store: BatchStore) -> None:
    odd = [0.1 + 0.2, 1e-9, 1_700_000_000.123456, -3.5, 5e-324, 0.0, 2.0**52 + 1]
    records = [SealedBatch(secrets.token_hex(16), int(x // B), x, x + 1 / 3, x + 0.7, x + 2 / 3 + 1, 7, "k0",
                           os.urandom(8), 3) for x in odd]
    any_store.commit(records, [])
    got = {r.uid: r for r in any_store.batches_by_ts(-INF, INF)}
    for r in records:
        g = got[r.uid]
        assert g == r
        assert [bits(v) for v in (g.lo, g.hi, g.rec_lo, g.rec_hi)] == [bits(v) for v in (r.lo, r.hi, r.rec_lo,
                                                                                          r.rec_hi)]
    assert any_store.max_ts() == max(r.hi for r in records)


def test_an_empty_store_answers_every_question_with_nothing(any_store: BatchStore) -> None:
    assert any_store.batches_by_ts(-INF, INF) == []
    assert any_store.batches_by_ts(0.0, 1.0, kind=AUDIT) == []
    assert any_store.batches_by_received(-INF, INF) == []
    assert list(any_store.batches_by_hi_desc()) == []
    assert any_store.max_ts() is None
    assert any_store.states("") == []
    assert list(any_store.records()) == []


def test_sealed_readings_open_again_after_the_round_trip(any_store: BatchStore) -> None:
    ring = KeyRing.of([os.urandom(32)], os.urandom(32))
    batch = OpenBatch(bucket=int(1_700_000_050 // B), opened_at=0.0)
    batch.add("dev_1", "temperature", 1_700_000_060.5,
              Columns([1_700_000_050.25, 1_700_000_051.5], [21.5, 21.75], [1, 2], [None, {"note": "ok"}], 20))
    batch.add("dev_2", "humidity", 1_700_000_061.0, Columns([1_700_000_052.0], [0.1 + 0.2], [None], [None]))
    sealed = seal_batch(ring, batch)
    any_store.commit([sealed], [])
    [stored] = any_store.batches_by_ts(1_700_000_051.0, 1_700_000_051.0)
    assert open_groups(ring, stored) == batch.groups
    [stored] = any_store.batches_by_received(1_700_000_061.0, 1_700_000_061.0)
    assert open_groups(ring, stored) == batch.groups


def test_the_ingest_service_cuts_batches_to_fit_the_store_and_loses_no_reading(any_store: BatchStore) -> None:
    # events of about 8 KiB of data per reading make a batch far larger than one DynamoDB item
    ring = KeyRing.of([os.urandom(32)], os.urandom(32))
    acks: list[dict[str, int]] = []
    service = IngestService(StorageSettings(backend="sqlite", bucket_seconds=B),
                            BatchingSettings(max_readings=5000, max_bytes=4_000_000, max_age_s=60.0),
                            any_store, lambda: ring, acks.append)
    service.start()
    base = 1_700_000_000.0
    note = "x" * 8000
    for i in range(120):
        service.ingest("dev_7", "camera", {"value": float(i), "ts": base + i * 0.25, "seq": i + 1,
                                        "data": {"note": note}}, base + 40)
    assert service.flush(60)
    stored = any_store.batches_by_ts(base, base + 30)
    limit = any_store.max_body_bytes
    assert limit is None or all(len(b.body) <= limit for b in stored)
    readings = [t for b in stored for g in open_groups(ring, b) for t in g[3]]
    assert sorted(readings) == [base + i * 0.25 for i in range(120)]
    assert acks and acks[-1][("dev_7", None)] == 120


# -- device groups, segments, device rows and the swap ------------------------------------------------------

def test_reads_limited_to_groups_return_only_those_groups_of_each_kind(any_store: BatchStore) -> None:
    batches = [rec(10.0 + g, 11.0 + g, group=g) for g in (0, 5, 9)]
    any_store.commit(batches, [])
    segment = rec(12.0, 30.0, group=9)
    assert any_store.swap([], [segment])
    assert uids(any_store.batches_by_ts(0.0, 100.0, BATCH, (5,))) == [batches[1].uid]
    assert uids(any_store.batches_by_ts(0.0, 100.0, BATCH, (0, 9))) == [batches[0].uid, batches[2].uid]
    assert uids(any_store.batches_by_ts(0.0, 100.0, SEGMENT, (9,))) == [segment.uid]
    assert any_store.batches_by_ts(0.0, 100.0, SEGMENT, (5,)) == []
    assert uids(any_store.batches_by_received(0.0, 100.0, BATCH, (9,))) == [batches[2].uid]
    assert uids(any_store.batches_by_received(0.0, 100.0, SEGMENT, None)) == [segment.uid]
    assert uids(list(any_store.batches_by_hi_desc(None, BATCH, (0, 5)))) == [batches[1].uid, batches[0].uid]
    assert uids(list(any_store.batches_by_hi_desc(None, SEGMENT, (9,)))) == [segment.uid]
    assert any_store.max_ts() == 30.0  # segments count
    assert any_store.batches_by_ts(0.0, 100.0, SEGMENT, (9,))[0] == segment  # every field, group included


def test_swap_replaces_batches_and_segments_by_segments_at_once_and_refuses_when_one_is_gone(
        any_store: BatchStore) -> None:
    old = [rec(float(i), i + 0.5, group=3) for i in range(5)]
    other = rec(2.0, 2.5, group=4)
    any_store.commit([*old, other], [])
    first = rec(0.0, 4.5, group=3)
    assert any_store.swap(old[:3], [first])
    assert uids(any_store.batches_by_ts(-INF, INF, BATCH)) == uids([other, old[3], old[4]])
    assert uids(any_store.batches_by_ts(-INF, INF, SEGMENT)) == [first.uid]
    second = rec(0.0, 4.5, group=3)
    assert any_store.swap([first, *old[3:]], [second])  # a later pass folds the segment and the late batches in
    assert uids(any_store.batches_by_ts(-INF, INF, SEGMENT)) == [second.uid]
    assert uids(any_store.batches_by_ts(-INF, INF, BATCH)) == [other.uid]
    stale = rec(0.0, 4.5, group=3)
    assert not any_store.swap([first], [stale])  # first is gone: nothing changes
    assert uids(any_store.batches_by_ts(-INF, INF, SEGMENT)) == [second.uid]
    assert {r.uid for kind, r in any_store.records() if kind == SEGMENT} == {second.uid}


def test_pending_windows_lists_the_windows_of_write_batches_that_ended_before_a_time(any_store: BatchStore) -> None:
    any_store.commit([rec(5.0, 6.0, group=1), rec(65.0, 70.0, group=1), rec(61.0, 62.0, group=2),
                      rec(130.0, 131.0, group=1)], [])
    assert any_store.swap([], [rec(10.0, 20.0, group=7)])  # segments are not pending
    assert any_store.pending_windows(60, 100.0) == [(0, 1), (1, 1), (1, 2)]
    assert any_store.pending_windows(60, 64.0) == [(0, 1), (1, 2)]


def test_a_setting_keeps_its_first_value_and_named_records_are_read_by_name(any_store: BatchStore) -> None:
    assert any_store.setting("device_tag_bits", "8") == "8"
    assert any_store.setting("device_tag_bits", "4") == "8"
    rows = [SealedState(f"device/{i:016x}", "k0", os.urandom(100 + i)) for i in range(300)]
    any_store.commit([], [*rows, SealedState("storage/0-of-1", "k0", b"counters")])
    wanted = [rows[7].name, rows[299].name, "device/ffffffffffffffff"]
    assert sorted(any_store.get_states(wanted), key=lambda r: r.name) == [rows[7], rows[299]]
    assert sorted(any_store.states("device/"), key=lambda r: r.name) == rows
    assert [r.name for r in any_store.states("storage/")] == ["storage/0-of-1"]
    newer = SealedState(rows[7].name, "k1", b"newer")
    any_store.commit([], [newer])
    assert any_store.get_states([rows[7].name]) == [newer]


# -- retention ----------------------------------------------------------------------------------------------

def test_delete_before_removes_only_batches_and_segments_that_ended_before_the_cutoff(any_store: BatchStore) -> None:
    cutoff = 3 * B + 50.0
    old = [rec(q * B + 10.0, q * B + 20.0, group=q % 3) for q in range(3)]
    straddling = rec(3 * B + 40.0, cutoff + 1.0, group=1)  # ends after the cutoff: kept whole
    at_cutoff = rec(3 * B + 45.0, cutoff, group=2)  # hi == cutoff is not "before" it
    young = [rec(4 * B + 10.0 + g, 4 * B + 20.0, group=g) for g in (1, 2)]  # distinct lo: a known order
    any_store.commit([*old, straddling, at_cutoff, *young], [SealedState("device/00", "k0", b"row")])
    old_segment, young_segment = rec(B + 30.0, B + 40.0, group=5), rec(cutoff - 1.0, 5 * B, group=5)
    assert any_store.swap([], [old_segment, young_segment])
    audit = rec(0.0, 1.0)
    any_store.append_audit(audit)
    removed = any_store.delete_before(cutoff, 1000)
    assert (removed.records, removed.readings, removed.bytes) == (4, 4, 4 * 64)
    assert any_store.delete_before(cutoff, 1000).records == 0
    assert uids(any_store.batches_by_ts(-INF, INF)) == uids([straddling, at_cutoff, *young])
    assert uids(any_store.batches_by_ts(-INF, INF, SEGMENT)) == [young_segment.uid]
    assert any_store.batches_by_ts(-INF, INF, SEGMENT)[0] == young_segment  # untouched, every field
    assert uids(any_store.batches_by_ts(-INF, INF, AUDIT)) == [audit.uid]  # audit chunks are kept
    assert [s.name for s in any_store.states("device/")] == ["device/00"]


def test_delete_before_takes_at_most_limit_records_a_call_until_none_is_left(any_store: BatchStore) -> None:
    records = [rec(float(i), i + 0.5, group=i % 4) for i in range(7)]
    any_store.commit(records, [])
    taken = [any_store.delete_before(100.0, 3).records for _ in range(4)]
    assert taken == [3, 3, 1, 0]
    assert any_store.batches_by_ts(-INF, INF) == []
