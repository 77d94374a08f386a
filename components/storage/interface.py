"""The storage interface every backend implements, and the sealed records it stores.

Backends store and return sealed records plus their clear index fields. They know nothing of WAMP,
hold no keys and never see a reading. ``tests/storage/test_store_contract.py`` runs the same suite against
every backend.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Kind = Literal["batch", "segment", "audit"]
BATCH: Literal["batch"] = "batch"
SEGMENT: Literal["segment"] = "segment"
AUDIT: Literal["audit"] = "audit"
EVERY_GROUP = 0
"""The group of records that may hold any device: those written before device groups, and audit chunks."""


def span_class(span: float) -> int:
    """0 for spans of at most 1 s, else ceil(log2(span)): a record of class c spans at most 2**c seconds.

    Indexing (class, lower bound) finds every record that overlaps a window with one range seek per class,
    so a query's cost follows the size of its answer, not of the store.
    """
    return 0 if span <= 1.0 else math.ceil(math.log2(span))


@dataclass(frozen=True, slots=True)
class SealedBatch:
    """A sealed record of readings (a write batch or a segment) or of audit entries, with the clear fields used
    to find it.

    ``lo``/``hi`` bound the readings' ``ts`` (the entries' time for audit); ``rec_lo``/``rec_hi`` bound
    their ``received_at``; ``bucket`` is the time bucket of a write batch, the window of a segment; ``group``
    is the device group of every reading in it (:data:`EVERY_GROUP`: any device).
    """

    uid: str
    bucket: int
    lo: float
    hi: float
    rec_lo: float
    rec_hi: float
    count: int
    key_id: str
    body: bytes
    fmt: int = 1
    group: int = EVERY_GROUP


@dataclass(frozen=True, slots=True)
class SealedState:
    """A sealed named record: a device row (``device/<tag>``) or a storage instance's counters (``storage/...``)."""

    name: str
    key_id: str
    body: bytes


Groups = Collection[int] | None
"""Device groups a read is limited to (None: every group)."""


@dataclass(frozen=True, slots=True)
class Removed:
    """What a deletion took away: records (write batches and segments), the readings they held, their body bytes."""

    records: int = 0
    readings: int = 0
    bytes: int = 0

    def __add__(self, other: Removed) -> Removed:
        """Both deletions together."""
        return Removed(self.records + other.records, self.readings + other.readings, self.bytes + other.bytes)


class BatchStore(Protocol):
    """What storage and queries need from a backend. Every method may raise StorageUnavailable."""

    @property
    def max_body_bytes(self) -> int | None:
        """Largest sealed body one record may hold (None: no limit); storage cuts records to fit before sealing."""
        ...

    @property
    def atomic_commit(self) -> bool:
        """True when :meth:`commit` is one transaction (else storage keeps what it needs to replay a torn one)."""
        ...

    def setting(self, name: str, default: str) -> str:
        """The store's value of ``name``, set to ``default`` by its first use: every process of a store agrees."""
        ...

    def commit(self, batches: Sequence[SealedBatch], states: Sequence[SealedState]) -> int:
        """Store write batches and replace named records, atomically where the backend can; return bytes written.

        Writing a batch whose uid is already stored is a no-op (retries store nothing twice).
        """
        ...

    def batches_by_ts(self, start: float, end: float, kind: Kind = BATCH, groups: Groups = None
                      ) -> list[SealedBatch]:
        """Records of ``kind`` (in ``groups``) whose [lo, hi] overlaps [start, end], ordered by lo."""
        ...

    def batches_by_received(self, start: float, end: float, kind: Kind = BATCH, groups: Groups = None
                            ) -> list[SealedBatch]:
        """Records of ``kind`` (in ``groups``) whose [rec_lo, rec_hi] overlaps [start, end], ordered by lo."""
        ...

    def batches_by_hi_desc(self, below: float | None = None, kind: Kind = BATCH, groups: Groups = None
                           ) -> Iterator[SealedBatch]:
        """Records of ``kind`` (in ``groups``) in descending order of hi (only hi < below when given), lazily."""
        ...

    def max_ts(self) -> float | None:
        """The greatest hi of all batches and segments, None when there are none."""
        ...

    def pending_windows(self, window_s: int, before: float) -> list[tuple[int, int]]:
        """(window, group) of every write batch whose hi is below ``before``, window = floor(lo / window_s), sorted."""
        ...

    def swap(self, old: Sequence[SealedBatch], new: Sequence[SealedBatch]) -> bool:
        """Replace records ``old`` (batches or segments) by segments ``new`` so that no read sees both or neither.

        False, changing nothing, when one of ``old`` is gone (another compactor got there first).
        """
        ...

    def delete_before(self, before: float, limit: int) -> Removed:
        """Delete up to ``limit`` write batches and segments whose hi is below ``before`` (where the backend has
        transactions, in one small one) and say what went; call again until it removes nothing.

        Audit chunks and named records are never deleted; neither is a record with hi >= ``before``.
        """
        ...

    @property
    def expires_itself(self) -> bool:
        """True when the backend removes records past their retention on its own (DynamoDB's TTL attribute)."""
        ...

    def states(self, prefix: str) -> list[SealedState]:
        """Every named record whose name starts with ``prefix``."""
        ...

    def get_states(self, names: Sequence[str]) -> list[SealedState]:
        """The named records of ``names`` that exist (in no particular order)."""
        ...

    def append_audit(self, chunk: SealedBatch) -> None:
        """Store a sealed chunk of audit entries."""
        ...

    def records(self) -> Iterator[tuple[Kind | Literal["state"], SealedBatch | SealedState]]:
        """Every stored record (batches, segments, audit chunks, named records), for re-sealing."""
        ...

    def replace(self, kind: Kind | Literal["state"], old: SealedBatch | SealedState,
                new: SealedBatch | SealedState) -> bool:
        """Swap ``old`` for ``new`` (same identity, new key and body) if ``old`` is still there; True if swapped."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...
