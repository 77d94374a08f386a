"""Opening the backend the settings choose; the interface module imports no backend, this one does."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from components.core.settings import StorageSettings
from components.storage.interface import BatchStore


def open_store(settings: StorageSettings) -> BatchStore:
    """The backend the settings choose (``storage.backend``)."""
    if settings.backend == "sqlite":
        from components.storage.sqlite import SqliteBatchStore

        return SqliteBatchStore(settings.sqlite_path)
    from components.storage.dynamo import DynamoBatchStore

    return DynamoBatchStore(settings)


class LazyStore:
    """A backend opened on first use, and again on the next use after opening failed.

    A query callee starts and registers even while its backend is down; callers get
    ``iot.error.storage_unavailable`` until it is back.
    """

    def __init__(self, opener: Callable[[], BatchStore]) -> None:
        """Open with ``opener`` when first needed."""
        self._opener = opener
        self._store: BatchStore | None = None
        self._lock = threading.Lock()

    def _get(self) -> BatchStore:
        with self._lock:
            if self._store is None:
                self._store = self._opener()
            return self._store

    @property
    def max_body_bytes(self) -> int | None:
        """The backend's record limit."""
        return self._get().max_body_bytes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)

    def close(self) -> None:
        """Close the backend if it was opened."""
        if self._store is not None:
            self._store.close()
