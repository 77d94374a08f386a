"""Re-sealing every stored record under a new key; safe to interrupt and run again.

With ``keys.source=file``: the first run adds a fresh key to the key file as the active one (keeping the
old ones, so everything stays readable), waits for running services to pick it up, re-seals every write
batch, segment, audit chunk, device row and counters record still under an old key (a compare-and-swap per
record, so a record changed meanwhile is simply seen again in the next pass), logging its progress, and once
none is left, drops the old keys from the file. The index key is kept: the groups of stored records use it.
A run that finds more than one key in the file resumes the unfinished rotation instead of starting another.

With ``keys.source=env``: put the new key first in ``IOT_KEYS``, keep the old ones after it, run this,
then remove the old ones from ``IOT_KEYS``.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from components.core.batches import reseal, reseal_state
from components.core.errors import ConfigError
from components.core.sealing import KEY_BYTES, KeyFile, KeyRing, key_id
from components.storage.interface import BatchStore, SealedState

log = logging.getLogger(__name__)

MAX_PASSES = 20
PROGRESS_EVERY_S = 5.0


@dataclass
class RekeyReport:
    """What a rekey run did."""

    active_key: str
    resealed: int = 0
    passes: int = 0
    dropped_keys: tuple[str, ...] = ()
    resumed: bool = False


def reseal_all(store: BatchStore, ring: KeyRing, stop: Callable[[], bool] = lambda: False) -> tuple[int, int]:
    """One pass: re-seal records not under the active key; return (re-sealed, still under an old key)."""
    resealed = left = seen = 0
    last_log = time.monotonic()
    for kind, record in store.records():
        if stop():
            break
        seen += 1
        if time.monotonic() - last_log >= PROGRESS_EVERY_S:
            last_log = time.monotonic()
            log.info("rekey: %d records looked at, %d re-sealed so far", seen, resealed)
        if record.key_id == ring.active_id:
            continue
        if isinstance(record, SealedState):
            new: object = reseal_state(ring, record)
        else:
            new = reseal(ring, record, kind)  # type: ignore[arg-type]
        if store.replace(kind, record, new):  # type: ignore[arg-type]
            resealed += 1
        else:
            left += 1  # changed meanwhile: the next pass sees its new version
    return resealed, left


def _remaining(store: BatchStore, active: str) -> int:
    return sum(1 for _, r in store.records() if r.key_id != active)


def rekey_file(store: BatchStore, key_file: KeyFile, grace_s: float = 3.0) -> RekeyReport:
    """Rotate the key of a key file and re-seal everything under the new key."""
    ring = key_file.load()
    resumed = len(ring.keys) > 1
    if not resumed:
        new = secrets.token_bytes(KEY_BYTES)
        ring = ring.rotated(key_id(new), {key_id(new): new, **ring.keys})
        key_file.save(ring)
        log.info("new active key %s added to %s; waiting %.1fs for running services to pick it up",
                 ring.active_id, key_file.path, grace_s)
        time.sleep(grace_s)  # services re-read the key file at most a second after it changes
    else:
        log.info("resuming the unfinished rotation to key %s", ring.active_id)
    report = RekeyReport(ring.active_id, resumed=resumed)
    report.resealed, report.passes = _passes(store, ring)
    old = tuple(sorted(k for k in ring.keys if k != ring.active_id))
    key_file.save(ring.rotated(ring.active_id, {ring.active_id: ring.keys[ring.active_id]}))
    report.dropped_keys = old
    return report


def rekey_ring(store: BatchStore, ring: KeyRing) -> RekeyReport:
    """Re-seal everything under the active key of ``ring`` (``keys.source=env``)."""
    report = RekeyReport(ring.active_id)
    report.resealed, report.passes = _passes(store, ring)
    return report


def _passes(store: BatchStore, ring: KeyRing) -> tuple[int, int]:
    total = 0
    for n in range(1, MAX_PASSES + 1):
        resealed, _ = reseal_all(store, ring)
        total += resealed
        if _remaining(store, ring.active_id) == 0:
            return total, n
        log.info("pass %d re-sealed %d records; records still under old keys remain, another pass", n, resealed)
    raise ConfigError(f"records kept appearing under old keys after {MAX_PASSES} passes: is a service still "
                      f"running with an old key file? Stop it or let it reload, then run rekey again")
