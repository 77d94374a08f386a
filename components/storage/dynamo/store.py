"""DynamoBatchStore: the BatchStore of one DynamoDB table, composed of its calls, layout, writes, states and reads."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Literal

from components.core.settings import StorageSettings
from components.storage.dynamo import reads
from components.storage.dynamo import state as state_records
from components.storage.dynamo.calls import connect
from components.storage.dynamo.codec import MAX_BODY_BYTES, check_record
from components.storage.dynamo.layout import GSI_RECEIVED, KIND_CODE, Layout, ensure_table, load_layout
from components.storage.dynamo.writes import RecordWriter, replace_record
from components.storage.interface import BATCH, Kind, SealedBatch, SealedState

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.client import DynamoDBClient


class DynamoBatchStore:
    """Implements :class:`components.storage.interface.BatchStore` on one DynamoDB table (thread-safe: one client)."""

    max_body_bytes: int | None = MAX_BODY_BYTES

    def __init__(self, settings: StorageSettings) -> None:
        """Connect, check (or create) the table and read its layout; StorageUnavailable says what is wrong."""
        self._calls = connect(settings, GSI_RECEIVED)
        self._table = self._calls.name
        try:
            ensure_table(self._calls, settings.dynamodb_create_table)
            self._layout = load_layout(self._calls, settings.bucket_seconds)
        except BaseException:
            self._calls.close()
            raise
        self._writer = RecordWriter(self._calls, self._layout)
        self._pool = reads.QueryPool()

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

    def commit(self, batches: Sequence[SealedBatch], state: SealedState | None) -> int:
        """Store batches (each uid once), then the state record; return the bytes of bodies newly written."""
        for b in batches:
            check_record(BATCH, b)
        if state is not None:
            self._writer.register([state_records.dir_entry(state.name)])
        written = self._writer.store("b", batches)
        if batches:
            self._writer.raise_max_hi(max(b.hi for b in batches))
        if state is not None:
            state_records.put_state(self._calls, state, None)
            written += len(state.body)
        return written

    def append_audit(self, chunk: SealedBatch) -> None:
        """Store a sealed chunk of audit entries."""
        self._writer.store("a", [chunk])

    def states(self, prefix: str) -> list[SealedState]:
        """State records whose name starts with ``prefix``."""
        return state_records.states(self._calls, prefix)

    def batches_by_ts(self, start: float, end: float, kind: Kind = BATCH) -> list[SealedBatch]:
        """Records whose [lo, hi] overlaps [start, end], ordered by lo."""
        return reads.by_lo(reads.window(self._calls, self._layout, self._pool, KIND_CODE[kind], "t", start, end))

    def batches_by_received(self, start: float, end: float) -> list[SealedBatch]:
        """Batches whose [rec_lo, rec_hi] overlaps [start, end], ordered by lo (found on the GSI, read consistently)."""
        keys = [{"pk": i["pk"], "sk": i["sk"]}
                for i in reads.window(self._calls, self._layout, self._pool, "b", "r", start, end)]
        return reads.by_lo(self._calls.batch_get(keys))

    def batches_by_hi_desc(self, below: float | None = None) -> Iterator[SealedBatch]:
        """Batches in descending order of hi (only hi < below when given), read lazily (a k-way merge of partitions)."""
        return reads.by_hi_desc(self._calls, self._layout, below)

    def max_ts(self) -> float | None:
        """The greatest hi of all batches (one consistent GetItem of the marker every commit raises)."""
        return reads.max_ts(self._calls)

    def records(self) -> Iterator[tuple[Kind | Literal["state"], SealedBatch | SealedState]]:
        """Every record, for re-sealing: the one Scan of this backend (consistent, paged)."""
        return reads.records(self._calls)

    def replace(self, kind: Kind | Literal["state"], old: SealedBatch | SealedState,
                new: SealedBatch | SealedState) -> bool:
        """Compare-and-swap the key and body of one record (a conditional write on key id and body digest)."""
        if isinstance(old, SealedState):
            if not isinstance(new, SealedState):
                raise TypeError("a state record is replaced by a state record")
            return state_records.put_state(self._calls, SealedState(old.name, new.key_id, new.body), old)
        if kind == "state" or isinstance(new, SealedState):
            raise TypeError(f"a {kind} record is replaced by a SealedBatch")
        return replace_record(self._calls, self._layout, KIND_CODE[kind], old, new)

    def close(self) -> None:
        """Stop the query threads and close the client's connections."""
        self._pool.close()
        self._calls.close()
