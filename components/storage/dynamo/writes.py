"""Writing records: BatchWriteItem in bounded chunks, directory entries first, each uid once.

Writes use BatchWriteItem (25 items, 16 MB a call) with UnprocessedItems and throttling retried with
exponential backoff and jitter for a bounded time. A commit is not one transaction: it writes directory
entries, then batches (skipping uids already stored, so retries store nothing twice), then the ``max_hi``
marker, then the state record; a crash in between leaves batches without the state that acknowledges
them, so their readings may be stored again when devices resend, but none is lost.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from botocore.exceptions import ClientError

from components.storage.dynamo.calls import CAS, DynamoTable
from components.storage.dynamo.codec import Item, attr_s, check_record, digest, encode_float, record_attrs
from components.storage.dynamo.layout import CODE_KIND, Layout
from components.storage.interface import SealedBatch

BATCH_WRITE_MAX_ITEMS = 25
BATCH_WRITE_MAX_BYTES = 16 * 1024 * 1024


def item_size(item: Item) -> int:
    """An item's size as DynamoDB counts it, closely enough to keep a BatchWriteItem under 16 MB."""
    size = 0
    for name, value in item.items():
        size += len(name)
        for typ, v in value.items():
            size += len(v) if typ == "B" else len(str(v).encode("utf-8"))
    return size + 100


def write(table: DynamoTable, requests: Sequence[Item]) -> None:
    """BatchWriteItem in chunks of at most 25 requests and 16 MB."""
    chunk: list[Item] = []
    size = 0
    for req in requests:
        body = req.get("PutRequest", {}).get("Item") or req["DeleteRequest"]["Key"]
        n = item_size(body)
        if chunk and (len(chunk) == BATCH_WRITE_MAX_ITEMS or size + n > BATCH_WRITE_MAX_BYTES):
            _write_chunk(table, chunk)
            chunk, size = [], 0
        chunk.append(req)
        size += n
    if chunk:
        _write_chunk(table, chunk)


def _write_chunk(table: DynamoTable, chunk: list[Item]) -> None:
    pending: list[Any] = chunk
    deadline = time.monotonic() + table.retry_budget_s
    for attempt in itertools.count(1):  # ends: all processed, or backoff raises at the deadline
        resp = table.call("BatchWriteItem", table.client.batch_write_item, RequestItems={table.name: pending})
        pending = list(resp.get("UnprocessedItems", {}).get(table.name, []))
        if not pending:
            return
        table.backoff(attempt, deadline, f"BatchWriteItem left {len(pending)} of {len(chunk)} items unprocessed")


def replace_record(table: DynamoTable, layout: Layout, code: str, old: SealedBatch, new: SealedBatch) -> bool:
    """Compare-and-swap the key id and body of one record; False if it is no longer ``old``."""
    check_record(CODE_KIND[code], new)
    try:
        table.call("UpdateItem", table.client.update_item, passthrough=CAS, TableName=table.name,
                   Key=layout.record_key(code, old),
                   UpdateExpression="SET #k = :k, #v = :v, #h = :h",
                   ConditionExpression="attribute_exists(#pk) AND #k = :ok AND #h = :oh",
                   ExpressionAttributeNames={"#pk": "pk", "#k": "k", "#v": "v", "#h": "h"},
                   ExpressionAttributeValues={":k": attr_s(new.key_id), ":v": {"B": new.body},
                                              ":h": attr_s(digest(new.key_id, new.body)),
                                              ":ok": attr_s(old.key_id), ":oh": attr_s(digest(old.key_id, old.body))})
    except ClientError:
        return False
    return True


class RecordWriter:
    """Stores records, remembering which directory entries and ``max_hi`` this process has written (thread-safe)."""

    def __init__(self, table: DynamoTable, layout: Layout) -> None:
        """Write records of ``layout`` to ``table``."""
        self.table, self.layout = table, layout
        self._lock = threading.Lock()
        self._known: set[tuple[str, str]] = set()  # directory entries this process knows are written
        self._max_hi_known = -math.inf  # the max_hi marker is known to be at least this

    def register(self, entries: Iterable[Item]) -> None:
        """Write directory entries this process has not written yet (before the records they describe)."""
        with self._lock:
            todo = {(e["pk"]["S"], e["sk"]["S"]): e for e in entries if (e["pk"]["S"], e["sk"]["S"]) not in self._known}
        if todo:
            write(self.table, [{"PutRequest": {"Item": e}} for e in todo.values()])
            with self._lock:
                self._known.update(todo)

    def store(self, code: str, records: Sequence[SealedBatch]) -> int:
        """Store records of kind ``code`` not stored yet (each uid once); return the bytes of bodies written."""
        unique: dict[str, SealedBatch] = {}
        for b in records:
            check_record(CODE_KIND[code], b)
            unique.setdefault(b.uid, b)
        if not unique:
            return 0
        self.register(e for b in unique.values() for e in self.layout.directory_entries(code, b))
        keys = {b.uid: self.layout.record_key(code, b) for b in unique.values()}
        stored = {(i["pk"]["S"], i["sk"]["S"]) for i in self.table.batch_get(list(keys.values()),
                                                                             projection="#pk, #sk")}
        new = [b for uid, b in unique.items() if (keys[uid]["pk"]["S"], keys[uid]["sk"]["S"]) not in stored]
        # only batches are in the arrival-time index (a sparse GSI: audit chunks cost nothing there)
        write(self.table, [{"PutRequest": {"Item": {**keys[b.uid], **record_attrs(b),
                                                    **(self.layout.arrival_key(b) if code == "b" else {})}}}
                           for b in new])
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
