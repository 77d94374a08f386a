"""Command line of the services: ``python -m components --help``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from components.core.errors import ConfigError, StorageUnavailable
from components.core.settings import REQUIRED, Settings, describe, load_settings
from components.ops import router_config
from components.ops.credentials import ROLES, CredentialStore


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m components",
                                     description="Sensor hub services and administration commands.")
    parser.add_argument("--config", help="config file (default: $IOT_CONFIG or ./config.json)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="start router, storage, query and simulated devices until Ctrl-C (make run)")
    router = sub.add_parser("router", help="render router/config.json with the settings and run Crossbar")
    router.add_argument("--loglevel", default="info", help="Crossbar log level (default: info)")
    sub.add_parser("storage", help="run the storage subscriber (readings -> sealed batches -> backend)")
    sub.add_parser("query", help="run a query callee (registers the iot.* query procedures, round robin)")
    rekey = sub.add_parser("rekey", help="re-seal every stored record under a new key (safe to interrupt and rerun)")
    rekey.add_argument("--grace", type=float, default=3.0,
                       help="seconds to wait after adding the new key, for running services to pick it up")
    backup = sub.add_parser("backup", help="copy the live SQLite store into PATH (SQLite's online backup API)")
    backup.add_argument("path", help="file to write the copy to")
    backup.add_argument("--force", action="store_true", help="replace PATH if it exists")
    restore = sub.add_parser("restore", help="make the copy at PATH the store, once it opens with the configured "
                                             "keys (stop storage and query first)")
    restore.add_argument("path", help="a copy made by backup")
    health = sub.add_parser("health", help="ask a running storage or query service on this host whether it is ready "
                                           "(exit 0) or not (exit 1): the container health check")
    health.add_argument("service", choices=("storage", "query"))
    health.add_argument("--live", action="store_true", help="only whether it is alive (its process answers)")
    http_call = sub.add_parser("http-call", help="call a procedure through the HTTP bridge (signed if required)")
    http_call.add_argument("procedure", help="e.g. iot.fetch_between_window")
    http_call.add_argument("args", nargs="?", default="[]", help="positional arguments as a JSON list")
    http_call.add_argument("kwargs", nargs="?", default="{}", help="keyword arguments as a JSON object")
    http_pub = sub.add_parser("http-publish", help="publish readings through the HTTP bridge (signed if required)")
    http_pub.add_argument("topic", help="e.g. iot.sensor.14.humidity")
    http_pub.add_argument("reading", help="a reading (or a list of readings) as JSON")
    sub.add_parser("secrets", help="create missing local secrets (tickets, simulated devices' keys)")
    sub.add_parser("settings", help="print the effective settings as JSON (no secrets in them)")
    sub.add_parser("settings-table", help="print every setting with its environment variable (Markdown)")

    device = sub.add_parser("device", help="provision, revoke or list devices")
    dsub = device.add_subparsers(dest="action", required=True)
    add = dsub.add_parser("add", help="provision a device: new key pair, registered with the router at once")
    add.add_argument("device_id")
    revoke = dsub.add_parser("revoke", help="revoke a device: its sessions are closed and refused")
    revoke.add_argument("device_id")
    dsub.add_parser("list", help="list provisioned devices")

    principal = sub.add_parser("principal", help="create a ticket principal (a person or service)")
    principal.add_argument("authid")
    principal.add_argument("--role", required=True, choices=ROLES)
    return parser


def _settings_json(settings: Settings) -> str:
    import dataclasses

    return json.dumps(dataclasses.asdict(settings), indent=2)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    args = _parser().parse_args(argv)
    if args.command == "settings-table":
        print("| setting | environment variable | default | meaning |\n|---|---|---|---|")
        for key, env, default, doc in describe():
            shown = default if default == REQUIRED else f"`{json.dumps(default)}`"
            print(f"| `{key}` | `{env}` | {shown} | {doc} |")
        return 0
    try:
        settings = load_settings(args.config)
        return _dispatch(args, settings)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except StorageUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    store = CredentialStore(settings.paths.secrets_dir)
    if args.command == "run":
        from components.ops.launcher import run_stack

        return run_stack(settings)
    if args.command == "storage":
        from components.wamp.subscriber import run as run_storage

        return run_storage(settings)
    if args.command == "query":
        from components.wamp.callee import run as run_query

        return run_query(settings)
    if args.command in ("http-call", "http-publish"):
        return _http(settings, store, args)
    if args.command == "rekey":
        return _rekey(settings, args.grace)
    if args.command == "health":
        return _health(settings, args.service, args.live)
    if args.command in ("backup", "restore"):
        from components.ops import backups

        if args.command == "backup":
            return backups.backup(settings, args.path, args.force)
        return backups.restore(settings, args.path)
    if args.command == "router":
        from components.ops.launcher import crossbar_argv

        node_dir = router_config.write_node_dir(settings)
        argv = crossbar_argv(node_dir, args.loglevel)
        os.execv(argv[0], argv)  # noqa: S606 - replaces this process with Crossbar
    if args.command == "secrets":
        created = store.ensure_local(settings.simulator.device_ids())
        print("\n".join(created) or "nothing to create")
        return 0
    if args.command == "settings":
        print(_settings_json(settings))
        return 0
    if args.command == "device":
        if args.action == "add":
            print(f"device {args.device_id} provisioned, public key {store.add_device(args.device_id)}; "
                  f"private key in {store.device_key_file(args.device_id)}")
        elif args.action == "revoke":
            store.revoke_device(args.device_id)
            print(f"device {args.device_id} revoked")
        else:
            for d in sorted(store.devices().values(), key=lambda d: d.device_id):
                print(f"{d.device_id}\t{'revoked' if d.revoked else 'active'}\t{d.pubkey}")
        return 0
    if args.command == "principal":
        store.add_principal(args.authid, args.role)
        print(f"principal {args.authid} ({args.role}) created; ticket in {store.ticket_file(args.authid)}")
        return 0
    raise AssertionError(f"unhandled command {args.command}")


def _http(settings: Settings, store: CredentialStore, args: argparse.Namespace) -> int:
    from components.ops.bridge_client import BridgeUnreachable, post

    try:
        if args.command == "http-call":
            path, payload = "call", {"procedure": args.procedure, "args": json.loads(args.args),
                                     "kwargs": json.loads(args.kwargs)}
        else:
            path, payload = "publish", {"topic": args.topic, "args": [json.loads(args.reading)]}
    except json.JSONDecodeError as err:
        raise ConfigError(f"arguments must be JSON: {err}") from None
    signing = store.existing_bridge_secret() if settings.router.http_bridge == "signed" else None
    try:
        status, answer = post(f"{router_config.bridge_base(settings)}/{path}", payload, signing)
    except BridgeUnreachable as err:
        print(f"error: {err}; check that the router runs and that router.url (IOT_ROUTER_URL) names it",
              file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2))
    return 0 if status == 200 and not (isinstance(answer, dict) and "error" in answer) else 1


def _health(settings: Settings, service: str, live: bool) -> int:
    from components.ops.launcher import health_url
    from components.ops.waiting import http_json

    url = health_url(settings, service, "live" if live else "ready")
    if url is None:
        raise ConfigError(f"health: monitoring.{service}_port is 0, so {service} serves no health endpoint")
    status, doc = http_json(url)
    if status == 200:
        print(json.dumps(doc))
        return 0
    what = "nothing answers" if status == 0 else f"{status} {json.dumps(doc)}"
    print(f"{service} is not {'live' if live else 'ready'}: {url}: {what}", file=sys.stderr)
    return 1


def _rekey(settings: Settings, grace: float) -> int:
    from components.core.rekey import rekey_file, rekey_ring
    from components.core.sealing import KeyFile, load_keyring
    from components.core.settings import setup_logging
    from components.storage.backends import open_store

    setup_logging(settings.log_level)
    if settings.keys.source == "passphrase":
        raise ConfigError("keys.source=passphrase: a passphrase key cannot be rotated in place; switch to "
                          "keys.source=env with the new key first in IOT_KEYS and the old one after it, then rekey")
    store = open_store(settings.storage)
    try:
        if settings.keys.source == "file":
            report = rekey_file(store, KeyFile(settings.keys.file), grace)
        else:
            report = rekey_ring(store, load_keyring(settings.keys, os.environ))
    finally:
        store.close()
    print(f"{'resumed: ' if report.resumed else ''}{report.resealed} records re-sealed under key "
          f"{report.active_key} in {report.passes} pass(es)"
          + (f"; removed old key(s) {', '.join(report.dropped_keys)}" if report.dropped_keys else ""))
    if settings.keys.source == "env":
        print("now remove every key but the first from IOT_KEYS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
