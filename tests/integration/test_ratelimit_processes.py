"""R1 (docs' test matrix, 7.3): four real processes with a backlog share one rate budget against
the simulator in real time: 0 x 429, never more than the limit in any rolling window counted at
arrival, and at least 95% of the limit in steady state.

Scale. Rillet allows 60 requests per rolling 60 s; its latency is taken as 20-500 ms. The test
scales time by 15: 60 requests per 4 s with 20/15-500/15 ms (1.3-33 ms) of latency, added by the
simulator before it counts a request (the response follows at once). Scaling the latency with
the window keeps their ratio, and so the ceiling below, what it is at full scale; the full-scale
run itself (60 per 60 s, 20-500 ms, about 4.5 minutes) is a benchmark, not a test:
``python3 run.py bench ratelimit --full-scale``.

Ceiling (derived from ``rillet_dagster/rillet/ratelimit.py``). A slot admitted at s is released
at the response f and counts until f + W (``_expired``: ``finished_at <= now - W``). With a
backlog its place among the N is taken again at f + W + d, d the re-admission lag (the waiter's
wake-up and one admission transaction). Each of the N places therefore cycles every W + H + d,
H = f - s >= L the hold (latency plus the local round trip and the release), so the long-run
arrival rate is N / (W + E[H] + E[d]), and the share of the limit's rate N / W is

    use = W / (W + E[H] + E[d]) <= W / (W + E[L]) = 4 / (4 + 0.01733) = 99.57 %.

Requiring 95% therefore allows E[H] - E[L] + E[d] up to W (1 / 0.95 - 1) - E[L] = 193 ms of
local overhead per request on a loaded CI machine. (At the bench's 2 s window with unscaled
20-500 ms latency the same formula gives 88.5%: 95% is unreachable there by any budget that
cannot see arrival times, which is why this test scales the latency too.)

Backlog. Each process runs 4 threads sending back to back through one RateBudget: at ~15
requests/s and holds of ~30-130 ms fewer than 2 of the 16 threads are in flight on average, so at
every moment a dozen or more wait for a slot. More threads add no demand, only contention: every
waiter sleeps until the same ``wake_at`` and then takes the key's lock in turn, and with 16
threads per process (64 waiters) that queue once added ~250 ms per admission while the 2-core
machine's load average was 6-7 (92.6% on PostgreSQL); 4 threads measured 98.6-99.2% that hour.

Steady state. All N slots are free at t = 0, so the first window is a burst of N arrivals. Use is
measured as the mean number of arrivals in the server's rolling window (t - W, t] over every
window end t from 2W to the end of the run (windows starting after the first one), divided by N;
the run lasts 5 windows (20 s), so 3 window lengths of window ends are averaged. Counting
arrivals over [W, T] would instead step by N as whole batches fall in or out of the span.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.ratelimit_bench import Scale, run_load, start_sandbox
from rillet_dagster.sandbox.server import SandboxServer
from tests.pg import postgres_url

PROCESSES = 4
THREADS_PER_PROCESS = 4
TIME_SCALE = 15.0  # Rillet's 60 s window / the test's 4 s
SCALE = Scale(
    requests=60,
    window_seconds=60.0 / TIME_SCALE,
    latency_ms=(20.0 / TIME_SCALE, 500.0 / TIME_SCALE),
)
WINDOWS = 5
REQUIRED_USE = 0.95


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    sandbox = start_sandbox(SCALE)
    yield sandbox
    sandbox.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'rate-state.db'}"
    return postgres_url("ratelimit_processes")


def test_the_ceiling_leaves_room_for_the_required_use() -> None:
    assert SCALE.ceiling == pytest.approx(4 / (4 + 0.26 / TIME_SCALE))
    assert SCALE.ceiling == pytest.approx(60 / 60.26)  # the same as at full scale
    assert SCALE.ceiling > 0.995 > REQUIRED_USE


@pytest.mark.slow
@pytest.mark.serial  # measures the share of the budget used
@pytest.mark.timeout(120)
def test_four_processes_use_95_percent_of_the_budget_in_steady_state_and_get_no_429s(
    server: SandboxServer, state_url: str
) -> None:
    result = run_load(
        server,
        state_url,
        PROCESSES,
        WINDOWS * SCALE.window_seconds,
        threads=THREADS_PER_PROCESS,
        scale=SCALE,
    )

    start, end = result.steady_span
    print(
        f"\n{result.state}: {PROCESSES} processes x {THREADS_PER_PROCESS} threads, "
        f"{SCALE.describe()}, {result.accepted} requests in {result.elapsed_seconds:g} s; "
        f"start-up use (first "
        f"{result.startup_seconds:g} s) {100 * result.startup_use:.1f}%, steady use (window "
        f"ends {start:g}-{end:g} s) {100 * result.steady_use:.1f}% (ceiling "
        f"{100 * SCALE.ceiling:.2f}%, mean hold {1000 * result.mean_hold_seconds:.0f} ms: "
        f"{100 * result.hold_ceiling:.1f}%); 429s {result.worker_429s} (server rejected "
        f"{result.rejected}), max in window {result.max_in_window}/{SCALE.requests}"
    )
    assert result.worker_429s == 0
    assert result.rejected == 0
    assert result.other_statuses == 0
    assert result.max_in_window <= SCALE.requests
    assert result.steady_use >= REQUIRED_USE
