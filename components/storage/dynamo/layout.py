"""Where records live in the table, and the table itself: its creation, schema check and layout item.

Table layout (one table, string keys ``pk``/``sk``, one GSI ``by_received`` on ``gpk``/``gsk``):

``b#<q>#<band>#<shard>`` / ``<lo>#<uid>``  (``a#...`` for audit chunks)
    One item per batch. ``q = floor(lo / bucket_seconds)`` is the record's time bucket, ``shard`` is
    ``crc32(uid) % shards`` (4 by default) so the batches of one bucket spread over several partitions
    and no partition is hot while every device publishes at once, and ``band`` groups records by how far
    their ``hi`` can lie past their ``lo``: band 0 holds spans of at most 8 s (almost every batch), band
    ``c`` (c > 3) spans of at most ``2**c`` s (see :func:`components.storage.interface.span_class`). ``<lo>`` is the
    float's order-preserving 16-hex-digit encoding, so "``lo`` in [start - max span of the band, end]" is a
    key range and the filter ``hi >= start`` only drops records that start at most one band span before
    the window. Every float is stored in that encoding: it gives back the same bits.
``gpk = r#<q>#<band>#<shard>`` / ``gsk = <rec_lo>#<uid>``  (GSI ``by_received``, batches only)
    The same layout on the arrival axis (``rec_lo``/``rec_hi``). It projects the keys and ``rh``
    (``rec_hi``) only, so it costs about 1 WCU per batch instead of a second copy of the body; the bodies
    are then read from the table with a consistent BatchGetItem. A GSI cannot be read consistently: a
    batch can show up in arrival-time queries a moment (typically well under a second) after its commit.
``d#<kind><axis>`` / ``<q>#<q>#<band>`` and ``d#<kind><axis>#bands`` / ``<band>``
    The directory: which (bucket, band) partitions exist, and the widest band ever written. A window
    reads the widest band (1 Query), the directory range the window can reach (1 Query), then one Query
    per shard of each (bucket, band) reached: 2 + 4 Queries for a window inside one bucket of ordinary
    batches. Entries are idempotent puts written before the records they describe (once per process).
``meta`` / ``layout`` and ``meta`` / ``max_hi``
    The table's layout (shards, bucket seconds: the table's values win over the settings, so every
    process agrees on where records are) and the greatest ``hi`` committed (a conditional update per
    commit), so :meth:`DynamoBatchStore.max_ts` is one GetItem.
``sd`` / ``n:<name>``, ``s#<name>`` / ``state``, ``p#<gen>`` / ``<i>``
    State records: a directory of names, one head item per name (its own partition, so storage
    instances do not share a hot key) holding the body when it fits, else pointing at a generation of
    parts. Parts are written first, then the head, then the old generation is deleted, so a reader never
    sees a torn state (it checks a digest and reads again if a replace raced it).
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
from components.storage.interface import Kind, SealedBatch, span_class

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
WRITE_SHARDS = 4
"""Partitions the batches of one time bucket spread over (fixed per table, stored in its layout item)."""
GSI_RECEIVED = "by_received"
NARROW_CLASS = 3
"""Records whose span class is at most this (spans up to 8 s) share band 0."""
TABLE_WAIT_S = 120.0

KIND_CODE: dict[str, str] = {"batch": "b", "audit": "a"}
CODE_KIND: dict[str, Kind] = {"b": "batch", "a": "audit"}
_EXPECTED_KEYS = [("pk", "HASH", "S"), ("sk", "RANGE", "S")]
_EXPECTED_GSI_KEYS = [("gpk", "HASH", "S"), ("gsk", "RANGE", "S")]


def shard_of(uid: str, shards: int) -> int:
    """The write shard of a record (stable across processes: crc32, not Python's salted hash)."""
    return zlib.crc32(uid.encode("utf-8")) % shards


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

    def record_key(self, code: str, b: SealedBatch) -> Item:
        """The table key of a record of kind ``code``."""
        return {"pk": attr_s(f"{code}#{self.bucket_of(b.lo)}#{self.band_of(b.hi - b.lo)}#"
                             f"{shard_of(b.uid, self.shards)}"),
                "sk": attr_s(f"{encode_float(b.lo)}#{b.uid}")}

    def arrival_key(self, b: SealedBatch) -> Item:
        """The key of a batch in the arrival-time index."""
        return {"gpk": attr_s(f"r#{self.bucket_of(b.rec_lo)}#{self.band_of(b.rec_hi - b.rec_lo)}#"
                              f"{shard_of(b.uid, self.shards)}"),
                "gsk": attr_s(f"{encode_float(b.rec_lo)}#{b.uid}")}

    def directory_entries(self, code: str, b: SealedBatch) -> list[Item]:
        """The directory entries that let a window find a record of kind ``code``."""
        axes = [("t", b.lo, b.hi)] + ([("r", b.rec_lo, b.rec_hi)] if code == "b" else [])
        out = []
        for axis, lo, hi in axes:
            q, band = self.bucket_of(lo), self.band_of(hi - lo)
            out.append({"pk": attr_s(f"d#{code}{axis}"), "sk": attr_s(f"{encode_float(float(q))}#{q}#{band:02d}")})
            out.append({"pk": attr_s(f"d#{code}{axis}#bands"), "sk": attr_s(f"{band:04d}")})
        return out


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
    """The table's layout, written first (with ``bucket_s`` and :data:`WRITE_SHARDS`) if it has none."""
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
