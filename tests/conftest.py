"""Shared fixtures: one real router for the session, fresh component processes per test where needed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from components.core.settings import Settings
from tests.support.harness import RouterProcess, stack_settings

pytest_plugins = ["tests.support.store_fixtures"]


@pytest.fixture(scope="session")
def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for the session-wide stack."""
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def router_settings(shared_root: Path) -> Settings:
    """Settings of the session-wide router (free port, secrets and devices 0 to 2 provisioned)."""
    return stack_settings(shared_root)


@pytest.fixture(scope="session")
def router(router_settings: Settings) -> Iterator[RouterProcess]:
    """A real Crossbar router from router/config.json, shared by the tests of the session."""
    proc = RouterProcess(router_settings).start()
    try:
        yield proc
    finally:
        proc.stop()
