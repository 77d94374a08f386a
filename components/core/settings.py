"""Application settings: ``config.json`` first, then ``IOT_*`` environment overrides, validated once.

Every setting is a field of one of the section dataclasses below. A field's metadata carries its
documentation and its check; the environment variable that overrides ``section.key`` is
``IOT_SECTION_KEY``. Relative paths are resolved against the directory of the config file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from components.core.errors import ConfigError

CONFIG_ENV = "IOT_CONFIG"
"""Environment variable naming the config file (default: ``config.json`` in the working directory)."""

SECRET_ENV = {
    "IOT_KEYS": "storage keys for keys.source=env: comma-separated base64 keys, the first one active",
    "IOT_INDEX_KEY": "index key for keys.source=env: base64 32-byte key that places each device in its group",
    "IOT_KEY_PASSPHRASE": "passphrase for keys.source=passphrase (stretched with scrypt and a stored salt)",
    "IOT_TICKET": "ticket a component logs in with, instead of reading it from paths.secrets_dir",
}
"""Environment variables that carry secrets; they are never written to config.json."""

_URL_RE = re.compile(r"wss?://[^/\s]+(/\S*)?\Z")
_NAME_RE = re.compile(r"[0-9a-z_]{1,64}\Z")


def _setting(doc: str, default: Any = dataclasses.MISSING, *, check: Callable[[Any], str | None] | None = None,
             choices: tuple[str, ...] = (), minimum: float | None = None, path: bool = False,
             optional: bool = False) -> Any:
    meta = {"doc": doc, "check": check, "choices": choices, "minimum": minimum, "path": path,
            "optional": optional}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _ws_url(value: str) -> str | None:
    return None if _URL_RE.match(value) else "a ws:// or wss:// URL, e.g. ws://127.0.0.1:8080/ws"


def _wamp_name(value: str) -> str | None:
    return None if _NAME_RE.match(value) else "lowercase letters, digits and _ (1 to 64)"


def _tag_bits(value: int) -> str | None:
    return None if 0 <= value <= 16 else "a whole number from 0 to 16"


def _names(value: list[str]) -> str | None:
    if value and all(_NAME_RE.match(v) for v in value):
        return None
    return "a non-empty list of names made of lowercase letters, digits and _"


@dataclass(frozen=True)
class RouterSettings:
    """Where components and devices find the router, and how the router listens."""

    url: str = _setting("WebSocket URL that components and devices connect to", check=_ws_url)
    realm: str = _setting("WAMP realm", check=_wamp_name)
    serializer: str = _setting("serializer components and devices speak", "msgpack",
                               choices=("msgpack", "json", "cbor"))
    listen_host: str = _setting("interface the router's web transport binds", "127.0.0.1")
    listen_port: int = _setting("port of the router's web transport (dashboard, /ws, /publish, /call)", 8080,
                                minimum=1)
    tls_cert: str | None = _setting("PEM certificate: set it and tls_key to serve https:// and wss://", None,
                                    path=True, optional=True)
    tls_key: str | None = _setting("PEM private key for tls_cert", None, path=True, optional=True)
    tls_trust_root: str | None = _setting("PEM certificate clients trust for wss:// (a self-signed one); "
                                          "null: the system's CAs", None, path=True, optional=True)
    http_bridge: str = _setting("who may use /publish and /call: loopback clients only, or signed requests",
                                "loopback", choices=("loopback", "signed"))
    auto_ping_interval_s: float = _setting("WebSocket ping interval; a peer silent for interval+timeout is dropped",
                                           10.0, minimum=1.0)
    auto_ping_timeout_s: float = _setting("how long the router waits for a pong", 10.0, minimum=1.0)
    proxy_workers: int = _setting("Crossbar proxy workers that hold the web transport on one shared port and talk to "
                                  "the router worker over a local socket; 0: the router worker holds it", 0,
                                  minimum=0)


@dataclass(frozen=True)
class PathSettings:
    """Folders for generated secrets and runtime files (both git-ignored)."""

    secrets_dir: str = _setting("generated tickets, device keys, storage key file", "var/secrets", path=True)
    run_dir: str = _setting("rendered router config, Crossbar node files, logs", "var/run", path=True)


@dataclass(frozen=True)
class StorageSettings:
    """Where and how sealed batches are stored."""

    backend: str = _setting("storage backend", choices=("sqlite", "dynamodb"))
    sqlite_path: str = _setting("SQLite database file", "var/iot.sqlite3", path=True)
    dynamodb_table: str = _setting("DynamoDB table name", "iot_batches")
    dynamodb_region: str = _setting("DynamoDB region", "us-east-1")
    dynamodb_endpoint_url: str | None = _setting("DynamoDB endpoint (DynamoDB Local); null for AWS", None,
                                                 optional=True)
    dynamodb_create_table: bool = _setting("create the DynamoDB table on first use when it is missing", True)
    shard: int = _setting("this storage instance's shard: it stores devices with hash(device_id) % shards == shard",
                          0, minimum=0)
    shards: int = _setting("number of storage instances sharing the devices", 1, minimum=1)
    bucket_seconds: int = _setting("readings of one batch share a time bucket of this many seconds of ts", 86400,
                                   minimum=1)
    writer_queue: int = _setting("closed batches that may wait for the writer; when full, new readings are shed",
                                 16, minimum=1)
    device_tag_bits: int = _setting("bits of a device's tag that name its group (fixed when a store is created; "
                                    "fewer: more devices per group, more privacy, more over-read)", 8, minimum=0,
                                    check=_tag_bits)
    segment_seconds: int = _setting("window of ts that compaction rewrites into one segment per device group", 3600,
                                    minimum=1)
    compact_after_s: float = _setting("a window is compacted once its end is this many seconds in the past", 120.0,
                                      minimum=0.0)
    retention_days: float = _setting("write batches and segments whose newest reading (ts) is older than this many "
                                     "days are deleted (DynamoDB: by the table's TTL); 0 keeps everything", 0.0,
                                     minimum=0.0)
    device_cache: int = _setting("device rows storage keeps in memory (a device not among them is read when it "
                                 "next sends)", 100_000, minimum=1)


@dataclass(frozen=True)
class BatchingSettings:
    """When an open batch closes (whichever limit comes first)."""

    max_readings: int = _setting("readings per batch", 5000, minimum=1)
    max_bytes: int = _setting("approximate plaintext bytes per batch", 1_048_576, minimum=1024)
    max_age_s: float = _setting("seconds a batch stays open", 1.0, minimum=0.01)


@dataclass(frozen=True)
class KeySettings:
    """Where the storage encryption keys come from."""

    source: str = _setting("file: key file created on first run; env: IOT_KEYS; passphrase: IOT_KEY_PASSPHRASE",
                           choices=("file", "env", "passphrase"))
    file: str = _setting("key file (owner-only permissions, outside git)", "var/secrets/keys.json", path=True)
    salt_file: str = _setting("salt for keys.source=passphrase, created on first run", "var/secrets/key.salt",
                              path=True)


@dataclass(frozen=True)
class QuerySettings:
    """Limits of the query callees."""

    max_results: int = _setting("largest answer without progressive results (else iot.error.too_many_results)",
                                10000, minimum=1)
    chunk_size: int = _setting("readings per progressive result", 1000, minimum=1)
    cache_readings: int = _setting("decrypted readings a query callee keeps in memory", 1_000_000, minimum=0)
    audit_flush_s: float = _setting("seconds between writes of buffered audit entries", 1.0, minimum=0.05)


@dataclass(frozen=True)
class MonitoringSettings:
    """The services' monitoring endpoints: Prometheus metrics and health checks over HTTP."""

    listen_host: str = _setting("interface the metrics and health endpoints bind (keep it loopback unless a "
                                "scraper elsewhere must reach them)", "127.0.0.1")
    storage_port: int = _setting("port of storage's /metrics, /health/ready and /health/live; 0 turns them off",
                                 9464, minimum=0)
    query_port: int = _setting("port of a query callee's /metrics and /health/*; 0 turns them off", 9465,
                               minimum=0)

    def port(self, service: str) -> int:
        """The port of ``service`` ("storage" or "query")."""
        return self.storage_port if service == "storage" else self.query_port


@dataclass(frozen=True)
class SimulatorSettings:
    """Defaults of the device simulator (``python -m devices``)."""

    devices: int = _setting("number of simulated devices", 3, minimum=1)
    first_device: int = _setting("id of the first simulated device", 0, minimum=0)
    sensor_types: list[str] = _setting(  # noqa: RUF009 - _setting turns a list into a default_factory
        "sensor types each device reports", ["humidity", "temperature"], check=_names)
    rate: float = _setting("readings per second per device and sensor type", 2.0, minimum=0.001)
    count: int = _setting("readings per device and sensor type before stopping; 0 runs until stopped", 0,
                          minimum=0)
    seed: int = _setting("seed: the same seed gives the same values", 1)
    batch: int = _setting("readings per published event", 1, minimum=1)

    def device_ids(self) -> list[str]:
        """Ids of the simulated devices: ``devices`` of them from ``first_device`` ("0", "1", ...)."""
        return simulated_ids(self.devices, self.first_device)


def simulated_ids(count: int, first: int = 0) -> list[str]:
    """Ids of ``count`` simulated devices starting at ``first`` (as strings: "0", "1", ...)."""
    return [str(i) for i in range(first, first + count)]


@dataclass(frozen=True)
class DeviceSettings:
    """The device publisher: flow control and the spool of unacknowledged readings."""

    window: int = _setting("publishes awaiting the router's acknowledgement at once", 16, minimum=1)
    spool_dir: str = _setting("folder of the devices' spool files", "var/spool", path=True)
    spool_max: int = _setting("unacknowledged readings a device keeps; when full it stops taking new readings",
                              100_000, minimum=1)
    ack_timeout_s: float = _setting("resend what is unacknowledged when no ack came for this long", 10.0,
                                    minimum=0.1)


@dataclass(frozen=True)
class Settings:
    """All settings, read once at the entry point and passed down."""

    router: RouterSettings
    paths: PathSettings
    storage: StorageSettings
    batching: BatchingSettings
    keys: KeySettings
    query: QuerySettings
    monitoring: MonitoringSettings
    simulator: SimulatorSettings
    device: DeviceSettings
    log_level: str = _setting("log level of components and devices", "info",
                              choices=("debug", "info", "warn", "error"))
    config_path: str = ""


SECTIONS: dict[str, type] = {
    f.name: f.type if isinstance(f.type, type) else globals()[str(f.type)]
    for f in dataclasses.fields(Settings)
    if str(f.type).endswith("Settings")
}
_TOP_LEVEL = ("log_level",)


def env_var(key: str) -> str:
    """The environment variable that overrides the setting ``key`` (``section.name``)."""
    return "IOT_" + key.replace(".", "_").upper()


def describe() -> list[tuple[str, str, Any, str]]:
    """Every setting as (key, environment variable, default, documentation), for docs and checks."""
    rows: list[tuple[str, str, Any, str]] = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            rows.append((key, env_var(key), _doc_default(f), f.metadata["doc"]))
    for name in _TOP_LEVEL:
        f = next(x for x in dataclasses.fields(Settings) if x.name == name)
        rows.append((name, env_var(name), _doc_default(f), f.metadata["doc"]))
    return rows


def known_env_vars() -> set[str]:
    """Every environment variable the settings loader reads."""
    return {row[1] for row in describe()} | set(SECRET_ENV) | {CONFIG_ENV}


REQUIRED = "(required)"


def _doc_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return REQUIRED
    return _default_of(f)


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _type_name(f: dataclasses.Field[Any]) -> str:
    return str(f.type).replace(" | None", "")


def _convert(key: str, raw: Any, f: dataclasses.Field[Any], from_env: bool) -> Any:
    """Coerce and check one value; raise ConfigError naming key, value and what was expected."""
    meta = f.metadata
    kind = _type_name(f)
    source = f" (from {env_var(key)})" if from_env else ""

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"setting {key}{source}: got {raw!r}, expected {expected}")

    if raw is None or (from_env and raw in ("", "null")):
        if meta["optional"]:
            return None
        raise bad(f"a {kind}")
    value: Any
    if kind == "bool":
        if isinstance(raw, bool):
            value = raw
        elif from_env and str(raw).lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            value = str(raw).lower() in ("1", "true", "yes", "on")
        else:
            raise bad("true or false")
    elif kind == "int":
        if isinstance(raw, bool):
            raise bad("an integer")
        if isinstance(raw, int):
            value = raw
        elif from_env and re.fullmatch(r"-?\d+", str(raw)):
            value = int(raw)
        else:
            raise bad("an integer")
    elif kind == "float":
        if isinstance(raw, bool):
            raise bad("a number")
        try:
            value = float(raw) if (from_env or isinstance(raw, int | float)) else None
        except ValueError:
            value = None
        if value is None or value != value or value in (float("inf"), float("-inf")):
            raise bad("a finite number")
    elif kind == "list[str]":
        if from_env and isinstance(raw, str):
            value = [part.strip() for part in raw.split(",") if part.strip()]
        elif isinstance(raw, list) and all(isinstance(v, str) for v in raw):
            value = list(raw)
        else:
            raise bad("a list of strings")
    else:
        if not isinstance(raw, str) or not raw:
            raise bad("a non-empty string")
        value = raw
    if meta["choices"] and value not in meta["choices"]:
        raise bad("one of " + ", ".join(meta["choices"]))
    if meta["minimum"] is not None and value < meta["minimum"]:
        raise bad(f"a value >= {meta['minimum']}")
    if meta["check"] is not None:
        problem = meta["check"](value)
        if problem:
            raise bad(problem)
    return value


T = TypeVar("T")


def _build_section(cls: type[T], section: str, data: Mapping[str, Any], environ: Mapping[str, str],
                   base: Path) -> T:
    if not isinstance(data, Mapping):
        raise ConfigError(f"setting {section}: got {data!r}, expected an object")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for unknown in sorted(set(data) - names):
        raise ConfigError(f"setting {section}.{unknown}: unknown key (known: {', '.join(sorted(names))})")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = f"{section}.{f.name}"
        env_name = env_var(key)
        if env_name in environ:
            value = _convert(key, environ[env_name], f, from_env=True)
        elif f.name in data:
            value = _convert(key, data[f.name], f, from_env=False)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"setting {key}: missing, expected {_expected(f)} "
                              f"(set it in config.json or {env_name})")
        else:
            value = _default_of(f)
        if f.metadata["path"] and value is not None:
            value = str((base / value).resolve()) if not os.path.isabs(value) else value
        values[f.name] = value
    return cls(**values)


def _expected(f: dataclasses.Field[Any]) -> str:
    if f.metadata["choices"]:
        return "one of " + ", ".join(f.metadata["choices"])
    return f"a {_type_name(f)}"


def load_settings(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the config file (``path``, else ``$IOT_CONFIG``, else ``./config.json``), apply overrides, validate."""
    environ = os.environ if environ is None else environ
    config_path = Path(path or environ.get(CONFIG_ENV) or "config.json").resolve()
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {config_path}: not found (pass --config or set {CONFIG_ENV})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"config file {config_path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {config_path}: expected a JSON object at the top level")
    allowed = set(SECTIONS) | set(_TOP_LEVEL)
    for unknown in sorted(set(raw) - allowed):
        raise ConfigError(f"setting {unknown}: unknown key (known: {', '.join(sorted(allowed))})")
    for name in sorted(environ):
        if name.startswith("IOT_") and name not in known_env_vars():
            raise ConfigError(f"environment variable {name}: not a setting this project knows "
                              f"(see the configuration table in docs/configuration.md)")
    base = config_path.parent
    sections: dict[str, Any] = {name: _build_section(cls, name, raw.get(name, {}), environ, base)
                                for name, cls in SECTIONS.items()}
    top = {f.name: f for f in dataclasses.fields(Settings) if f.name in _TOP_LEVEL}
    extra: dict[str, Any] = {}
    for name, f in top.items():
        if env_var(name) in environ:
            extra[name] = _convert(name, environ[env_var(name)], f, from_env=True)
        elif name in raw:
            extra[name] = _convert(name, raw[name], f, from_env=False)
    settings = Settings(**sections, **extra, config_path=str(config_path))
    _check_together(settings)
    return settings


def _check_together(s: Settings) -> None:
    """Checks that involve more than one setting."""
    if (s.router.tls_cert is None) != (s.router.tls_key is None):
        raise ConfigError(f"settings router.tls_cert and router.tls_key: got {s.router.tls_cert!r} and "
                          f"{s.router.tls_key!r}, expected both set (TLS on) or both null (TLS off)")
    if s.storage.shard >= s.storage.shards:
        raise ConfigError(f"setting storage.shard: got {s.storage.shard}, expected a value below "
                          f"storage.shards ({s.storage.shards})")
    if s.router.listen_port > 65535:
        raise ConfigError(f"setting router.listen_port: got {s.router.listen_port}, expected a port 1 to 65535")
    for name in ("storage_port", "query_port"):
        if getattr(s.monitoring, name) > 65535:
            raise ConfigError(f"setting monitoring.{name}: got {getattr(s.monitoring, name)}, expected a port "
                              "0 to 65535 (0: off)")


_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}


def setup_logging(level: str) -> None:
    """Send core (stdlib) logs to stderr in the same shape as txaio's, at ``level`` (``log_level``)."""
    logging.basicConfig(stream=sys.stderr, level=_LOG_LEVELS[level],
                        format="%(asctime)s [%(name)s] %(levelname)s %(message)s", datefmt="%Y-%m-%dT%H:%M:%S%z")
