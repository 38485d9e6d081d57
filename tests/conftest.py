"""Shared fixtures: a real sandbox server on loopback with a fake clock, and an HTTP client."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from rillet_dagster.clock import FakeClock
from rillet_dagster.sandbox.server import SandboxOptions, SandboxServer, build_sandbox

API_KEY = "test-key-0123456789"
HEADERS = {"Authorization": f"Bearer {API_KEY}", "X-Rillet-API-Version": "4"}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


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
