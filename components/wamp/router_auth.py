"""Authentication inside the router worker: tickets for services and people, cryptosign for devices.

Crossbar loads :func:`create` as a ``function`` authenticator (no WAMP round trip per login). A device
that logs in gets a role of its own, ``device_<authid>``, created on the fly with two static, cacheable
permissions: publish to ``iot.sensor.<authid>.`` and subscribe to ``iot.ack.<authid>``. So one device
cannot speak for another, the router checks it from its authorization cache without calling out, and
adding a device needs no router restart. Revoking a device (the registry file changes) removes its role
and closes its sessions within a second.
"""

from __future__ import annotations

from typing import Any

import txaio
from autobahn.wamp.exception import ApplicationError
from twisted.internet.task import LoopingCall

from components.ops.credentials import CredentialStore, Device, Principal
from components.wamp import uris

log = txaio.make_logger()

NOT_AUTHORIZED = "wamp.error.not_authorized"
REGISTRY_POLL_S = 1.0


def device_role(device_id: str) -> str:
    """The role name the router gives a device."""
    return f"device_{device_id}"


def device_permissions(device_id: str) -> list[dict[str, Any]]:
    """What a device may do: publish its own readings, hear its own acks."""
    return [
        {"uri": f"{uris.SENSOR_PREFIX}{device_id}.", "match": "prefix", "allow": {"publish": True},
         "disclose": {"publisher": True}, "cache": True},
        {"uri": uris.ack_topic(device_id), "match": "exact", "allow": {"subscribe": True}, "cache": True},
    ]


class Registry:
    """The credentials as the router sees them, reloaded when the files change."""

    def __init__(self, store: CredentialStore) -> None:
        """Read from ``store``."""
        self._store = store
        self._stamp: tuple[float, float] | None = None
        self.principals: dict[str, Principal] = {}
        self.devices: dict[str, Device] = {}

    def _mtimes(self) -> tuple[float, float]:
        def mtime(path: Any) -> float:
            try:
                return float(path.stat().st_mtime_ns)
            except FileNotFoundError:
                return 0.0
        return mtime(self._store.principals_file), mtime(self._store.devices_file)

    def refresh(self) -> bool:
        """Reload if a file changed; True when something was reloaded."""
        stamp = self._mtimes()
        if stamp == self._stamp:
            return False
        self.principals = self._store.principals()
        self.devices = self._store.devices()
        self._stamp = stamp
        return True


class Authenticator:
    """Checks tickets and device keys; creates and removes the per-device roles."""

    def __init__(self, registry: Registry, controller: Any) -> None:
        """Authenticate against ``registry``; manage roles through the router worker ``controller``."""
        self._registry = registry
        self._controller = controller
        self._device_roles: set[tuple[str, str]] = set()
        registry.refresh()

    def __call__(self, realm: str, authid: str, details: dict[str, Any]) -> dict[str, Any]:
        """Crossbar's function-authenticator entry point."""
        self._registry.refresh()
        method = details.get("authmethod")
        if method == "ticket":
            return self._ticket(authid, details.get("ticket") or "")
        if method == "cryptosign":
            return self._device(realm, authid, (details.get("authextra") or {}).get("pubkey"))
        raise ApplicationError(NOT_AUTHORIZED, f"authentication method {method!r} is not accepted")

    def _ticket(self, authid: str, ticket: str) -> dict[str, Any]:
        principal = self._registry.principals.get(authid)
        if principal is None or not principal.accepts(ticket):
            # One message for both cases: do not tell a guesser which principals exist.
            raise ApplicationError(NOT_AUTHORIZED, f"ticket for principal {authid!r} was not accepted")
        return {"role": principal.role}

    def _device(self, realm: str, authid: str, pubkey: str | None) -> dict[str, Any]:
        device = self._registry.devices.get(authid)
        if device is None:
            raise ApplicationError(NOT_AUTHORIZED, f"device {authid!r} is not provisioned")
        if device.revoked:
            raise ApplicationError(NOT_AUTHORIZED, f"device {authid!r} has been revoked")
        if pubkey is not None and pubkey != device.pubkey:
            raise ApplicationError(NOT_AUTHORIZED, f"device {authid!r} presented a key that is not its own")
        self._ensure_role(realm, authid)
        return {"role": device_role(authid), "pubkey": device.pubkey}

    def _realm_id(self, realm: str) -> str:
        realm_id: str = self._controller.realm_to_id[realm]
        return realm_id

    def _ensure_role(self, realm: str, device_id: str) -> None:
        realm_id = self._realm_id(realm)
        role = device_role(device_id)
        if role not in self._controller.realms[realm_id].roles:
            self._controller.start_router_realm_role(
                realm_id, role, {"name": role, "permissions": device_permissions(device_id)})
        self._device_roles.add((realm, device_id))

    def sweep_revoked(self) -> None:
        """Remove the roles of revoked devices and close their sessions."""
        self._registry.refresh()
        for realm, device_id in list(self._device_roles):
            device = self._registry.devices.get(device_id)
            if device is not None and not device.revoked:
                continue
            self._device_roles.discard((realm, device_id))
            realm_id = self._realm_id(realm)
            role = device_role(device_id)
            if role in self._controller.realms[realm_id].roles:
                self._controller.stop_router_realm_role(realm_id, role)
            router = self._controller._router_factory.get(realm)
            killed = router._realm.session.session_kill_by_authid(
                device_id, reason=NOT_AUTHORIZED, message="device revoked")
            log.info("device {device} revoked: role removed, {n} session(s) closed", device=device_id,
                     n=len(killed))


def create(config: dict[str, Any], controller: Any) -> Authenticator:
    """Crossbar calls this once per router worker (``"create": "components.wamp.router_auth.create"``)."""
    authenticator = Authenticator(Registry(CredentialStore(config["secrets_dir"])), controller)
    sweeper = LoopingCall(authenticator.sweep_revoked)
    sweeper.start(REGISTRY_POLL_S, now=False)
    return authenticator
