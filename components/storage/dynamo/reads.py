"""Reading records: windows on either time axis as Queries on key ranges, and the merge by descending hi."""

from __future__ import annotations

import heapq
import itertools
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

from components.storage.dynamo.calls import DynamoTable
from components.storage.dynamo.codec import Item, attr_s, decode_float, encode_float, record_of
from components.storage.dynamo.layout import CODE_KIND, GSI_RECEIVED, Layout
from components.storage.dynamo.state import assemble
from components.storage.interface import Kind, SealedBatch, SealedState

HI_DESC_FIRST_PAGE, HI_DESC_MAX_PAGE = 4, 256
QUERY_FANOUT = 8
"""Partition Queries of one window run this many at a time."""

T = TypeVar("T")
R = TypeVar("R")


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


class QueryPool:
    """Threads for the partition Queries of a window, started on first use."""

    def __init__(self) -> None:
        """No threads until a window reads more than one partition."""
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    def map(self, fn: Callable[[T], R], args: Sequence[T]) -> Iterator[R]:
        """``fn`` over ``args``, side by side."""
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(QUERY_FANOUT, thread_name_prefix="dynamodb-query")
            executor = self._executor
        return executor.map(fn, args)

    def close(self) -> None:
        """Stop the threads."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)


def _widest_band(table: DynamoTable, code: str, axis: str) -> int | None:
    items = table.call("Query", table.client.query, TableName=table.name, ConsistentRead=True, Limit=1,
                       ScanIndexForward=False, KeyConditionExpression="#pk = :p",
                       ExpressionAttributeNames={"#pk": "pk"},
                       ExpressionAttributeValues={":p": attr_s(f"d#{code}{axis}#bands")}).get("Items", [])
    return int(items[0]["sk"]["S"]) if items else None


def _directory(table: DynamoTable, code: str, axis: str, q_lo: int | None, q_hi: int | None,
               descending: bool = False, page: int | None = None) -> Iterator[tuple[int, int]]:
    """(bucket, band) entries with bucket in [q_lo, q_hi] (None: unbounded), in bucket order."""
    cond, values = "#pk = :p", {":p": attr_s(f"d#{code}{axis}")}
    if q_lo is not None:
        values[":a"] = attr_s(encode_float(float(q_lo)))
    if q_hi is not None:
        values[":b"] = attr_s(encode_float(float(q_hi)) + "$")  # '$' sorts after the '#' that follows
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
    for item in table.query(**kwargs):
        _, q, band = item["sk"]["S"].split("#")
        yield int(q), int(band)


def window(table: DynamoTable, lay: Layout, pool: QueryPool, code: str, axis: Literal["t", "r"],
           start: float, end: float) -> list[Item]:
    """Items (keys only on the arrival axis) whose interval on ``axis`` overlaps [start, end]."""
    if math.isnan(start) or math.isnan(end):
        raise ValueError("window bounds must be numbers")
    if start == math.inf or end == -math.inf:
        return []
    widest = _widest_band(table, code, axis)
    if widest is None:
        return []
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
    for q, band in _directory(table, code, axis, q_lo, q_hi):
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
                "ExpressionAttributeValues": {":p": attr_s(f"{prefix}#{q}#{band}#{shard}"), ":a": attr_s(lower),
                                              ":b": attr_s(upper)}}
            if math.isfinite(start):
                kwargs["FilterExpression"] = "#hi >= :s"
                kwargs["ExpressionAttributeNames"]["#hi"] = hi
                kwargs["ExpressionAttributeValues"][":s"] = attr_s(_at_least(start))
            queries.append(kwargs)
    if len(queries) <= 1:
        return [item for kwargs in queries for item in table.query(**kwargs)]
    # the partitions are independent: read them side by side, so latency is a few round trips, not one each
    pages = pool.map(lambda kwargs: list(table.query(**kwargs)), queries)
    return [item for page in pages for item in page]


def by_lo(items: Iterable[Item]) -> list[SealedBatch]:
    """The records of ``items``, each uid once, ordered by lo."""
    unique = {b.uid: b for b in map(record_of, items)}
    return sorted(unique.values(), key=lambda b: (b.lo, b.uid))


def by_hi_desc(table: DynamoTable, lay: Layout, below: float | None) -> Iterator[SealedBatch]:
    """Batches in descending order of hi (only hi < below when given), read lazily.

    A k-way merge: each (bucket, band, shard) partition is read backwards by lo, a page at a time; a record
    is yielded once no unread record can have a greater hi (an unread record of band b starts at most at
    the last lo read there, so it ends at most one band span later).
    """
    if below is not None and (math.isnan(below) or below == -math.inf):
        return
    widest = _widest_band(table, "b", "t")
    if widest is None:
        return
    cap = math.inf if below is None else below
    reach = lay.band_span(widest)
    top = lay.bucket_of(below) if below is not None and math.isfinite(below) else None
    entries = _directory(table, "b", "t", None, top, descending=True, page=64)
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
                s = _Stream(table, f"b#{q}#{band}#{shard}", lay.band_span(band), below)
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


class _Stream:
    """One partition of batches read backwards by lo, a page at a time (for :func:`by_hi_desc`)."""

    def __init__(self, table: DynamoTable, pk: str, span: float, below: float | None) -> None:
        self.table, self.pk, self.span, self.below = table, pk, span, below
        self.start: Item | None = None
        self.limit = HI_DESC_FIRST_PAGE  # small first: a caller that wants the newest few reads little

    def read(self) -> tuple[list[SealedBatch], float | None]:
        """The next page of records, and the greatest hi the rest can have (None: nothing is left)."""
        names = {"#pk": "pk"}
        values = {":p": attr_s(self.pk)}
        cond = "#pk = :p"
        kwargs: dict[str, Any] = {}
        if self.below is not None:
            names.update({"#sk": "sk", "#hi": "hi"})
            values[":b"] = attr_s(_at_least(self.below))  # lo <= hi < below
            cond += " AND #sk < :b"
            kwargs["FilterExpression"] = "#hi < :b"
        if self.start:
            kwargs["ExclusiveStartKey"] = self.start
        resp = self.table.call("Query", self.table.client.query, TableName=self.table.name, ConsistentRead=True,
                               ScanIndexForward=False, Limit=self.limit, KeyConditionExpression=cond,
                               ExpressionAttributeNames=names, ExpressionAttributeValues=values, **kwargs)
        self.limit = min(HI_DESC_MAX_PAGE, self.limit * 2)
        self.start = resp.get("LastEvaluatedKey")
        records = [record_of(i) for i in resp.get("Items", [])]
        if not self.start:
            return records, None
        return records, _up(decode_float(self.start["sk"]["S"]) + self.span)


def max_ts(table: DynamoTable) -> float | None:
    """The greatest hi of all batches (one consistent GetItem of the marker every commit raises)."""
    item = table.get({"pk": attr_s("meta"), "sk": attr_s("max_hi")})
    return decode_float(item["hi"]["S"]) if item and "hi" in item else None


def records(table: DynamoTable) -> Iterator[tuple[Kind | Literal["state"], SealedBatch | SealedState]]:
    """Every record, for re-sealing: the one Scan of this backend (consistent, paged)."""
    start: Item | None = None
    while True:  # ends when a page has no LastEvaluatedKey
        extra: dict[str, Any] = {"ExclusiveStartKey": start} if start else {}
        resp = table.call("Scan", table.client.scan, TableName=table.name, ConsistentRead=True, **extra)
        for item in resp.get("Items", []):
            kind = item["pk"]["S"].split("#", 1)[0]
            if kind in CODE_KIND:
                yield CODE_KIND[kind], record_of(item)
            elif kind == "s":
                state = assemble(table, item)
                if state is not None:
                    yield "state", state
        start = resp.get("LastEvaluatedKey")
        if not start:
            return
