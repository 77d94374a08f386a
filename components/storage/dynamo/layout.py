"""Where records live in the table, and the table itself: its creation, schema check and layout item.

Table layout (one table, string keys ``pk``/``sk``, one GSI ``by_received`` on ``gpk``/``gsk``). Kinds have
codes: ``b`` write batches, ``c`` segments (compacted), ``a`` audit chunks.

``<code>#<q>#<band>#<shard>`` / ``<lo>#<uid>``  (group 0) and ``<code>#<q>#<band>#g<group>`` (group 1..65535)
    One item per record, with its group in ``grp`` (an item without ``grp``, written by layout version 1, is
    of group 0). ``q = floor(lo / bucket_seconds)`` is the record's time bucket. Group 0 (records of any
    device: those written before device groups, and audit chunks) spreads the records of one bucket over
    ``shard = crc32(uid) % shards`` (4 by default), so no partition is hot while every device publishes at
    once; a group > 0 is its own spread (a commit writes one batch per group present), so a read limited to
    some groups Queries only their partitions. ``band`` groups records by how far their ``hi`` can lie past
    their ``lo``: band 0 holds spans of at most 8 s (almost every batch), band ``c`` (c > 3) spans of at most
    ``2**c`` s (see :func:`components.storage.interface.span_class`; an hour's segment is band 12).
    ``<lo>`` is the float's order-preserving 16-hex-digit encoding, so "``lo`` in [start - max span of the
    band, end]" is a key range and the filter ``hi >= start`` only drops records that start at most one band
    span before the window. Every float is stored in that encoding: it gives back the same bits. A segment
    put by a swap not yet committed carries ``pend = <swap id>``: every read skips it.
``gpk = r#<q>#<band>#<shard or g<group>>`` / ``gsk = <rec_lo>#<uid>``  (GSI ``by_received``; ``rc#...``
    for segments; audit chunks are not in it) The same layout on the arrival axis (``rec_lo``/``rec_hi``).
    It projects the keys and ``rh`` (``rec_hi``) only, so it costs about 1 WCU per record instead of a second
    copy of the body; the bodies are then read from the table with a consistent BatchGetItem. A GSI cannot be
    read consistently: a batch can show up in arrival-time queries a moment (typically well under a second)
    after its commit.
``d#<code><axis>`` / ``<q>#<q>#<band>``, ``d#<code><axis>#g<group>`` / ``<q>#<q>#<band>``,
``d#<code><axis>#any`` / ``<q>#<q>#<band>#<group>`` and ``d#<code><axis>#bands`` / ``<band>``
    The directory (axis ``t`` for ``ts``, ``r`` for arrival): which (bucket, band) partitions group 0 has
    (the first form, as layout version 1 wrote it), which ones group g > 0 has (the second), the same for
    every group > 0 at once (the third, for reads of every group) and the widest band ever written. A window
    reads the widest band (1 Query), the directory range the window can reach (1 Query per group asked, or 2
    for every group), the swap intents before and after (2 Queries of a partition that is normally empty, see
    :mod:`~components.storage.dynamo.swaps`), then one Query per partition reached: for a window inside one
    bucket, 5 + 4 Queries for every group's batches when all are of group 0, 5 + 1 for a device's groups
    ``(0, g)`` when only ``g`` has records there. Entries are idempotent puts written before the records they
    describe (once per process).
``d#bp`` / ``<q>#<q>#<band>#<group>``
    The batch partitions that may hold batches not compacted yet, for
    :meth:`~components.storage.dynamo.store.DynamoBatchStore.pending_windows`. A writer puts the entry
    (with ``at``, its clock) before writing batches there, again every :data:`PENDING_LEASE_S` while it
    writes there; ``pending_windows`` deletes an entry whose partitions it finds empty once ``at`` is older
    than the lease and a margin, so the entries follow the batches waiting for compaction, not the history.
``meta`` / ``layout``, ``meta`` / ``max_hi`` and ``meta`` / ``setting:<name>``
    The table's layout (version, shards, bucket seconds: the table's values win over the settings, so every
    process agrees on where records are), the greatest ``hi`` committed or swapped in (a conditional update),
    so :meth:`~components.storage.dynamo.store.DynamoBatchStore.max_ts` is one GetItem, and the store's
    settings (the first writer's value wins).
``x`` / ``<swap id>`` and ``x#<swap id>`` / ``<i>``
    Swap intents (status, groups, the new segments' keys) and their parts (the keys of the records a swap
    replaces): see :mod:`~components.storage.dynamo.swaps`.
``s#device/<h>`` / ``<name>``
    Device rows (names ``device/<hex tag>``) in 16 partitions by the first hex digit ``h`` of the tag, so
    ``states("device/")`` is 16 Queries and ``get_states`` a BatchGetItem of keys computed from the names.
``sd`` / ``n:<name>``, ``s#<name>`` / ``state``
    Every other named record (``storage/...`` counters): a directory of names and one head item per name (its
    own partition, so storage instances do not share a hot key). A head or device row holds the body when it
    fits, else points at a generation of parts ``p#<gen>`` / ``<i>``: parts are written first, then the
    head, then the old generation is deleted, so a reader never sees a torn record (it checks a digest and
    reads again if a replace raced it).

Layout version 1 (before device groups, segments and swaps) is read as it is: its records are group 0, its
named records are all of the ``sd`` form. Opening it upgrades the layout item to version 2 after seeding
``d#bp`` from its directory (stop the processes of the previous version first: they refuse version 2).
"""

from __future__ import annotations

import itertools
import logging
import time
import zlib
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from components.core.errors import StorageUnavailable
from components.core.settings import env_var
from components.storage.dynamo.calls import CAS, DynamoTable
from components.storage.dynamo.codec import Item, attr_n, attr_s, encode_float
from components.storage.interface import EVERY_GROUP, Kind, SealedBatch, span_class

log = logging.getLogger(__name__)

LAYOUT_VERSION = 2
"""2: device groups, segments, swap intents, pending directory, device rows. 1 is read and upgraded."""
WRITE_SHARDS = 4
"""Partitions the group-0 records of one time bucket spread over (fixed per table, stored in its layout item)."""
GSI_RECEIVED = "by_received"
NARROW_CLASS = 3
"""Records whose span class is at most this (spans up to 8 s) share band 0."""
TABLE_WAIT_S = 120.0
PENDING_LEASE_S = 300.0
"""A writer puts the pending entry of a batch partition again when its last put is older than this."""

KIND_CODE: dict[str, str] = {"batch": "b", "segment": "c", "audit": "a"}
CODE_KIND: dict[str, Kind] = {"b": "batch", "c": "segment", "a": "audit"}
ARRIVAL_CODE: dict[str, str] = {"b": "r", "c": "rc"}
"""Kinds in the arrival-time index, and the prefix of their ``gpk``."""
PENDING_PK = "d#bp"
_EXPECTED_KEYS = [("pk", "HASH", "S"), ("sk", "RANGE", "S")]
_EXPECTED_GSI_KEYS = [("gpk", "HASH", "S"), ("gsk", "RANGE", "S")]


def shard_of(uid: str, shards: int) -> int:
    """The write shard of a group-0 record (stable across processes: crc32, not Python's salted hash)."""
    return zlib.crc32(uid.encode("utf-8")) % shards


def dir_pk(code: str, axis: str, group: int) -> str:
    """The directory partition of a group's (bucket, band) entries of kind ``code`` on ``axis``."""
    return f"d#{code}{axis}" if group == EVERY_GROUP else f"d#{code}{axis}#g{group}"


def any_pk(code: str, axis: str) -> str:
    """The directory partition of every group > 0's (bucket, band, group) entries."""
    return f"d#{code}{axis}#any"


def bands_pk(code: str, axis: str) -> str:
    """The directory partition of the bands written."""
    return f"d#{code}{axis}#bands"


def dir_sk(q: int, band: int, group: int | None = None) -> str:
    """A directory entry's sort key: ordered by bucket (then band); with the group in ``#any`` and ``d#bp``."""
    sk = f"{encode_float(float(q))}#{q}#{band:02d}"
    return sk if group is None else f"{sk}#{group}"


def parse_dir_sk(sk: str, group: int) -> tuple[int, int, int]:
    """(bucket, band, group) of a directory sort key (``group`` when the key carries none)."""
    parts = sk.split("#")
    return int(parts[1]), int(parts[2]), int(parts[3]) if len(parts) > 3 else group


@dataclass(frozen=True)
class Layout:
    """Where records live: the table's shard count and bucket size."""

    shards: int
    bucket_s: int

    def bucket_of(self, x: float) -> int:
        """The time bucket of an instant."""
        return int(x // self.bucket_s)

    @staticmethod
    def band_of(span: float) -> int:
        """The band of a record spanning ``span`` seconds."""
        c = span_class(span)
        return 0 if c <= NARROW_CLASS else c

    @staticmethod
    def band_span(band: int) -> float:
        """The longest span a record of ``band`` has."""
        return 2.0 ** (NARROW_CLASS if band == 0 else band)

    def _spread(self, b: SealedBatch) -> str:
        return str(shard_of(b.uid, self.shards)) if b.group == EVERY_GROUP else f"g{b.group}"

    def partitions(self, prefix: str, q: int, band: int, group: int) -> list[str]:
        """The partition keys of (bucket, band, group) for records (or index entries) keyed ``prefix``."""
        if group == EVERY_GROUP:
            return [f"{prefix}#{q}#{band}#{shard}" for shard in range(self.shards)]
        return [f"{prefix}#{q}#{band}#g{group}"]

    def record_key(self, code: str, b: SealedBatch) -> Item:
        """The table key of a record of kind ``code``."""
        return {"pk": attr_s(f"{code}#{self.bucket_of(b.lo)}#{self.band_of(b.hi - b.lo)}#{self._spread(b)}"),
                "sk": attr_s(f"{encode_float(b.lo)}#{b.uid}")}

    def arrival_key(self, code: str, b: SealedBatch) -> Item:
        """The key of a record of kind ``code`` in the arrival-time index (none for audit chunks)."""
        if code not in ARRIVAL_CODE:
            return {}
        return {"gpk": attr_s(f"{ARRIVAL_CODE[code]}#{self.bucket_of(b.rec_lo)}#"
                              f"{self.band_of(b.rec_hi - b.rec_lo)}#{self._spread(b)}"),
                "gsk": attr_s(f"{encode_float(b.rec_lo)}#{b.uid}")}

    def directory_entries(self, code: str, b: SealedBatch) -> list[Item]:
        """The directory entries that let a window find a record of kind ``code``."""
        axes = [("t", b.lo, b.hi)] + ([("r", b.rec_lo, b.rec_hi)] if code in ARRIVAL_CODE else [])
        out = []
        for axis, lo, hi in axes:
            q, band = self.bucket_of(lo), self.band_of(hi - lo)
            out.append({"pk": attr_s(dir_pk(code, axis, b.group)), "sk": attr_s(dir_sk(q, band))})
            if b.group != EVERY_GROUP:
                out.append({"pk": attr_s(any_pk(code, axis)), "sk": attr_s(dir_sk(q, band, b.group))})
            out.append({"pk": attr_s(bands_pk(code, axis)), "sk": attr_s(f"{band:04d}")})
        return out

    def pending_key(self, b: SealedBatch) -> Item:
        """The key of the pending entry of a write batch's partition."""
        return {"pk": attr_s(PENDING_PK),
                "sk": attr_s(dir_sk(self.bucket_of(b.lo), self.band_of(b.hi - b.lo), b.group))}


def ensure_table(table: DynamoTable, create: bool) -> None:
    """Check the table is a sensor hub table and active; create it first if it is missing and ``create``."""
    try:
        found = table.call("DescribeTable", table.client.describe_table,
                           passthrough=frozenset({"ResourceNotFoundException"}), TableName=table.name)["Table"]
    except ClientError as err:
        if not create:
            raise StorageUnavailable(
                f"DynamoDB table {table.name!r} does not exist at {table.where}; create it, or let storage "
                f"create it by setting storage.dynamodb_create_table to true (environment: "
                f"{env_var('storage.dynamodb_create_table')}=true)") from err
        _create_table(table)
        found = _wait_active(table)
    _check_schema(table, found)
    if found.get("TableStatus") != "ACTIVE" or any(
            g.get("IndexStatus") != "ACTIVE" for g in found.get("GlobalSecondaryIndexes", [])):
        _wait_active(table)


def _create_table(table: DynamoTable) -> None:
    attrs = {name for name, _, _ in _EXPECTED_KEYS + _EXPECTED_GSI_KEYS}
    try:
        table.call(
            "CreateTable", table.client.create_table, passthrough=frozenset({"ResourceInUseException"}),
            TableName=table.name, BillingMode="PAY_PER_REQUEST",
            AttributeDefinitions=[{"AttributeName": a, "AttributeType": "S"} for a in sorted(attrs)],
            KeySchema=[{"AttributeName": a, "KeyType": k} for a, k, _ in _EXPECTED_KEYS],
            GlobalSecondaryIndexes=[{
                "IndexName": GSI_RECEIVED,
                "KeySchema": [{"AttributeName": a, "KeyType": k} for a, k, _ in _EXPECTED_GSI_KEYS],
                "Projection": {"ProjectionType": "INCLUDE", "NonKeyAttributes": ["rh"]},
            }])
        log.info("created DynamoDB table %s (on-demand capacity) at %s", table.name, table.where)
    except ClientError:
        log.info("DynamoDB table %s is being created by another process; waiting for it", table.name)


def ensure_ttl(table: DynamoTable, attribute: str) -> None:
    """Turn on the table's time to live on ``attribute`` (DynamoDB deletes an item once that time has passed)."""
    found = table.call("DescribeTimeToLive", table.client.describe_time_to_live, TableName=table.name)
    status = found.get("TimeToLiveDescription", {})
    if status.get("TimeToLiveStatus") in ("ENABLED", "ENABLING"):
        if status.get("AttributeName") != attribute:
            raise StorageUnavailable(
                f"DynamoDB table {table.name!r} at {table.where} has time to live on attribute "
                f"{status.get('AttributeName')!r}, but storage.retention_days needs it on {attribute!r}: turn it "
                "off (UpdateTimeToLive) and start storage again")
        return
    table.call("UpdateTimeToLive", table.client.update_time_to_live, TableName=table.name,
               TimeToLiveSpecification={"Enabled": True, "AttributeName": attribute})
    log.info("DynamoDB table %s: time to live turned on (attribute %s)", table.name, attribute)


def _wait_active(table: DynamoTable) -> Any:
    deadline = time.monotonic() + TABLE_WAIT_S
    for attempt in itertools.count():  # ends: returns once active, raises at the deadline
        found = table.call("DescribeTable", table.client.describe_table, TableName=table.name)["Table"]
        if found.get("TableStatus") == "ACTIVE" and all(
                g.get("IndexStatus") == "ACTIVE" for g in found.get("GlobalSecondaryIndexes", [])):
            return found
        if time.monotonic() > deadline:
            raise StorageUnavailable(f"DynamoDB table {table.name!r} at {table.where} is still "
                                     f"{found.get('TableStatus')} after {TABLE_WAIT_S:.0f}s; try again later")
        time.sleep(min(2.0, 0.05 * 2**attempt))
    raise AssertionError("unreachable")  # pragma: no cover


def _check_schema(table: DynamoTable, described: Any) -> None:
    types = {a["AttributeName"]: a["AttributeType"] for a in described.get("AttributeDefinitions", [])}
    found = [(k["AttributeName"], k["KeyType"], types.get(k["AttributeName"], "?"))
             for k in described.get("KeySchema", [])]
    gsis = {g["IndexName"]: g for g in described.get("GlobalSecondaryIndexes", [])}
    gsi = gsis.get(GSI_RECEIVED)
    found_gsi = ([(k["AttributeName"], k["KeyType"], types.get(k["AttributeName"], "?"))
                  for k in gsi["KeySchema"]] if gsi else [])
    projection = gsi.get("Projection", {}) if gsi else {}
    projected = projection.get("ProjectionType") == "ALL" or "rh" in projection.get("NonKeyAttributes", [])

    def show(keys: list[tuple[str, str, str]]) -> str:
        return ", ".join(f"{name} {kind} {typ}" for name, kind, typ in keys) or "none"

    if found != _EXPECTED_KEYS or found_gsi != _EXPECTED_GSI_KEYS or not projected:
        raise StorageUnavailable(
            f"DynamoDB table {table.name!r} at {table.where} is not a sensor hub table: expected key schema "
            f"[{show(_EXPECTED_KEYS)}] with index {GSI_RECEIVED} [{show(_EXPECTED_GSI_KEYS)}] projecting rh, "
            f"found [{show(found)}] with index {GSI_RECEIVED} [{show(found_gsi)}]"
            f"{'' if projected or not gsi else ' not projecting rh'}; set storage.dynamodb_table to another "
            "name (storage creates it) or drop this table")


def load_layout(table: DynamoTable, bucket_s: int) -> Layout:
    """The table's layout, written first (with ``bucket_s`` and :data:`WRITE_SHARDS`) if it has none; a
    version-1 layout is upgraded."""
    key = {"pk": attr_s("meta"), "sk": attr_s("layout")}
    for _ in range(2):  # a second read only when another process wrote the layout first
        item = table.get(key)
        if item is not None:
            version = int(item["layout"]["N"])
            if version > LAYOUT_VERSION:
                raise StorageUnavailable(f"DynamoDB table {table.name!r} has layout version {version}, "
                                         f"newer than this version of the sensor hub reads ({LAYOUT_VERSION})")
            layout = Layout(int(item["shards"]["N"]), int(item["bucket_seconds"]["N"]))
            if layout.bucket_s != bucket_s:
                log.info("DynamoDB table %s keeps buckets of %d s (storage.bucket_seconds is %d): using the "
                         "table's", table.name, layout.bucket_s, bucket_s)
            if version < LAYOUT_VERSION:
                _upgrade_v1(table, key)
            return layout
        try:
            table.call("PutItem", table.client.put_item, passthrough=CAS, TableName=table.name,
                       Item={**key, "layout": attr_n(LAYOUT_VERSION), "shards": attr_n(WRITE_SHARDS),
                             "bucket_seconds": attr_n(bucket_s)},
                       ConditionExpression="attribute_not_exists(pk)")
            return Layout(WRITE_SHARDS, bucket_s)
        except ClientError:
            continue
    raise StorageUnavailable(f"cannot read the layout item of DynamoDB table {table.name!r}")


def _upgrade_v1(table: DynamoTable, key: Item) -> None:
    """Version 1 to 2: every batch partition of the directory may hold batches to compact; then say so."""
    entries = list(table.query(KeyConditionExpression="#pk = :p", ExpressionAttributeNames={"#pk": "pk"},
                               ExpressionAttributeValues={":p": attr_s(dir_pk("b", "t", EVERY_GROUP))}))
    now = time.time()
    table.put_all({"pk": attr_s(PENDING_PK), "sk": attr_s(e["sk"]["S"] + f"#{EVERY_GROUP}"),
                   "at": {"N": repr(now)}} for e in entries)
    try:
        table.call("UpdateItem", table.client.update_item, passthrough=CAS, TableName=table.name, Key=key,
                   UpdateExpression="SET #v = :new", ConditionExpression="#v = :old",
                   ExpressionAttributeNames={"#v": "layout"},
                   ExpressionAttributeValues={":new": attr_n(LAYOUT_VERSION), ":old": attr_n(1)})
        log.info("upgraded DynamoDB table %s to layout version %d (device groups, segments): %d batch "
                 "partition(s) to compact", table.name, LAYOUT_VERSION, len(entries))
    except ClientError:
        pass  # another process upgraded it first
