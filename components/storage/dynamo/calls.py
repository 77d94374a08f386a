"""Calls to one DynamoDB table: throttling retried with backoff for a bounded time, failures StorageUnavailable.

Batched calls are cut to DynamoDB's limits here: BatchGetItem 100 keys a call, BatchWriteItem 25 requests and
16 MB a call, their unprocessed keys and items retried with exponential backoff and jitter.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
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
from components.core.settings import StorageSettings
from components.storage.dynamo.codec import Item

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.client import DynamoDBClient

BATCH_GET_MAX_KEYS = 100
BATCH_WRITE_MAX_ITEMS = 25
BATCH_WRITE_MAX_BYTES = 16 * 1024 * 1024
TRANSACT_MAX_ITEMS = 100
RETRY_BUDGET_S = 20.0
"""How long throttling and unprocessed items are retried before a call gives up with StorageUnavailable."""
BACKOFF_BASE_S, BACKOFF_CAP_S = 0.05, 2.0
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 2.0, 15.0

THROTTLE_CODES = frozenset({"ProvisionedThroughputExceededException", "ThrottlingException",
                            "RequestLimitExceeded"})
RETRYABLE_CODES = THROTTLE_CODES | {"InternalServerError", "ServiceUnavailable"}
CREDENTIAL_CODES = frozenset({"UnrecognizedClientException", "InvalidSignatureException", "AccessDeniedException",
                              "ExpiredTokenException", "MissingAuthenticationTokenException"})
CONDITION_FAILED = "ConditionalCheckFailedException"
CAS = frozenset({CONDITION_FAILED})
"""``passthrough`` for conditional writes: a failed condition is raised as the ClientError, not retried."""
TRANSACTION_CANCELED = "TransactionCanceledException"

T = TypeVar("T")


def item_size(item: Item) -> int:
    """An item's size as DynamoDB counts it, closely enough to keep a BatchWriteItem under 16 MB."""
    size = 0
    for name, value in item.items():
        size += len(name)
        for typ, v in value.items():
            size += len(v) if typ == "B" else len(str(v).encode("utf-8"))
    return size + 100


def redact(url: str) -> str:
    """The endpoint without user:password, should one be written into it."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
    except ValueError:  # a malformed port: botocore will say what is wrong with it
        return "the configured storage.dynamodb_endpoint_url"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class DynamoTable:
    """One table reached through one boto3 client (thread-safe), the calls on it retried and explained."""

    def __init__(self, client: DynamoDBClient, name: str, where: str, index: str) -> None:
        """``where`` names the endpoint in messages, ``index`` the table's index (when it is missing)."""
        self.client, self.name, self.where, self.index = client, name, where, index
        self.retry_budget_s = RETRY_BUDGET_S  # seconds one call may spend retrying throttling (tunable, e.g. in tests)

    def call(self, op: str, fn: Callable[..., T], *, passthrough: frozenset[str] = frozenset(),
             **kwargs: Any) -> T:
        """Call the client, retrying throttling; every failure becomes StorageUnavailable (but ``passthrough``)."""
        deadline: float | None = None
        for attempt in itertools.count(1):  # ends: backoff raises once the retry budget is spent
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
                self.backoff(attempt, deadline, f"{op} answered {code}", err)
            except NoCredentialsError as err:
                raise StorageUnavailable(
                    f"no AWS credentials found for DynamoDB at {self.where}: set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or run with an instance role); DynamoDB Local accepts "
                    "any non-empty values") from err
            except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError) as err:
                raise StorageUnavailable(
                    f"cannot reach DynamoDB at {self.where} ({op}: {err}); check storage.dynamodb_endpoint_url "
                    "and storage.dynamodb_region and that the server is running") from err
            except BotoCoreError as err:
                raise StorageUnavailable(f"DynamoDB {op} on table {self.name!r} at {self.where} failed: "
                                         f"{err}") from err
        raise AssertionError("unreachable")  # pragma: no cover - itertools.count never ends

    def backoff(self, attempt: int, deadline: float, what: str, cause: BaseException | None = None) -> None:
        """Sleep before retry number ``attempt`` (exponential, jittered), or give up at ``deadline``."""
        ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2.0 ** (attempt - 1))
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)  # jitter: writers that collided do not retry together
        if time.monotonic() + delay > deadline:
            raise StorageUnavailable(
                f"DynamoDB table {self.name!r} at {self.where} is throttling: {what}, still after "
                f"{self.retry_budget_s:.0f}s of retries; give the table more capacity or slow the writers"
            ) from cause
        time.sleep(delay)

    def _explain(self, op: str, code: str, err: ClientError) -> str:
        message = err.response.get("Error", {}).get("Message", "")
        if code == "ResourceNotFoundException":
            return (f"DynamoDB table {self.name!r} (or its index {self.index}) was not found at {self.where} "
                    f"during {op}: was it deleted? Restarting storage creates it again when "
                    "storage.dynamodb_create_table is true")
        if code in CREDENTIAL_CODES:
            return (f"DynamoDB at {self.where} refused {op} on table {self.name!r} ({code}: {message}); check "
                    "the AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance "
                    "role) and their permissions on the table")
        return f"DynamoDB {op} on table {self.name!r} at {self.where} failed: {code}: {message}"

    def get(self, key: Item) -> Item | None:
        """One item, read consistently (None: there is none)."""
        return self.call("GetItem", self.client.get_item, TableName=self.name, Key=key,
                         ConsistentRead=True).get("Item")

    def query(self, **kwargs: Any) -> Iterator[Item]:
        """Every item a Query matches, following LastEvaluatedKey (consistent unless on an index)."""
        kwargs.setdefault("ConsistentRead", "IndexName" not in kwargs)
        start: Item | None = None
        while True:  # ends when a page has no LastEvaluatedKey
            extra: dict[str, Any] = {"ExclusiveStartKey": start} if start else {}
            resp = self.call("Query", self.client.query, TableName=self.name, **kwargs, **extra)
            yield from resp.get("Items", [])
            start = resp.get("LastEvaluatedKey")
            if not start:
                return

    def batch_get(self, keys: list[Item], projection: str | None = None) -> Iterator[Item]:
        """BatchGetItem, consistent, 100 keys a call, following UnprocessedKeys.

        ``projection`` names attributes as ``#name`` (e.g. ``"#pk, #sk"``); each is mapped to ``name``.
        """
        for i in range(0, len(keys), BATCH_GET_MAX_KEYS):
            request: dict[str, Any] = {"Keys": keys[i:i + BATCH_GET_MAX_KEYS], "ConsistentRead": True}
            if projection:
                names = {n.strip(): n.strip()[1:] for n in projection.split(",")}
                request.update(ProjectionExpression=projection, ExpressionAttributeNames=names)
            deadline = time.monotonic() + self.retry_budget_s
            for attempt in itertools.count(1):  # ends: nothing unprocessed, or backoff raises at the deadline
                resp = self.call("BatchGetItem", self.client.batch_get_item, RequestItems={self.name: request})
                got = resp.get("Responses", {}).get(self.name, [])
                yield from got
                left = resp.get("UnprocessedKeys", {}).get(self.name)
                if not left or not left.get("Keys"):
                    break
                if not got:  # a response cut by size makes progress and is read on at once; none means throttled
                    self.backoff(attempt, deadline, f"BatchGetItem left {len(left['Keys'])} keys unprocessed")
                request = dict(left)

    def write(self, requests: Sequence[Item]) -> None:
        """BatchWriteItem (PutRequest/DeleteRequest items) in chunks of at most 25 requests and 16 MB."""
        chunk: list[Item] = []
        size = 0
        for req in requests:
            body = req.get("PutRequest", {}).get("Item") or req["DeleteRequest"]["Key"]
            n = item_size(body)
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
        for attempt in itertools.count(1):  # ends: all processed, or backoff raises at the deadline
            resp = self.call("BatchWriteItem", self.client.batch_write_item, RequestItems={self.name: pending})
            pending = list(resp.get("UnprocessedItems", {}).get(self.name, []))
            if not pending:
                return
            self.backoff(attempt, deadline, f"BatchWriteItem left {len(pending)} of {len(chunk)} items unprocessed")

    def put_all(self, items: Iterable[Item]) -> None:
        """Put ``items`` (BatchWriteItem)."""
        self.write([{"PutRequest": {"Item": i}} for i in items])

    def delete_all(self, keys: Iterable[Item]) -> None:
        """Delete the items of ``keys`` (BatchWriteItem; a missing item is no error)."""
        self.write([{"DeleteRequest": {"Key": k}} for k in keys])

    def close(self) -> None:
        """Close the client's connections."""
        self.client.close()


def connect(settings: StorageSettings, index: str) -> DynamoTable:
    """A client for the table the settings name (no calls yet); StorageUnavailable if none can be set up."""
    where = (redact(settings.dynamodb_endpoint_url) if settings.dynamodb_endpoint_url
             else f"AWS region {settings.dynamodb_region}")
    try:
        session = boto3.session.Session()
        client: DynamoDBClient = session.client(
            "dynamodb", region_name=settings.dynamodb_region, endpoint_url=settings.dynamodb_endpoint_url,
            # no botocore retries: throttling is retried with a budget, an unreachable endpoint fails fast
            config=Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                          retries={"total_max_attempts": 1}, max_pool_connections=16))
    except (BotoCoreError, ValueError) as err:
        raise StorageUnavailable(f"cannot set up a DynamoDB client for {where}: {err}") from err
    return DynamoTable(client, settings.dynamodb_table, where, index)
