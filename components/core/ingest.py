"""The ingest service: validate, de-duplicate, batch, seal and commit readings; report what to acknowledge.

Threads: :meth:`IngestService.ingest` and :meth:`IngestService.tick` run on the caller's thread (the
reactor); sealing and writing run on one writer thread, so a slow disk never stalls the caller. Between
them sits a bounded queue of closed batches. When it is full, the service *sheds*: readings arriving
until the writer catches up are counted and dropped, not acknowledged, so devices that number their
readings send them again; memory never grows without bound.

Delivery (readings with ``seq``): per device and spool epoch, storage accepts seq numbers in order, starting
at 1. A seq below the next expected one is a duplicate and is dropped; one above it (a gap, after a lost
event) is dropped too, and the last ack is repeated so the device sends again from there (go-back-N). The
highest committed seq per device and epoch is part of the state record committed in the same transaction as
the batch, and is only then acknowledged. The epoch is a random id a device's spool gets when it is created
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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from components.core import readings as rd
from components.core.batches import OpenBatch, group_epoch, open_groups, open_state, seal_batch, seal_state, split_batch
from components.core.errors import IotError
from components.core.readings import Columns
from components.core.sealing import KeyRing
from components.core.settings import BatchingSettings, StorageSettings
from components.storage.interface import BatchStore

log = logging.getLogger(__name__)

STATE_PREFIX = "storage/"
STATE_VERSION = 1
STATS_WRITE_INTERVAL_S = 1.0
REPLAY_MARGIN_S = 10.0
"""How far back, before the close of the last job a state record covers, a restart looks for later batches."""
REJECT_LOG_INTERVAL_S = 1.0
RETRY_MIN_S, RETRY_MAX_S = 0.05, 5.0
SHED = "shed"
GROUP_COMMIT_JOBS = 64

Mark = tuple[str, str | None]
"""What a seq sequence belongs to: (device_id, spool epoch or None)."""


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


@dataclass
class StorageState:
    """What a storage instance has committed: seq marks, a per-device summary, counters."""

    seq: dict[Mark, int] = field(default_factory=dict)
    # device -> sensor type -> [count, first_ts, last_ts, last_received_at, latest [ts, value, seq, data, rec]]
    devices: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    counters: Counters = field(default_factory=Counters)

    def apply(self, batches: list[OpenBatch], marks: dict[Mark, int]) -> int:
        """Fold committed batches and seq marks into the summary; return the number of readings."""
        n = 0
        for batch in batches:
            for device_id, sensor_type, rec, ts, values, seqs, datas, *_ in batch.groups:
                n += len(ts)
                lo, hi = min(ts), max(ts)
                entry = self.devices.setdefault(device_id, {}).get(sensor_type)
                if entry is None:
                    entry = self.devices[device_id][sensor_type] = [0, lo, hi, rec, None]
                entry[0] += len(ts)
                entry[1] = min(entry[1], lo)
                entry[3] = max(entry[3], rec)
                if entry[4] is None or hi >= entry[4][0]:
                    i = ts.index(hi)
                    entry[4] = [hi, values[i], seqs[i] if seqs else None, datas[i] if datas else None, rec]
                entry[2] = max(entry[2], hi)
        for mark, seq in marks.items():
            if seq > self.seq.get(mark, 0):
                self.seq[mark] = seq
        return n

    def marks_record(self) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
        """The seq marks as stored: {device: seq} without epoch, {device: {epoch: seq}} with one."""
        plain: dict[str, int] = {}
        by_epoch: dict[str, dict[str, int]] = {}
        for (device_id, epoch), seq in self.seq.items():
            if epoch is None:
                plain[device_id] = seq
            else:
                by_epoch.setdefault(device_id, {})[epoch] = seq
        return plain, by_epoch

    def record(self, shard: int, shards: int, queue_depth: int, replay: dict[str, Any]) -> dict[str, Any]:
        """The value sealed into the state record."""
        plain, by_epoch = self.marks_record()
        return {"v": STATE_VERSION, "shard": shard, "shards": shards, "seq": plain, "epochs": by_epoch,
                "devices": self.devices,
                "counters": self.counters.as_dict(), "queue_depth": queue_depth, "written_at": time.time(),
                "replay": replay}


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
        # caller-thread state
        self.counters = Counters()
        self._open: dict[int, OpenBatch] = {}
        self._open_count = 0
        self._open_bytes = 0
        self._open_since: float | None = None
        self._marks: dict[Mark, int] = {}
        self._next_seq: dict[Mark, int] = {}
        self._reacks: set[Mark] = set()
        self._held: _Job | None = None
        self._reject_log: Counter[str] = Counter()
        self._reject_example: dict[str, str] = {}
        self._last_reject_log = 0.0
        self._last_state_write = 0.0
        self._dirty = False
        # writer-thread state
        self._state = StorageState()
        self._recent: deque[tuple[float, list[str]]] = deque()
        self._stopping = threading.Event()
        self._writer = threading.Thread(target=self._run, name="storage-writer", daemon=True)
        self.lost_on_shutdown = 0

    # ---- start and stop
    def start(self) -> None:
        """Load committed state (seq marks of every shard, own summary and counters), start the writer."""
        ring = self._keys()
        for sealed in self._store.states(STATE_PREFIX):
            value = open_state(ring, sealed)
            # every shard's marks: a device that moved shards keeps its sequence
            marks: list[tuple[Mark, int]] = [((d, None), seq) for d, seq in value.get("seq", {}).items()]
            marks += [((d, e), seq) for d, epochs in value.get("epochs", {}).items() for e, seq in epochs.items()]
            for mark, seq in marks:
                if seq > self._state.seq.get(mark, 0):
                    self._state.seq[mark] = seq
            if sealed.name == self._name:
                self._state.devices = value.get("devices", {})
                self._state.counters = Counters.from_dict(value.get("counters", {}))
                self._replay(ring, value.get("replay"))
        self.counters = copy.deepcopy(self._state.counters)
        self._writer.start()
        log.info("storage %s started: %d device(s) known, %d readings stored so far", self._name,
                 len(self._state.devices), self.counters.stored)

    def _replay(self, ring: KeyRing, replay: dict[str, Any] | None) -> None:
        """Fold in batches committed after this instance's last state record.

        A backend whose commit is not one transaction (DynamoDB) can hold batches whose state update was lost
        in a crash. Every batch committed after a state record holds readings received after that record's job
        closed, so they are found by arrival time; the uids listed in the record are the ones it already covers.
        """
        if not replay:
            return
        known = set(replay.get("uids", ()))
        replayed = 0
        folded: list[str] = []
        for sealed in self._store.batches_by_received(replay["from"], float("inf")):
            if sealed.uid in known:
                continue
            batch = OpenBatch(sealed.bucket, 0.0)
            marks: dict[Mark, int] = {}
            for group in open_groups(ring, sealed):
                if self._shards > 1 and shard_of(group[0], self._shards) != self._shard:
                    break  # another instance's batch
                batch.add_group(group)
                if group[5]:
                    mark = (group[0], group_epoch(group))
                    marks[mark] = max(marks.get(mark, 0), max(s for s in group[5] if s is not None))
            else:
                self._state.counters.stored += self._state.apply([batch], marks)
                self._state.counters.batches += 1
                replayed += 1
                folded.append(sealed.uid)
        # the next state records still list these, so a second crash soon after does not fold them in twice
        self._recent = deque([(replay["from"] + REPLAY_MARGIN_S, [*known, *folded])])
        if replayed:
            log.warning("storage %s: folded in %d batch(es) committed after its last state record (a crash between "
                        "the two writes)", self._name, replayed)

    def flush(self, timeout: float = 30.0) -> bool:
        """Seal and commit everything open, stop the writer; True if all of it was committed in time."""
        deadline = time.monotonic() + timeout
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
        committed = self._state.seq.get(mark, 0)
        start = self._next_seq.get(mark, committed + 1)
        n = len(cols.seqs)
        keep: list[int] | None = None
        if not rejected and cols.seqs[0] == start and cols.seqs == list(range(start, start + n)):
            expected = start + n  # the usual event: the next readings in order, checked in one comparison
        else:
            keep, expected = self._walk_seqs(mark, payload, cols, rejected, committed, start)
        if expected != start:
            self._next_seq[mark] = expected
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
        for bucket, part in parts:
            batch = self._open.get(bucket)
            if batch is None:
                batch = self._open[bucket] = OpenBatch(bucket, now)
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
        reacks = {d: self._state.seq.get(d, 0) for d in self._reacks}
        self._reacks.clear()
        return reacks

    def stats(self) -> dict[str, Any]:
        """Counters as of now, with the queue depth."""
        out = self.counters.as_dict()
        out["stored"], out["batches"], out["bytes"] = (self._state.counters.stored, self._state.counters.batches,
                                                       self._state.counters.bytes)
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
        n = self._state.apply(job.batches, job.marks)
        counters = self._state.counters
        pending = Counters.from_dict(job.counters)
        pending.stored, pending.batches = counters.stored + n, counters.batches + len(sealed)
        pending.bytes = counters.bytes
        delay = RETRY_MIN_S
        failures = 0
        uids = [b.uid for b in sealed]
        recent = [(t, u) for t, u in self._recent if t >= job.closed_at - REPLAY_MARGIN_S] + [(job.closed_at, uids)]
        replay = {"from": job.closed_at - REPLAY_MARGIN_S, "uids": [u for _, us in recent for u in us]}
        while True:
            state = StorageState(self._state.seq, self._state.devices, pending)
            try:
                record = state.record(self._shard, self._shards, self.queue_depth(), replay)
                written = self._store.commit(sealed, seal_state(ring, self._name, record))
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
        self._state.counters = pending
        self._recent = deque(recent)
        if job.marks:
            self._on_commit({d: self._state.seq[d] for d in job.marks})
        return True
