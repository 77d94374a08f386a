"""DynamoBatchStore: the BatchStore of one DynamoDB table, composed of its calls, layout, writes, named records,
swaps and reads."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Literal

from botocore.exceptions import ClientError

from components.core.settings import StorageSettings
from components.storage.dynamo import reads, swaps
from components.storage.dynamo import state as named
from components.storage.dynamo.calls import CAS, connect
from components.storage.dynamo.codec import MAX_BODY_BYTES, attr_s, check_record
from components.storage.dynamo.layout import GSI_RECEIVED, KIND_CODE, Layout, ensure_table, ensure_ttl, load_layout
from components.storage.dynamo.writes import TTL_ATTRIBUTE, RecordWriter, replace_record
from components.storage.interface import BATCH, SEGMENT, Groups, Kind, Removed, SealedBatch, SealedState

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.client import DynamoDBClient


class DynamoBatchStore:
    """Implements :class:`components.storage.interface.BatchStore` on one DynamoDB table (thread-safe: one client)."""

    max_body_bytes: int | None = MAX_BODY_BYTES

    def __init__(self, settings: StorageSettings) -> None:
        """Connect, check (or create) the table, read its layout and finish what killed swaps left;
        StorageUnavailable says what is wrong."""
        self._calls = connect(settings, GSI_RECEIVED)
        self._table = self._calls.name
        try:
            ensure_table(self._calls, settings.dynamodb_create_table)
            self._layout = load_layout(self._calls, settings.bucket_seconds)
            swaps.recover(self._calls, None)
            if settings.retention_days > 0:
                ensure_ttl(self._calls, TTL_ATTRIBUTE)
        except BaseException:
            self._calls.close()
            raise
        self._retention_s = settings.retention_days * 86400.0
        self._writer = RecordWriter(self._calls, self._layout, expire_after_s=self._retention_s or None)
        self._named = named.StateWriter(self._calls)
        self._pool = reads.QueryPool()
        self._settings: dict[str, str] = {}
        self._lock = threading.Lock()

    @property
    def client(self) -> DynamoDBClient:
        """The boto3 client (tools and tests may wrap its methods)."""
        return self._calls.client

    @property
    def layout(self) -> Layout:
        """Where this table keeps records (its shard count and bucket size)."""
        return self._layout

    @property
    def retry_budget_s(self) -> float:
        """Seconds one call may spend retrying throttling (tunable, e.g. in tests)."""
        return self._calls.retry_budget_s

    @retry_budget_s.setter
    def retry_budget_s(self, seconds: float) -> None:
        self._calls.retry_budget_s = seconds

    @property
    def atomic_commit(self) -> bool:
        """False: a commit is several calls (the core keeps a replay record for a torn one)."""
        return False

    def setting(self, name: str, default: str) -> str:
        """The store's value of ``name``: a conditional PutItem of ``default``, else a consistent read of the value
        the first writer put (remembered: it never changes)."""
        with self._lock:
            if name in self._settings:
                return self._settings[name]
        key = {"pk": attr_s("meta"), "sk": attr_s(f"setting:{name}")}
        try:
            self._calls.call("PutItem", self.client.put_item, passthrough=CAS, TableName=self._table,
                             Item={**key, "value": attr_s(default)}, ConditionExpression="attribute_not_exists(pk)")
            value = default
        except ClientError:
            item = self._calls.get(key)
            value = default if item is None else item["value"]["S"]
        with self._lock:
            self._settings[name] = value
        return value

    def commit(self, batches: Sequence[SealedBatch], states: Sequence[SealedState]) -> int:
        """Store batches (each uid once), then the device rows (BatchWriteItem), then the other named records
        (the counters last); return the bytes of bodies newly written."""
        for b in batches:
            check_record(BATCH, b)
        self._named.register(s.name for s in states)
        written = self._writer.store("b", batches)
        if batches:
            self._writer.raise_max_hi(max(b.hi for b in batches))
        self._named.put(states)
        return written + sum(len(s.body) for s in states)

    def append_audit(self, chunk: SealedBatch) -> None:
        """Store a sealed chunk of audit entries."""
        self._writer.store("a", [chunk])

    def states(self, prefix: str) -> list[SealedState]:
        """Named records whose name starts with ``prefix`` (device rows: up to 16 Queries side by side)."""
        return named.states(self._calls, prefix, self._pool.map)

    def get_states(self, names: Sequence[str]) -> list[SealedState]:
        """The named records of ``names`` that exist (consistent BatchGetItem, 100 keys a call)."""
        return named.get_states(self._calls, names)

    def batches_by_ts(self, start: float, end: float, kind: Kind = BATCH, groups: Groups = None
                      ) -> list[SealedBatch]:
        """Records of ``kind`` (in ``groups``) whose [lo, hi] overlaps [start, end], ordered by lo."""
        return reads.by_ts(self._calls, self._layout, self._pool, KIND_CODE[kind], start, end, groups)

    def batches_by_received(self, start: float, end: float, kind: Kind = BATCH, groups: Groups = None
                            ) -> list[SealedBatch]:
        """Records of ``kind`` (in ``groups``) whose [rec_lo, rec_hi] overlaps [start, end], ordered by lo (found on
        the GSI, read consistently); audit chunks are not in that index (ValueError)."""
        return reads.by_received(self._calls, self._layout, self._pool, KIND_CODE[kind], start, end, groups)

    def batches_by_hi_desc(self, below: float | None = None, kind: Kind = BATCH, groups: Groups = None
                           ) -> Iterator[SealedBatch]:
        """Records of ``kind`` (in ``groups``) by descending hi (only hi < below when given), read lazily."""
        return reads.by_hi_desc(self._calls, self._layout, KIND_CODE[kind], below, groups)

    def max_ts(self) -> float | None:
        """The greatest hi of all batches and segments (one consistent GetItem of the marker)."""
        return reads.max_ts(self._calls)

    def pending_windows(self, window_s: int, before: float) -> list[tuple[int, int]]:
        """(window, group) of write batches with hi below ``before``, read from the partitions still pending."""
        return reads.pending_windows(self._calls, self._layout, self._pool, window_s, before)

    def swap(self, old: Sequence[SealedBatch], new: Sequence[SealedBatch]) -> bool:
        """Replace records ``old`` by segments ``new`` with the protocol of :mod:`components.storage.dynamo.swaps`."""
        return swaps.swap(self._calls, self._layout, self._writer, old, new)

    @property
    def expires_itself(self) -> bool:
        """True with a retention set: batches and segments carry the TTL attribute and DynamoDB deletes them."""
        return self._retention_s > 0

    def delete_before(self, before: float, limit: int) -> Removed:
        """Delete up to ``limit`` batches and segments with hi below ``before`` (the newest of them first; for
        records written before a retention was set, which carry no TTL attribute)."""
        old: list[tuple[str, SealedBatch]] = []
        for kind in (BATCH, SEGMENT):
            code = KIND_CODE[kind]
            for b in reads.by_hi_desc(self._calls, self._layout, code, before, None):
                if len(old) >= limit:
                    break
                old.append((code, b))
        self._calls.delete_all(self._layout.record_key(code, b) for code, b in old)
        return Removed(len(old), sum(b.count for _, b in old), sum(len(b.body) for _, b in old))

    def records(self) -> Iterator[tuple[Kind | Literal["state"], SealedBatch | SealedState]]:
        """Every record, for re-sealing: the one Scan of this backend (consistent, paged)."""
        return reads.records(self._calls)

    def replace(self, kind: Kind | Literal["state"], old: SealedBatch | SealedState,
                new: SealedBatch | SealedState) -> bool:
        """Compare-and-swap the key and body of one record (a conditional write on key id and body digest)."""
        if isinstance(old, SealedState):
            if not isinstance(new, SealedState):
                raise TypeError("a named record is replaced by a named record")
            return named.put_state(self._calls, SealedState(old.name, new.key_id, new.body), old)
        if kind == "state" or isinstance(new, SealedState):
            raise TypeError(f"a {kind} record is replaced by a SealedBatch")
        return replace_record(self._calls, self._layout, KIND_CODE[kind], old, new)

    def close(self) -> None:
        """Stop the query threads and close the client's connections."""
        self._pool.close()
        self._calls.close()
