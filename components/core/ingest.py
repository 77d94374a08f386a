"""The ingest service: validate, de-duplicate, batch, seal and commit readings; report what to acknowledge.

Threads: :meth:`IngestService.ingest` and :meth:`IngestService.tick` run on the caller's thread (the
reactor); sealing and writing run on one writer thread, so a slow disk never stalls the caller. Between
them sits a bounded queue of closed batches. When it is full, the service *sheds*: readings arriving
until the writer catches up are counted and dropped, not acknowledged, so devices that number their
readings send them again; memory never grows without bound.

Delivery (readings with ``seq``): per device and spool epoch, storage accepts seq numbers in order, starting
at 1. A seq below the next expected one is a duplicate and is dropped; one above it (a gap, after a lost
event) is dropped too, and the last ack is repeated so the device sends again from there (go-back-N). The
highest committed seq per device and epoch is part of the device's row (:mod:`components.core.devices`),
written in the same transaction as the batch, and is only then acknowledged. A commit writes its batches (one
per device group), the rows of the devices in it, and this instance's small counters record: nothing of the
devices that did not send. The epoch is a random id a device's spool gets when it is created
(the producer epoch of Kafka's idempotent producer): a device that lost its spool starts a new epoch at seq 1,
and its readings are never taken for duplicates of the old epoch's. Events without an epoch share one
sequence per device, as devices of older versions send them.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from components.core import readings as rd
from components.core.batches import (
    OpenBatch,
    group_epoch,
    open_groups,
    open_state,
    seal_batch,
    seal_packed,
    seal_state,
    split_batch,
)
from components.core.compactor import Compactor
from components.core.devices import NO_EPOCH, DeviceIndex, DeviceRow, RowCache
from components.core.errors import IotError
from components.core.metrics import Histogram
from components.core.readings import Columns
from components.core.sealing import KeyRing
from components.core.settings import BatchingSettings, StorageSettings
from components.storage.interface import BatchStore, SealedState

log = logging.getLogger(__name__)

STATE_PREFIX = "storage/"
STATE_VERSION = 2
TAG_BITS = "device_tag_bits"
"""The store setting that fixes the length of device groups for the life of the store."""
STATS_WRITE_INTERVAL_S = 1.0
REPLAY_MARGIN_S = 10.0
"""How far back, before the close of the last job a state record covers, a restart looks for later batches."""
REJECT_LOG_INTERVAL_S = 1.0
RETRY_MIN_S, RETRY_MAX_S = 0.05, 5.0
SHED = "shed"
GROUP_COMMIT_JOBS = 64

Mark = tuple[str, str | None]
"""What a seq sequence belongs to: (device_id, spool epoch or None)."""


def _seq_key(mark: Mark) -> str:
    """A mark as one string (ids never hold a space): storage keeps one next seq per device it has seen, and a
    dict of strings to ints is one the garbage collector never walks, where a dict keyed by tuples is walked at
    every full collection."""
    device_id, epoch = mark
    return device_id if epoch is None else f"{device_id} {epoch}"


def _mark_of(key: str) -> Mark:
    device_id, _, epoch = key.partition(" ")
    return device_id, epoch or None


def shard_of(device_id: str, shards: int) -> int:
    """The storage shard that stores ``device_id`` (stable across processes and restarts)."""
    # blake2b mixes short ids like "0".."50" evenly; crc32 puts runs of them on the same shard
    digest = hashlib.blake2b(device_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def state_name(shard: int, shards: int) -> str:
    """Name of the state record of one storage instance."""
    return f"{STATE_PREFIX}{shard}-of-{shards}"


@dataclass
class Counters:
    """What storage counts (cumulative across restarts; ``queue_depth`` is instantaneous)."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    shed: int = 0
    batches: int = 0
    bytes: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for the state record and iot.get_stats)."""
        return {"received": self.received, "stored": self.stored, "duplicates": self.duplicates,
                "out_of_order": self.out_of_order, "shed": self.shed, "batches": self.batches,
                "bytes": self.bytes, "rejected": dict(self.rejected)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Counters:
        """Inverse of :meth:`as_dict`."""
        return cls(d.get("received", 0), d.get("stored", 0), d.get("duplicates", 0), d.get("out_of_order", 0),
                   d.get("shed", 0), d.get("batches", 0), d.get("bytes", 0), Counter(d.get("rejected", {})))


def open_rows(ring: KeyRing, sealed: list[SealedState]) -> dict[str, DeviceRow]:
    """Device rows by device id."""
    rows = (DeviceRow.of(open_state(ring, st)) for st in sealed)
    return {r.device_id: r for r in rows}


@dataclass
class _Job:
    batches: list[OpenBatch]
    marks: dict[Mark, int]
    counters: dict[str, Any]
    closed_at: float


_STOP = object()


def _merge(jobs: list[_Job]) -> _Job:
    """Jobs closed one after the other, as one: every batch, the latest marks, counters and close time."""
    if len(jobs) == 1:
        return jobs[0]
    marks: dict[Mark, int] = {}
    for j in jobs:
        marks.update(j.marks)  # a device's marks only grow
    return _Job([b for j in jobs for b in j.batches], marks, jobs[-1].counters, jobs[-1].closed_at)


class IngestService:
    """Storage's core. ``on_commit(acks)`` is called (from the writer thread) with (device, epoch) -> committed seq."""

    def __init__(self, storage: StorageSettings, batching: BatchingSettings, store: BatchStore,
                 keys: Callable[[], KeyRing], on_commit: Callable[[dict[Mark, int]], None],
                 clock: Callable[[], float] = time.time) -> None:
        """Ingest into ``store``, sealing with ``keys()`` (called per write, so a rekey is picked up)."""
        self._store = store
        self._keys = keys
        self._on_commit = on_commit
        self._clock = clock
        self._shard, self._shards = storage.shard, storage.shards
        self._bucket_s = storage.bucket_seconds
        self._max_readings, self._max_bytes, self._max_age = (batching.max_readings, batching.max_bytes,
                                                              batching.max_age_s)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=storage.writer_queue)
        self._name = state_name(self._shard, self._shards)
        self._tag_bits = storage.device_tag_bits
        self._cache_size = storage.device_cache
        self.index = DeviceIndex(b"\0" * 32, 0)  # replaced in start(), from the index key
        self.rows = RowCache(storage.device_cache, self._load_rows)
        self.compactor = Compactor(store, keys, lambda: self.index, storage.segment_seconds, storage.compact_after_s,
                                   storage.shard, storage.shards, clock, storage.retention_days * 86400.0)
        # caller-thread state
        self.counters = Counters()
        self._open: dict[tuple[int, int], OpenBatch] = {}
        self._open_count = 0
        self._open_bytes = 0
        self._open_since: float | None = None
        self._marks: dict[Mark, int] = {}
        self._next_seq: dict[str, int] = {}  # by _seq_key
        self._reacks: set[Mark] = set()
        self._held: _Job | None = None
        self._reject_log: Counter[str] = Counter()
        self._reject_example: dict[str, str] = {}
        self._last_reject_log = 0.0
        self._last_state_write = 0.0
        self._dirty = False
        # writer-thread state
        self._committed = Counters()
        self._recent: deque[tuple[float, list[str]]] = deque()
        self._stopping = threading.Event()
        self._writer = threading.Thread(target=self._run, name="storage-writer", daemon=True)
        self.lost_on_shutdown = 0
        self.commit_seconds = Histogram()
        """How long each store commit took (observed once per commit, never per reading)."""

    # ---- start and stop
    def start(self, compact: bool = True) -> None:
        """Load this instance's counters (upgrading state records of the version before device rows), fold in
        what a torn commit left behind, and start the writer (and, unless told not to, the compactor)."""
        ring = self._keys()
        bits = int(self._store.setting(TAG_BITS, str(self._tag_bits)))
        if bits != self._tag_bits:
            log.info("this store keeps device groups of %d bits (storage.device_tag_bits=%d applies to new stores)",
                     bits, self._tag_bits)
        self.index = DeviceIndex(ring.index_key, bits)
        own: dict[str, Any] = {}
        legacy: list[tuple[str, dict[str, Any]]] = []
        for sealed in self._store.states(STATE_PREFIX):
            value = open_state(ring, sealed)
            if value.get("v", 1) < STATE_VERSION:
                legacy.append((sealed.name, value))
            if sealed.name == self._name:
                own = value
        self._committed = Counters.from_dict(own.get("counters", {}))
        if legacy:
            self._upgrade(ring, legacy)
        self._replay(ring, own.get("replay"))
        self.counters = copy.deepcopy(self._committed)
        self._writer.start()
        if compact:
            self.compactor.start()
        log.info("storage %s started: device groups of %d bits, %d readings stored so far", self._name, bits,
                 self.counters.stored)

    def _load_rows(self, device_ids: Sequence[str]) -> dict[str, DeviceRow]:
        names = [self.index.row_name(d) for d in device_ids]
        return open_rows(self._keys(), self._store.get_states(names))

    def _mine(self, device_id: str) -> bool:
        return self._shards == 1 or shard_of(device_id, self._shards) == self._shard

    def _upgrade(self, ring: KeyRing, legacy: list[tuple[str, dict[str, Any]]]) -> None:
        """Turn state records of the version before device rows into device rows (this instance's devices)."""
        rows: dict[str, DeviceRow] = {}

        def row(device_id: str) -> DeviceRow:
            if device_id not in rows:
                rows[device_id] = self.rows.get(device_id)
            return rows[device_id]

        for name, value in legacy:
            # every record's marks: a device that moved shards keeps its sequence
            for device_id, seq in value.get("seq", {}).items():
                if self._mine(device_id):
                    row(device_id).raise_mark(None, seq)
            for device_id, epochs in value.get("epochs", {}).items():
                if self._mine(device_id):
                    for epoch, seq in epochs.items():
                        row(device_id).raise_mark(epoch, seq)
            if name == self._name or (self._shard == 0 and value.get("shard", 0) >= self._shards):
                for device_id, types in value.get("devices", {}).items():
                    for sensor_type, entry in types.items():
                        row(device_id).merge_entry(sensor_type, entry)
        sealed = [seal_state(ring, self.index.row_name(d), r.value()) for d, r in rows.items()]
        self._store.commit([], [*sealed, seal_state(ring, self._name, self._record(self._committed, {}, 0))])
        self.rows.put(rows.values())
        log.info("storage %s: upgraded its state record to %d device row(s)", self._name, len(rows))

    def _record(self, counters: Counters, replay: dict[str, Any], queue_depth: int) -> dict[str, Any]:
        """The value sealed into this instance's state record: counters (and what a replay needs)."""
        return {"v": STATE_VERSION, "shard": self._shard, "shards": self._shards,
                "counters": counters.as_dict(), "queue_depth": queue_depth, "written_at": time.time(),
                "replay": replay}

    def _replay(self, ring: KeyRing, replay: dict[str, Any] | None) -> None:
        """Fold in batches committed after this instance's last state record.

        A backend whose commit is not one transaction (DynamoDB) can hold batches whose rows and state update
        were lost in a crash. Every batch committed after a state record holds readings received after that
        record's job closed, so they are found by arrival time; the uids listed in the record are the ones it
        already covers.
        """
        if not replay:
            return
        known = set(replay.get("uids", ()))
        folded: list[str] = []
        rows: dict[str, DeviceRow] = {}
        for sealed in self._store.batches_by_received(replay["from"], float("inf")):
            if sealed.uid in known:
                continue
            groups = open_groups(ring, sealed)
            if any(not self._mine(g[0]) for g in groups):
                continue  # another instance's batch
            for g in groups:
                row = rows.get(g[0]) or rows.setdefault(g[0], self.rows.get(g[0]))
                row.fold(g[1], g[2], g[3], g[4], g[5], g[6])
                if g[5]:
                    row.raise_mark(group_epoch(g), max(x for x in g[5] if x is not None))
                self._committed.stored += len(g[3])
            self._committed.batches += 1
            folded.append(sealed.uid)
        # the next state records still list these, so a second crash soon after does not fold them in twice
        self._recent = deque([(replay["from"] + REPLAY_MARGIN_S, [*known, *folded])])
        if folded:
            sealed_rows = [seal_state(ring, self.index.row_name(d), r.value()) for d, r in rows.items()]
            self._store.commit([], [*sealed_rows, seal_state(ring, self._name, self._record(
                self._committed, {"from": replay["from"], "uids": [*known, *folded]}, 0))])
            self.rows.put(rows.values())
            log.warning("storage %s: folded in %d batch(es) committed after its last state record (a crash between "
                        "the two writes)", self._name, len(folded))

    def flush(self, timeout: float = 30.0) -> bool:
        """Seal and commit everything open, stop the writer; True if all of it was committed in time."""
        deadline = time.monotonic() + timeout
        self.compactor.stop()
        jobs: list[Any] = [j for j in (self._held, self._close_open()) if j is not None]
        self._held = None
        jobs += [_Job([], {}, self._counter_snapshot(), self._clock()), _STOP]  # final counters, then stop
        for j in jobs:
            try:
                self._queue.put(j, timeout=max(0.01, deadline - time.monotonic()))
            except queue.Full:
                if isinstance(j, _Job):
                    self.lost_on_shutdown += sum(b.count for b in j.batches)
        self._writer.join(max(0.0, deadline - time.monotonic()))
        if self._writer.is_alive():
            self._stopping.set()
            self._writer.join(5.0)
        while True:
            try:
                j = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(j, _Job):
                self.lost_on_shutdown += sum(b.count for b in j.batches)
        if self.lost_on_shutdown:
            log.error("storage could not commit %d readings before shutdown (not acknowledged: devices that "
                      "number their readings will send them again)", self.lost_on_shutdown)
        return self.lost_on_shutdown == 0

    # ---- caller thread
    def ingest(self, device_id: str, sensor_type: str, payload: object, received_at: float | None = None,
               epoch: object = None) -> None:
        """Take one event of ``device_id``'s ``sensor_type`` readings (with the spool ``epoch`` of its seqs, if the
        device sent one).

        Never raises on bad input: it is counted instead."""
        n_total = max(1, len(payload)) if type(payload) is list else 1  # an empty event counts as one refusal
        if not rd.valid_id(device_id) or not rd.valid_id(sensor_type):
            self.refuse_source(payload, f"{device_id}.{sensor_type}")
            return
        if self._shards > 1 and shard_of(device_id, self._shards) != self._shard:
            return
        self.counters.received += n_total
        self._dirty = True
        if self._held is not None:
            self.counters.shed += n_total
            self._reject_log[SHED] += n_total
            return
        if epoch is not None and not rd.valid_id(epoch):
            self._reject(rd.BAD_EPOCH, n_total, f"{device_id}.{sensor_type}")
            return
        mark: Mark = (device_id, epoch)  # type: ignore[assignment]  # checked just above
        cols, rejected = rd.validate_event(device_id, sensor_type, payload)
        for _, reason in rejected:
            self._reject(reason, 1, f"{device_id}.{sensor_type}")
        if rejected or cols.seqs.count(None) != len(cols.seqs):
            cols = self._sequence(mark, payload, cols, rejected)
        if len(cols.ts):
            self._add(mark, sensor_type, self._clock() if received_at is None else received_at, cols)

    def refuse_source(self, payload: object, source: str) -> None:
        """Count an event whose source (``source``: where it was published) names no valid device and sensor type."""
        n_total = max(1, len(payload)) if type(payload) is list else 1
        self.counters.received += n_total
        self._reject(rd.BAD_TOPIC, n_total, source)

    def _reject(self, reason: str, n: int, source: str) -> None:
        self.counters.rejected[reason] += n
        self._reject_log[reason] += n
        self._reject_example.setdefault(reason, source)

    def _sequence(self, mark: Mark, payload: object, cols: Columns, rejected: list[tuple[int, str]]) -> Columns:
        key = _seq_key(mark)
        start = self._next_seq.get(key)
        committed = None
        if start is None:  # first sight since start (or since its entry was let go): the row says where it stands
            committed = self.rows.mark(*mark)
            start = committed + 1
        n = len(cols.seqs)
        keep: list[int] | None = None
        if not rejected and cols.seqs[0] == start and cols.seqs == list(range(start, start + n)):
            expected = start + n  # the usual event: the next readings in order, checked in one comparison
        else:
            if committed is None:
                committed = self.rows.mark(*mark)
            keep, expected = self._walk_seqs(mark, payload, cols, rejected, committed, start)
        if expected != start:
            self._next_seq[key] = expected
            self._marks[mark] = expected - 1
            if self._open_since is None:
                self._open_since = self._clock()
        if keep is None or len(keep) == len(cols.ts):
            return cols
        out = Columns([cols.ts[i] for i in keep], [cols.values[i] for i in keep], [cols.seqs[i] for i in keep],
                      [cols.datas[i] for i in keep])
        out.data_bytes = cols.data_bytes if any(d is not None for d in out.datas) else 0
        return out

    def _walk_seqs(self, mark: Mark, payload: object, cols: Columns, rejected: list[tuple[int, str]],
                   committed: int, expected: int) -> tuple[list[int], int]:
        """Reading by reading: the accepted readings to keep, and the next expected seq."""
        raw = payload if type(payload) is list else [payload]
        bad = dict(rejected)
        keep: list[int] = []
        accepted = 0
        for i, reading in enumerate(raw):
            if i in bad:
                seq = reading.get("seq") if type(reading) is dict else None
                if type(seq) is int and seq == expected:
                    expected += 1  # a refused reading still uses up its seq: resending it would not help
                continue
            seq = cols.seqs[accepted]
            if seq is None:
                keep.append(accepted)
            elif seq == expected:
                keep.append(accepted)
                expected += 1
            elif seq < expected:
                self.counters.duplicates += 1
                if seq <= committed:
                    self._reacks.add(mark)
            else:
                self.counters.out_of_order += 1
                self._reacks.add(mark)  # repeat the last ack: the device learns it must go back
            accepted += 1
        return keep, expected

    def _add(self, mark: Mark, sensor_type: str, received_at: float, cols: Columns) -> None:
        device_id, epoch = mark
        bucket_s = self._bucket_s
        lo_bucket, hi_bucket = int(min(cols.ts) // bucket_s), int(max(cols.ts) // bucket_s)
        if lo_bucket == hi_bucket:
            parts = [(lo_bucket, cols)]
        else:  # readings of one event across buckets: split, so a batch never spans more than a bucket
            split: dict[int, list[int]] = {}
            for i, t in enumerate(cols.ts):
                split.setdefault(int(t // bucket_s), []).append(i)
            parts = []
            for bucket, idx in split.items():
                part = Columns([cols.ts[i] for i in idx], [cols.values[i] for i in idx],
                               [cols.seqs[i] for i in idx], [cols.datas[i] for i in idx])
                part.data_bytes = cols.data_bytes * len(idx) // len(cols.ts)
                parts.append((bucket, part))
        now = self._clock()
        group = self.index.group(device_id)
        for bucket, part in parts:
            batch = self._open.get((bucket, group))
            if batch is None:
                batch = self._open[bucket, group] = OpenBatch(bucket, now, group)
            before = batch.nbytes
            batch.add(device_id, sensor_type, received_at, part, epoch)
            self._open_count += len(part.ts)
            self._open_bytes += batch.nbytes - before
        if self._open_since is None:
            self._open_since = now
        if self._open_count >= self._max_readings or self._open_bytes >= self._max_bytes:
            self._submit(self._close_open())

    def _counter_snapshot(self) -> dict[str, Any]:
        return self.counters.as_dict()

    def _close_open(self) -> _Job | None:
        if not self._open and not self._marks:
            return None
        job = _Job(list(self._open.values()), self._marks, self._counter_snapshot(), self._clock())
        self._open, self._marks = {}, {}
        self._open_count = self._open_bytes = 0
        self._open_since = None
        return job

    def _submit(self, job: _Job | None) -> None:
        if job is None:
            return
        try:
            self._queue.put_nowait(job)
            self._last_state_write = self._clock()
        except queue.Full:
            self._held = job
            log.warning("storage writer is behind (%d batches queued): shedding new readings until it catches up",
                        self._queue.qsize())

    def tick(self) -> dict[Mark, int]:
        """Periodic work: close aged batches, hand a held batch to the writer, write counters, log rejections.

        Returns acks to re-send: devices that sent duplicates of committed readings (they missed the ack) or
        readings after a gap (the repeated ack tells them to send again from there).
        """
        now = self._clock()
        if self._held is not None:
            try:
                self._queue.put_nowait(self._held)
                self._held = None
                log.info("storage writer caught up: taking readings again")
            except queue.Full:
                pass
        if self._open_since is not None and self._held is None and now - self._open_since >= self._max_age:
            self._submit(self._close_open())
        if (self._dirty and self._held is None and self._queue.empty()
                and now - self._last_state_write >= STATS_WRITE_INTERVAL_S):
            self._dirty = False
            self._submit(_Job([], {}, self._counter_snapshot(), now))
        if self._reject_log and now - self._last_reject_log >= REJECT_LOG_INTERVAL_S:
            summary = ", ".join(f"{n} {reason} (e.g. on {self._reject_example.get(reason, '-')})"
                                for reason, n in sorted(self._reject_log.items()))
            log.warning("refused readings in the last %.0fs: %s", now - self._last_reject_log
                        if self._last_reject_log else REJECT_LOG_INTERVAL_S, summary)
            self._reject_log.clear()
            self._reject_example.clear()
            self._last_reject_log = now
        reacks = {d: self.rows.mark(*d) for d in self._reacks}
        self._reacks.clear()
        if len(self._next_seq) > self._cache_size:
            self._let_go()
        return reacks

    def _let_go(self) -> None:
        """Forget where devices stand whose readings are all committed (their row has it), so memory stays bounded."""
        pending = set(self._marks)
        for key, nxt in list(self._next_seq.items()):
            mark = _mark_of(key)
            if mark not in pending and self.rows.cached_mark(*mark) == nxt - 1:
                del self._next_seq[key]

    def stats(self) -> dict[str, Any]:
        """Counters as of now, with the queue depth."""
        out = self.counters.as_dict()
        out["stored"], out["batches"], out["bytes"] = (self._committed.stored, self._committed.batches,
                                                       self._committed.bytes)
        out["queue_depth"] = self.queue_depth()
        return out

    def queue_depth(self) -> int:
        """Closed batches waiting for the writer (a held one included)."""
        return self._queue.qsize() + (1 if self._held is not None else 0)

    # ---- writer thread
    def _run(self) -> None:
        while True:
            jobs = [self._queue.get()]
            # Group commit: what queued up while the last commit ran goes into one transaction and one state
            # record, so a writer that falls behind (a slow disk, a checkpoint) catches up instead of shedding.
            while jobs[-1] is not _STOP and len(jobs) < GROUP_COMMIT_JOBS:
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = jobs[-1] is _STOP
            if stop:
                jobs.pop()
            if jobs:
                job = _merge(jobs)
                if not self._write(job):
                    self.lost_on_shutdown += sum(b.count for b in job.batches)
            if stop:
                return

    def _write(self, job: _Job) -> bool:
        ring = self._keys()
        limit = self._store.max_body_bytes
        # sealed once: a retry writes the same uids; cut first where the backend limits a record's size
        sealed = [seal_batch(ring, part) for b in job.batches for part in split_batch(b, limit)]
        rows = self.rows.get_many({g[0] for b in job.batches for g in b.groups} | {d for d, _ in job.marks})
        n = 0
        for batch in job.batches:
            for g in batch.groups:
                rows[g[0]].fold(g[1], g[2], g[3], g[4], g[5], g[6])
                n += len(g[3])
        for (device_id, epoch), seq in job.marks.items():
            rows[device_id].raise_mark(epoch, seq)
        packed = [(d, r.packed()) for d, r in rows.items()]
        sealed_rows = [seal_packed(ring, self.index.row_name(d), p) for d, p in packed]
        pending = Counters.from_dict(job.counters)
        pending.stored, pending.batches = self._committed.stored + n, self._committed.batches + len(sealed)
        pending.bytes = self._committed.bytes
        replay: dict[str, Any] = {}
        recent = list(self._recent)
        if not self._store.atomic_commit:
            uids = [b.uid for b in sealed]
            recent = [(t, u) for t, u in recent if t >= job.closed_at - REPLAY_MARGIN_S] + [(job.closed_at, uids)]
            replay = {"from": job.closed_at - REPLAY_MARGIN_S, "uids": [u for _, us in recent for u in us]}
        delay = RETRY_MIN_S
        failures = 0
        while True:
            state = seal_state(ring, self._name, self._record(pending, replay, self.queue_depth()))
            try:
                started = time.perf_counter()
                written = self._store.commit(sealed, [*sealed_rows, state])
                self.commit_seconds.observe(time.perf_counter() - started)
                break
            except IotError as err:
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    log.error("storage write failed (%s); keeping %d readings and retrying", err, n)
                if self._stopping.wait(delay):
                    return False
                delay = min(RETRY_MAX_S, delay * 2)
            except Exception:
                log.exception("unexpected error writing a batch; retrying")
                if self._stopping.wait(delay):
                    return False
                delay = min(RETRY_MAX_S, delay * 2)
        if failures:
            log.info("storage write succeeded after %d failed attempts", failures)
        pending.bytes += written
        self._committed = pending
        self._recent = deque(recent)
        self.rows.put_packed(packed)
        if job.marks:
            self._on_commit({(d, e): rows[d].marks[NO_EPOCH if e is None else e] for d, e in job.marks})
        return True
