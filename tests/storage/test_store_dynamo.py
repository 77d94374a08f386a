"""DynamoDB-specific behaviour of DynamoBatchStore, on a real local DynamoDB server.

Paging, chunked writes, retries, table checks and failures; device groups, device rows, settings, pending
windows, swaps (killed at every step) and tables of layout version 1. Faults (throttling, unprocessed items, a
refused call, a process killed between two calls) are injected by wrapping client methods in the test that
needs them, nowhere else.
"""

from __future__ import annotations

import math
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError
from hypothesis import given
from hypothesis import strategies as st

from components.core.errors import StorageUnavailable
from components.core.settings import StorageSettings
from components.storage.dynamo import (
    GSI_RECEIVED,
    HI_DESC_FIRST_PAGE,
    LAYOUT_VERSION,
    DynamoBatchStore,
    decode_float,
    encode_float,
    shard_of,
)
from components.storage.dynamo import codec as dynamo_codec
from components.storage.dynamo import reads as dynamo_reads
from components.storage.dynamo import swaps as dynamo_swaps
from components.storage.interface import AUDIT, BATCH, SEGMENT, SealedBatch, SealedState
from tests.storage.test_store_contract import rec
from tests.support.store_fixtures import CONTRACT_BUCKET_S, DUMMY_CREDENTIALS, free_port, moto_server

B = CONTRACT_BUCKET_S
INF = math.inf
Fault = Callable[[Callable[..., Any], dict[str, Any]], Any]


class Spy:
    """Wraps one method of a boto3 client: logs (arguments, response) and plays the given faults first."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, client: Any, method: str,
                 faults: Iterator[Fault] | None = None) -> None:
        self.real = getattr(client, method)
        self.faults = faults if faults is not None else iter(())
        self.log: list[tuple[dict[str, Any], Any]] = []
        self._lock = threading.Lock()  # the store reads partitions from several threads
        monkeypatch.setattr(client, method, self)

    def __call__(self, **kwargs: Any) -> Any:
        with self._lock:
            fault = next(self.faults, None)
        try:
            resp = fault(self.real, kwargs) if fault else self.real(**kwargs)
        except ClientError as err:
            resp = err
            raise
        finally:
            with self._lock:
                self.log.append((kwargs, resp))
        return resp


def client_error(code: str, op: str) -> ClientError:
    """The error boto3 raises when DynamoDB answers ``code``."""
    return ClientError({"Error": {"Code": code, "Message": f"injected {code}"}}, op)


def throttled(real: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """A call DynamoDB refused for lack of capacity."""
    raise client_error("ThrottlingException", "BatchWriteItem")


def half_unprocessed(real: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """A BatchWriteItem that wrote the first half of its items and handed the rest back."""
    [(table, requests)] = kwargs["RequestItems"].items()
    half = len(requests) // 2
    real(RequestItems={table: requests[:half]})
    return {"UnprocessedItems": {table: requests[half:]}}


def table_items(admin: Any, table: str, prefix: str) -> list[dict[str, Any]]:
    """Items of ``table`` whose pk starts with ``prefix`` (a Scan from the test's side)."""
    items: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {"TableName": table, "ConsistentRead": True}
    for _ in range(1000):  # bounded: far more pages than any test writes
        page = admin.scan(**kwargs)
        items += [i for i in page["Items"] if i["pk"]["S"].startswith(prefix)]
        if "LastEvaluatedKey" not in page:
            return items
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
    raise AssertionError("scan did not end")


def uids_of_shard(shard: int, shards: int, n: int) -> list[str]:
    """``n`` uids that land in ``shard``."""
    found = [u for u in (f"{i:032x}" for i in range(64 * n)) if shard_of(u, shards) == shard][:n]
    assert len(found) == n
    return found


def test_a_query_follows_last_evaluated_key_past_one_megabyte(dynamo_store: DynamoBatchStore,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # five 300 KB records in one partition: DynamoDB returns at most 1 MB per Query page
    records = [rec(10.0 + i, 10.5 + i, uid=u, body=os.urandom(300_000))
               for i, u in enumerate(uids_of_shard(0, dynamo_store.layout.shards, 5))]
    dynamo_store.commit(records, [])
    spy = Spy(monkeypatch, dynamo_store.client, "query")
    assert dynamo_store.batches_by_ts(0.0, 100.0) == records
    pages = [(c, r) for c, r in spy.log if c["ExpressionAttributeValues"][":p"]["S"] == "b#0#0#0"]
    assert len(pages) >= 2
    assert "LastEvaluatedKey" in pages[0][1]
    assert pages[1][0]["ExclusiveStartKey"] == pages[0][1]["LastEvaluatedKey"]
    assert [r.hi for r in dynamo_store.batches_by_hi_desc()] == [r.hi for r in reversed(records)]
    assert dynamo_store.batches_by_received(-INF, INF) == records
    scans = Spy(monkeypatch, dynamo_store.client, "scan")
    assert sorted(x.uid for _, x in dynamo_store.records() if isinstance(x, SealedBatch)) == sorted(
        r.uid for r in records)
    assert len(scans.log) >= 2


def test_a_commit_of_26_batches_is_written_as_chunks_of_25_and_1(dynamo_store: DynamoBatchStore,
                                                               dynamo_settings: StorageSettings,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    dynamo_store.commit([rec(1.0, 1.5)], [])  # the bucket's directory entries exist from now on
    spy = Spy(monkeypatch, dynamo_store.client, "batch_write_item")
    batches = [rec(2.0 + i, 2.5 + i) for i in range(26)]
    assert dynamo_store.commit(batches, []) == sum(len(b.body) for b in batches)
    assert [len(c["RequestItems"][dynamo_settings.dynamodb_table]) for c, _ in spy.log] == [25, 1]
    assert len(dynamo_store.batches_by_ts(-INF, INF)) == 27


def test_throttling_and_unprocessed_items_are_retried_and_each_batch_stored_once(
        dynamo_store: DynamoBatchStore, monkeypatch: pytest.MonkeyPatch) -> None:
    first = rec(1.0, 1.5)
    dynamo_store.commit([first], [])
    spy = Spy(monkeypatch, dynamo_store.client, "batch_write_item", iter([throttled, half_unprocessed]))
    batches = [rec(2.0 + i, 2.5 + i) for i in range(10)]
    assert dynamo_store.commit(batches, []) == sum(len(b.body) for b in batches)
    assert [type(r).__name__ for _, r in spy.log][:1] == ["ClientError"]
    assert len(spy.log) == 3  # throttled, half written, the rest
    assert len(spy.log[2][0]["RequestItems"][dynamo_store._table]) == 5
    stored = [x.uid for _, x in dynamo_store.records() if isinstance(x, SealedBatch)]
    assert sorted(stored) == sorted([first.uid] + [b.uid for b in batches])
    reads = Spy(monkeypatch, dynamo_store.client, "get_item", iter([throttled]))
    assert dynamo_store.max_ts() == batches[-1].hi
    assert len(reads.log) == 2


def test_throttling_that_does_not_stop_gives_up_within_the_retry_budget(
        dynamo_store: DynamoBatchStore, monkeypatch: pytest.MonkeyPatch) -> None:
    dynamo_store.retry_budget_s = 0.5
    always: Iterator[Fault] = iter(lambda: throttled, None)  # an endless supply of throttling
    spy = Spy(monkeypatch, dynamo_store.client, "batch_write_item", always)
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match="throttling") as info:
        dynamo_store.commit([rec(1.0, 2.0)], [])
    assert time.monotonic() - started < 3.0
    assert len(spy.log) >= 2
    assert isinstance(info.value.__cause__, ClientError)


def test_a_missing_table_is_refused_with_how_to_allow_creation_when_creation_is_off(
        dynamo_settings: StorageSettings, dynamodb_admin: Any) -> None:
    settings = replace(dynamo_settings, dynamodb_create_table=False)
    with pytest.raises(StorageUnavailable) as info:
        DynamoBatchStore(settings)
    message = str(info.value)
    assert settings.dynamodb_table in message and "does not exist" in message
    assert "storage.dynamodb_create_table" in message and "IOT_STORAGE_DYNAMODB_CREATE_TABLE=true" in message
    assert isinstance(info.value.__cause__, ClientError)
    assert settings.dynamodb_table not in dynamodb_admin.list_tables()["TableNames"]


def test_a_missing_table_is_created_on_demand_with_its_keys_and_arrival_index(
        dynamo_store: DynamoBatchStore, dynamo_settings: StorageSettings, dynamodb_admin: Any) -> None:
    table = dynamodb_admin.describe_table(TableName=dynamo_settings.dynamodb_table)["Table"]
    assert table["TableStatus"] == "ACTIVE"
    assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    assert [(k["AttributeName"], k["KeyType"]) for k in table["KeySchema"]] == [("pk", "HASH"), ("sk", "RANGE")]
    [gsi] = table["GlobalSecondaryIndexes"]
    assert gsi["IndexName"] == GSI_RECEIVED
    assert [(k["AttributeName"], k["KeyType"]) for k in gsi["KeySchema"]] == [("gpk", "HASH"), ("gsk", "RANGE")]
    assert gsi["Projection"] == {"ProjectionType": "INCLUDE", "NonKeyAttributes": ["rh"]}
    again = DynamoBatchStore(dynamo_settings)  # a second process opens the table it finds
    again.close()


def test_a_table_with_another_key_schema_is_refused_naming_expected_and_found(
        dynamo_settings: StorageSettings, dynamodb_admin: Any) -> None:
    dynamodb_admin.create_table(TableName=dynamo_settings.dynamodb_table, BillingMode="PAY_PER_REQUEST",
                                KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
                                AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}])
    with pytest.raises(StorageUnavailable) as info:
        DynamoBatchStore(dynamo_settings)
    message = str(info.value)
    assert "expected key schema [pk HASH S, sk RANGE S]" in message
    assert "found [id HASH S]" in message and dynamo_settings.dynamodb_table in message


def test_a_table_without_the_arrival_index_is_refused(dynamo_settings: StorageSettings, dynamodb_admin: Any) -> None:
    dynamodb_admin.create_table(TableName=dynamo_settings.dynamodb_table, BillingMode="PAY_PER_REQUEST",
                                KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"},
                                           {"AttributeName": "sk", "KeyType": "RANGE"}],
                                AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"},
                                                      {"AttributeName": "sk", "AttributeType": "S"}])
    with pytest.raises(StorageUnavailable, match=f"index {GSI_RECEIVED} \\[gpk HASH S, gsk RANGE S\\].*found.*"
                                                 f"index {GSI_RECEIVED} \\[none\\]"):
        DynamoBatchStore(dynamo_settings)


def test_an_unreachable_endpoint_fails_within_a_few_seconds(dynamo_settings: StorageSettings) -> None:
    port = free_port()  # nothing listens there
    settings = replace(dynamo_settings, dynamodb_endpoint_url=f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match=f"cannot reach DynamoDB at http://127.0.0.1:{port}") as info:
        DynamoBatchStore(settings)
    assert time.monotonic() - started < 5.0
    assert isinstance(info.value.__cause__, EndpointConnectionError)


def test_missing_credentials_are_reported_as_storage_unavailable(dynamo_settings: StorageSettings,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match="no AWS credentials found") as info:
        DynamoBatchStore(dynamo_settings)
    assert time.monotonic() - started < 5.0
    assert isinstance(info.value.__cause__, NoCredentialsError)


def test_a_refused_call_becomes_storage_unavailable_that_names_the_problem_and_keeps_the_cause(
        dynamo_store: DynamoBatchStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(real: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        raise client_error("AccessDeniedException", "GetItem")

    Spy(monkeypatch, dynamo_store.client, "get_item", iter([denied]))
    with pytest.raises(StorageUnavailable, match=r"AccessDeniedException.*check the AWS credentials") as info:
        dynamo_store.max_ts()
    assert isinstance(info.value.__cause__, ClientError)
    assert DUMMY_CREDENTIALS["aws_secret_access_key"] not in str(info.value)


def test_a_body_over_max_body_bytes_is_refused_before_dynamodb_sees_it(
        dynamo_store: DynamoBatchStore, monkeypatch: pytest.MonkeyPatch) -> None:
    limit = dynamo_store.max_body_bytes
    assert limit is not None and 300_000 < limit < 400 * 1024
    too_big = rec(1.0, 2.0, body=os.urandom(limit + 1))
    writes = Spy(monkeypatch, dynamo_store.client, "batch_write_item")
    with pytest.raises(StorageUnavailable, match=f"limit of {limit} bytes"):
        dynamo_store.commit([rec(0.0, 0.5), too_big], [])
    with pytest.raises(StorageUnavailable, match=f"limit of {limit} bytes"):
        dynamo_store.append_audit(too_big)
    assert writes.log == []
    assert dynamo_store.batches_by_ts(-INF, INF) == []
    fitting = rec(3.0, 4.0, body=os.urandom(limit))
    dynamo_store.commit([fitting], [])
    assert dynamo_store.batches_by_ts(-INF, INF) == [fitting]
    with pytest.raises(StorageUnavailable, match=f"limit of {limit} bytes"):
        dynamo_store.replace(BATCH, fitting, replace(fitting, body=too_big.body))


def test_the_batches_of_one_bucket_spread_over_every_write_shard(
        dynamo_store: DynamoBatchStore, dynamo_settings: StorageSettings, dynamodb_admin: Any) -> None:
    batches = [rec(10.0 + i * 0.1, 10.05 + i * 0.1, uid=f"{i:032x}") for i in range(40)]
    dynamo_store.commit(batches, [])
    items = table_items(dynamodb_admin, dynamo_settings.dynamodb_table, "b#")
    assert len(items) == 40
    assert {i["pk"]["S"] for i in items} == {f"b#0#0#{s}" for s in range(dynamo_store.layout.shards)}
    assert dynamo_store.layout.shards >= 4
    assert len({i["gpk"]["S"] for i in items}) == dynamo_store.layout.shards  # the arrival index spreads too


def queried(spy: Spy) -> dict[str, list[str]]:
    """The partitions a spy on ``query`` saw, by what they hold: directory, swap intents, records."""
    out: dict[str, list[str]] = {"directory": [], "intents": [], "records": []}
    for call, _ in spy.log:
        pk = call["ExpressionAttributeValues"][":p"]["S"]
        out["directory" if pk.startswith("d#") else "intents" if pk.split("#")[0] == "x" else "records"].append(pk)
    return out


def test_a_window_costs_three_directory_queries_two_intent_queries_and_one_per_shard_and_never_scans(
        dynamo_store: DynamoBatchStore, monkeypatch: pytest.MonkeyPatch) -> None:
    batches = [rec(3 * B + i, 3 * B + i + 0.5) for i in range(20)]
    dynamo_store.commit(batches, [])
    queries = Spy(monkeypatch, dynamo_store.client, "query")
    scans = Spy(monkeypatch, dynamo_store.client, "scan")
    gets = Spy(monkeypatch, dynamo_store.client, "batch_get_item")
    assert dynamo_store.batches_by_ts(3 * B + 5, 3 * B + 9) == batches[5:10]
    seen = queried(queries)
    assert sorted(seen["directory"]) == ["d#bt", "d#bt#any", "d#bt#bands"]  # group 0's, every other group's
    assert seen["intents"] == ["x", "x"]  # before and after: a swap that committed meanwhile is noticed
    assert sorted(seen["records"]) == [f"b#3#0#{s}" for s in range(dynamo_store.layout.shards)]
    assert all(c["ConsistentRead"] is True for c, _ in queries.log)
    queries.log.clear()
    assert dynamo_store.batches_by_received(3 * B + 6.5, 3 * B + 10.5) == batches[5:10]
    on_index = [c for c, _ in queries.log if c.get("IndexName") == GSI_RECEIVED]
    assert len(on_index) == dynamo_store.layout.shards
    assert not any(c["ConsistentRead"] for c in on_index)  # a GSI cannot be read consistently
    assert gets.log and all(c["RequestItems"][dynamo_store._table]["ConsistentRead"] for c, _ in gets.log)
    assert scans.log == []


def test_the_newest_batch_is_found_reading_a_few_pages_not_the_store(
        dynamo_store: DynamoBatchStore, monkeypatch: pytest.MonkeyPatch) -> None:
    batches = [rec(i * 0.15, i * 0.15 + 0.1) for i in range(600)]
    dynamo_store.commit(batches, [])
    queries = Spy(monkeypatch, dynamo_store.client, "query")
    newest = next(dynamo_store.batches_by_hi_desc())
    assert newest == batches[-1]
    read = sum(len(r["Items"]) for c, r in queries.log if c["ExpressionAttributeValues"][":p"]["S"].startswith("b#"))
    assert read < 150  # of 600
    assert min(c["Limit"] for c, _ in queries.log if "Limit" in c) <= HI_DESC_FIRST_PAGE


def test_a_store_opened_with_another_bucket_size_keeps_the_tables_layout(dynamo_settings: StorageSettings) -> None:
    first = DynamoBatchStore(dynamo_settings)
    old = rec(250.0, 251.0)
    first.commit([old], [])
    second = DynamoBatchStore(replace(dynamo_settings, bucket_seconds=3600))
    try:
        assert second.layout == first.layout
        assert second.batches_by_ts(200.0, 300.0) == [old]
        new = rec(420.0, 421.0)
        second.commit([new], [])
        assert first.batches_by_ts(0.0, 1000.0) == [old, new]
    finally:
        first.close()
        second.close()


def test_replacing_large_states_leaves_no_parts_behind(dynamo_store: DynamoBatchStore,
                                                       dynamo_settings: StorageSettings, dynamodb_admin: Any) -> None:
    limit = dynamo_store.max_body_bytes
    assert limit is not None
    a = SealedState("storage/0-of-1", "k0", os.urandom(3 * limit))
    b = SealedState(a.name, "k0", os.urandom(2 * limit + 1))
    dynamo_store.commit([], [a])
    dynamo_store.commit([], [b])
    assert len(table_items(dynamodb_admin, dynamo_settings.dynamodb_table, "p#")) == 3
    assert not dynamo_store.replace("state", a, SealedState(a.name, "k1", os.urandom(4 * limit)))  # a is stale
    assert len(table_items(dynamodb_admin, dynamo_settings.dynamodb_table, "p#")) == 3
    assert dynamo_store.replace("state", b, SealedState(b.name, "k1", b"small now"))
    assert table_items(dynamodb_admin, dynamo_settings.dynamodb_table, "p#") == []
    assert dynamo_store.states("") == [SealedState(a.name, "k1", b"small now")]


def test_audit_chunks_stay_out_of_the_arrival_index(dynamo_store: DynamoBatchStore, dynamo_settings: StorageSettings,
                                                    dynamodb_admin: Any) -> None:
    dynamo_store.append_audit(rec(1.0, 2.0))
    [item] = table_items(dynamodb_admin, dynamo_settings.dynamodb_table, "a#")
    assert "gpk" not in item and "gsk" not in item
    assert len(dynamo_store.batches_by_ts(0.0, 5.0, kind=AUDIT)) == 1


@given(st.floats(allow_nan=False), st.floats(allow_nan=False))
def test_the_float_encoding_keeps_order_and_every_bit(a: float, b: float) -> None:
    for x in (a, b):
        assert struct.pack(">d", decode_float(encode_float(x))) == struct.pack(">d", x)
    if a < b:
        assert encode_float(a) < encode_float(b)
    assert len(encode_float(a)) == 16


def test_the_moto_fallback_server_serves_the_store_too(dynamo_settings: StorageSettings) -> None:
    # the fixture uses moto only where Java is missing; this keeps that path working where Java is present
    servers = moto_server()
    server = next(servers)
    try:
        store = DynamoBatchStore(replace(dynamo_settings, dynamodb_endpoint_url=server.endpoint))
        try:
            batch = rec(10.0, 11.0)
            state = SealedState("storage/0-of-1", "k0", os.urandom(500_000))
            store.commit([batch], [state])
            assert store.batches_by_ts(0.0, 20.0) == [batch]
            assert store.batches_by_received(-INF, INF) == [batch]
            assert store.states("storage/") == [state]
            assert store.max_ts() == 11.0
        finally:
            store.close()
    finally:
        servers.close()
    assert server.flavour == "moto"


def test_a_record_spanning_into_later_buckets_is_found_from_each(dynamo_store: DynamoBatchStore) -> None:
    long = rec(B - 1.0, 4 * B + 50.0)  # starts in bucket 0, ends in bucket 4
    short = rec(3 * B + 1.0, 3 * B + 2.0)
    dynamo_store.commit([short, long], [])
    for start in (B - 1.0, 2 * B + 10.0, 4 * B + 50.0):
        assert long.uid in [r.uid for r in dynamo_store.batches_by_ts(start, start + 1.0)]
    assert dynamo_store.batches_by_ts(4 * B + 50.5, 5 * B) == []
    assert dynamo_store.batches_by_ts(20 * B, 2 * B) == []  # backwards: no key range DynamoDB would refuse
    assert [r.uid for r in dynamo_store.batches_by_hi_desc()] == [long.uid, short.uid]


def test_sealed_batches_keep_every_field(dynamo_store: DynamoBatchStore) -> None:
    batch = SealedBatch("0123abcd", 17, 1700.5, 1701.25, 1702.0, 1703.0, 123_456, "key-7", b"", 2)
    dynamo_store.commit([batch], [])
    assert dynamo_store.batches_by_ts(-INF, INF) == [batch]


# ---- device groups, segments, swaps, named records, settings, layout version 1

def grec(lo: float, hi: float, group: int, **kwargs: Any) -> SealedBatch:
    """A write batch of one device group."""
    return replace(rec(lo, hi, **kwargs), group=group)


def seg(records: list[SealedBatch], group: int, window: int) -> SealedBatch:
    """A segment of ``records`` (its bounds theirs), as the compactor would seal it."""
    return SealedBatch(os.urandom(16).hex(), window, min(r.lo for r in records), max(r.hi for r in records),
                       min(r.rec_lo for r in records), max(r.rec_hi for r in records),
                       sum(r.count for r in records), "k0", os.urandom(200), 2, group)


class Killed(BaseException):
    """The process stopped between two calls (not an Exception: nothing on the way catches it)."""


class Kill:
    """Counts a client's calls and kills the process at call number ``at`` (None: never); every later call dies."""

    METHODS = ("query", "get_item", "batch_get_item", "put_item", "update_item", "delete_item", "batch_write_item",
               "transact_write_items")

    def __init__(self, monkeypatch: pytest.MonkeyPatch, client: Any, at: int | None) -> None:
        self.at, self.calls = at, 0
        self._lock = threading.Lock()
        for name in self.METHODS:
            monkeypatch.setattr(client, name, self._wrap(getattr(client, name)))

    def _wrap(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(**kwargs: Any) -> Any:
            with self._lock:
                n, self.calls = self.calls, self.calls + 1
            if self.at is not None and n >= self.at:
                raise Killed(f"killed at call {n}")
            return real(**kwargs)
        return call


def shown(store: DynamoBatchStore, group: int, start: float, end: float) -> set[str]:
    """The uids of the batches and segments of ``group`` every read shows in [start, end] (all reads agree)."""
    views = []
    for read in (store.batches_by_ts, store.batches_by_received):
        views.append({r.uid for kind in (BATCH, SEGMENT) for r in read(start, end, kind, (group,))})
    views.append({r.uid for kind in (BATCH, SEGMENT) for r in store.batches_by_hi_desc(end + 10, kind, (group,))
                  if r.hi >= start})
    views.append({r.uid for kind in (BATCH, SEGMENT) for r in store.batches_by_ts(start, end, kind)})
    assert all(v == views[0] for v in views), views
    return views[0]


def leftovers(admin: Any, table: str) -> tuple[list[str], list[str]]:
    """Segments still marked by a swap, and the statuses of swap intents that are not done."""
    items = table_items(admin, table, "")
    return ([i["sk"]["S"] for i in items if "pend" in i],
            [i["st"]["S"] for i in items if i["pk"]["S"] == "x" and i["st"]["S"] != "done"])


def test_a_swap_killed_between_any_two_calls_shows_old_or_new_and_the_next_swap_or_open_finishes_it(
        dynamo_settings: StorageSettings, dynamodb_admin: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    table = dynamo_settings.dynamodb_table
    setup = DynamoBatchStore(dynamo_settings)
    total: int | None = None
    at = 0
    outcomes = []
    try:
        while total is None or at <= total:  # at = total: the swap finishes before the kill
            group, w = 7, at  # one group (a later swap of it undoes a pending intent), a window per run
            first = [grec(w * 50 + i, w * 50 + i + 0.5, group) for i in range(6)]
            setup.commit(first, [])
            earlier = seg(first[:3], group, w)  # a segment of an earlier pass, folded in again
            assert setup.swap(first[:3], [earlier])
            old = [*first[3:], earlier]
            new = [seg(old, group, w)]
            victim = DynamoBatchStore(dynamo_settings)
            kill = Kill(monkeypatch, victim.client, None if total is None else at)
            try:
                assert victim.swap(old, new)
                killed = False
            except Killed:
                killed = True
            finally:
                victim.close()
            if total is None:
                total = kill.calls
                assert total >= 8  # recovery, check, intent, parts, segments, transaction, deletes, done
            window = (w * 50.0, w * 50.0 + 49.0)
            reader = DynamoBatchStore(dynamo_settings)  # opening it finishes a committed swap
            try:
                now = shown(reader, group, *window)
                assert now in ({r.uid for r in old}, {r.uid for r in new}), at
                outcomes.append(now == {r.uid for r in new})
                pend, open_intents = leftovers(dynamodb_admin, table)
                assert "committed" not in open_intents  # finished at open
                if not killed:
                    assert (pend, open_intents) == ([], [])
                current = new if outcomes[-1] else old
                after = [seg(current, group, w)]
                assert reader.swap(current, after)  # the next swap of the group undoes a pending one first
                assert shown(reader, group, *window) == {after[0].uid}
                assert leftovers(dynamodb_admin, table) == ([], [])
                stale = [i for i in table_items(dynamodb_admin, table, "b#") if i["uid"]["S"] in
                         {r.uid for r in old}] + [i for i in table_items(dynamodb_admin, table, "c#")
                                                  if i["uid"]["S"] in {r.uid for r in (*old, *new)}]
                assert stale == []  # nothing of either swap is left behind
            finally:
                reader.close()
            at += 1
    finally:
        setup.close()
    assert False in outcomes and True in outcomes  # killed before the commit, and after it


def test_a_pending_swap_found_at_store_open_is_undone_only_once_it_is_stale(
        dynamo_settings: StorageSettings, dynamodb_admin: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    setup = DynamoBatchStore(dynamo_settings)
    old = [grec(10.0 + i, 10.5 + i, 4) for i in range(3)]
    setup.commit(old, [])
    victim = DynamoBatchStore(dynamo_settings)
    Kill(monkeypatch, victim.client, 6)  # after the intent, its parts and the pending segment are put
    with pytest.raises(Killed):
        victim.swap(old, [seg(old, 4, 0)])
    table = dynamo_settings.dynamodb_table
    assert leftovers(dynamodb_admin, table)[1] == ["pending"]
    DynamoBatchStore(dynamo_settings).close()  # another process may still own a young pending swap
    assert leftovers(dynamodb_admin, table)[1] == ["pending"]
    later = time.time() + dynamo_swaps.STALE_PENDING_S + 1
    monkeypatch.setattr(dynamo_swaps.time, "time", lambda: later)
    DynamoBatchStore(dynamo_settings).close()
    assert leftovers(dynamodb_admin, table) == ([], [])
    assert shown(setup, 4, 0.0, 50.0) == {r.uid for r in old}
    setup.close()


def test_a_read_during_which_a_swap_commits_is_read_again(dynamo_store: DynamoBatchStore,
                                                          dynamo_settings: StorageSettings,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    old = [grec(10.0, 11.0, 3)]
    dynamo_store.commit(old, [])
    first = seg(old, 3, 0)
    assert dynamo_store.swap(old, [first])
    new = replace(seg([first], 4, 0), lo=first.lo)  # into another group's partition: a read sees two partitions
    other = DynamoBatchStore(dynamo_settings)
    real = dynamo_store.client.query
    swapped: list[bool] = []
    intent_reads: list[str] = []

    def query(**kwargs: Any) -> Any:
        pk = kwargs["ExpressionAttributeValues"][":p"]["S"]
        intent_reads.extend([pk] if pk == "x" else [])
        resp = real(**kwargs)
        if pk.startswith("c#") and not swapped:  # between the Queries of the two partitions
            swapped.append(other.swap([first], [new]))
        return resp

    monkeypatch.setattr(dynamo_store.client, "query", query)
    try:
        assert dynamo_store.batches_by_ts(0.0, 100.0, SEGMENT, (3, 4)) == [new]
        assert swapped == [True]
        assert len(intent_reads) == 4  # a look before and after, twice
    finally:
        other.close()


def test_a_grouped_read_queries_only_the_partitions_of_its_groups(dynamo_store: DynamoBatchStore,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    by_group = {g: [grec(3 * B + i + g / 10, 3 * B + i + g / 10 + 0.05, g) for i in range(3)] for g in range(6)}
    dynamo_store.commit([b for g in sorted(by_group) for b in by_group[g]], [])
    queries = Spy(monkeypatch, dynamo_store.client, "query")
    assert dynamo_store.batches_by_ts(3 * B, 4 * B, BATCH, (3,)) == by_group[3]
    seen = queried(queries)
    assert sorted(seen["directory"]) == ["d#bt#bands", "d#bt#g3"]
    assert seen["records"] == ["b#3#0#g3"]
    queries.log.clear()
    assert dynamo_store.batches_by_ts(3 * B, 4 * B, BATCH, (0, 3)) == sorted(by_group[0] + by_group[3],
                                                                            key=lambda b: b.lo)
    assert sorted(queried(queries)["records"]) == sorted(["b#3#0#g3"] + [f"b#3#0#{s}" for s in range(4)])
    queries.log.clear()
    assert {b.uid for b in dynamo_store.batches_by_received(-INF, INF, BATCH, (5,))} == {b.uid for b in by_group[5]}
    assert queried(queries)["records"] == ["r#3#0#g5"]  # on the arrival index: the group's partition only
    queries.log.clear()
    assert [b.uid for b in dynamo_store.batches_by_hi_desc(None, BATCH, (2,))] == [b.uid for b in by_group[2][::-1]]
    assert set(queried(queries)["records"]) == {"b#3#0#g2"}
    assert dynamo_store.batches_by_ts(-INF, INF, BATCH, (9,)) == []
    assert len(dynamo_store.batches_by_ts(-INF, INF)) == 18


def test_segments_have_their_partitions_and_index_and_are_listed_replaced_and_refused_when_too_big(
        dynamo_store: DynamoBatchStore, dynamo_settings: StorageSettings, dynamodb_admin: Any) -> None:
    batches = [grec(5.0, 6.0, 9), grec(7.0, 8.0, 9)]
    dynamo_store.commit(batches, [])
    segment = seg(batches, 9, 0)
    assert dynamo_store.swap(batches, [segment])
    [item] = table_items(dynamodb_admin, dynamo_settings.dynamodb_table, "c#")
    assert (item["pk"]["S"], item["gpk"]["S"], item["grp"]["N"]) == ("c#0#0#g9", "rc#0#0#g9", "9")
    assert dynamo_store.batches_by_ts(0.0, 10.0) == []
    assert dynamo_store.batches_by_ts(0.0, 10.0, SEGMENT) == [segment]
    assert dynamo_store.batches_by_received(-INF, INF, SEGMENT, (9,)) == [segment]
    assert dynamo_store.max_ts() == 8.0
    assert [(k, x) for k, x in dynamo_store.records()] == [("segment", segment)]
    resealed = replace(segment, key_id="k1", body=b"resealed")
    assert dynamo_store.replace(SEGMENT, segment, resealed)
    assert not dynamo_store.replace(SEGMENT, segment, resealed)
    assert dynamo_store.batches_by_ts(0.0, 10.0, SEGMENT, (9,)) == [resealed]
    limit = dynamo_store.max_body_bytes
    assert limit is not None
    with pytest.raises(StorageUnavailable, match=f"segment .* limit of {limit} bytes"):
        dynamo_store.swap([resealed], [replace(seg([resealed], 9, 0), body=os.urandom(limit + 1))])
    with pytest.raises(ValueError, match="at most 99 segments"):
        dynamo_store.swap([resealed], [seg([resealed], 9, 0) for _ in range(100)])
    assert dynamo_store.batches_by_ts(0.0, 10.0, SEGMENT) == [resealed]  # neither swap changed anything
    assert dynamo_store.swap([batches[0]], [seg(batches, 9, 0)]) is False  # one of old is gone


def test_a_commit_of_1000_device_rows_uses_batch_writes_and_they_read_back_by_prefix_and_name(
        dynamo_store: DynamoBatchStore, dynamo_settings: StorageSettings, dynamodb_admin: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [SealedState(f"device/{os.urandom(16).hex()}", "k0", os.urandom(300)) for _ in range(1000)]
    counters = SealedState("storage/0-of-1", "k0", os.urandom(2000))
    writes = Spy(monkeypatch, dynamo_store.client, "batch_write_item")
    puts = Spy(monkeypatch, dynamo_store.client, "put_item")
    assert dynamo_store.commit([], [*rows, counters]) == 1000 * 300 + 2000
    table = dynamo_settings.dynamodb_table
    sizes = [len(c["RequestItems"][table]) for c, _ in writes.log]
    assert sizes[-40:] == [25] * 40  # after the one directory entry of the counters record
    assert sum(sizes) == 1001
    assert len(puts.log) == 1  # the counters record
    directory = table_items(dynamodb_admin, table, "sd")
    assert [i["sk"]["S"] for i in directory] == ["n:storage/0-of-1"]  # no entry per device
    assert len({i["pk"]["S"] for i in table_items(dynamodb_admin, table, "s#device/")}) == 16
    queries = Spy(monkeypatch, dynamo_store.client, "query")
    assert dynamo_store.states("device/") == sorted(rows, key=lambda s: s.name)
    assert len(queries.log) == 17  # 16 row partitions and the sd directory
    assert dynamo_store.states("storage/") == [counters]
    assert sorted(dynamo_store.states(""), key=lambda s: s.name) == sorted([*rows, counters], key=lambda s: s.name)
    assert dynamo_store.states(rows[0].name[:9]) == sorted((r for r in rows if r.name.startswith(rows[0].name[:9])),
                                                           key=lambda s: s.name)
    gets = Spy(monkeypatch, dynamo_store.client, "batch_get_item")
    wanted = [r.name for r in rows[:250]] + ["device/0000", "storage/9-of-9"]
    got = dynamo_store.get_states(wanted)
    assert sorted(got, key=lambda s: s.name) == sorted(rows[:250], key=lambda s: s.name)
    assert len(gets.log) == 3 and all(c["RequestItems"][table]["ConsistentRead"] for c, _ in gets.log)
    newer = SealedState(rows[0].name, "k1", b"newer")
    assert dynamo_store.replace("state", rows[0], newer)
    assert not dynamo_store.replace("state", rows[0], newer)
    assert dynamo_store.get_states([rows[0].name]) == [newer]
    listed = {x.name for k, x in dynamo_store.records() if isinstance(x, SealedState)}
    assert listed == {r.name for r in rows} | {counters.name}


def test_setting_is_the_first_writers_value_in_every_store_instance(dynamo_settings: StorageSettings) -> None:
    first, second = DynamoBatchStore(dynamo_settings), DynamoBatchStore(dynamo_settings)
    try:
        assert second.setting("device_tag_bits", "8") == "8"
        assert first.setting("device_tag_bits", "12") == "8"
        assert first.setting("other", "x") == "x"
        third = DynamoBatchStore(dynamo_settings)
        assert third.setting("device_tag_bits", "4") == "8" and third.setting("other", "y") == "x"
        third.close()
    finally:
        first.close()
        second.close()


def test_pending_windows_skip_read_and_the_entries_of_emptied_partitions_are_pruned_after_the_lease(
        dynamo_settings: StorageSettings, dynamodb_admin: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    store = DynamoBatchStore(dynamo_settings)
    table = dynamo_settings.dynamodb_table
    batches = [grec(i * 0.5, i * 0.5 + 0.2, 5) for i in range(200)] + [grec(30.0, 30.5, 0), grec(99.0, 99.5, 6)]
    store.commit(batches, [])
    queries = Spy(monkeypatch, store.client, "query")
    assert store.pending_windows(10, 99.0) == sorted([(w, 5) for w in range(10)] + [(3, 0)])  # (9, 6) ends later
    items_read = sum(len(r["Items"]) for c, r in queries.log if c["ExpressionAttributeValues"][":p"]["S"] != "d#bp")
    assert items_read < 40  # one per window found (and one at each partition's end), not one per batch
    assert store.pending_windows(10, INF)[-1] == (9, 6)
    assert store.swap(batches[:200], [seg(batches[:200], 5, 0)])
    assert store.pending_windows(10, INF) == [(3, 0), (9, 6)]
    assert len(table_items(dynamodb_admin, table, "d#bp")) == 3  # within the lease: kept
    store.close()
    later = time.time() + 10_000
    monkeypatch.setattr(dynamo_reads.time, "time", lambda: later)
    store = DynamoBatchStore(dynamo_settings)
    try:
        assert store.pending_windows(10, INF) == [(3, 0), (9, 6)]
        assert sorted(i["sk"]["S"].split("#", 1)[1] for i in table_items(dynamodb_admin, table, "d#bp")) == [
            "0#00#0", "0#00#6"]  # group 5's partition is empty: its entry is gone
        late = grec(4.0, 4.1, 5)  # a late batch for the compacted window: the writer puts the entry again
        store.commit([late], [])
        assert store.pending_windows(10, INF) == [(0, 5), (3, 0), (9, 6)]
    finally:
        store.close()


def _v1_record(code: str, b: SealedBatch, shards: int) -> dict[str, Any]:
    """A record item as layout version 1 wrote it (no group, a shard always)."""
    q, band = int(b.lo // B), 0
    item: dict[str, Any] = {
        "pk": {"S": f"{code}#{q}#{band}#{shard_of(b.uid, shards)}"}, "sk": {"S": f"{encode_float(b.lo)}#{b.uid}"},
        "uid": {"S": b.uid}, "bucket": {"N": str(b.bucket)}, "lo": {"S": encode_float(b.lo)},
        "hi": {"S": encode_float(b.hi)}, "rl": {"S": encode_float(b.rec_lo)}, "rh": {"S": encode_float(b.rec_hi)},
        "n": {"N": str(b.count)}, "k": {"S": b.key_id}, "f": {"N": str(b.fmt)}, "v": {"B": b.body},
        "h": {"S": dynamo_codec.digest(b.key_id, b.body)}}
    if code == "b":
        item.update(gpk={"S": f"r#{int(b.rec_lo // B)}#0#{shard_of(b.uid, shards)}"},
                    gsk={"S": f"{encode_float(b.rec_lo)}#{b.uid}"})
    return item


def _v1_table(admin: Any, table: str, batches: list[SealedBatch], audit: SealedBatch, state: SealedState) -> None:
    """A table as the version before device groups left it."""
    keys = [{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}]
    admin.create_table(TableName=table, BillingMode="PAY_PER_REQUEST", KeySchema=keys,
                       AttributeDefinitions=[{"AttributeName": a, "AttributeType": "S"} for a in ("gpk", "gsk", "pk",
                                                                                                   "sk")],
                       GlobalSecondaryIndexes=[{"IndexName": GSI_RECEIVED, "KeySchema": [
                           {"AttributeName": "gpk", "KeyType": "HASH"}, {"AttributeName": "gsk", "KeyType": "RANGE"}],
                           "Projection": {"ProjectionType": "INCLUDE", "NonKeyAttributes": ["rh"]}}])
    items: list[dict[str, Any]] = [
        {"pk": {"S": "meta"}, "sk": {"S": "layout"}, "layout": {"N": "1"}, "shards": {"N": "4"},
         "bucket_seconds": {"N": str(B)}},
        {"pk": {"S": "meta"}, "sk": {"S": "max_hi"}, "hi": {"S": encode_float(max(b.hi for b in batches))}},
        {"pk": {"S": "sd"}, "sk": {"S": f"n:{state.name}"}, "name": {"S": state.name}},
        {"pk": {"S": f"s#{state.name}"}, "sk": {"S": "state"}, "name": {"S": state.name}, "k": {"S": state.key_id},
         "h": {"S": dynamo_codec.digest(state.key_id, state.body)}, "v": {"B": state.body}},
        _v1_record("a", audit, 4)]
    items += [_v1_record("b", b, 4) for b in batches]
    for code, axis, bound in [("b", "t", "lo"), ("b", "r", "rec_lo"), ("a", "t", "lo")]:
        for q in {int(getattr(r, bound) // B) for r in (batches if code == "b" else [audit])}:
            items.append({"pk": {"S": f"d#{code}{axis}"}, "sk": {"S": f"{encode_float(float(q))}#{q}#00"}})
        items.append({"pk": {"S": f"d#{code}{axis}#bands"}, "sk": {"S": "0000"}})
    for item in items:
        admin.put_item(TableName=table, Item=item)


def test_a_table_of_layout_version_1_reads_as_group_0_and_is_upgraded(
        dynamo_settings: StorageSettings, dynamodb_admin: Any) -> None:
    table = dynamo_settings.dynamodb_table
    batches = [rec(10.0 + i * 30, 10.5 + i * 30) for i in range(8)]
    audit, state = rec(1.0, 2.0), SealedState("storage/0-of-1", "k0", os.urandom(100))
    _v1_table(dynamodb_admin, table, batches, audit, state)
    store = DynamoBatchStore(dynamo_settings)
    try:
        layout = dynamodb_admin.get_item(TableName=table, Key={"pk": {"S": "meta"}, "sk": {"S": "layout"}})["Item"]
        assert int(layout["layout"]["N"]) == LAYOUT_VERSION == 2
        for groups in (None, (0,), (0, 7)):
            assert store.batches_by_ts(-INF, INF, BATCH, groups) == batches
            assert store.batches_by_received(-INF, INF, BATCH, groups) == batches
            assert list(store.batches_by_hi_desc(None, BATCH, groups)) == batches[::-1]
        assert store.batches_by_ts(-INF, INF, BATCH, (7,)) == []
        assert store.batches_by_ts(-INF, INF, AUDIT) == [audit]
        assert store.max_ts() == batches[-1].hi
        assert store.states("storage/") == [state] and store.get_states([state.name]) == [state]
        assert store.pending_windows(100, INF) == [(0, 0), (1, 0), (2, 0)]  # the upgrade found them
        window = [b for b in batches if b.lo < 100]
        assert store.swap(window, [seg(window, 0, 0)])
        assert store.pending_windows(100, INF) == [(1, 0), (2, 0)]
        assert store.batches_by_ts(0.0, 99.0, SEGMENT) == [seg_of(store)]
        assert len(store.batches_by_ts(-INF, INF)) == len(batches) - len(window)
        assert store.layout.shards == 4
    finally:
        store.close()


def seg_of(store: DynamoBatchStore) -> SealedBatch:
    """The one segment of a store."""
    [only] = [x for k, x in store.records() if k == SEGMENT]
    assert isinstance(only, SealedBatch)
    return only


def test_a_swap_whose_intent_another_swap_of_its_group_undid_fails_and_leaves_nothing(
        dynamo_store: DynamoBatchStore, dynamo_settings: StorageSettings, dynamodb_admin: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    old = [grec(10.0 + i, 10.5 + i, 8) for i in range(4)]
    dynamo_store.commit(old, [])
    slow, theirs = seg(old, 8, 0), seg(old, 8, 0)
    other = DynamoBatchStore(dynamo_settings)
    real = dynamo_store.client.transact_write_items

    def transact(**kwargs: Any) -> Any:  # a second compactor of the group runs while this one is about to commit
        assert other.swap(old, [theirs])
        return real(**kwargs)

    monkeypatch.setattr(dynamo_store.client, "transact_write_items", transact)
    try:
        assert dynamo_store.swap(old, [slow]) is False
        assert shown(dynamo_store, 8, 0.0, 50.0) == {theirs.uid}
        assert leftovers(dynamodb_admin, dynamo_settings.dynamodb_table) == ([], [])
        assert [i["uid"]["S"] for i in table_items(dynamodb_admin, dynamo_settings.dynamodb_table, "c#")] == [
            theirs.uid]
    finally:
        other.close()


def test_with_a_retention_the_table_has_ttl_on_and_batches_and_segments_expire_retention_after_their_hi(
        dynamo_settings: StorageSettings, dynamodb_admin: Any) -> None:
    store = DynamoBatchStore(replace(dynamo_settings, retention_days=2.0))
    try:
        assert store.expires_itself
        batch, segment, audit = rec(100.0, 110.25), rec(200.0, 300.5), rec(0.0, 1.0)
        store.commit([batch], [])
        assert store.swap([], [segment])
        store.append_audit(audit)
        ttl = dynamodb_admin.describe_time_to_live(TableName=dynamo_settings.dynamodb_table)
        assert ttl["TimeToLiveDescription"]["TimeToLiveStatus"] in ("ENABLED", "ENABLING")
        assert ttl["TimeToLiveDescription"]["AttributeName"] == "exp"
        items = dynamodb_admin.scan(TableName=dynamo_settings.dynamodb_table, ConsistentRead=True)["Items"]
        expiry = {i["uid"]["S"]: i.get("exp", {}).get("N") for i in items if "uid" in i}
        assert expiry == {batch.uid: str(math.ceil(110.25 + 2 * 86400)), segment.uid: str(math.ceil(300.5 + 2 * 86400)),
                          audit.uid: None}
    finally:
        store.close()
    plain = DynamoBatchStore(dynamo_settings)  # no retention: nothing expires
    try:
        assert not plain.expires_itself
    finally:
        plain.close()
