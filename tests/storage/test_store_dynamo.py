"""DynamoDB-specific behaviour of DynamoBatchStore, on a real local DynamoDB server.

Paging, chunked writes, retries, table checks and failures. Faults (throttling, unprocessed items, a refused
call) are injected by wrapping one client method in the test that needs them, nowhere else.
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
    DynamoBatchStore,
    decode_float,
    encode_float,
    shard_of,
)
from components.storage.interface import AUDIT, BATCH, SealedBatch, SealedState
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
    dynamo_store.commit(records, None)
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
    dynamo_store.commit([rec(1.0, 1.5)], None)  # the bucket's directory entries exist from now on
    spy = Spy(monkeypatch, dynamo_store.client, "batch_write_item")
    batches = [rec(2.0 + i, 2.5 + i) for i in range(26)]
    assert dynamo_store.commit(batches, None) == sum(len(b.body) for b in batches)
    assert [len(c["RequestItems"][dynamo_settings.dynamodb_table]) for c, _ in spy.log] == [25, 1]
    assert len(dynamo_store.batches_by_ts(-INF, INF)) == 27


def test_throttling_and_unprocessed_items_are_retried_and_each_batch_stored_once(
        dynamo_store: DynamoBatchStore, monkeypatch: pytest.MonkeyPatch) -> None:
    first = rec(1.0, 1.5)
    dynamo_store.commit([first], None)
    spy = Spy(monkeypatch, dynamo_store.client, "batch_write_item", iter([throttled, half_unprocessed]))
    batches = [rec(2.0 + i, 2.5 + i) for i in range(10)]
    assert dynamo_store.commit(batches, None) == sum(len(b.body) for b in batches)
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
        dynamo_store.commit([rec(1.0, 2.0)], None)
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
        dynamo_store.commit([rec(0.0, 0.5), too_big], None)
    with pytest.raises(StorageUnavailable, match=f"limit of {limit} bytes"):
        dynamo_store.append_audit(too_big)
    assert writes.log == []
    assert dynamo_store.batches_by_ts(-INF, INF) == []
    fitting = rec(3.0, 4.0, body=os.urandom(limit))
    dynamo_store.commit([fitting], None)
    assert dynamo_store.batches_by_ts(-INF, INF) == [fitting]
    with pytest.raises(StorageUnavailable, match=f"limit of {limit} bytes"):
        dynamo_store.replace(BATCH, fitting, replace(fitting, body=too_big.body))


def test_the_batches_of_one_bucket_spread_over_every_write_shard(
        dynamo_store: DynamoBatchStore, dynamo_settings: StorageSettings, dynamodb_admin: Any) -> None:
    batches = [rec(10.0 + i * 0.1, 10.05 + i * 0.1, uid=f"{i:032x}") for i in range(40)]
    dynamo_store.commit(batches, None)
    items = table_items(dynamodb_admin, dynamo_settings.dynamodb_table, "b#")
    assert len(items) == 40
    assert {i["pk"]["S"] for i in items} == {f"b#0#0#{s}" for s in range(dynamo_store.layout.shards)}
    assert dynamo_store.layout.shards >= 4
    assert len({i["gpk"]["S"] for i in items}) == dynamo_store.layout.shards  # the arrival index spreads too


def test_a_window_costs_two_directory_queries_and_one_per_shard_and_never_scans(
        dynamo_store: DynamoBatchStore, monkeypatch: pytest.MonkeyPatch) -> None:
    batches = [rec(3 * B + i, 3 * B + i + 0.5) for i in range(20)]
    dynamo_store.commit(batches, None)
    queries = Spy(monkeypatch, dynamo_store.client, "query")
    scans = Spy(monkeypatch, dynamo_store.client, "scan")
    gets = Spy(monkeypatch, dynamo_store.client, "batch_get_item")
    assert dynamo_store.batches_by_ts(3 * B + 5, 3 * B + 9) == batches[5:10]
    assert len(queries.log) == 2 + dynamo_store.layout.shards
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
    dynamo_store.commit(batches, None)
    queries = Spy(monkeypatch, dynamo_store.client, "query")
    newest = next(dynamo_store.batches_by_hi_desc())
    assert newest == batches[-1]
    read = sum(len(r["Items"]) for c, r in queries.log if c["ExpressionAttributeValues"][":p"]["S"].startswith("b#"))
    assert read < 150  # of 600
    assert min(c["Limit"] for c, _ in queries.log if "Limit" in c) <= HI_DESC_FIRST_PAGE


def test_a_store_opened_with_another_bucket_size_keeps_the_tables_layout(dynamo_settings: StorageSettings) -> None:
    first = DynamoBatchStore(dynamo_settings)
    old = rec(250.0, 251.0)
    first.commit([old], None)
    second = DynamoBatchStore(replace(dynamo_settings, bucket_seconds=3600))
    try:
        assert second.layout == first.layout
        assert second.batches_by_ts(200.0, 300.0) == [old]
        new = rec(420.0, 421.0)
        second.commit([new], None)
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
    dynamo_store.commit([], a)
    dynamo_store.commit([], b)
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
            store.commit([batch], state)
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
    dynamo_store.commit([short, long], None)
    for start in (B - 1.0, 2 * B + 10.0, 4 * B + 50.0):
        assert long.uid in [r.uid for r in dynamo_store.batches_by_ts(start, start + 1.0)]
    assert dynamo_store.batches_by_ts(4 * B + 50.5, 5 * B) == []
    assert dynamo_store.batches_by_ts(20 * B, 2 * B) == []  # backwards: no key range DynamoDB would refuse
    assert [r.uid for r in dynamo_store.batches_by_hi_desc()] == [long.uid, short.uid]


def test_sealed_batches_keep_every_field(dynamo_store: DynamoBatchStore) -> None:
    batch = SealedBatch("0123abcd", 17, 1700.5, 1701.25, 1702.0, 1703.0, 123_456, "key-7", b"", 2)
    dynamo_store.commit([batch], None)
    assert dynamo_store.batches_by_ts(-INF, INF) == [batch]
