"""Reading records: windows on either time axis as Queries on key ranges, the merge by descending hi, and the
partitions that hold batches still to compact.

Reads of batches and segments skip segments a swap has not committed (``pend``) and hide the records a committed
swap replaces (:class:`~components.storage.dynamo.swaps.Visibility`); audit chunks are never swapped.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

from botocore.exceptions import ClientError

from components.storage.dynamo.calls import CAS, DynamoTable
from components.storage.dynamo.codec import Item, attr_s, decode_float, encode_float, group_of, record_of
from components.storage.dynamo.layout import (
    ARRIVAL_CODE,
    CODE_KIND,
    GSI_RECEIVED,
    PENDING_LEASE_S,
    PENDING_PK,
    Layout,
    any_pk,
    bands_pk,
    dir_pk,
    parse_dir_sk,
)
from components.storage.dynamo.state import assemble
from components.storage.dynamo.swaps import Visibility, consistent
from components.storage.interface import EVERY_GROUP, Groups, Kind, SealedBatch, SealedState

HI_DESC_FIRST_PAGE, HI_DESC_MAX_PAGE = 4, 256
QUERY_FANOUT = 8
"""Partition Queries of one window run this many at a time."""
PRUNE_MARGIN_S = 300.0
"""A pending entry is deleted only when its last put is older than the lease and this (writes in flight, clocks)."""

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
                       ExpressionAttributeValues={":p": attr_s(bands_pk(code, axis))}).get("Items", [])
    return int(items[0]["sk"]["S"]) if items else None


def _entries(table: DynamoTable, pk: str, group: int, q_lo: int | None, q_hi: int | None, descending: bool,
             page: int | None) -> Iterator[tuple[int, int, int]]:
    """(bucket, band, group) entries of one directory partition with bucket in [q_lo, q_hi] (None: unbounded)."""
    cond, values = "#pk = :p", {":p": attr_s(pk)}
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
        yield parse_dir_sk(item["sk"]["S"], group)


def _directory(table: DynamoTable, code: str, axis: str, q_lo: int | None, q_hi: int | None, groups: Groups,
               descending: bool = False, page: int | None = None) -> Iterator[tuple[int, int, int]]:
    """(bucket, band, group) partitions of ``groups`` (None: every group) in bucket order.

    Every group: group 0's directory and the one of every other group; else one directory per group asked.
    """
    sources = ([(dir_pk(code, axis, EVERY_GROUP), EVERY_GROUP), (any_pk(code, axis), EVERY_GROUP)]
               if groups is None else [(dir_pk(code, axis, g), g) for g in sorted(set(groups))])
    streams = [_entries(table, pk, g, q_lo, q_hi, descending, page) for pk, g in sources]
    if len(streams) == 1:
        return streams[0]
    return heapq.merge(*streams, key=lambda e: -e[0] if descending else e[0])


def window(table: DynamoTable, lay: Layout, pool: QueryPool, code: str, axis: Literal["t", "r"],
           start: float, end: float, groups: Groups = None) -> list[Item]:
    """Items (keys only on the arrival axis) of ``groups`` whose interval on ``axis`` overlaps [start, end]."""
    if math.isnan(start) or math.isnan(end):
        raise ValueError("window bounds must be numbers")
    if start == math.inf or end == -math.inf or (groups is not None and not groups):
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
    prefix = ARRIVAL_CODE[code] if axis == "r" else code
    upper = _at_most(end) + "$"
    queries: list[dict[str, Any]] = []
    for q, band, group in _directory(table, code, axis, q_lo, q_hi, groups):
        span = lay.band_span(band)
        if (q + 1) * lay.bucket_s + span < _down(start):
            continue  # every record of this partition ends before the window starts
        lower = _at_least(_down(start - span))
        if lower > upper:
            continue
        for partition in lay.partitions(prefix, q, band, group):
            kwargs: dict[str, Any] = {
                **index, "KeyConditionExpression": "#pk = :p AND #sk BETWEEN :a AND :b",
                "ExpressionAttributeNames": {"#pk": pk, "#sk": sk},
                "ExpressionAttributeValues": {":p": attr_s(partition), ":a": attr_s(lower), ":b": attr_s(upper)}}
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


def by_ts(table: DynamoTable, lay: Layout, pool: QueryPool, code: str, start: float, end: float,
          groups: Groups) -> list[SealedBatch]:
    """Records of kind ``code`` (in ``groups``) whose [lo, hi] overlaps [start, end], ordered by lo."""
    if code not in ARRIVAL_CODE:  # audit chunks: never swapped
        return by_lo(window(table, lay, pool, code, "t", start, end, groups))
    return consistent(table, groups, lambda seen: by_lo(
        i for i in window(table, lay, pool, code, "t", start, end, groups) if seen.shows(i)))


def by_received(table: DynamoTable, lay: Layout, pool: QueryPool, code: str, start: float, end: float,
                groups: Groups) -> list[SealedBatch]:
    """Records of kind ``code`` whose [rec_lo, rec_hi] overlaps [start, end] (found on the GSI, read consistently)."""
    if code not in ARRIVAL_CODE:
        raise ValueError(f"{CODE_KIND[code]} records are not in the arrival-time index")

    def read(seen: Visibility) -> list[SealedBatch]:
        keys = [{"pk": i["pk"], "sk": i["sk"]} for i in window(table, lay, pool, code, "r", start, end, groups)]
        return by_lo(i for i in table.batch_get(keys) if seen.shows(i))

    return consistent(table, groups, read)


def by_lo(items: Iterable[Item]) -> list[SealedBatch]:
    """The records of ``items``, each uid once, ordered by lo."""
    unique = {b.uid: b for b in map(record_of, items)}
    return sorted(unique.values(), key=lambda b: (b.lo, b.uid))


def by_hi_desc(table: DynamoTable, lay: Layout, code: str, below: float | None, groups: Groups
               ) -> Iterator[SealedBatch]:
    """Records of kind ``code`` (in ``groups``) in descending order of hi (only hi < below when given), lazily.

    A k-way merge: each (bucket, band, group or shard) partition is read backwards by lo, a page at a time; a
    record is yielded once no unread record can have a greater hi (an unread record of band b starts at most at
    the last lo read there, so it ends at most one band span later). The swap intents are read before each
    page: a swap that commits while the caller iterates hides the old records not yielded yet.
    """
    if (below is not None and (math.isnan(below) or below == -math.inf)) or (groups is not None and not groups):
        return
    widest = _widest_band(table, code, "t")
    if widest is None:
        return
    seen = Visibility(table, groups) if code in ARRIVAL_CODE else None
    cap = math.inf if below is None else below
    reach = lay.band_span(widest)
    top = lay.bucket_of(below) if below is not None and math.isfinite(below) else None
    entries = _directory(table, code, "t", None, top, groups, descending=True, page=64)
    ticket = itertools.count()
    ready: list[tuple[float, int, SealedBatch]] = []  # max-heap on hi of records read
    streams: list[tuple[float, int, _Stream]] = []  # max-heap on the greatest hi a stream can still hold
    entry = next(entries, None)
    while True:  # ends: every pass yields a record, opens a directory entry or reads a page of a partition
        unopened = -math.inf if entry is None else _up((entry[0] + 1) * lay.bucket_s + reach)
        pending = -streams[0][0] if streams else -math.inf
        if ready and -ready[0][0] >= max(unopened, pending):
            b = heapq.heappop(ready)[2]
            if seen is None or b.uid not in seen.hidden:
                yield b
            continue
        if entry is None and not streams:
            return
        if entry is not None and unopened >= pending:
            q, band, group = entry
            for partition in lay.partitions(code, q, band, group):
                s = _Stream(table, partition, lay.band_span(band), below)
                first = min(cap, _up((q + 1) * lay.bucket_s + s.span))
                heapq.heappush(streams, (-first, next(ticket), s))
            entry = next(entries, None)
            continue
        _, _, stream = heapq.heappop(streams)
        if seen is not None:
            seen.look()
        records, bound = stream.read(seen)
        for b in records:
            heapq.heappush(ready, (-b.hi, next(ticket), b))
        if bound is not None:
            heapq.heappush(streams, (-min(cap, bound), next(ticket), stream))


class _Stream:
    """One partition of records read backwards by lo, a page at a time (for :func:`by_hi_desc`)."""

    def __init__(self, table: DynamoTable, pk: str, span: float, below: float | None) -> None:
        self.table, self.pk, self.span, self.below = table, pk, span, below
        self.start: Item | None = None
        self.limit = HI_DESC_FIRST_PAGE  # small first: a caller that wants the newest few reads little

    def read(self, seen: Visibility | None) -> tuple[list[SealedBatch], float | None]:
        """The next page of records ``seen`` shows, and the greatest hi the rest can have (None: nothing left)."""
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
        records = [record_of(i) for i in resp.get("Items", []) if seen is None or seen.shows(i)]
        if not self.start:
            return records, None
        return records, _up(decode_float(self.start["sk"]["S"]) + self.span)


def max_ts(table: DynamoTable) -> float | None:
    """The greatest hi of all batches and segments (one consistent GetItem of the marker commits and swaps raise)."""
    item = table.get({"pk": attr_s("meta"), "sk": attr_s("max_hi")})
    return decode_float(item["hi"]["S"]) if item and "hi" in item else None


def pending_windows(table: DynamoTable, lay: Layout, pool: QueryPool, window_s: int, before: float
                    ) -> list[tuple[int, int]]:
    """(window, group) of every write batch with hi < ``before``: the partitions of ``d#bp``, each skip-read.

    A partition is read one item at a time, jumping to the next window after each batch found, so the cost
    follows the windows waiting for compaction, not their batches; entries whose partitions are empty are pruned.
    """
    if math.isnan(before):
        raise ValueError("before must be a number")
    if before == -math.inf:
        return []
    q_hi = lay.bucket_of(before) if math.isfinite(before) else None
    entries = list(table.query(**_range_kwargs(PENDING_PK, q_hi)))
    found: set[tuple[int, int]] = set()
    for part in pool.map(lambda e: _pending_in(table, lay, e, window_s, before), entries):
        found |= part
    return sorted(found)


def _range_kwargs(pk: str, q_hi: int | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"KeyConditionExpression": "#pk = :p", "ExpressionAttributeNames": {"#pk": "pk"},
                              "ExpressionAttributeValues": {":p": attr_s(pk)}}
    if q_hi is not None:
        kwargs["KeyConditionExpression"] += " AND #sk <= :b"
        kwargs["ExpressionAttributeNames"]["#sk"] = "sk"
        kwargs["ExpressionAttributeValues"][":b"] = attr_s(encode_float(float(q_hi)) + "$")
    return kwargs


def _pending_in(table: DynamoTable, lay: Layout, entry: Item, window_s: int, before: float) -> set[tuple[int, int]]:
    """The (window, group) pairs of one pending entry's partitions; the entry is pruned when they are empty."""
    q, band, group = parse_dir_sk(entry["sk"]["S"], EVERY_GROUP)
    partitions = lay.partitions("b", q, band, group)
    found: set[tuple[int, int]] = set()
    empty = True
    for pk in partitions:
        empty = _skip_read(table, pk, window_s, before, found) and empty
    if empty and float(entry["at"]["N"]) < time.time() - PENDING_LEASE_S - PRUNE_MARGIN_S:
        try:
            table.call("DeleteItem", table.client.delete_item, passthrough=CAS, TableName=table.name,
                       Key={"pk": entry["pk"], "sk": entry["sk"]}, ConditionExpression="#at = :at",
                       ExpressionAttributeNames={"#at": "at"}, ExpressionAttributeValues={":at": entry["at"]})
        except ClientError:
            return found  # a writer put it again meanwhile
        if not all(_skip_read(table, pk, window_s, before, found) for pk in partitions):
            table.put_all([{"pk": entry["pk"], "sk": entry["sk"], "at": {"N": repr(time.time())}}])  # a batch raced
    return found


def _skip_read(table: DynamoTable, pk: str, window_s: int, before: float, found: set[tuple[int, int]]) -> bool:
    """Add the (window, group) of the batches of one partition with hi < ``before``; True if it is empty."""
    after: str | None = None
    empty = True
    while True:  # ends: every read moves ``after`` past the item it read, or finds none
        cond, values = "#pk = :p", {":p": attr_s(pk)}
        if after is not None:
            cond, values[":a"] = cond + " AND #sk > :a", attr_s(after)
        items = table.call("Query", table.client.query, TableName=table.name, ConsistentRead=True, Limit=1,
                           KeyConditionExpression=cond, ProjectionExpression="#sk, #hi, #grp",
                           ExpressionAttributeNames={"#pk": "pk", "#sk": "sk", "#hi": "hi", "#grp": "grp"},
                           ExpressionAttributeValues=values).get("Items", [])
        if not items:
            return empty
        empty = False
        sk = items[0]["sk"]["S"]
        lo, hi = decode_float(sk), decode_float(items[0]["hi"]["S"])
        if lo >= before:
            return False
        after = sk
        if hi < before:
            w = int(lo // window_s)
            found.add((w, group_of(items[0])))
            after = max(sk, encode_float(_down((w + 1) * window_s)))  # on to the next window


def records(table: DynamoTable) -> Iterator[tuple[Kind | Literal["state"], SealedBatch | SealedState]]:
    """Every record, for re-sealing: the one Scan of this backend (consistent, paged; uncommitted segments left out)."""
    start: Item | None = None
    while True:  # ends when a page has no LastEvaluatedKey
        extra: dict[str, Any] = {"ExclusiveStartKey": start} if start else {}
        resp = table.call("Scan", table.client.scan, TableName=table.name, ConsistentRead=True, **extra)
        for item in resp.get("Items", []):
            kind = item["pk"]["S"].split("#", 1)[0]
            if kind in CODE_KIND and "pend" not in item:
                yield CODE_KIND[kind], record_of(item)
            elif kind == "s":
                state = assemble(table, item)
                if state is not None:
                    yield "state", state
        start = resp.get("LastEvaluatedKey")
        if not start:
            return
