"""Shared rate budget: how much of Rillet's limit several processes use, and how many 429s.

The sandbox runs in this process as a real HTTP server limited to N requests per rolling W seconds
with random inbound latency (delay before a request is counted, the response follows at once).
Worker processes (spawned, each with several threads sharing one RateBudget) send requests
through the budget for a fixed time; the sandbox reports how many it accepted and refused and
the most arrivals in any rolling window, and this process records the time of every accepted
arrival to measure how full the server's window was.

Scales: ``python -m bench ratelimit`` runs Rillet's 60 per 60 s time-scaled to 60 per 2 s with
20-500 ms of latency (unscaled: large next to the window, the hard case for safety); ``python -m
bench ratelimit --full-scale [--state sqlite|postgresql]`` runs the real 60 per 60 s, 4 processes,
4 windows (about 4.5 minutes).

Two figures per run:

* start-up: accepted arrivals in the first 4 windows / 4N. Every slot is free at t=0, so the
  first N requests leave at once and every later batch follows one window after the previous
  batch's responses; short runs step up and down with these batches and flatter the budget.
* steady state: the mean number of accepted arrivals in the server's rolling window (t - W, t],
  over every window end t from 2W to the end of sending (windows that start after the first
  window, so the start-up burst is left out), divided by N. Counting arrivals over [W, T]
  instead would step with the batches (a batch in or out of the span moves it by N), while the
  window's fill only dips for a latency's length once per cycle.

The ceiling (derived from ``rillet_dagster/rillet/ratelimit.py``): a slot admitted at s is
released at its response f (``release`` logs ``finished_at``) and counts until f + W
(``_expired``: ``finished_at <= now - W``). With a backlog (some thread always waiting) its place
among the N is taken again at f + W + d, d the re-admission lag (a waiter wakes at the
``wake_at`` it computed, at least ``poll_seconds`` later when it lost the race, then one
admission transaction). So each of the N places cycles every W + H + d, with H = f - s the hold:
the request's round trip plus the release transaction. Over many cycles (renewal-reward) the
admission rate, and so the arrival rate at Rillet, is N / (W + E[H] + E[d]); as a share of the
limit's long-run rate N / W:

    use = W / (W + E[H] + E[d]) <= W / (W + E[L])

because the hold includes the request's latency to Rillet L (here all of it: the simulator's
delay comes before the arrival is counted). W / (W + E[L]) is the ceiling of any budget that
cannot see arrival times: a slot cannot be reused before its request was counted and one window
has passed since. At 20-500 ms (mean 260 ms) it is 2 / 2.26 = 88.5% with the 2 s window, and
60 / 60.26 = 99.57% at Rillet's 60 s window. The table also shows W / (W + measured mean hold);
what separates it from the measured use is d.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import create_engine, delete, text
from sqlalchemy.exc import SQLAlchemyError

from bench.table import print_table
from rillet_dagster.clock import Clock
from rillet_dagster.rillet.ratelimit import RateBudget, keys_table, safe_url, slots_table
from rillet_dagster.sandbox.limits import RollingWindowLimiter

if TYPE_CHECKING:
    from rillet_dagster.sandbox.server import SandboxServer

API_KEY = "k-rate-0123456789"
KEY_LABEL = API_KEY[:4] + "..."
RATE = 60
WINDOW_SECONDS = 2.0
LATENCY_MS = (20.0, 500.0)
REQUEST_TIMEOUT = 5.0
# One thread per process only reaches ~4 requests/s at 260 ms mean latency; the budget is 30/s,
# so each process runs enough threads to keep the budget, not the clients, the bottleneck.
THREADS_PER_PROCESS = 16
POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
STARTUP_WINDOWS = 4  # the start-up figure: the first 4 windows (8 s at the 2 s window)
STEADY_WINDOWS = 10  # a default run: 10 windows, the steady figure over the last 9
FULL_SCALE_WINDOWS = 4  # 240 s at Rillet's 60 s window: the steady figure over the last 3


@dataclass(frozen=True)
class Scale:
    """A rate limit (N per rolling W seconds) and the simulator's latency range."""

    requests: int = RATE
    window_seconds: float = WINDOW_SECONDS
    latency_ms: tuple[float, float] = LATENCY_MS

    @property
    def mean_latency_seconds(self) -> float:
        return (self.latency_ms[0] + self.latency_ms[1]) / 2000

    @property
    def ceiling(self) -> float:
        """W / (W + mean latency): the most of the budget usable in steady state."""
        return self.window_seconds / (self.window_seconds + self.mean_latency_seconds)

    def describe(self) -> str:
        low, high = self.latency_ms
        return (
            f"{self.requests} requests per {self.window_seconds:g} s, "
            f"{low:.3g}-{high:.3g} ms latency"
        )


SCALED = Scale()  # Rillet's 60 per 60 s, time-scaled to 2 s; the latency is not scaled
FULL_SCALE = Scale(RATE, 60.0, LATENCY_MS)  # Rillet's real limit


class RecordingLimiter(RollingWindowLimiter):
    """The simulator's limiter, also keeping the time of every arrival it admitted.

    The time is read again right after ``admit`` (the sandbox calls it from its one event-loop
    thread, so microseconds after the limiter's own reading).
    """

    def __init__(self, clock: Clock, requests: int, window_seconds: float) -> None:
        super().__init__(clock, requests, window_seconds)
        self._admitted: dict[str, list[float]] = {}
        self._times_lock = threading.Lock()

    def admit(self, key: str) -> bool:
        admitted = super().admit(key)
        if admitted:
            moment = self.clock.time()
            with self._times_lock:
                self._admitted.setdefault(key, []).append(moment)
        return admitted

    def admitted_times(self, key: str) -> list[float]:
        with self._times_lock:
            return list(self._admitted.get(key, ()))

    def reset(self) -> None:
        super().reset()
        with self._times_lock:
            self._admitted.clear()


def start_sandbox(scale: Scale = SCALED, seed: int = 3) -> SandboxServer:
    # Imported here so that spawned workers do not pay for the simulator's imports.
    from rillet_dagster.sandbox.faults import Faults
    from rillet_dagster.sandbox.server import SandboxOptions, SandboxServer, build_sandbox

    options = SandboxOptions(
        size="tiny",
        api_keys=(API_KEY,),
        rate_limit=scale.requests,
        rate_window_seconds=scale.window_seconds,
        faults=Faults(
            latency_min_ms=scale.latency_ms[0], latency_max_ms=scale.latency_ms[1], seed=seed
        ),
    )
    sandbox = build_sandbox(options)
    sandbox.limiter = RecordingLimiter(sandbox.clock, scale.requests, scale.window_seconds)
    return SandboxServer(sandbox).start()


def _limiter(server: SandboxServer) -> RecordingLimiter:
    limiter = server.sandbox.limiter
    if not isinstance(limiter, RecordingLimiter):
        raise TypeError("start the sandbox with start_sandbox() to record arrival times")
    return limiter


def postgres_unavailable(url: str = POSTGRES_URL) -> str | None:
    """Why PostgreSQL at ``url`` cannot be used, or None when it answers."""
    engine = create_engine(url, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        return f"PostgreSQL at {safe_url(url)} is unreachable: {type(cause).__name__}"
    finally:
        engine.dispose()
    return None


def clear_state(state_url: str) -> None:
    """Forget this key's slots and pause, so that a run starts from an empty window."""
    budget = RateBudget(state_url, API_KEY, requests=RATE, window_seconds=WINDOW_SECONDS)
    engine = create_engine(state_url)
    try:
        with engine.begin() as connection:
            connection.execute(delete(slots_table).where(slots_table.c.key_hash == budget.key_hash))
            connection.execute(delete(keys_table).where(keys_table.c.key_hash == budget.key_hash))
    finally:
        engine.dispose()


@dataclass
class WorkerCounts:
    ok: int = 0
    rate_limited: int = 0
    other: int = 0
    last_response: float = 0.0
    waited_seconds: float = 0.0
    holds: int = 0
    hold_seconds: float = 0.0  # summed: from acquire's return to release's return


@dataclass(frozen=True)
class WorkerPlan:
    state_url: str
    base_url: str
    run_seconds: float
    threads: int
    scale: Scale


def worker(plan: WorkerPlan, ready: Any, go: Any, start_at: Any, results: Any) -> None:
    """One process: ``threads`` threads sending GET /tax-rates through one shared RateBudget.

    No request starts after the deadline. Threads still waiting in ``acquire`` then are not
    waited for (that would add up to a window to every run): the counts are reported once no
    thread is mid-request, and the process exits with the waiters, as a killed process would.
    """
    scale = plan.scale
    budget = RateBudget(
        plan.state_url,
        API_KEY,
        requests=scale.requests,
        window_seconds=scale.window_seconds,
        request_timeout=REQUEST_TIMEOUT,
    )
    headers = {"Authorization": f"Bearer {API_KEY}", "X-Rillet-API-Version": "4"}
    limits = httpx.Limits(max_connections=plan.threads, max_keepalive_connections=plan.threads)
    client = httpx.Client(
        base_url=plan.base_url, headers=headers, timeout=REQUEST_TIMEOUT, limits=limits
    )
    counts = WorkerCounts()
    changed = threading.Condition()
    sending = 0
    running = plan.threads
    budget.in_window()  # connect and create the tables before the run starts
    ready.put(True)
    go.wait()
    deadline = start_at.value + plan.run_seconds

    def send() -> bool:
        """One request through the budget; False once the run is over."""
        nonlocal sending
        with budget.slot():
            admitted = time.time()
            with changed:
                sending += 1  # before the deadline check, so the reporter cannot miss it
            try:
                if time.time() >= deadline:
                    return False
                status = client.get("/tax-rates").status_code
                with changed:
                    counts.last_response = max(counts.last_response, time.time())
                    counts.ok += status == 200
                    counts.rate_limited += status == 429
                    counts.other += status not in (200, 429)
            finally:
                with changed:
                    sending -= 1
                    changed.notify_all()
        with changed:
            counts.holds += 1
            counts.hold_seconds += time.time() - admitted
        if status == 429:
            budget.pause(scale.window_seconds)  # Rillet sends no Retry-After: wait a window
        return True

    def loop() -> None:
        nonlocal running
        try:
            while time.time() < deadline and send():
                pass
        finally:
            with changed:
                running -= 1
                changed.notify_all()

    for _ in range(plan.threads):
        threading.Thread(target=loop, daemon=True).start()
    with changed:
        while running and (sending or time.time() < deadline):
            changed.wait(timeout=max(deadline - time.time(), 0.05))
        counts.waited_seconds = budget.waited_seconds
        results.put(counts)
    results.close()
    results.join_thread()
    # Threads may still be waiting in acquire (or mid-transaction); leave like a killed process
    # rather than let interpreter shutdown run under them.
    os._exit(0)


def _get(queue: Any, workers: list[Any], timeout: float) -> Any:
    """The next item from ``queue``, failing fast when a worker died instead of reporting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return queue.get(timeout=0.5)
        except Empty:
            dead = [p.exitcode for p in workers if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"rate-budget worker exited with {dead[0]}") from None
    raise TimeoutError(f"rate-budget workers did not report within {timeout:g} s")


def window_fill(arrivals: Sequence[float], window: float, start: float, end: float) -> float:
    """The mean over window ends t in [start, end] of the arrivals in (t - window, t].

    An arrival at a lies in (t - window, t] for t in [a, a + window): it adds the length of that
    interval's overlap with [start, end], divided by end - start.
    """
    if end <= start:
        raise ValueError("the span to average over is empty")
    covered = sum(max(0.0, min(a + window, end) - max(a, start)) for a in arrivals)
    return covered / (end - start)


@dataclass
class LoadResult:
    state: str
    processes: int
    scale: Scale
    accepted: int
    rejected: int
    worker_429s: int
    other_statuses: int
    max_in_window: int
    elapsed_seconds: float  # the sending period: no request starts after it
    last_response_seconds: float
    mean_hold_seconds: float
    arrivals: list[float] = field(repr=False)  # accepted, seconds after the start

    @property
    def budget(self) -> float:
        """Requests the limit allows over the sending period, at its long-run rate N / W.

        Over a period T the server accepts up to N * ceil(T / W) arrivals, since the first window
        starts full; the long-run rate is the stricter yardstick.
        """
        return self.scale.requests * self.elapsed_seconds / self.scale.window_seconds

    @property
    def startup_seconds(self) -> float:
        return min(self.elapsed_seconds, STARTUP_WINDOWS * self.scale.window_seconds)

    @property
    def startup_requests(self) -> int:
        return sum(1 for a in self.arrivals if a <= self.startup_seconds)

    @property
    def startup_use(self) -> float:
        """Accepted arrivals in the first windows over what the long-run rate allows then."""
        allowed = self.scale.requests * self.startup_seconds / self.scale.window_seconds
        return self.startup_requests / allowed

    @property
    def steady_span(self) -> tuple[float, float]:
        """Window ends measured: from the end of the first window after the start-up one."""
        return 2 * self.scale.window_seconds, self.elapsed_seconds

    @property
    def steady_requests(self) -> int:
        """Accepted arrivals after the first window, up to the end of sending."""
        window, end = self.scale.window_seconds, self.elapsed_seconds
        return sum(1 for a in self.arrivals if window < a <= end)

    @property
    def steady_use(self) -> float:
        """The server's rolling window's mean fill after the first window, as a share of N."""
        start, end = self.steady_span
        fill = window_fill(self.arrivals, self.scale.window_seconds, start, end)
        return fill / self.scale.requests

    @property
    def hold_ceiling(self) -> float:
        """W / (W + measured mean hold): the ceiling without the re-admission lag."""
        window = self.scale.window_seconds
        return window / (window + self.mean_hold_seconds)


def run_load(
    server: SandboxServer,
    state_url: str,
    processes: int,
    run_seconds: float,
    threads: int = THREADS_PER_PROCESS,
    scale: Scale = SCALED,
) -> LoadResult:
    """Run ``processes`` workers against ``server`` for ``run_seconds`` with a fresh window.

    ``scale`` must be the one ``server`` was started with.
    """
    clear_state(state_url)
    httpx.post(server.base_url + "/_sandbox/stats/reset").raise_for_status()
    context = multiprocessing.get_context("spawn")
    ready, results = context.Queue(), context.Queue()
    go, start_at = context.Event(), context.Value("d", 0.0)
    plan = WorkerPlan(state_url, server.base_url, run_seconds, threads, scale)
    workers = [
        context.Process(target=worker, args=(plan, ready, go, start_at, results), daemon=True)
        for _ in range(processes)
    ]
    for process in workers:
        process.start()
    try:
        for _ in workers:
            _get(ready, workers, timeout=60)
        start_at.value = time.time()
        go.set()
        counts: list[WorkerCounts] = [
            _get(results, workers, timeout=run_seconds + 60) for _ in workers
        ]
    finally:
        for process in workers:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
    stats = httpx.get(server.base_url + "/_sandbox/stats").json()["keys"].get(KEY_LABEL, {})
    arrivals = [a - start_at.value for a in _limiter(server).admitted_times(API_KEY)]
    clear_state(state_url)  # a shared PostgreSQL keeps nothing of the run
    label = "PostgreSQL" if state_url.startswith("postgresql") else "SQLite"
    holds = sum(c.holds for c in counts)
    return LoadResult(
        state=label,
        processes=processes,
        scale=scale,
        accepted=int(stats.get("accepted", 0)),
        rejected=int(stats.get("rejected", 0)),
        worker_429s=sum(c.rate_limited for c in counts),
        other_statuses=sum(c.other for c in counts),
        max_in_window=int(stats.get("max_in_window", 0)),
        elapsed_seconds=run_seconds,
        last_response_seconds=max(c.last_response for c in counts) - start_at.value,
        mean_hold_seconds=sum(c.hold_seconds for c in counts) / holds if holds else 0.0,
        arrivals=sorted(arrivals),
    )


def result_rows(result: LoadResult) -> list[tuple[object, ...]]:
    """A start-up row and a steady-state row for one run."""
    scale = result.scale
    start, end = result.steady_span
    common = (result.state, result.processes)
    safety = (result.worker_429s, f"{result.max_in_window} / {scale.requests}")
    return [
        (
            *common,
            f"start-up: 0-{result.startup_seconds:g} s from empty",
            result.startup_requests,
            f"{100 * result.startup_use:.1f}%",
            "",
            "",
            *safety,
        ),
        (
            *common,
            f"steady: window ends {start:g}-{end:g} s",
            result.steady_requests,
            f"{100 * result.steady_use:.1f}%",
            f"{100 * scale.ceiling:.1f}%",
            f"{1000 * result.mean_hold_seconds:.0f} ms: {100 * result.hold_ceiling:.1f}%",
            *safety,
        ),
    ]


HEADERS = [
    "state",
    "processes",
    "phase",
    "requests",
    "budget use",
    "ceiling W/(W+mean latency)",
    "mean hold: W/(W+hold)",
    "429s",
    "max in window",
]


def _state_urls(directory: str, states: Sequence[str]) -> list[str]:
    urls = []
    if "sqlite" in states:
        urls.append(f"sqlite:///{Path(directory) / 'rate-state.db'}")
    if "postgresql" in states:
        reason = postgres_unavailable()
        if reason:
            print(f"skipping PostgreSQL rows: {reason}")
        else:
            urls.append(POSTGRES_URL)
    return urls


def run_table(
    scale: Scale, windows: int, process_counts: Sequence[int], states: Sequence[str]
) -> None:
    rows: list[tuple[object, ...]] = []
    run_seconds = windows * scale.window_seconds
    server = start_sandbox(scale)
    try:
        with tempfile.TemporaryDirectory() as directory:
            for state_url in _state_urls(directory, states):
                for processes in process_counts:
                    result = run_load(server, state_url, processes, run_seconds, scale=scale)
                    rows.extend(result_rows(result))
                    print(
                        f"{result.state}, {processes} processes: {result.accepted} accepted, "
                        f"{result.rejected} refused, last response at "
                        f"{result.last_response_seconds:.2f} s",
                        flush=True,
                    )
    finally:
        server.stop()
    print_table(
        f"Shared rate budget: {scale.describe()}, {THREADS_PER_PROCESS} threads per process, "
        f"{run_seconds:g} s runs ({windows} windows)",
        HEADERS,
        rows,
    )


def main(argv: Sequence[str] = ()) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench ratelimit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--full-scale",
        action="store_true",
        help=f"Rillet's real 60 per 60 s, 4 processes, {FULL_SCALE_WINDOWS} windows",
    )
    parser.add_argument(
        "--state",
        choices=("sqlite", "postgresql", "both"),
        help="the budget's state database (default: both; sqlite with --full-scale)",
    )
    options = parser.parse_args(list(argv))
    state = options.state or ("sqlite" if options.full_scale else "both")
    states = ("sqlite", "postgresql") if state == "both" else (state,)
    if options.full_scale:
        run_table(FULL_SCALE, FULL_SCALE_WINDOWS, (4,), states)
    else:
        run_table(SCALED, STEADY_WINDOWS, (1, 2, 4), states)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
