"""Whether a store opens with a key ring: every data key its records are sealed with, and its index key.

A restore must not replace a working store by one the configured keys cannot read. For each key id the store
uses, the ring must hold that key and one record sealed with it must open; a few device rows must open and sit
under the names the ring's index key gives their devices (a row placed by another index key would never be
found again, and the devices' readings would be looked for in the wrong groups).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from components.core.batches import open_groups, open_segment, open_state
from components.core.devices import DeviceIndex, DeviceRow
from components.core.errors import DecryptionFailed
from components.core.sealing import KeyRing
from components.storage.interface import AUDIT, BATCH, SEGMENT, SealedBatch, SealedState


def _open_one(ring: KeyRing, kind: str, record: SealedBatch | SealedState) -> None:
    if isinstance(record, SealedState):
        open_state(ring, record)
    elif kind == SEGMENT:
        open_segment(ring, record)
    else:
        open_groups(ring, record, AUDIT if kind == AUDIT else BATCH)


def key_problems(ring: KeyRing, samples: Mapping[str, tuple[str, SealedBatch | SealedState]],
                 counts: Mapping[str, int], device_rows: Sequence[SealedState]) -> list[str]:
    """What keeps the store from opening with ``ring`` (empty: it opens): one line per missing or wrong key."""
    problems = []
    for key_id in sorted(samples):
        kind, record = samples[key_id]
        if key_id not in ring.keys:
            problems.append(f"data key {key_id} is missing: {counts.get(key_id, 0)} record(s) are sealed with it, "
                            f"the configured keys are {', '.join(sorted(ring.keys))}")
            continue
        try:
            _open_one(ring, kind, record)
        except DecryptionFailed as err:
            problems.append(f"data key {key_id} does not open its records: {err}")
    index = DeviceIndex(ring.index_key, 0)  # a row's name is its full tag, whatever the group length
    for sealed in device_rows:
        if sealed.key_id not in ring.keys:
            continue  # reported above
        try:
            row = DeviceRow.of(open_state(ring, sealed))
        except DecryptionFailed:
            continue  # reported above, when its key is one the ring lacks; else the data-key check failed too
        expected = index.row_name(row.device_id)
        if expected != sealed.name:
            problems.append(f"the index key is not the one this store was written with: device {row.device_id}'s "
                            f"row is {sealed.name}, the configured index key puts it at {expected}")
            break
    return problems
