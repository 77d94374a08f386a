"""The settings loader: a bad config.json stops start-up with a message naming key, value and expectation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from components.core.errors import ConfigError
from components.core.settings import describe, env_var, known_env_vars, load_settings
from tests.support.harness import REPO


def write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def base() -> dict:
    return json.loads((REPO / "config.json").read_text())


def test_the_shipped_config_loads_and_resolves_paths_against_its_folder() -> None:
    settings = load_settings(REPO / "config.json", environ={})
    assert settings.router.realm == "iot"
    assert settings.storage.backend == "sqlite"
    assert settings.storage.sqlite_path == str(REPO / "var" / "iot.sqlite3")


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda c: c["batching"].update(max_readings="many"),
         r"batching\.max_readings: got 'many', expected an integer"),
        (lambda c: c["batching"].update(max_age_s=0), r"batching\.max_age_s: got 0, expected a value >= 0\.01"),
        (lambda c: c["storage"].update(backend="postgres"),
         r"storage\.backend: got 'postgres', expected one of sqlite, dynamodb"),
        (lambda c: c["router"].update(url="http://x"), r"router\.url: got 'http://x', expected a ws:// or wss://"),
        (lambda c: c["router"].pop("realm"), r"router\.realm: missing, expected a str .*IOT_ROUTER_REALM"),
        (lambda c: c["router"].update(colour="blue"), r"router\.colour: unknown key"),
        (lambda c: c.update(extra={}), r"extra: unknown key"),
        (lambda c: c["storage"].update(shard=2, shards=2), r"storage\.shard: got 2, expected a value below"),
        (lambda c: c["router"].update(tls_cert="cert.pem"), r"router\.tls_cert and router\.tls_key"),
        (lambda c: c["simulator"].update(sensor_types=["Humidity"]), r"simulator\.sensor_types: got \['Humidity'\]"),
    ],
)
def test_a_wrong_or_missing_value_names_key_value_and_expectation(tmp_path: Path, edit, pattern: str) -> None:
    cfg = base()
    edit(cfg)
    with pytest.raises(ConfigError, match=pattern):
        load_settings(write(tmp_path, cfg), environ={})


def test_environment_overrides_config_json(tmp_path: Path) -> None:
    path = write(tmp_path, base())
    settings = load_settings(path, environ={
        "IOT_STORAGE_BACKEND": "dynamodb",
        "IOT_BATCHING_MAX_READINGS": "250",
        "IOT_BATCHING_MAX_AGE_S": "0.5",
        "IOT_STORAGE_DYNAMODB_CREATE_TABLE": "false",
        "IOT_SIMULATOR_SENSOR_TYPES": "humidity, pressure",
        "IOT_STORAGE_DYNAMODB_ENDPOINT_URL": "http://127.0.0.1:8000",
        "IOT_LOG_LEVEL": "warn",
    })
    assert settings.storage.backend == "dynamodb"
    assert settings.batching.max_readings == 250
    assert settings.batching.max_age_s == 0.5
    assert settings.storage.dynamodb_create_table is False
    assert settings.simulator.sensor_types == ["humidity", "pressure"]
    assert settings.storage.dynamodb_endpoint_url == "http://127.0.0.1:8000"
    assert settings.log_level == "warn"


def test_a_bad_override_names_the_environment_variable(tmp_path: Path) -> None:
    expected = r"storage\.shards \(from IOT_STORAGE_SHARDS\): got '0', expected a value >= 1"
    with pytest.raises(ConfigError, match=expected):
        load_settings(write(tmp_path, base()), environ={"IOT_STORAGE_SHARDS": "0"})


def test_an_unknown_iot_environment_variable_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="IOT_STORAGE_BAKCEND: not a setting"):
        load_settings(write(tmp_path, base()), environ={"IOT_STORAGE_BAKCEND": "sqlite"})


def test_a_missing_or_broken_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.json", environ={})
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_settings(tmp_path / "bad.json", environ={})


def test_every_setting_has_a_unique_environment_variable_and_a_doc() -> None:
    rows = describe()
    envs = [env for _, env, _, _ in rows]
    assert len(envs) == len(set(envs))
    for key, env, _, doc in rows:
        assert env == env_var(key) and doc


def test_the_configuration_doc_documents_every_setting_and_environment_variable() -> None:
    readme = (REPO / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"`(IOT_[A-Z0-9_]+)`", readme))
    assert known_env_vars() <= documented, sorted(known_env_vars() - documented)
    assert documented <= known_env_vars(), sorted(documented - known_env_vars())


def test_the_configuration_doc_settings_table_is_the_generated_one() -> None:
    import subprocess
    import sys

    table = subprocess.run([sys.executable, "-m", "components", "settings-table"], capture_output=True, text=True,
                           check=True, cwd=REPO).stdout
    doc = (REPO / "docs" / "configuration.md").read_text()
    assert table.strip() in doc, "regenerate: python -m components settings-table"
