"""Shared fixtures: a real sandbox server on loopback with a fake clock, and an HTTP client;
and, around every test, the X1 watch for canary secrets (``tests/canary.py``)."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Generator, Iterator
from datetime import UTC, date, datetime
from typing import Any

import httpx
import pytest

from rillet_dagster.clock import FakeClock
from rillet_dagster.sandbox.server import SandboxOptions, SandboxServer, build_sandbox
from tests import canary
from tests.dev_stack import DevStack, running_dev

API_KEY = canary.api_key("suite")
HEADERS = {"Authorization": f"Bearer {API_KEY}", "X-Rillet-API-Version": "4"}
WATCH = canary.WATCH


def pytest_configure(config: pytest.Config) -> None:
    """X1: every test runs with everything at DEBUG, watched for the canaries. pytest's own log
    capture (reports, ``caplog``) stays at WARNING unless asked otherwise: keeping every DEBUG
    record of httpcore and SQLAlchemy for the reports would cost far more than the search."""
    if config.option.log_level is None:
        config.option.log_level = "WARNING"
    canary.install()


@pytest.fixture(autouse=True)
def _no_canary_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test (and the teardown of its other fixtures): the canary was never logged,
    never written to a database of this process (Dagster's event log and runs included), and is
    in no log or SQLite file under the test's ``tmp_path`` (Dagster homes of subprocesses)."""
    WATCH.raise_loggers()
    yield
    folder = request.node.funcargs.get("tmp_path")
    if folder is not None:
        WATCH.scan_folder(folder)
    found = WATCH.drain()
    assert not found, "X1: a canary secret leaked:\n" + "\n".join(found)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """X1 in what pytest captured of a test phase: stdout, stderr (Dagster's console logger
    writes there) and the log records it kept."""
    report = yield
    for title, content in report.sections:
        if title.endswith(f" {report.when}") and canary.contains(content):
            report.outcome = "failed"
            report.longrepr = f"X1: a canary secret in {title}: ...{canary.excerpt(content)}..."
            break
    return report


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
        secrets = webhook_secrets_of(stack)  # the .env goes when the stack stops
        yield stack
    assert_kept_secret(stack, secrets)


def webhook_secrets_of(stack: DevStack) -> list[bytes]:
    """The webhook tokens ``rillet-dagster dev`` made for its session (it cannot be given
    canaries), as text and as decoded HMAC keys, from the ``.env`` it wrote."""
    settings = dict(
        line.split("=", 1) for line in stack.env_file.read_text().splitlines() if "=" in line
    )
    tokens = [t for t in settings["RILLET_WEBHOOK_SECRETS"].split(",") if t]
    assert tokens, "the dev stack wrote no webhook token to its .env"
    return [t.encode() for t in tokens] + [base64.b64decode(t) for t in tokens]


def assert_kept_secret(stack: DevStack, secrets: list[bytes]) -> None:
    """X1 for ``rillet-dagster dev``: its webhook tokens are in neither its console, its logs
    (``dev_logs``) nor its Dagster storage and databases."""
    console = stack.console.encode()
    assert not any(s in console for s in secrets), "the dev console shows its webhook token"
    files = [path for path in sorted(stack.home.rglob("*")) if path.is_file()]
    leaks = [path for path in files if any(s in path.read_bytes() for s in secrets)]
    assert leaks == [], "the dev stack's webhook token is stored or logged"
