"""Writing records: BatchWriteItem in bounded chunks, directory entries first, each uid once.

Writes use BatchWriteItem (25 items, 16 MB a call, see :meth:`~components.storage.dynamo.calls.DynamoTable.write`)
with UnprocessedItems and throttling retried with exponential backoff and jitter for a bounded time. A commit is
not one transaction (``atomic_commit`` is False): it writes directory and pending entries, then batches
(skipping uids already stored, so retries store nothing twice), then the ``max_hi`` marker, then the device
rows, then the counters record; a crash in between leaves batches without the rows and counters that
acknowledge them, so the core folds them in again from its replay record (or devices resend), but none is lost.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from botocore.exceptions import ClientError

from components.storage.dynamo.calls import CAS, DynamoTable
from components.storage.dynamo.codec import Item, attr_n, attr_s, check_record, digest, encode_float, record_attrs
from components.storage.dynamo.layout import CODE_KIND, PENDING_LEASE_S, Layout
from components.storage.interface import SealedBatch

TTL_ATTRIBUTE = "exp"
"""The table's TTL attribute: epoch seconds after which DynamoDB deletes the item (storage.retention_days)."""
EXPIRING_CODES = frozenset({"b", "c"})
KNOWN_ENTRIES_MAX = 200_000
"""Directory entries a process remembers as written; past this it forgets them (and writes them once more)."""


def replace_record(table: DynamoTable, layout: Layout, code: str, old: SealedBatch, new: SealedBatch) -> bool:
    """Compare-and-swap the key id and body of one record; False if it is no longer ``old``."""
    check_record(CODE_KIND[code], new)
    try:
        table.call("UpdateItem", table.client.update_item, passthrough=CAS, TableName=table.name,
                   Key=layout.record_key(code, old),
                   UpdateExpression="SET #k = :k, #v = :v, #h = :h",
                   ConditionExpression="attribute_exists(#pk) AND attribute_not_exists(#pend) AND #k = :ok "
                                       "AND #h = :oh",
                   ExpressionAttributeNames={"#pk": "pk", "#pend": "pend", "#k": "k", "#v": "v", "#h": "h"},
                   ExpressionAttributeValues={":k": attr_s(new.key_id), ":v": {"B": new.body},
                                              ":h": attr_s(digest(new.key_id, new.body)),
                                              ":ok": attr_s(old.key_id), ":oh": attr_s(digest(old.key_id, old.body))})
    except ClientError:
        return False
    return True


def record_item(layout: Layout, code: str, b: SealedBatch, expire_after_s: float | None = None) -> Item:
    """The whole item of a record of kind ``code``: keys, arrival-index keys (batches, segments), attributes, and
    for batches and segments, when a retention is set, the TTL attribute (``hi`` plus the retention)."""
    item = {**layout.record_key(code, b), **record_attrs(b), **layout.arrival_key(code, b)}
    if expire_after_s and code in EXPIRING_CODES:
        item[TTL_ATTRIBUTE] = attr_n(math.ceil(b.hi + expire_after_s))
    return item


class RecordWriter:
    """Stores records, remembering which directory and pending entries and ``max_hi`` this process has written
    (thread-safe)."""

    def __init__(self, table: DynamoTable, layout: Layout, clock: Callable[[], float] = time.monotonic,
                 expire_after_s: float | None = None) -> None:
        """Write records of ``layout`` to ``table``; batches and segments expire ``expire_after_s`` after their hi."""
        self.table, self.layout = table, layout
        self.expire_after_s = expire_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._known: set[tuple[str, str]] = set()  # directory entries this process knows are written
        self._leased: dict[str, float] = {}  # pending entries: when this process last put them (monotonic)
        self._max_hi_known = -math.inf  # the max_hi marker is known to be at least this

    def register(self, entries: Iterable[Item]) -> None:
        """Write directory entries this process has not written yet (before the records they describe)."""
        with self._lock:
            todo = {(e["pk"]["S"], e["sk"]["S"]): e for e in entries if (e["pk"]["S"], e["sk"]["S"]) not in self._known}
        if todo:
            self.table.put_all(todo.values())
            with self._lock:
                if len(self._known) + len(todo) > KNOWN_ENTRIES_MAX:
                    self._known.clear()
                self._known.update(todo)

    def lease(self, batches: Iterable[SealedBatch]) -> None:
        """Put the pending entries of the batches' partitions not put by this process within the lease."""
        now = self._clock()
        with self._lock:
            self._leased = {sk: t for sk, t in self._leased.items() if now - t < PENDING_LEASE_S}
            todo = {}
            for b in batches:
                key = self.layout.pending_key(b)
                if key["sk"]["S"] not in self._leased:
                    todo[key["sk"]["S"]] = key
        if todo:
            self.table.put_all({**key, "at": {"N": repr(time.time())}} for key in todo.values())
            with self._lock:
                self._leased.update(dict.fromkeys(todo, now))

    def unique(self, code: str, records: Sequence[SealedBatch]) -> dict[str, SealedBatch]:
        """The records by uid (the first of each), every one checked to fit an item."""
        unique: dict[str, SealedBatch] = {}
        for b in records:
            check_record(CODE_KIND[code], b)
            unique.setdefault(b.uid, b)
        return unique

    def store(self, code: str, records: Sequence[SealedBatch]) -> int:
        """Store records of kind ``code`` not stored yet (each uid once); return the bytes of bodies written."""
        unique = self.unique(code, records)
        if not unique:
            return 0
        self.register(e for b in unique.values() for e in self.layout.directory_entries(code, b))
        if code == "b":
            self.lease(unique.values())
        keys = {b.uid: self.layout.record_key(code, b) for b in unique.values()}
        stored = {(i["pk"]["S"], i["sk"]["S"]) for i in self.table.batch_get(list(keys.values()),
                                                                             projection="#pk, #sk")}
        new = [b for uid, b in unique.items() if (keys[uid]["pk"]["S"], keys[uid]["sk"]["S"]) not in stored]
        # audit chunks stay out of the arrival-time index (a sparse GSI: they cost nothing there)
        self.table.put_all(record_item(self.layout, code, b, self.expire_after_s) for b in new)
        return sum(len(b.body) for b in new)

    def raise_max_hi(self, hi: float) -> None:
        """Raise the ``max_hi`` marker to ``hi`` (a conditional update, skipped when it is known to be higher)."""
        with self._lock:
            if hi <= self._max_hi_known:
                return
        try:
            self.table.call("UpdateItem", self.table.client.update_item, passthrough=CAS, TableName=self.table.name,
                            Key={"pk": attr_s("meta"), "sk": attr_s("max_hi")}, UpdateExpression="SET #hi = :h",
                            ConditionExpression="attribute_not_exists(#hi) OR #hi < :h",
                            ExpressionAttributeNames={"#hi": "hi"},
                            ExpressionAttributeValues={":h": attr_s(encode_float(hi))})
        except ClientError:
            pass  # another writer already recorded a greater hi
        with self._lock:
            self._max_hi_known = max(self._max_hi_known, hi)
