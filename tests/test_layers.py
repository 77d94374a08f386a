"""The layer rules of the design: the core imports no WAMP code; URIs live in one module and the README."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from components import uris
from tests.harness import REPO

WAMP_LIBS = ("autobahn", "twisted", "crossbar", "txaio")
# The WAMP adapters and entry points; every other module of components/ is core.
ADAPTERS = {"wamp.py", "router_auth.py", "storage_subscriber.py", "query_callee.py", "__main__.py"}
CORE_DEVICE_MODULES = {"simulator.py", "spool.py"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def core_modules() -> list[Path]:
    comps = [p for p in (REPO / "components").glob("*.py") if p.name not in ADAPTERS]
    devs = [p for p in (REPO / "devices").glob("*.py") if p.name in CORE_DEVICE_MODULES]
    return comps + devs


def test_core_modules_import_no_wamp_code_even_indirectly() -> None:
    core = {f"{p.parent.name}.{p.stem}": p for p in core_modules()}
    assert "components.readings" in core and "components.settings" in core
    for name, path in core.items():
        for imported in imports_of(path):
            assert not imported.startswith(WAMP_LIBS), f"{name} imports {imported}"
            if imported.startswith(("components.", "devices.")):
                assert imported in core, f"core module {name} imports the adapter {imported}"


def test_the_readme_uri_table_matches_the_uri_module() -> None:
    readme = (REPO / "README.md").read_text()
    documented = set(re.findall(r"^\| `(iot\.[a-z0-9_.<>]+)", readme, flags=re.M))
    documented = {re.sub(r"\(.*", "", d) for d in documented}
    expected = set(uris.PROCEDURES) | set(uris.ERRORS) | {"iot.sensor.<device_id>.<sensor_type>",
                                                         "iot.ack.<device_id>"}
    assert documented == expected


def test_uri_constants_follow_the_naming_rule() -> None:
    for value in [*uris.PROCEDURES, *uris.ERRORS]:
        assert re.fullmatch(r"[0-9a-z_]+(\.[0-9a-z_]+)+", value), value
    assert uris.parse_sensor_topic(uris.sensor_topic("7", "humidity")) == ("7", "humidity")
    assert uris.parse_sensor_topic("iot.sensor.7") is None
