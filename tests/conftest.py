"""Shared fixtures: one real router for the session, fresh component processes per test where needed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer

from components.core.settings import Settings
from tests.support.harness import (
    ComponentProcess,
    RouterProcess,
    Session,
    as_device,
    as_principal,
    derive_settings,
    stack_settings,
    start_query,
    start_storage,
)

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


@dataclass
class RunningStack:
    """Storage, a query callee and a dashboard session on the session's router, for one test."""

    settings: Settings
    storage: ComponentProcess
    query: ComponentProcess
    reader: Session
    sessions: list[Session] = field(default_factory=list)

    @defer.inlineCallbacks
    def device(self, device_id: str) -> Generator[defer.Deferred[Session], Session, Session]:
        """A session as the provisioned device ``device_id``, closed when the test ends."""
        session = yield as_device(self.settings, device_id)
        self.sessions.append(session)
        return session


@pytest_twisted.async_yield_fixture
async def running_stack(request: pytest.FixtureRequest, router: RouterProcess, router_settings: Settings,
                        tmp_path: Path) -> AsyncIterator[RunningStack]:
    """A stack of the test's own (database, keys, spool) on the shared router.

    ``@pytest.mark.stack(section={...})`` overrides settings, as ``derive_settings`` does.
    """
    marker = request.node.get_closest_marker("stack")
    settings = derive_settings(router_settings, tmp_path, marker.kwargs if marker else None)
    storage = await start_storage(settings)
    query: ComponentProcess | None = None
    try:
        query = await start_query(settings)
        stack = RunningStack(settings, storage, query, await as_principal(settings, "dashboard"))
        stack.sessions.append(stack.reader)
        yield stack
        for session in stack.sessions:
            await session.close()
    finally:
        if query is not None:
            query.stop()
        storage.stop()
