"""The storage interface every backend implements, and the sealed records it stores.

Backends store and return sealed records plus their clear index fields. They know nothing of WAMP,
hold no keys and never see a reading. ``tests/storage/test_store_contract.py`` runs the same suite against
every backend.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Kind = Literal["batch", "audit"]
BATCH: Literal["batch"] = "batch"
AUDIT: Literal["audit"] = "audit"


def span_class(span: float) -> int:
    """0 for spans of at most 1 s, else ceil(log2(span)): a record of class c spans at most 2**c seconds.

    Indexing (class, lower bound) finds every record that overlaps a window with one range seek per class,
    so a query's cost follows the size of its answer, not of the store.
    """
    return 0 if span <= 1.0 else math.ceil(math.log2(span))


@dataclass(frozen=True, slots=True)
class SealedBatch:
    """A sealed batch of readings (or of audit entries) with the clear fields used to find it.

    ``lo``/``hi`` bound the readings' ``ts`` (the entries' time for audit); ``rec_lo``/``rec_hi`` bound
    their ``received_at``; ``bucket`` is the time bucket the batch belongs to (its partition).
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


@dataclass(frozen=True, slots=True)
class SealedState:
    """A sealed named record: a storage instance's state (dedup marks, device summary, counters)."""

    name: str
    key_id: str
    body: bytes


class BatchStore(Protocol):
    """What storage and queries need from a backend. Every method may raise StorageUnavailable."""

    @property
    def max_body_bytes(self) -> int | None:
        """Largest sealed body one record may hold (None: no limit); storage cuts batches to fit before sealing."""
        ...

    def commit(self, batches: Sequence[SealedBatch], state: SealedState | None) -> int:
        """Store batches and replace a state record, atomically where the backend can; return bytes written.

        Writing a batch whose uid is already stored is a no-op (retries store nothing twice).
        """
        ...

    def batches_by_ts(self, start: float, end: float, kind: Kind = BATCH) -> list[SealedBatch]:
        """Records whose [lo, hi] overlaps [start, end], ordered by lo."""
        ...

    def batches_by_received(self, start: float, end: float) -> list[SealedBatch]:
        """Batches whose [rec_lo, rec_hi] overlaps [start, end], ordered by lo."""
        ...

    def batches_by_hi_desc(self, below: float | None = None) -> Iterator[SealedBatch]:
        """Batches in descending order of hi (only those with hi < below when given), lazily."""
        ...

    def max_ts(self) -> float | None:
        """The greatest hi of all batches, None when there are none."""
        ...

    def states(self, prefix: str) -> list[SealedState]:
        """Every state record whose name starts with ``prefix``."""
        ...

    def append_audit(self, chunk: SealedBatch) -> None:
        """Store a sealed chunk of audit entries."""
        ...

    def records(self) -> Iterator[tuple[Kind | Literal["state"], SealedBatch | SealedState]]:
        """Every stored record (batches, audit chunks, states), for re-sealing."""
        ...

    def replace(self, kind: Kind | Literal["state"], old: SealedBatch | SealedState,
                new: SealedBatch | SealedState) -> bool:
        """Swap ``old`` for ``new`` (same identity, new key and body) if ``old`` is still there; True if swapped."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...
