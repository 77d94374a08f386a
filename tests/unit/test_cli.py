"""The command lines explain every option, and the router config is valid for Crossbar as committed."""

from __future__ import annotations

import subprocess
import sys

from components.core.settings import load_settings
from components.ops import router_config
from components.ops.launcher import crossbar_executable
from components.ops.router_config import bridge_base
from tests.support.harness import REPO, free_port, write_config


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_devices_help_explains_every_option() -> None:
    top = run("-m", "devices", "--help")
    assert top.returncode == 0 and "simulate" in top.stdout and "send" in top.stdout
    sim = run("-m", "devices", "simulate", "--help").stdout
    for option in ("--devices", "--first-device", "--device-ids", "--sensor-types", "--rate", "--count", "--seed",
                   "--batch", "--classic", "--serializer"):
        assert option in sim
    send = run("-m", "devices", "send", "--help").stdout
    for option in ("--device", "--sensor-type", "--value", "--ts", "--data"):
        assert option in send


def test_components_help_lists_the_commands() -> None:
    out = run("-m", "components", "--help").stdout
    for command in ("run", "router", "secrets", "device", "principal", "settings"):
        assert command in out


def test_a_bad_config_stops_a_command_with_the_message_and_exit_code_2(tmp_path) -> None:
    (tmp_path / "config.json").write_text('{"router": {"url": "ws://127.0.0.1:1/ws", "realm": "IOT"}}')
    result = run("-m", "components", "--config", str(tmp_path / "config.json"), "settings")
    assert result.returncode == 2
    assert "setting router.realm: got 'IOT', expected lowercase letters, digits and _" in result.stderr
    assert "Traceback" not in result.stderr


def test_crossbar_check_passes_on_the_committed_router_config() -> None:
    result = subprocess.run([crossbar_executable(), "check", "--cbdir", str(REPO / "router")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "configuration looks good" in result.stdout


def test_with_proxy_workers_the_rendered_config_passes_crossbar_check_and_the_router_worker_takes_proxies_only(
        tmp_path) -> None:
    settings = load_settings(write_config(tmp_path, free_port(), {"router": {"proxy_workers": 2}}), environ={})
    node_dir = router_config.write_node_dir(settings)
    result = subprocess.run([crossbar_executable(), "check", "--cbdir", str(node_dir)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "configuration looks good" in result.stdout, result.stdout + result.stderr
    router, *proxies = router_config.render(settings)["workers"]
    assert [w["type"] for w in proxies] == ["proxy", "proxy"]
    # the router worker listens for the proxies alone: a Unix socket in the owner-only node folder, and no
    # login there but anonymous-proxy (which takes the role a proxy claims)
    [backend] = router["transports"]
    assert backend["type"] == "rawsocket" and backend["endpoint"]["type"] == "unix"
    assert backend["auth"] == {"anonymous-proxy": {"type": "static"}}
    assert (node_dir.stat().st_mode & 0o777) == 0o700 and backend["endpoint"]["path"].startswith(str(node_dir))
    for proxy in proxies:
        [web] = proxy["transports"]
        assert web["endpoint"]["shared"] is True and web["endpoint"]["port"] == settings.router.listen_port
        assert {m["create"] for m in web["paths"]["ws"]["auth"].values()} == {"components.wamp.router_auth.create"}
        assert set(proxy["routes"][settings.router.realm]) == {r["name"] for r in router["realms"][0]["roles"]}


def test_importing_crossbar_prints_no_numpy_abi_warning() -> None:
    # crossbar pulls bjdata, whose binary extension must be built against the installed NumPy
    result = run("-c", "import bjdata, autobahn.wamp.serializer")
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_http_call_finds_the_bridge_at_router_url_and_says_in_one_line_when_nothing_answers(tmp_path) -> None:
    port = free_port()  # nothing listens there
    config = write_config(tmp_path, port)
    result = run("-m", "components", "--config", str(config), "http-call", "iot.get_stats")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"no answer from the HTTP bridge at http://127.0.0.1:{port}/call" in result.stderr
    assert "IOT_ROUTER_URL" in result.stderr


def test_http_call_on_a_signed_bridge_without_its_secret_names_the_missing_file(tmp_path) -> None:
    config = write_config(tmp_path, free_port(), {"router": {"http_bridge": "signed"}})
    result = run("-m", "components", "--config", str(config), "http-call", "iot.get_stats")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{tmp_path / 'secrets' / 'http_bridge.json'} is missing" in result.stderr
    assert not (tmp_path / "secrets").exists()  # a client never makes up a secret the router does not know


def test_the_bridge_base_is_the_host_of_router_url_not_the_listen_address() -> None:
    settings = load_settings(REPO / "config.json", {"IOT_ROUTER_URL": "wss://router:8443/ws",
                                                    "IOT_ROUTER_LISTEN_HOST": "0.0.0.0"})
    assert bridge_base(settings) == "https://router:8443"
