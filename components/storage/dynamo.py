"""DynamoBatchStore: sealed batches in one DynamoDB table, found by Query on key ranges, never by Scan.

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

Writes use BatchWriteItem (25 items, 16 MB a call) with UnprocessedItems and throttling retried with
exponential backoff and jitter for a bounded time. A commit is not one transaction: it writes directory
entries, then batches (skipping uids already stored, so retries store nothing twice), then the ``max_hi``
marker, then the state record; a crash in between leaves batches without the state that acknowledges
them, so their readings may be stored again when devices resend, but none is lost.

Cost: a batch of B KB costs ceil(B + 0.4) WCU plus 1 WCU in the GSI and 1 RCU for the existence check; a
commit adds 1 WCU for ``max_hi`` and the state record's size in KB; a window reads its answer plus the
records starting up to one band span before it, at 4 KB per RCU, in the Queries counted above.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import logging
import math
import random
import secrets
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from components.core.errors import StorageUnavailable
from components.core.settings import StorageSettings, env_var
from components.storage.interface import BATCH, Kind, SealedBatch, SealedState, span_class

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.client import DynamoDBClient

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
WRITE_SHARDS = 4
"""Partitions the batches of one time bucket spread over (fixed per table, stored in its layout item)."""
GSI_RECEIVED = "by_received"
ITEM_LIMIT_BYTES = 400 * 1024
MAX_BODY_BYTES = 350 * 1024
"""Largest sealed body of one item: DynamoDB's 400 KB item limit less room for keys and index fields."""
NARROW_CLASS = 3
"""Records whose span class is at most this (spans up to 8 s) share band 0."""
BATCH_WRITE_MAX_ITEMS = 25
BATCH_WRITE_MAX_BYTES = 16 * 1024 * 1024
BATCH_GET_MAX_KEYS = 100
RETRY_BUDGET_S = 20.0
"""How long throttling and unprocessed items are retried before a call gives up with StorageUnavailable."""
BACKOFF_BASE_S, BACKOFF_CAP_S = 0.05, 2.0
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 2.0, 15.0
TABLE_WAIT_S = 120.0
STATE_READ_ATTEMPTS = 8
HI_DESC_FIRST_PAGE, HI_DESC_MAX_PAGE = 4, 256
QUERY_FANOUT = 8
"""Partition Queries of one window run this many at a time."""

THROTTLE_CODES = frozenset({"ProvisionedThroughputExceededException", "ThrottlingException",
                            "RequestLimitExceeded"})
RETRYABLE_CODES = THROTTLE_CODES | {"InternalServerError", "ServiceUnavailable"}
CREDENTIAL_CODES = frozenset({"UnrecognizedClientException", "InvalidSignatureException", "AccessDeniedException",
                              "ExpiredTokenException", "MissingAuthenticationTokenException"})
CONDITION_FAILED = "ConditionalCheckFailedException"
_CAS = frozenset({CONDITION_FAILED})

_KIND_CODE: dict[str, str] = {"batch": "b", "audit": "a"}
_CODE_KIND: dict[str, Kind] = {"b": "batch", "a": "audit"}
_SIGN, _MASK = 1 << 63, (1 << 64) - 1
_EXPECTED_KEYS = [("pk", "HASH", "S"), ("sk", "RANGE", "S")]
_EXPECTED_GSI_KEYS = [("gpk", "HASH", "S"), ("gsk", "RANGE", "S")]

Item = dict[str, Any]
T = TypeVar("T")


def encode_float(x: float) -> str:
    """16 hex digits whose string order is the floats' order; :func:`decode_float` gives back the same bits."""
    bits: int = struct.unpack(">Q", struct.pack(">d", x))[0]
    bits = (~bits & _MASK) if bits & _SIGN else (bits | _SIGN)
    return f"{bits:016x}"


def decode_float(s: str) -> float:
    """Inverse of :func:`encode_float` (reads the first 16 characters, so a sort key can be passed whole)."""
    bits = int(s[:16], 16)
    bits = (bits & ~_SIGN) if bits & _SIGN else (~bits & _MASK)
    value: float = struct.unpack(">d", struct.pack(">Q", bits))[0]
    return value


def _at_least(x: float) -> str:
    # -0.0 encodes below 0.0: a lower bound of zero must admit both
    return encode_float(-0.0 if x == 0 else x)


def _at_most(x: float) -> str:
    return encode_float(0.0 if x == 0 else x)


def _down(x: float) -> float:
    """``x`` moved down by more than float rounding can err, for lower bounds computed with arithmetic."""
    return x - (abs(x) * 2.0**-40 + 2.0**-30) if math.isfinite(x) else x


def _up(x: float) -> float:
    """``x`` moved up by more than float rounding can err, for upper bounds computed with arithmetic."""
    return x + (abs(x) * 2.0**-40 + 2.0**-30) if math.isfinite(x) else x


def shard_of(uid: str, shards: int) -> int:
    """The write shard of a record (stable across processes: crc32, not Python's salted hash)."""
    return zlib.crc32(uid.encode("utf-8")) % shards


def digest(key_id: str, body: bytes) -> str:
    """What compare-and-swap compares: the key id and the body, hashed (conditions stay small)."""
    kid = key_id.encode("utf-8")
    return hashlib.sha256(len(kid).to_bytes(4, "big") + kid + body).hexdigest()


def _s(value: str) -> dict[str, str]:
    return {"S": value}


def _n(value: int) -> dict[str, str]:
    return {"N": str(int(value))}


def _redact(url: str) -> str:
    """The endpoint without user:password, should one be written into it."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
    except ValueError:  # a malformed port: botocore will say what is wrong with it
        return "the configured storage.dynamodb_endpoint_url"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


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


class DynamoBatchStore:
    """Implements :class:`components.storage.interface.BatchStore` on one DynamoDB table (thread-safe: one boto3 client)."""

    max_body_bytes: int | None = MAX_BODY_BYTES

    def __init__(self, settings: StorageSettings) -> None:
        """Connect, check (or create) the table and read its layout; StorageUnavailable says what is wrong."""
        self._table = settings.dynamodb_table
        self._where = (_redact(settings.dynamodb_endpoint_url) if settings.dynamodb_endpoint_url
                       else f"AWS region {settings.dynamodb_region}")
        self.retry_budget_s = RETRY_BUDGET_S  # seconds one call may spend retrying throttling (tunable, e.g. in tests)
        self._lock = threading.Lock()
        self._known: set[tuple[str, str]] = set()  # directory entries this process knows are written
        self._max_hi_known = -math.inf  # the max_hi marker is known to be at least this
        self._executor: ThreadPoolExecutor | None = None
        try:
            session = boto3.session.Session()
            self._client: DynamoDBClient = session.client(
                "dynamodb", region_name=settings.dynamodb_region, endpoint_url=settings.dynamodb_endpoint_url,
                # no botocore retries: throttling is retried below with a budget, an unreachable endpoint fails fast
                config=Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                              retries={"total_max_attempts": 1}, max_pool_connections=16))
        except (BotoCoreError, ValueError) as err:
            raise StorageUnavailable(f"cannot set up a DynamoDB client for {self._where}: {err}") from err
        try:
            self._ensure_table(settings.dynamodb_create_table)
            self._layout = self._load_layout(settings.bucket_seconds)
        except BaseException:
            self._client.close()
            raise

    @property
    def client(self) -> DynamoDBClient:
        """The boto3 client (tools and tests may wrap its methods)."""
        return self._client

    @property
    def layout(self) -> Layout:
        """Where this table keeps records (its shard count and bucket size)."""
        return self._layout

    # ---- calls, errors, retries
    def _call(self, op: str, fn: Callable[..., T], *, passthrough: frozenset[str] = frozenset(),
              **kwargs: Any) -> T:
        """Call the client, retrying throttling; every failure becomes StorageUnavailable (but ``passthrough``)."""
        deadline: float | None = None
        for attempt in itertools.count(1):  # ends: _backoff raises once the retry budget is spent
            try:
                return fn(**kwargs)
            except ClientError as err:
                code = err.response.get("Error", {}).get("Code", "")
                if code in passthrough:
                    raise
                if code not in RETRYABLE_CODES:
                    raise StorageUnavailable(self._explain(op, code, err)) from err
                if deadline is None:
                    deadline = time.monotonic() + self.retry_budget_s
                self._backoff(attempt, deadline, f"{op} answered {code}", err)
            except NoCredentialsError as err:
                raise StorageUnavailable(
                    f"no AWS credentials found for DynamoDB at {self._where}: set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or run with an instance role); DynamoDB Local accepts "
                    "any non-empty values") from err
            except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError) as err:
                raise StorageUnavailable(
                    f"cannot reach DynamoDB at {self._where} ({op}: {err}); check storage.dynamodb_endpoint_url "
                    "and storage.dynamodb_region and that the server is running") from err
            except BotoCoreError as err:
                raise StorageUnavailable(f"DynamoDB {op} on table {self._table!r} at {self._where} failed: "
                                         f"{err}") from err
        raise AssertionError("unreachable")  # pragma: no cover - itertools.count never ends

    def _backoff(self, attempt: int, deadline: float, what: str, cause: BaseException | None = None) -> None:
        """Sleep before retry number ``attempt`` (exponential, jittered), or give up at ``deadline``."""
        ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2.0 ** (attempt - 1))
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)  # jitter: writers that collided do not retry together
        if time.monotonic() + delay > deadline:
            raise StorageUnavailable(
                f"DynamoDB table {self._table!r} at {self._where} is throttling: {what}, still after "
                f"{self.retry_budget_s:.0f}s of retries; give the table more capacity or slow the writers"
            ) from cause
        time.sleep(delay)

    def _explain(self, op: str, code: str, err: ClientError) -> str:
        message = err.response.get("Error", {}).get("Message", "")
        if code == "ResourceNotFoundException":
            return (f"DynamoDB table {self._table!r} (or its index {GSI_RECEIVED}) was not found at {self._where} "
                    f"during {op}: was it deleted? Restarting storage creates it again when "
                    "storage.dynamodb_create_table is true")
        if code in CREDENTIAL_CODES:
            return (f"DynamoDB at {self._where} refused {op} on table {self._table!r} ({code}: {message}); check "
                    "the AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance "
                    "role) and their permissions on the table")
        return f"DynamoDB {op} on table {self._table!r} at {self._where} failed: {code}: {message}"

    # ---- table and layout
    def _ensure_table(self, create: bool) -> None:
        try:
            table = self._call("DescribeTable", self._client.describe_table,
                               passthrough=frozenset({"ResourceNotFoundException"}), TableName=self._table)["Table"]
        except ClientError as err:
            if not create:
                raise StorageUnavailable(
                    f"DynamoDB table {self._table!r} does not exist at {self._where}; create it, or let storage "
                    f"create it by setting storage.dynamodb_create_table to true (environment: "
                    f"{env_var('storage.dynamodb_create_table')}=true)") from err
            self._create_table()
            table = self._wait_active()
        self._check_schema(table)
        if table.get("TableStatus") != "ACTIVE" or any(
                g.get("IndexStatus") != "ACTIVE" for g in table.get("GlobalSecondaryIndexes", [])):
            self._wait_active()

    def _create_table(self) -> None:
        attrs = {name for name, _, _ in _EXPECTED_KEYS + _EXPECTED_GSI_KEYS}
        try:
            self._call(
                "CreateTable", self._client.create_table, passthrough=frozenset({"ResourceInUseException"}),
                TableName=self._table, BillingMode="PAY_PER_REQUEST",
                AttributeDefinitions=[{"AttributeName": a, "AttributeType": "S"} for a in sorted(attrs)],
                KeySchema=[{"AttributeName": a, "KeyType": k} for a, k, _ in _EXPECTED_KEYS],
                GlobalSecondaryIndexes=[{
                    "IndexName": GSI_RECEIVED,
                    "KeySchema": [{"AttributeName": a, "KeyType": k} for a, k, _ in _EXPECTED_GSI_KEYS],
                    "Projection": {"ProjectionType": "INCLUDE", "NonKeyAttributes": ["rh"]},
                }])
            log.info("created DynamoDB table %s (on-demand capacity) at %s", self._table, self._where)
        except ClientError:
            log.info("DynamoDB table %s is being created by another process; waiting for it", self._table)

    def _wait_active(self) -> Any:
        deadline = time.monotonic() + TABLE_WAIT_S
        for attempt in itertools.count():  # ends: returns once active, raises at the deadline
            table = self._call("DescribeTable", self._client.describe_table, TableName=self._table)["Table"]
            if table.get("TableStatus") == "ACTIVE" and all(
                    g.get("IndexStatus") == "ACTIVE" for g in table.get("GlobalSecondaryIndexes", [])):
                return table
            if time.monotonic() > deadline:
                raise StorageUnavailable(f"DynamoDB table {self._table!r} at {self._where} is still "
                                         f"{table.get('TableStatus')} after {TABLE_WAIT_S:.0f}s; try again later")
            time.sleep(min(2.0, 0.05 * 2**attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def _check_schema(self, table: Any) -> None:
        types = {a["AttributeName"]: a["AttributeType"] for a in table.get("AttributeDefinitions", [])}
        found = [(k["AttributeName"], k["KeyType"], types.get(k["AttributeName"], "?"))
                 for k in table.get("KeySchema", [])]
        gsis = {g["IndexName"]: g for g in table.get("GlobalSecondaryIndexes", [])}
        gsi = gsis.get(GSI_RECEIVED)
        found_gsi = ([(k["AttributeName"], k["KeyType"], types.get(k["AttributeName"], "?"))
                      for k in gsi["KeySchema"]] if gsi else [])
        projection = gsi.get("Projection", {}) if gsi else {}
        projected = projection.get("ProjectionType") == "ALL" or "rh" in projection.get("NonKeyAttributes", [])

        def show(keys: list[tuple[str, str, str]]) -> str:
            return ", ".join(f"{name} {kind} {typ}" for name, kind, typ in keys) or "none"

        if found != _EXPECTED_KEYS or found_gsi != _EXPECTED_GSI_KEYS or not projected:
            raise StorageUnavailable(
                f"DynamoDB table {self._table!r} at {self._where} is not a sensor hub table: expected key schema "
                f"[{show(_EXPECTED_KEYS)}] with index {GSI_RECEIVED} [{show(_EXPECTED_GSI_KEYS)}] projecting rh, "
                f"found [{show(found)}] with index {GSI_RECEIVED} [{show(found_gsi)}]"
                f"{'' if projected or not gsi else ' not projecting rh'}; set storage.dynamodb_table to another "
                "name (storage creates it) or drop this table")

    def _load_layout(self, bucket_s: int) -> Layout:
        key = {"pk": _s("meta"), "sk": _s("layout")}
        for _ in range(2):  # a second read only when another process wrote the layout first
            item = self._call("GetItem", self._client.get_item, TableName=self._table, Key=key,
                              ConsistentRead=True).get("Item")
            if item is not None:
                version = int(item["layout"]["N"])
                if version > LAYOUT_VERSION:
                    raise StorageUnavailable(f"DynamoDB table {self._table!r} has layout version {version}, "
                                             f"newer than this version of the sensor hub reads ({LAYOUT_VERSION})")
                layout = Layout(int(item["shards"]["N"]), int(item["bucket_seconds"]["N"]))
                if layout.bucket_s != bucket_s:
                    log.info("DynamoDB table %s keeps buckets of %d s (storage.bucket_seconds is %d): using the "
                             "table's", self._table, layout.bucket_s, bucket_s)
                return layout
            try:
                self._call("PutItem", self._client.put_item, passthrough=_CAS, TableName=self._table,
                           Item={**key, "layout": _n(LAYOUT_VERSION), "shards": _n(WRITE_SHARDS),
                                 "bucket_seconds": _n(bucket_s)},
                           ConditionExpression="attribute_not_exists(pk)")
                return Layout(WRITE_SHARDS, bucket_s)
            except ClientError:
                continue
        raise StorageUnavailable(f"cannot read the layout item of DynamoDB table {self._table!r}")

    # ---- items
    def _record_key(self, code: str, b: SealedBatch) -> Item:
        lay = self._layout
        return {"pk": _s(f"{code}#{lay.bucket_of(b.lo)}#{lay.band_of(b.hi - b.lo)}#{shard_of(b.uid, lay.shards)}"),
                "sk": _s(f"{encode_float(b.lo)}#{b.uid}")}

    def _record_item(self, code: str, b: SealedBatch) -> Item:
        item = self._record_key(code, b)
        item.update({"uid": _s(b.uid), "bucket": _n(b.bucket), "lo": _s(encode_float(b.lo)),
                     "hi": _s(encode_float(b.hi)), "rl": _s(encode_float(b.rec_lo)), "rh": _s(encode_float(b.rec_hi)),
                     "n": _n(b.count), "k": _s(b.key_id), "f": _n(b.fmt), "v": {"B": b.body},
                     "h": _s(digest(b.key_id, b.body))})
        if code == "b":  # only batches are in the arrival-time index (a sparse GSI: audit chunks cost nothing there)
            lay = self._layout
            item["gpk"] = _s(f"r#{lay.bucket_of(b.rec_lo)}#{lay.band_of(b.rec_hi - b.rec_lo)}#"
                             f"{shard_of(b.uid, lay.shards)}")
            item["gsk"] = _s(f"{encode_float(b.rec_lo)}#{b.uid}")
        return item

    @staticmethod
    def _record_of(item: Item) -> SealedBatch:
        return SealedBatch(item["uid"]["S"], int(item["bucket"]["N"]), decode_float(item["lo"]["S"]),
                           decode_float(item["hi"]["S"]), decode_float(item["rl"]["S"]),
                           decode_float(item["rh"]["S"]), int(item["n"]["N"]), item["k"]["S"],
                           bytes(item["v"]["B"]), int(item["f"]["N"]))

    def _directory_entries(self, code: str, b: SealedBatch) -> list[Item]:
        lay = self._layout
        axes = [("t", b.lo, b.hi)] + ([("r", b.rec_lo, b.rec_hi)] if code == "b" else [])
        out = []
        for axis, lo, hi in axes:
            q, band = lay.bucket_of(lo), lay.band_of(hi - lo)
            out.append({"pk": _s(f"d#{code}{axis}"), "sk": _s(f"{encode_float(float(q))}#{q}#{band:02d}")})
            out.append({"pk": _s(f"d#{code}{axis}#bands"), "sk": _s(f"{band:04d}")})
        return out

    def _check_record(self, kind: str, b: SealedBatch) -> None:
        if len(b.body) > MAX_BODY_BYTES:
            raise StorageUnavailable(
                f"{kind} {b.uid} has a sealed body of {len(b.body)} bytes, over the DynamoDB backend's limit of "
                f"{MAX_BODY_BYTES} bytes per record (max_body_bytes; a DynamoDB item holds at most 400 KB): cut "
                "batches to store.max_body_bytes before sealing (components.core.batches.split_batch)")
        if not all(math.isfinite(x) for x in (b.lo, b.hi, b.rec_lo, b.rec_hi)):
            raise ValueError(f"{kind} {b.uid} has a time bound that is not finite")
        if not b.uid or len(b.uid.encode("utf-8")) > 512:
            raise ValueError(f"{kind} uid must be 1 to 512 bytes, got {len(b.uid.encode('utf-8'))}")

    # ---- writing
    def _register(self, entries: Iterable[Item]) -> None:
        """Write directory entries this process has not written yet (before the records they describe)."""
        with self._lock:
            todo = {(e["pk"]["S"], e["sk"]["S"]): e for e in entries if (e["pk"]["S"], e["sk"]["S"]) not in self._known}
        if todo:
            self._write([{"PutRequest": {"Item": e}} for e in todo.values()])
            with self._lock:
                self._known.update(todo)

    def _write(self, requests: Sequence[Item]) -> None:
        """BatchWriteItem in chunks of at most 25 requests and 16 MB."""
        chunk: list[Item] = []
        size = 0
        for req in requests:
            body = req.get("PutRequest", {}).get("Item") or req["DeleteRequest"]["Key"]
            n = _item_size(body)
            if chunk and (len(chunk) == BATCH_WRITE_MAX_ITEMS or size + n > BATCH_WRITE_MAX_BYTES):
                self._write_chunk(chunk)
                chunk, size = [], 0
            chunk.append(req)
            size += n
        if chunk:
            self._write_chunk(chunk)

    def _write_chunk(self, chunk: list[Item]) -> None:
        pending: list[Any] = chunk
        deadline = time.monotonic() + self.retry_budget_s
        for attempt in itertools.count(1):  # ends: all processed, or _backoff raises at the deadline
            resp = self._call("BatchWriteItem", self._client.batch_write_item, RequestItems={self._table: pending})
            pending = list(resp.get("UnprocessedItems", {}).get(self._table, []))
            if not pending:
                return
            self._backoff(attempt, deadline, f"BatchWriteItem left {len(pending)} of {len(chunk)} items unprocessed")

    def _stored_keys(self, keys: list[Item]) -> set[tuple[str, str]]:
        """Which of ``keys`` exist (consistent reads; a missing item costs 1 RCU)."""
        found: set[tuple[str, str]] = set()
        for item in self._batch_get(keys, projection="#pk, #sk"):
            found.add((item["pk"]["S"], item["sk"]["S"]))
        return found

    def _batch_get(self, keys: list[Item], projection: str | None = None) -> Iterator[Item]:
        """BatchGetItem, consistent, 100 keys a call, following UnprocessedKeys."""
        for i in range(0, len(keys), BATCH_GET_MAX_KEYS):
            request: dict[str, Any] = {"Keys": keys[i:i + BATCH_GET_MAX_KEYS], "ConsistentRead": True}
            if projection:
                request.update(ProjectionExpression=projection, ExpressionAttributeNames={"#pk": "pk", "#sk": "sk"})
            deadline = time.monotonic() + self.retry_budget_s
            for attempt in itertools.count(1):  # ends: nothing unprocessed, or _backoff raises at the deadline
                resp = self._call("BatchGetItem", self._client.batch_get_item, RequestItems={self._table: request})
                got = resp.get("Responses", {}).get(self._table, [])
                yield from got
                left = resp.get("UnprocessedKeys", {}).get(self._table)
                if not left or not left.get("Keys"):
                    break
                if not got:  # a response cut by size makes progress and is read on at once; none means throttled
                    self._backoff(attempt, deadline, f"BatchGetItem left {len(left['Keys'])} keys unprocessed")
                request = dict(left)

    def _store_records(self, code: str, records: Sequence[SealedBatch]) -> int:
        kind = _CODE_KIND[code]
        unique: dict[str, SealedBatch] = {}
        for b in records:
            self._check_record(kind, b)
            unique.setdefault(b.uid, b)
        if not unique:
            return 0
        self._register(e for b in unique.values() for e in self._directory_entries(code, b))
        keys = {b.uid: self._record_key(code, b) for b in unique.values()}
        stored = self._stored_keys(list(keys.values()))
        new = [b for uid, b in unique.items() if (keys[uid]["pk"]["S"], keys[uid]["sk"]["S"]) not in stored]
        self._write([{"PutRequest": {"Item": self._record_item(code, b)}} for b in new])
        return sum(len(b.body) for b in new)

    def _raise_max_hi(self, hi: float) -> None:
        with self._lock:
            if hi <= self._max_hi_known:
                return
        try:
            self._call("UpdateItem", self._client.update_item, passthrough=_CAS, TableName=self._table,
                       Key={"pk": _s("meta"), "sk": _s("max_hi")}, UpdateExpression="SET #hi = :h",
                       ConditionExpression="attribute_not_exists(#hi) OR #hi < :h",
                       ExpressionAttributeNames={"#hi": "hi"}, ExpressionAttributeValues={":h": _s(encode_float(hi))})
        except ClientError:
            pass  # another writer already recorded a greater hi
        with self._lock:
            self._max_hi_known = max(self._max_hi_known, hi)

    def commit(self, batches: Sequence[SealedBatch], state: SealedState | None) -> int:
        """Store batches (each uid once), then the state record; return the bytes of bodies newly written."""
        for b in batches:
            self._check_record(BATCH, b)
        if state is not None:
            self._register([self._state_dir_entry(state.name)])
        written = self._store_records("b", batches)
        if batches:
            self._raise_max_hi(max(b.hi for b in batches))
        if state is not None:
            self._put_state(state, None)
            written += len(state.body)
        return written

    def append_audit(self, chunk: SealedBatch) -> None:
        """Store a sealed chunk of audit entries."""
        self._store_records("a", [chunk])

    # ---- state records
    @staticmethod
    def _state_dir_entry(name: str) -> Item:
        return {"pk": _s("sd"), "sk": _s(f"n:{name}"), "name": _s(name)}

    @staticmethod
    def _head_key(name: str) -> Item:
        return {"pk": _s(f"s#{name}"), "sk": _s("state")}

    @staticmethod
    def _part_keys(gen: str, parts: int) -> list[Item]:
        return [{"pk": _s(f"p#{gen}"), "sk": _s(f"{i:06d}")} for i in range(parts)]

    def _put_state(self, state: SealedState, expect: SealedState | None) -> bool:
        """Write a state record (parts first, then the head); with ``expect``, only if the head still matches it."""
        if not state.name:
            raise ValueError("a state record needs a name")
        head: Item = {**self._head_key(state.name), "name": _s(state.name), "k": _s(state.key_id),
                      "h": _s(digest(state.key_id, state.body))}
        parts: list[Item] = []
        if len(state.body) <= MAX_BODY_BYTES:
            head["v"] = {"B": state.body}
        else:  # over one item: a fresh generation of parts, so readers of the current one are never disturbed
            gen = secrets.token_hex(8)
            chunks = [state.body[i:i + MAX_BODY_BYTES] for i in range(0, len(state.body), MAX_BODY_BYTES)]
            parts = [{**key, "v": {"B": c}} for key, c in zip(self._part_keys(gen, len(chunks)), chunks, strict=True)]
            head.update(gen=_s(gen), parts=_n(len(parts)))
            self._write([{"PutRequest": {"Item": p}} for p in parts])
        kwargs: dict[str, Any] = {}
        if expect is not None:
            kwargs = {"ConditionExpression": "#k = :k AND #h = :h", "ExpressionAttributeNames": {"#k": "k", "#h": "h"},
                      "ExpressionAttributeValues": {":k": _s(expect.key_id),
                                                    ":h": _s(digest(expect.key_id, expect.body))}}
        try:
            resp = self._call("PutItem", self._client.put_item, passthrough=_CAS, TableName=self._table,
                              Item=head, ReturnValues="ALL_OLD", **kwargs)
        except ClientError:
            self._write([{"DeleteRequest": {"Key": {"pk": p["pk"], "sk": p["sk"]}}} for p in parts])
            return False
        old = resp.get("Attributes") or {}
        if "gen" in old:  # the replaced generation is ours to delete (whoever replaces a head deletes its parts)
            self._write([{"DeleteRequest": {"Key": k}} for k in self._part_keys(old["gen"]["S"],
                                                                                  int(old["parts"]["N"]))])
        return True

    def _assemble(self, head: Item) -> SealedState | None:
        """The state a head describes; None if it vanished. Reads again when a concurrent replace tore it."""
        for _ in range(STATE_READ_ATTEMPTS):
            name = head["name"]["S"]
            if "gen" not in head:
                body = bytes(head["v"]["B"])
            else:
                pages = self._query(KeyConditionExpression="#pk = :p", ExpressionAttributeNames={"#pk": "pk"},
                                    ExpressionAttributeValues={":p": _s(f"p#{head['gen']['S']}")})
                chunks = [bytes(item["v"]["B"]) for item in pages]
                body = b"".join(chunks) if len(chunks) == int(head["parts"]["N"]) else b""
            if digest(head["k"]["S"], body) == head["h"]["S"]:
                return SealedState(name, head["k"]["S"], body)
            fresh = self._call("GetItem", self._client.get_item, TableName=self._table, Key=self._head_key(name),
                               ConsistentRead=True).get("Item")
            if fresh is None:
                return None
            head = fresh
        raise StorageUnavailable(f"state record {head['name']['S']!r} kept changing while being read "
                                 f"({STATE_READ_ATTEMPTS} attempts); try again")

    def states(self, prefix: str) -> list[SealedState]:
        """State records whose name starts with ``prefix``."""
        names = [item["name"]["S"] for item in self._query(
            KeyConditionExpression="#pk = :p AND begins_with(#sk, :n)",
            ExpressionAttributeNames={"#pk": "pk", "#sk": "sk"},
            ExpressionAttributeValues={":p": _s("sd"), ":n": _s(f"n:{prefix}")})]
        out = []
        for head in self._batch_get([self._head_key(n) for n in names]):
            state = self._assemble(head)
            if state is not None:  # a name whose first write did not finish has no head: nothing to read
                out.append(state)
        return sorted(out, key=lambda s: s.name)

    # ---- reading
    def _query(self, **kwargs: Any) -> Iterator[Item]:
        """Every item a Query matches, following LastEvaluatedKey (consistent unless on the GSI)."""
        kwargs.setdefault("ConsistentRead", "IndexName" not in kwargs)
        for page in self._query_pages(**kwargs):
            yield from page.get("Items", [])

    def _query_pages(self, **kwargs: Any) -> Iterator[Any]:
        start: Item | None = None
        while True:  # ends when a page has no LastEvaluatedKey
            extra: dict[str, Any] = {"ExclusiveStartKey": start} if start else {}
            resp = self._call("Query", self._client.query, TableName=self._table, **kwargs, **extra)
            yield resp
            start = resp.get("LastEvaluatedKey")
            if not start:
                return

    def _widest_band(self, code: str, axis: str) -> int | None:
        items = self._call("Query", self._client.query, TableName=self._table, ConsistentRead=True, Limit=1,
                           ScanIndexForward=False, KeyConditionExpression="#pk = :p",
                           ExpressionAttributeNames={"#pk": "pk"},
                           ExpressionAttributeValues={":p": _s(f"d#{code}{axis}#bands")}).get("Items", [])
        return int(items[0]["sk"]["S"]) if items else None

    def _directory(self, code: str, axis: str, q_lo: int | None, q_hi: int | None, descending: bool = False,
                   page: int | None = None) -> Iterator[tuple[int, int]]:
        """(bucket, band) entries with bucket in [q_lo, q_hi] (None: unbounded), in bucket order."""
        cond, values = "#pk = :p", {":p": _s(f"d#{code}{axis}")}
        if q_lo is not None:
            values[":a"] = _s(encode_float(float(q_lo)))
        if q_hi is not None:
            values[":b"] = _s(encode_float(float(q_hi)) + "$")  # '$' sorts after the '#' that follows
        if q_lo is not None and q_hi is not None:
            cond += " AND #sk BETWEEN :a AND :b"
        elif q_lo is not None:
            cond += " AND #sk >= :a"
        elif q_hi is not None:
            cond += " AND #sk <= :b"
        kwargs: dict[str, Any] = {"KeyConditionExpression": cond, "ScanIndexForward": not descending,
                                  "ExpressionAttributeNames": {"#pk": "pk", **({"#sk": "sk"} if ":a" in values
                                                                                or ":b" in values else {})},
                                  "ExpressionAttributeValues": values}
        if page:
            kwargs["Limit"] = page
        for item in self._query(**kwargs):
            _, q, band = item["sk"]["S"].split("#")
            yield int(q), int(band)

    def _window(self, code: str, axis: Literal["t", "r"], start: float, end: float) -> list[Item]:
        """Items (keys only on the arrival axis) whose interval on ``axis`` overlaps [start, end]."""
        if math.isnan(start) or math.isnan(end):
            raise ValueError("window bounds must be numbers")
        if start == math.inf or end == -math.inf:
            return []
        widest = self._widest_band(code, axis)
        if widest is None:
            return []
        lay = self._layout
        reach = _down(start - lay.band_span(widest))
        q_lo = lay.bucket_of(reach) - 1 if math.isfinite(reach) else None  # one bucket of slack for rounding
        q_hi = lay.bucket_of(end) if math.isfinite(end) else None
        if q_lo is not None and q_hi is not None and q_lo > q_hi:
            return []  # a window given backwards, wider apart than any record is long: nothing can touch both ends
        index = {"IndexName": GSI_RECEIVED} if axis == "r" else {}
        pk, sk, hi = ("gpk", "gsk", "rh") if axis == "r" else ("pk", "sk", "hi")
        prefix = "r" if axis == "r" else code
        upper = _at_most(end) + "$"
        queries: list[dict[str, Any]] = []
        for q, band in self._directory(code, axis, q_lo, q_hi):
            span = lay.band_span(band)
            if (q + 1) * lay.bucket_s + span < _down(start):
                continue  # every record of this partition ends before the window starts
            lower = _at_least(_down(start - span))
            if lower > upper:
                continue
            for shard in range(lay.shards):
                kwargs: dict[str, Any] = {
                    **index, "KeyConditionExpression": "#pk = :p AND #sk BETWEEN :a AND :b",
                    "ExpressionAttributeNames": {"#pk": pk, "#sk": sk},
                    "ExpressionAttributeValues": {":p": _s(f"{prefix}#{q}#{band}#{shard}"), ":a": _s(lower),
                                                  ":b": _s(upper)}}
                if math.isfinite(start):
                    kwargs["FilterExpression"] = "#hi >= :s"
                    kwargs["ExpressionAttributeNames"]["#hi"] = hi
                    kwargs["ExpressionAttributeValues"][":s"] = _s(_at_least(start))
                queries.append(kwargs)
        if len(queries) <= 1:
            return [item for kwargs in queries for item in self._query(**kwargs)]
        # the partitions are independent: read them side by side, so latency is a few round trips, not one each
        pages = self._pool().map(lambda kwargs: list(self._query(**kwargs)), queries)
        return [item for page in pages for item in page]

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(QUERY_FANOUT, thread_name_prefix="dynamodb-query")
            return self._executor

    @staticmethod
    def _by_lo(records: Iterable[SealedBatch]) -> list[SealedBatch]:
        unique = {b.uid: b for b in records}
        return sorted(unique.values(), key=lambda b: (b.lo, b.uid))

    def batches_by_ts(self, start: float, end: float, kind: Kind = BATCH) -> list[SealedBatch]:
        """Records whose [lo, hi] overlaps [start, end], ordered by lo."""
        return self._by_lo(self._record_of(i) for i in self._window(_KIND_CODE[kind], "t", start, end))

    def batches_by_received(self, start: float, end: float) -> list[SealedBatch]:
        """Batches whose [rec_lo, rec_hi] overlaps [start, end], ordered by lo (found on the GSI, read consistently)."""
        keys = [{"pk": i["pk"], "sk": i["sk"]} for i in self._window("b", "r", start, end)]
        return self._by_lo(self._record_of(i) for i in self._batch_get(keys))

    def batches_by_hi_desc(self, below: float | None = None) -> Iterator[SealedBatch]:
        """Batches in descending order of hi (only hi < below when given), read lazily.

        A k-way merge: each (bucket, band, shard) partition is read backwards by lo, a page at a time; a record
        is yielded once no unread record can have a greater hi (an unread record of band b starts at most at
        the last lo read there, so it ends at most one band span later).
        """
        if below is not None and (math.isnan(below) or below == -math.inf):
            return
        widest = self._widest_band("b", "t")
        if widest is None:
            return
        lay = self._layout
        cap = math.inf if below is None else below
        reach = lay.band_span(widest)
        top = lay.bucket_of(below) if below is not None and math.isfinite(below) else None
        entries = self._directory("b", "t", None, top, descending=True, page=64)
        ticket = itertools.count()
        ready: list[tuple[float, int, SealedBatch]] = []  # max-heap on hi of records read
        streams: list[tuple[float, int, _Stream]] = []  # max-heap on the greatest hi a stream can still hold
        entry = next(entries, None)
        while True:  # ends: every pass yields a record, opens a directory entry or reads a page of a partition
            unopened = -math.inf if entry is None else _up((entry[0] + 1) * lay.bucket_s + reach)
            pending = -streams[0][0] if streams else -math.inf
            if ready and -ready[0][0] >= max(unopened, pending):
                yield heapq.heappop(ready)[2]
                continue
            if entry is None and not streams:
                return
            if entry is not None and unopened >= pending:
                q, band = entry
                for shard in range(lay.shards):
                    s = _Stream(self, f"b#{q}#{band}#{shard}", lay.band_span(band), below)
                    first = min(cap, _up((q + 1) * lay.bucket_s + s.span))
                    heapq.heappush(streams, (-first, next(ticket), s))
                entry = next(entries, None)
                continue
            _, _, stream = heapq.heappop(streams)
            records, bound = stream.read()
            for b in records:
                heapq.heappush(ready, (-b.hi, next(ticket), b))
            if bound is not None:
                heapq.heappush(streams, (-min(cap, bound), next(ticket), stream))

    def max_ts(self) -> float | None:
        """The greatest hi of all batches (one consistent GetItem of the marker every commit raises)."""
        item = self._call("GetItem", self._client.get_item, TableName=self._table,
                          Key={"pk": _s("meta"), "sk": _s("max_hi")}, ConsistentRead=True).get("Item")
        return decode_float(item["hi"]["S"]) if item and "hi" in item else None

    def records(self) -> Iterator[tuple[Kind | Literal["state"], SealedBatch | SealedState]]:
        """Every record, for re-sealing: the one Scan of this backend (consistent, paged)."""
        start: Item | None = None
        while True:  # ends when a page has no LastEvaluatedKey
            extra: dict[str, Any] = {"ExclusiveStartKey": start} if start else {}
            resp = self._call("Scan", self._client.scan, TableName=self._table, ConsistentRead=True, **extra)
            for item in resp.get("Items", []):
                kind = item["pk"]["S"].split("#", 1)[0]
                if kind in _CODE_KIND:
                    yield _CODE_KIND[kind], self._record_of(item)
                elif kind == "s":
                    state = self._assemble(item)
                    if state is not None:
                        yield "state", state
            start = resp.get("LastEvaluatedKey")
            if not start:
                return

    def replace(self, kind: Kind | Literal["state"], old: SealedBatch | SealedState,
                new: SealedBatch | SealedState) -> bool:
        """Compare-and-swap the key and body of one record (a conditional write on key id and body digest)."""
        if isinstance(old, SealedState):
            if not isinstance(new, SealedState):
                raise TypeError("a state record is replaced by a state record")
            return self._put_state(SealedState(old.name, new.key_id, new.body), old)
        if kind == "state" or isinstance(new, SealedState):
            raise TypeError(f"a {kind} record is replaced by a SealedBatch")
        self._check_record(kind, new)
        try:
            self._call("UpdateItem", self._client.update_item, passthrough=_CAS, TableName=self._table,
                       Key=self._record_key(_KIND_CODE[kind], old),
                       UpdateExpression="SET #k = :k, #v = :v, #h = :h",
                       ConditionExpression="attribute_exists(#pk) AND #k = :ok AND #h = :oh",
                       ExpressionAttributeNames={"#pk": "pk", "#k": "k", "#v": "v", "#h": "h"},
                       ExpressionAttributeValues={":k": _s(new.key_id), ":v": {"B": new.body},
                                                  ":h": _s(digest(new.key_id, new.body)),
                                                  ":ok": _s(old.key_id), ":oh": _s(digest(old.key_id, old.body))})
        except ClientError:
            return False
        return True

    def close(self) -> None:
        """Stop the query threads and close the client's connections."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        self._client.close()


class _Stream:
    """One partition of batches read backwards by lo, a page at a time (for :meth:`batches_by_hi_desc`)."""

    def __init__(self, store: DynamoBatchStore, pk: str, span: float, below: float | None) -> None:
        self.store, self.pk, self.span, self.below = store, pk, span, below
        self.start: Item | None = None
        self.limit = HI_DESC_FIRST_PAGE  # small first: a caller that wants the newest few reads little

    def read(self) -> tuple[list[SealedBatch], float | None]:
        """The next page of records, and the greatest hi the rest can have (None: nothing is left)."""
        names = {"#pk": "pk"}
        values = {":p": _s(self.pk)}
        cond = "#pk = :p"
        kwargs: dict[str, Any] = {}
        if self.below is not None:
            names.update({"#sk": "sk", "#hi": "hi"})
            values[":b"] = _s(_at_least(self.below))  # lo <= hi < below
            cond += " AND #sk < :b"
            kwargs["FilterExpression"] = "#hi < :b"
        if self.start:
            kwargs["ExclusiveStartKey"] = self.start
        resp = self.store._call("Query", self.store._client.query, TableName=self.store._table, ConsistentRead=True,
                                ScanIndexForward=False, Limit=self.limit, KeyConditionExpression=cond,
                                ExpressionAttributeNames=names, ExpressionAttributeValues=values, **kwargs)
        self.limit = min(HI_DESC_MAX_PAGE, self.limit * 2)
        self.start = resp.get("LastEvaluatedKey")
        records = [DynamoBatchStore._record_of(i) for i in resp.get("Items", [])]
        if not self.start:
            return records, None
        return records, _up(decode_float(self.start["sk"]["S"]) + self.span)


def _item_size(item: Item) -> int:
    """An item's size as DynamoDB counts it, closely enough to keep a BatchWriteItem under 16 MB."""
    size = 0
    for name, value in item.items():
        size += len(name)
        for typ, v in value.items():
            size += len(v) if typ == "B" else len(str(v).encode("utf-8"))
    return size + 100
