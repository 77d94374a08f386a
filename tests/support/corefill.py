"""Filling a real store through the real ingest service, without a router (for core-level tests)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from components.core.ingest import IngestService
from components.core.sealing import KeyRing
from components.core.settings import BatchingSettings, QuerySettings, StorageSettings
from components.storage.interface import BatchStore
from components.wamp import uris
from components.wamp.subscriber import deliver

STORAGE = StorageSettings(backend="sqlite")
BATCHING = BatchingSettings()
QUERY = QuerySettings()


def new_ring() -> KeyRing:
    """A key ring with one fresh key."""
    return KeyRing.of([os.urandom(32)], os.urandom(32))


@dataclass
class Ingested:
    """An ingest service over a store, with what it acknowledged."""

    service: IngestService
    acks: list[dict[tuple[str, str | None], int]] = field(default_factory=list)

    def events(self, events: Iterable[tuple[str, Any, float]]) -> Ingested:
        """Ingest (topic, payload, received_at) events."""
        for topic, payload, received_at in events:
            deliver(self.service, topic, payload, received_at)
        return self

    def flush(self) -> Ingested:
        """Commit everything and stop the writer."""
        assert self.service.flush(30)
        return self


def ingest(store: BatchStore, ring: KeyRing, storage: StorageSettings = STORAGE, batching: BatchingSettings = BATCHING,
           clock: Any = None, compact: bool = False) -> Ingested:
    """A started ingest service writing to ``store`` (its compactor runs only when asked: tests compact by hand)."""
    holder: list[Ingested] = []
    kwargs = {"clock": clock} if clock else {}
    service = IngestService(storage, batching, store, lambda: ring, lambda acks: holder[0].acks.append(acks),
                            **kwargs)
    holder.append(Ingested(service))
    service.start(compact=compact)
    return holder[0]


def fill(store: BatchStore, ring: KeyRing, events: Iterable[tuple[str, Any, float]], **settings: Any) -> Ingested:
    """Ingest events and commit them."""
    storage = replace(STORAGE, **{k: v for k, v in settings.items() if hasattr(STORAGE, k)})
    batching = replace(BATCHING, **{k: v for k, v in settings.items() if hasattr(BATCHING, k)})
    return ingest(store, ring, storage, batching).events(events).flush()


H, T = "humidity", "temperature"


def topic(device: str, sensor: str) -> str:
    """The topic of a device's readings of one sensor type."""
    return uris.sensor_topic(device, sensor)


def dataset() -> list[tuple[str, Any, float]]:
    """Three devices, overlapping time ranges, several batches (max_readings=7 in fill)."""
    return [
        (topic("1", H), [{"value": float(i), "ts": 1000.0 + i, "seq": i + 1} for i in range(10)], 5000.0),
        (topic("2", T), [{"value": 100.0 + i, "ts": 1005.0 + i} for i in range(10)], 5001.0),
        (topic("43", H), {"value": 7.5, "ts": 2000.25, "data": {"fw": "1.0"}}, 6000.0),
        (topic("1", T), [{"value": -1.0, "ts": 1003.0}, {"value": -2.0, "ts": 1003.0}], 6000.5),
    ]
