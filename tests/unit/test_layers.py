"""The layers, checked by folder.

Core and storage import no WAMP code and nothing of the adapters or operations; the storage interface imports
no backend; components import nothing of devices; URIs live in one module and the README.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from components.wamp import uris
from tests.support.harness import REPO

WAMP_LIBS = ("autobahn", "twisted", "crossbar", "txaio")
COMPONENTS = REPO / "components"
ROOMS = ("core", "storage", "wamp", "ops")
PACKAGES = {"components", *(f"components.{room}" for room in ROOMS)}  # their __init__ modules hold nothing


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code (lazy imports too)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module in PACKAGES:  # from components.core import ingest
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def modules_in(room: str) -> dict[str, Path]:
    return {f"components.{room}.{p.stem}": p for p in (COMPONENTS / room).glob("**/*.py")}


def test_components_holds_only_its_rooms_and_the_entry_point() -> None:
    top = {p.name for p in COMPONENTS.iterdir() if not p.name.startswith((".", "__pycache__"))}
    assert top == {"__init__.py", "__main__.py", *ROOMS}
    for room in ROOMS:
        assert (COMPONENTS / room / "__init__.py").exists()
    bad_names = {"common.py", "run.py", "logs.py", "utils.py", "helpers.py", "misc.py"}
    for path in [*COMPONENTS.rglob("*.py"), *(REPO / "devices").rglob("*.py")]:
        assert path.name not in bad_names, path


def test_core_and_storage_import_no_wamp_code_and_nothing_of_the_adapters_or_operations() -> None:
    for room in ("core", "storage"):
        modules = modules_in(room)
        assert modules, room
        for name, path in modules.items():
            for imported in imports_of(path):
                assert not imported.startswith(WAMP_LIBS), f"{name} imports {imported}"
                assert not imported.startswith(("components.wamp", "components.ops", "devices")), \
                    f"{name} imports {imported}"


def test_the_storage_interface_imports_no_backend_and_the_core_only_the_interface() -> None:
    interface = imports_of(COMPONENTS / "storage" / "interface.py")
    assert not {i for i in interface if i.startswith("components.storage.")}, interface
    for name, path in modules_in("core").items():
        storage = {i for i in imports_of(path) if i.startswith("components.storage")}
        assert storage <= {"components.storage.interface"}, f"{name} imports {storage}"


def test_components_import_nothing_of_devices() -> None:
    for path in COMPONENTS.rglob("*.py"):
        devices = {i for i in imports_of(path) if i == "devices" or i.startswith("devices.")}
        assert not devices, f"{path.relative_to(REPO)} imports {devices}"


def test_the_devices_own_modules_import_no_wamp_code() -> None:
    for name in ("simulator.py", "spool.py"):
        for imported in imports_of(REPO / "devices" / name):
            assert not imported.startswith(WAMP_LIBS), f"devices/{name} imports {imported}"


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
