"""The router's effective Crossbar config: ``router/config.json`` with the settings applied.

``router/config.json`` is a complete config for the defaults (``crossbar check`` passes on it). Before a
start, the settings are applied to it (listen address, realm, TLS, ping, where secrets live, and the HTTP
bridge's signing secret when signing is on) and the result is written, owner-only, into the run folder
that Crossbar uses as its node directory, so nothing is ever written into ``router/``.

With ``router.proxy_workers`` N > 0 the web transport (dashboard, WebSocket, ``/call``, ``/publish``) moves
from the router worker into N Crossbar proxy workers that share its port (``"shared": true``: the kernel
spreads new connections over them). Each proxy authenticates its clients with the same authenticator and
forwards their sessions to the router worker over a Unix socket in the node directory (owner-only), where
``anonymous-proxy`` is the only login: the router worker takes the role the proxy has checked, and still
authorizes every action by that role. The router worker keeps the realm and its roles.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from components.core.errors import ConfigError
from components.core.files import write_private
from components.core.settings import Settings
from components.ops.credentials import CredentialStore

ROUTER_DIR = Path(__file__).resolve().parents[2] / "router"
LOOPBACK_NETS = ["127.0.0.1/32", "::1/128"]
ROUTER_WORKER_ID = "router"
"""The router worker's id: proxies reach its management procedures (``crossbar.worker.router.*``) by it."""
BACKEND = "router"
"""The name of a proxy's connection to the router worker."""
SOCKET_NAME = "router.sock"
MAX_SOCKET_PATH = 107
BACKEND_SERIALIZER = "msgpack"
BOOT_COMPLETE = "NODE_BOOT_COMPLETE"
"""Crossbar's log marker once the node has applied its whole config."""


def load_template(router_dir: Path = ROUTER_DIR) -> dict[str, Any]:
    """The router config as committed."""
    data: dict[str, Any] = json.loads((router_dir / "config.json").read_text(encoding="utf-8"))
    return data


def render(settings: Settings, template: dict[str, Any] | None = None, router_dir: Path = ROUTER_DIR
           ) -> dict[str, Any]:
    """Apply ``settings`` to the template; the result is what Crossbar runs."""
    cfg = copy.deepcopy(template if template is not None else load_template(router_dir))
    cfg.pop("$schema", None)
    r = settings.router
    worker = cfg["workers"][0]
    realm = worker["realms"][0]
    realm["name"] = realm["id"] = r.realm
    transport = worker["transports"][0]
    endpoint = transport["endpoint"]
    endpoint["interface"] = r.listen_host
    endpoint["port"] = r.listen_port
    if r.tls_cert and r.tls_key:
        endpoint["tls"] = {"certificate": r.tls_cert, "key": r.tls_key}
    paths = transport["paths"]
    paths["/"]["directory"] = str((router_dir / paths["/"]["directory"]).resolve())
    ws = paths["ws"]
    for method in ws["auth"].values():
        method["config"]["secrets_dir"] = settings.paths.secrets_dir
    ws["options"]["auto_ping_interval"] = int(r.auto_ping_interval_s * 1000)
    ws["options"]["auto_ping_timeout"] = int(r.auto_ping_timeout_s * 1000)
    for name in ("publish", "call"):
        service = paths[name]
        service["realm"] = r.realm
        options = service.setdefault("options", {})
        if r.http_bridge == "signed":
            options.pop("require_ip", None)
            options.update(CredentialStore(settings.paths.secrets_dir).bridge_secret())
        else:
            options["require_ip"] = list(LOOPBACK_NETS)
    if r.proxy_workers:
        socket_path = node_dir(settings) / SOCKET_NAME
        if len(str(socket_path).encode()) > MAX_SOCKET_PATH:
            raise ConfigError(f"setting router.proxy_workers: the router's socket {socket_path} is longer than "
                              f"{MAX_SOCKET_PATH} bytes, more than a Unix socket path may be; set a shorter "
                              "paths.run_dir")
        _with_proxies(cfg, r.proxy_workers, socket_path)
    return cfg


def _with_proxies(cfg: dict[str, Any], count: int, socket_path: Path) -> None:
    """Move the router worker's web transport into ``count`` proxy workers on a shared port.

    The router worker listens on ``socket_path`` for the proxies alone (``anonymous-proxy``); each proxy routes
    every role of the realm, and the per-device roles as the authenticator creates them, to that socket.
    """
    worker = cfg["workers"][0]
    worker["id"] = ROUTER_WORKER_ID
    realm = worker["realms"][0]
    web = worker["transports"][0]
    endpoint = {"type": "unix", "path": str(socket_path)}
    worker["transports"] = [{"type": "rawsocket", "endpoint": endpoint, "serializers": [BACKEND_SERIALIZER],
                             "options": {"max_message_size": web["paths"]["ws"]["options"]["max_message_size"]},
                             "auth": {"anonymous-proxy": {"type": "static"}}}]
    web["endpoint"]["shared"] = True
    for method in web["paths"]["ws"]["auth"].values():
        # the authenticator creates device roles in the router worker and routes them in its proxy
        method["config"].update(router_worker=ROUTER_WORKER_ID, backend=BACKEND)
    backend = {"transport": {"type": "rawsocket", "endpoint": endpoint, "url": "ws://localhost",
                             "serializer": BACKEND_SERIALIZER},
               "auth": {"anonymous-proxy": {"type": "static"}}}
    routes = {realm["name"]: {role["name"]: BACKEND for role in realm["roles"]}}
    cfg["workers"] += [{"type": "proxy", "id": f"proxy{i + 1}", "connections": {BACKEND: copy.deepcopy(backend)},
                        "routes": copy.deepcopy(routes), "transports": [copy.deepcopy(web)]} for i in range(count)]


def ready_marker(settings: Settings) -> str | None:
    """What the router prints once every worker is set up, when its port opens earlier (with proxy workers: the
    first proxy listens before the others, and before its own paths are served)."""
    return BOOT_COMPLETE if settings.router.proxy_workers else None


def node_dir(settings: Settings) -> Path:
    """The Crossbar node directory of the router: ``<run_dir>/router``."""
    return Path(settings.paths.run_dir).resolve() / "router"


def write_node_dir(settings: Settings, config: dict[str, Any] | None = None) -> Path:
    """Write the effective config into ``<run_dir>/router`` (owner-only); return that node directory."""
    folder = node_dir(settings)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder.chmod(0o700)  # the proxies' socket lives here: nobody else may reach it
    write_private(folder / "config.json", json.dumps(config or render(settings), indent=2))
    return folder


def local_host(settings: Settings) -> str:
    """The address a client on the router's own host uses for ``router.listen_host`` (a wildcard: loopback)."""
    host = settings.router.listen_host
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104 - a bind address turned client


def http_base(settings: Settings) -> str:
    """Base URL of the router's web transport as seen from the router's own host (the launcher's banner)."""
    host = local_host(settings)
    scheme = "https" if settings.router.tls_cert else "http"
    return f"{scheme}://{host}:{settings.router.listen_port}"


def bridge_base(settings: Settings) -> str:
    """Base URL of the HTTP bridge for a client: the host and port of ``router.url``, ws(s) turned into http(s).

    A client finds the bridge where it finds the WebSocket: in a compose stack that is ``ws://router:8080/ws``,
    from the host the published port.
    """
    url = urlsplit(settings.router.url)
    return f"{'https' if url.scheme == 'wss' else 'http'}://{url.netloc}"
