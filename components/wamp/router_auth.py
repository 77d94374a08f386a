"""Authentication inside the router worker: tickets for services and people, cryptosign for devices.

Crossbar loads :func:`create` as a ``function`` authenticator (no WAMP round trip per login). A device
that logs in gets a role of its own, ``device_<authid>``, created on the fly with two static, cacheable
permissions: publish to ``iot.sensor.<authid>.`` and subscribe to ``iot.ack.<authid>``. So one device
cannot speak for another, the router checks it from its authorization cache without calling out, and
adding a device needs no router restart. Revoking a device (the registry file changes) removes its role
and closes its sessions within a second.

With proxy workers (``router.proxy_workers``) the authenticator runs in each proxy: it creates a device's
role in the router worker through the node's management API (``crossbar.worker.router.*``) and adds a
route for that role to its own proxy, so the session it forwards is given exactly that role.
"""

from __future__ import annotations

from typing import Any

import txaio
from autobahn.wamp.exception import ApplicationError
from twisted.internet import defer
from twisted.internet.task import LoopingCall

from components.ops.credentials import CredentialStore, Device, Principal
from components.wamp import uris

log = txaio.make_logger()

NOT_AUTHORIZED = "wamp.error.not_authorized"
ALREADY_EXISTS = "crossbar.error.already_exists"
NO_SUCH_OBJECT = "crossbar.error.no_such_object"
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


class RouterRoles:
    """Device roles in the router worker this code runs in (``controller`` is its RouterController)."""

    def __init__(self, controller: Any) -> None:
        """Manage the roles of ``controller``'s realms."""
        self._controller = controller

    def _realm_id(self, realm: str) -> str:
        realm_id: str = self._controller.realm_to_id[realm]
        return realm_id

    def ensure(self, realm: str, role: str, permissions: list[dict[str, Any]]) -> Any:
        """Create ``role`` unless it exists."""
        realm_id = self._realm_id(realm)
        if role not in self._controller.realms[realm_id].roles:
            self._controller.start_router_realm_role(realm_id, role, {"name": role, "permissions": permissions})

    def remove(self, realm: str, role: str, authid: str) -> Any:
        """Remove ``role`` and close the sessions of ``authid``; the number closed."""
        realm_id = self._realm_id(realm)
        if role in self._controller.realms[realm_id].roles:
            self._controller.stop_router_realm_role(realm_id, role)
        router = self._controller._router_factory.get(realm)
        return len(router._realm.session.session_kill_by_authid(authid, reason=NOT_AUTHORIZED,
                                                                 message="device revoked"))


class ProxyRoles:
    """Device roles seen from a proxy worker: created in the router worker, routed to it by this proxy.

    ``controller`` is the proxy's ProxyController (a session on the node's management realm); the router
    worker's procedures are ``crossbar.worker.<router_worker>.*``, and ``backend`` is the proxy's connection
    to it.
    """

    def __init__(self, controller: Any, router_worker: str, backend: str) -> None:
        """Manage roles of ``router_worker`` and routes of ``controller``."""
        self._controller = controller
        self._api = f"crossbar.worker.{router_worker}."
        self._backend = backend
        self._ensured: set[tuple[str, str]] = set()

    @defer.inlineCallbacks
    def ensure(self, realm: str, role: str, permissions: list[dict[str, Any]]) -> Any:
        """Create ``role`` in the router worker unless it exists, then route it from this proxy."""
        if (realm, role) in self._ensured:
            return
        try:
            yield self._controller.call(self._api + "start_router_realm_role", realm, role,
                                        {"name": role, "permissions": permissions})
        except ApplicationError as err:  # created before, by this proxy or another one
            if err.error != ALREADY_EXISTS:
                raise
        if not self._controller.has_role(realm, role):
            yield self._controller.start_proxy_realm_route(realm, {role: self._backend})
        self._ensured.add((realm, role))

    @defer.inlineCallbacks
    def remove(self, realm: str, role: str, authid: str) -> Any:
        """Remove ``role`` from the router worker and close the sessions of ``authid`` there."""
        self._ensured.discard((realm, role))
        try:
            yield self._controller.call(self._api + "stop_router_realm_role", realm, role)
        except ApplicationError as err:  # removed by another proxy
            if err.error != NO_SUCH_OBJECT:
                raise
        killed = yield self._controller.call(self._api + "kill_by_authid", realm, authid, NOT_AUTHORIZED,
                                             "device revoked")
        return len(killed or [])


class Authenticator:
    """Checks tickets and device keys; creates and removes the per-device roles."""

    def __init__(self, registry: Registry, roles: RouterRoles | ProxyRoles) -> None:
        """Authenticate against ``registry``; keep device roles with ``roles``."""
        self._registry = registry
        self._roles = roles
        self._device_roles: set[tuple[str, str]] = set()
        registry.refresh()

    def __call__(self, realm: str, authid: str, details: dict[str, Any]) -> Any:
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

    def _device(self, realm: str, authid: str, pubkey: str | None) -> Any:
        device = self._registry.devices.get(authid)
        if device is None:
            raise ApplicationError(NOT_AUTHORIZED, f"device {authid!r} is not provisioned")
        if device.revoked:
            raise ApplicationError(NOT_AUTHORIZED, f"device {authid!r} has been revoked")
        if pubkey is not None and pubkey != device.pubkey:
            raise ApplicationError(NOT_AUTHORIZED, f"device {authid!r} presented a key that is not its own")
        principal = {"role": device_role(authid), "pubkey": device.pubkey}
        done = defer.maybeDeferred(self._roles.ensure, realm, device_role(authid), device_permissions(authid))
        done.addCallback(lambda _: self._device_roles.add((realm, authid)))
        return done.addCallback(lambda _: principal)

    @defer.inlineCallbacks
    def sweep_revoked(self) -> Any:
        """Remove the roles of revoked devices and close their sessions (a failure is retried next sweep)."""
        self._registry.refresh()
        for realm, device_id in list(self._device_roles):
            device = self._registry.devices.get(device_id)
            if device is not None and not device.revoked:
                continue
            try:
                closed = yield defer.maybeDeferred(self._roles.remove, realm, device_role(device_id), device_id)
            except Exception as err:
                log.warn("device {device} revoked, but its role is not removed yet ({err}); trying again",
                         device=device_id, err=err)
                continue
            self._device_roles.discard((realm, device_id))
            log.info("device {device} revoked: role removed, {n} session(s) closed", device=device_id, n=closed)


def create(config: dict[str, Any], controller: Any) -> Authenticator:
    """Crossbar calls this once per worker that authenticates (``"create": "components.wamp.router_auth.create"``):
    the router worker, or each proxy worker (then ``config`` names the router worker and the proxy's backend)."""
    roles: RouterRoles | ProxyRoles = RouterRoles(controller)
    if "router_worker" in config:
        roles = ProxyRoles(controller, config["router_worker"], config["backend"])
    authenticator = Authenticator(Registry(CredentialStore(config["secrets_dir"])), roles)
    sweeper = LoopingCall(authenticator.sweep_revoked)
    sweeper.start(REGISTRY_POLL_S, now=False)
    return authenticator
