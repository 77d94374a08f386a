"""The router's effective Crossbar config: ``router/config.json`` with the settings applied.

``router/config.json`` is a complete config for the defaults (``crossbar check`` passes on it). Before a
start, the settings are applied to it (listen address, realm, TLS, ping, where secrets live, and the HTTP
bridge's signing secret when signing is on) and the result is written, owner-only, into the run folder
that Crossbar uses as its node directory, so nothing is ever written into ``router/``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from components.core.files import write_private
from components.core.settings import Settings
from components.ops.credentials import CredentialStore

ROUTER_DIR = Path(__file__).resolve().parents[2] / "router"
LOOPBACK_NETS = ["127.0.0.1/32", "::1/128"]


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
    return cfg


def write_node_dir(settings: Settings, config: dict[str, Any] | None = None) -> Path:
    """Write the effective config into ``<run_dir>/router``; return that node directory."""
    node_dir = Path(settings.paths.run_dir) / "router"
    node_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(node_dir / "config.json", json.dumps(config or render(settings), indent=2))
    return node_dir


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
