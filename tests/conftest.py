"""Shared fixtures: a real sandbox server on loopback with a fake clock, and an HTTP client."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime
from typing import Any

import httpx
import pytest

from rillet_dagster.clock import FakeClock
from rillet_dagster.sandbox.server import SandboxOptions, SandboxServer, build_sandbox
from tests.dev_stack import DevStack, running_dev

API_KEY = "test-key-0123456789"
HEADERS = {"Authorization": f"Bearer {API_KEY}", "X-Rillet-API-Version": "4"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The test that stops the session's ``rillet-dagster dev`` runs after all its other users."""
    items.sort(key=lambda item: item.get_closest_marker("stops_dev_stack") is not None)


@pytest.fixture(scope="session", autouse=True)
def _outside_the_checkout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Run from an empty folder: Dagster's CLI loads ``.env`` from its working folder, and a
    checkout where ``rillet-dagster dev`` runs (or ran) has one pointing at that stack."""
    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(previous)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def today() -> date:
    """The UTC date, read once when the test starts (never at import): partition ranges built
    from it stay one day within the test even when the session runs across midnight UTC."""
    return datetime.now(UTC).date()


@pytest.fixture
def start_sandbox(clock: FakeClock) -> Iterator[Callable[..., SandboxServer]]:
    """Start sandboxes (tiny by default) on port 0; all are stopped after the test."""
    servers: list[SandboxServer] = []

    def start(**overrides: Any) -> SandboxServer:
        use_clock = overrides.pop("clock", clock)
        options = SandboxOptions(size="tiny", api_keys=(API_KEY,), webhook_time_factor=0.001)
        for name, value in overrides.items():
            setattr(options, name, value)
        server = SandboxServer(build_sandbox(options, clock=use_clock))
        servers.append(server.start())
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def sandbox(start_sandbox: Callable[..., SandboxServer]) -> SandboxServer:
    return start_sandbox()


@pytest.fixture
def api(sandbox: SandboxServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sandbox.base_url, headers=HEADERS, timeout=10) as client:
        yield client


@pytest.fixture(scope="session")
def dev_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    """One real ``rillet-dagster dev`` for the session, after its first run said "ready"."""
    with running_dev(tmp_path_factory.mktemp("dev")) as stack:
        stack.wait_ready()
        yield stack
