"""Local credentials: service tickets, the device registry and device keys, the HTTP bridge secret.

Everything lives under ``paths.secrets_dir`` (git-ignored, owner-only permissions). The router reads
``principals.json`` (ticket hashes, never tickets) and ``devices.json`` (device public keys); each
service reads its own ticket from ``tickets/<authid>.ticket``; each device its private key from
``devices/<device_id>.key``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from components.core.errors import ConfigError
from components.core.files import write_private
from components.core.readings import valid_id

ROLES = ("storage", "query", "reader", "admin")
"""Roles a ticket principal may hold (devices get a role of their own, made by the router)."""

SERVICE_PRINCIPALS = {"storage": "storage", "query": "query", "dashboard": "reader", "admin": "admin"}
"""Principals created on first run: authid -> role."""

ROLE_MIGRATIONS = {("query", "storage"): "query"}
"""(authid, role it had in an older version) -> the role it has now: applied to existing principals on start.

Query callees used to log in with the storage role, which may publish acks; they now hold a role of their own."""


def ticket_hash(ticket: str) -> str:
    """What the router stores for a ticket."""
    return hashlib.sha256(ticket.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Principal:
    """A ticket principal as the router sees it."""

    authid: str
    role: str
    ticket_sha256: str

    def accepts(self, ticket: str) -> bool:
        """Constant-time check of a presented ticket."""
        return hmac.compare_digest(self.ticket_sha256, ticket_hash(ticket))


@dataclass(frozen=True)
class Device:
    """A device as the router sees it."""

    device_id: str
    pubkey: str
    revoked: bool


class CredentialStore:
    """The credentials folder: create, read and change principals, devices and the bridge secret."""

    def __init__(self, secrets_dir: str | os.PathLike[str]) -> None:
        """Use the folder ``secrets_dir`` (created on first write)."""
        self.root = Path(secrets_dir)

    # -- paths
    @property
    def principals_file(self) -> Path:
        """Ticket principals: authid -> role and ticket hash."""
        return self.root / "principals.json"

    @property
    def devices_file(self) -> Path:
        """Device registry: device id -> public key, revoked flag."""
        return self.root / "devices.json"

    def ticket_file(self, authid: str) -> Path:
        """Where the ticket of ``authid`` is kept for the service that logs in with it."""
        return self.root / "tickets" / f"{authid}.ticket"

    def device_key_file(self, device_id: str) -> Path:
        """Where the private key of ``device_id`` is kept."""
        return self.root / "devices" / f"{device_id}.key"

    @property
    def bridge_file(self) -> Path:
        """Key and secret for signed HTTP bridge requests."""
        return self.root / "http_bridge.json"

    # -- reading
    def _load(self, path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except json.JSONDecodeError as err:
            raise ConfigError(f"credentials file {path}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"credentials file {path}: expected a JSON object")
        return data

    def principals(self) -> dict[str, Principal]:
        """Every ticket principal."""
        return {authid: Principal(authid, p["role"], p["ticket_sha256"])
                for authid, p in self._load(self.principals_file).items()}

    def devices(self) -> dict[str, Device]:
        """Every provisioned device, revoked ones included."""
        return {d: Device(d, v["pubkey"], bool(v.get("revoked", False)))
                for d, v in self._load(self.devices_file).items()}

    def ticket(self, authid: str) -> str:
        """The ticket a service logs in with."""
        path = self.ticket_file(authid)
        return _read_secret(path, f"no ticket for {authid!r} at {path}: run 'python -m components secrets' "
                                  f"(make run does it on first start) or set IOT_TICKET")

    def device_key(self, device_id: str) -> str:
        """The private key (hex seed) of a device."""
        path = self.device_key_file(device_id)
        return _read_secret(path, f"device {device_id!r} has no key at {path}: provision it with "
                                  f"'python -m components device add {device_id}'")

    def bridge_secret(self) -> dict[str, str]:
        """Key and secret of the HTTP bridge (created when missing)."""
        data = self._load(self.bridge_file)
        if not data:
            data = {"key": "bridge", "secret": secrets.token_urlsafe(32)}
            write_private(self.bridge_file, json.dumps(data, indent=2))
        return {"key": data["key"], "secret": data["secret"]}

    def existing_bridge_secret(self) -> dict[str, str]:
        """Key and secret of the HTTP bridge for a client, which must find them (the router creates them)."""
        data = self._load(self.bridge_file)
        if not data:
            raise ConfigError(f"the HTTP bridge is signed, but {self.bridge_file} is missing: copy it from the "
                              "router's secrets folder (paths.secrets_dir)")
        return {"key": data["key"], "secret": data["secret"]}

    # -- changing
    def add_principal(self, authid: str, role: str) -> str:
        """Create (or replace) a ticket principal; return its new ticket."""
        if not valid_id(authid):
            raise ConfigError(f"principal {authid!r}: expected lowercase letters, digits and _ (1 to 64)")
        if role not in ROLES:
            raise ConfigError(f"principal {authid!r}: role {role!r}, expected one of {', '.join(ROLES)}")
        ticket = secrets.token_urlsafe(32)
        write_private(self.ticket_file(authid), ticket + "\n")
        data = self._load(self.principals_file)
        data[authid] = {"role": role, "ticket_sha256": ticket_hash(ticket), "created": time.time()}
        write_private(self.principals_file, json.dumps(data, indent=2, sort_keys=True))
        return ticket

    def add_device(self, device_id: str) -> str:
        """Provision a device (new key pair, or the existing key re-activated); return its public key."""
        if not valid_id(device_id):
            raise ConfigError(f"device {device_id!r}: expected lowercase letters, digits and _ (1 to 64)")
        key_file = self.device_key_file(device_id)
        if key_file.exists():
            seed = bytes.fromhex(key_file.read_text(encoding="utf-8").strip())
        else:
            seed = bytes(SigningKey.generate())
            write_private(key_file, seed.hex() + "\n")
        pubkey = SigningKey(seed).verify_key.encode().hex()
        data = self._load(self.devices_file)
        data[device_id] = {"pubkey": pubkey, "revoked": False, "created": time.time()}
        write_private(self.devices_file, json.dumps(data, indent=2, sort_keys=True))
        return pubkey

    def revoke_device(self, device_id: str) -> None:
        """Revoke a device: the router refuses its sessions and closes the open ones."""
        data = self._load(self.devices_file)
        if device_id not in data:
            raise ConfigError(f"device {device_id!r}: not provisioned (see 'python -m components device list')")
        data[device_id]["revoked"] = True
        data[device_id]["revoked_at"] = time.time()
        write_private(self.devices_file, json.dumps(data, indent=2, sort_keys=True))

    def _migrate_roles(self) -> list[str]:
        """Give principals of an older version the role they have now (their tickets stay valid)."""
        data = self._load(self.principals_file)
        changed = []
        for authid, p in data.items():
            role = ROLE_MIGRATIONS.get((authid, p.get("role")))
            if role is not None:
                changed.append(f"role of {authid} changed from {p['role']} to {role}")
                p["role"] = role
        if changed:
            write_private(self.principals_file, json.dumps(data, indent=2, sort_keys=True))
        return changed

    def ensure_local(self, device_ids: Iterable[str] = ()) -> list[str]:
        """Create what a local stack needs and is missing, migrate old roles; return what was done (names only)."""
        created = []
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        created += self._migrate_roles()
        principals = self.principals()
        for authid, role in SERVICE_PRINCIPALS.items():
            if authid not in principals or not self.ticket_file(authid).exists():
                self.add_principal(authid, role)
                created.append(f"created ticket for {authid} ({role})")
        devices = self.devices()
        for device_id in device_ids:
            if device_id not in devices or not self.device_key_file(device_id).exists():
                self.add_device(device_id)
                created.append(f"created key for device {device_id}")
        if not self.bridge_file.exists():
            self.bridge_secret()
            created.append("created HTTP bridge key and secret")
        return created


def _read_secret(path: Path, missing: str) -> str:
    """The one-line secret in ``path``; ConfigError with ``missing`` when there is no such file."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ConfigError(missing) from None
