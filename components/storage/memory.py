"""MemoryBatchStore: the reference backend, plain dicts and lists in one process.

It holds what the interface promises and nothing more, in the most direct way (a window query is a scan),
so the contract suite checks the real backends against something obviously right, and core tests can run
without a file. Nothing survives the process.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Literal

from components.storage.interface import AUDIT, BATCH, SEGMENT, Groups, Kind, Removed, SealedBatch, SealedState


class MemoryBatchStore:
    """Implements :class:`components.storage.interface.BatchStore` in memory (thread-safe)."""

    max_body_bytes: int | None = None
    atomic_commit = True
    expires_itself = False

    def __init__(self) -> None:
        """An empty store."""
        self._records: dict[Kind, dict[str, SealedBatch]] = {BATCH: {}, SEGMENT: {}, AUDIT: {}}
        self._states: dict[str, SealedState] = {}
        self._settings: dict[str, str] = {}
        self._lock = threading.Lock()

    def setting(self, name: str, default: str) -> str:
        """The store's value of ``name`` (``default`` from its first use)."""
        with self._lock:
            return self._settings.setdefault(name, default)

    def commit(self, batches: Sequence[SealedBatch], states: Sequence[SealedState]) -> int:
        """Store batches and replace named records, at once."""
        written = 0
        with self._lock:
            for b in batches:
                if b.uid not in self._records[BATCH]:
                    self._records[BATCH][b.uid] = b
                    written += len(b.body)
            for state in states:
                self._states[state.name] = state
                written += len(state.body)
        return written

    def append_audit(self, chunk: SealedBatch) -> None:
        """Store a sealed chunk of audit entries."""
        with self._lock:
            self._records[AUDIT].setdefault(chunk.uid, chunk)

    def _all(self, kind: Kind, groups: Groups = None) -> list[SealedBatch]:
        with self._lock:
            return [b for b in self._records[kind].values() if groups is None or b.group in groups]

    def batches_by_ts(self, start: float, end: float, kind: Kind = BATCH, groups: Groups = None
                      ) -> list[SealedBatch]:
        """Records whose [lo, hi] overlaps [start, end], ordered by lo."""
        return sorted((b for b in self._all(kind, groups) if b.lo <= end and b.hi >= start), key=lambda b: b.lo)

    def batches_by_received(self, start: float, end: float, kind: Kind = BATCH, groups: Groups = None
                            ) -> list[SealedBatch]:
        """Records whose [rec_lo, rec_hi] overlaps [start, end], ordered by lo."""
        return sorted((b for b in self._all(kind, groups) if b.rec_lo <= end and b.rec_hi >= start),
                      key=lambda b: b.lo)

    def batches_by_hi_desc(self, below: float | None = None, kind: Kind = BATCH, groups: Groups = None
                           ) -> Iterator[SealedBatch]:
        """Records in descending order of hi (only those with hi < below when given)."""
        batches = [b for b in self._all(kind, groups) if below is None or b.hi < below]
        yield from sorted(batches, key=lambda b: b.hi, reverse=True)

    def max_ts(self) -> float | None:
        """The greatest hi of all batches and segments."""
        return max((b.hi for kind in (BATCH, SEGMENT) for b in self._all(kind)), default=None)

    def pending_windows(self, window_s: int, before: float) -> list[tuple[int, int]]:
        """(window, group) of write batches with hi below ``before``."""
        return sorted({(int(b.lo // window_s), b.group) for b in self._all(BATCH) if b.hi < before})

    def swap(self, old: Sequence[SealedBatch], new: Sequence[SealedBatch]) -> bool:
        """Replace ``old`` records by segments ``new`` at once."""
        with self._lock:
            if any(self._find(b) is None for b in old):
                return False
            for b in old:
                table = self._find(b)
                del table[b.uid]  # type: ignore[union-attr]
            for s in new:
                self._records[SEGMENT][s.uid] = s
        return True

    def delete_before(self, before: float, limit: int) -> Removed:
        """Delete up to ``limit`` batches and segments with hi below ``before``, oldest first."""
        with self._lock:
            old = sorted(((b.hi, kind, b) for kind in (BATCH, SEGMENT) for b in self._records[kind].values()
                          if b.hi < before), key=lambda x: x[0])[:max(0, limit)]
            for _, kind, b in old:
                del self._records[kind][b.uid]
        return Removed(len(old), sum(b.count for _, _, b in old), sum(len(b.body) for _, _, b in old))

    def _find(self, record: SealedBatch) -> dict[str, SealedBatch] | None:
        for kind in (BATCH, SEGMENT):
            if self._records[kind].get(record.uid) == record:
                return self._records[kind]
        return None

    def states(self, prefix: str) -> list[SealedState]:
        """Named records whose name starts with ``prefix``."""
        with self._lock:
            return [s for name, s in self._states.items() if name.startswith(prefix)]

    def get_states(self, names: Sequence[str]) -> list[SealedState]:
        """The named records of ``names`` that exist."""
        with self._lock:
            return [self._states[n] for n in names if n in self._states]

    def records(self) -> Iterator[tuple[Kind | Literal["state"], SealedBatch | SealedState]]:
        """Every record, for re-sealing."""
        for kind in (BATCH, SEGMENT, AUDIT):
            for b in self._all(kind):
                yield kind, b
        for state in self.states(""):
            yield "state", state

    def replace(self, kind: Kind | Literal["state"], old: SealedBatch | SealedState,
                new: SealedBatch | SealedState) -> bool:
        """Compare-and-swap one record's key and body."""
        with self._lock:
            if isinstance(old, SealedState):
                if self._states.get(old.name) != old:
                    return False
                self._states[old.name] = new  # type: ignore[assignment]
                return True
            table = self._records[kind]  # type: ignore[index]
            if table.get(old.uid) != old:
                return False
            table[old.uid] = new  # type: ignore[assignment]
            return True

    def close(self) -> None:
        """Nothing to release."""
