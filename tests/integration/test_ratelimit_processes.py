"""Four real processes share one rate budget against the simulator in real time: no 429s.

The simulator is limited to 60 requests per rolling 2 s (Rillet's 60 per 60 s, time-scaled) with
20-500 ms of latency before each request is counted, so latency is large next to the window: the
case where logging send times instead of response times would overrun it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.ratelimit_bench import (
    POSTGRES_URL,
    RATE,
    WINDOW_SECONDS,
    run_load,
    start_sandbox,
)
from rillet_dagster.sandbox.server import SandboxServer
from tests.pg import require_postgres

PROCESSES = 4
RUN_SECONDS = 6.0


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    sandbox = start_sandbox()
    yield sandbox
    sandbox.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'rate-state.db'}"
    require_postgres()
    return POSTGRES_URL


@pytest.mark.slow
@pytest.mark.serial  # measures the share of the budget used
@pytest.mark.timeout(60)
def test_processes_sharing_a_budget_get_no_429s_and_use_most_of_it(
    server: SandboxServer, state_url: str
) -> None:
    result = run_load(server, state_url, PROCESSES, RUN_SECONDS)

    budget = RATE * result.elapsed_seconds / WINDOW_SECONDS
    print(
        f"\n{result.state}: {PROCESSES} processes, {result.accepted} requests in "
        f"{result.elapsed_seconds:g} s (last response at {result.last_response_seconds:.2f} s), "
        f"budget use {100 * result.accepted / budget:.1f}%, 429s {result.worker_429s} "
        f"(server rejected {result.rejected}), max in window {result.max_in_window}/{RATE}"
    )
    assert result.worker_429s == 0
    assert result.rejected == 0
    assert result.other_statuses == 0
    assert result.max_in_window <= RATE
    assert result.accepted >= 0.9 * RATE * (result.elapsed_seconds / WINDOW_SECONDS)
