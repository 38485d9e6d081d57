"""Shared rate budget: how much of Rillet's limit several processes use, and how many 429s.

The sandbox runs in this process as a real HTTP server limited to 60 requests per rolling 2 s
(Rillet's 60 per 60 s, time-scaled) with 20-500 ms of inbound latency. Worker processes (spawned,
each with several threads sharing one RateBudget) send requests through the budget for a fixed
time; the sandbox reports how many it accepted and refused, and the most arrivals in any window.

Budget use is requests / (N * T / W) over the sending period T. Every slot starts full at t=0,
so short runs step up and down with the batches; over long runs it settles near W / (W + mean
latency), about 88% here (latency is 13% of this 2 s window, but 0.4% of Rillet's 60 s one):
a slot is free again one window after its response, and its next request then still has to
travel to Rillet. No budget that cannot see arrival times can do better without risking a 429.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from queue import Empty
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import create_engine, delete, text
from sqlalchemy.exc import SQLAlchemyError

from bench.table import print_table
from rillet_dagster.rillet.ratelimit import RateBudget, keys_table, safe_url, slots_table

if TYPE_CHECKING:
    from rillet_dagster.sandbox.server import SandboxServer

API_KEY = "k-rate-0123456789"
KEY_LABEL = API_KEY[:4] + "..."
RATE = 60
WINDOW_SECONDS = 2.0
LATENCY_MS = (20, 500)
REQUEST_TIMEOUT = 5.0
# One thread per process only reaches ~4 requests/s at 260 ms mean latency; the budget is 30/s,
# so each process runs enough threads to keep the budget, not the clients, the bottleneck.
THREADS_PER_PROCESS = 16
POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def start_sandbox(seed: int = 3) -> SandboxServer:
    # Imported here so that spawned workers do not pay for the simulator's imports.
    from rillet_dagster.sandbox.faults import Faults
    from rillet_dagster.sandbox.server import SandboxOptions, SandboxServer, build_sandbox

    options = SandboxOptions(
        size="tiny",
        api_keys=(API_KEY,),
        rate_limit=RATE,
        rate_window_seconds=WINDOW_SECONDS,
        faults=Faults(latency_min_ms=LATENCY_MS[0], latency_max_ms=LATENCY_MS[1], seed=seed),
    )
    return SandboxServer(build_sandbox(options)).start()


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


def worker(
    state_url: str,
    base_url: str,
    run_seconds: float,
    threads: int,
    ready: Any,
    go: Any,
    start_at: Any,
    results: Any,
) -> None:
    """One process: ``threads`` threads sending GET /tax-rates through one shared RateBudget.

    No request starts after the deadline. Threads still waiting in ``acquire`` then are not
    waited for (that would add up to a window to every run): the counts are reported once no
    thread is mid-request, and the process exits with the waiters, as a killed process would.
    """
    budget = RateBudget(
        state_url,
        API_KEY,
        requests=RATE,
        window_seconds=WINDOW_SECONDS,
        request_timeout=REQUEST_TIMEOUT,
    )
    headers = {"Authorization": f"Bearer {API_KEY}", "X-Rillet-API-Version": "4"}
    limits = httpx.Limits(max_connections=threads, max_keepalive_connections=threads)
    client = httpx.Client(
        base_url=base_url, headers=headers, timeout=REQUEST_TIMEOUT, limits=limits
    )
    counts = WorkerCounts()
    changed = threading.Condition()
    sending = 0
    running = threads
    budget.in_window()  # connect and create the tables before the run starts
    ready.put(True)
    go.wait()
    deadline = start_at.value + run_seconds

    def send() -> bool:
        """One request through the budget; False once the run is over."""
        nonlocal sending
        with budget.slot():
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
        if status == 429:
            budget.pause(WINDOW_SECONDS)  # Rillet sends no Retry-After: wait a window
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

    for _ in range(threads):
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


@dataclass
class LoadResult:
    state: str
    processes: int
    accepted: int
    rejected: int
    worker_429s: int
    other_statuses: int
    max_in_window: int
    elapsed_seconds: float  # the sending period: no request starts after it
    last_response_seconds: float

    @property
    def budget(self) -> float:
        """Requests the limit allows over the sending period, at its long-run rate N / W.

        Over a period T the server accepts up to N * ceil(T / W) arrivals, since the first window
        starts full; the long-run rate is the stricter yardstick.
        """
        return RATE * self.elapsed_seconds / WINDOW_SECONDS

    @property
    def budget_use(self) -> float:
        return self.accepted / self.budget


def run_load(
    server: SandboxServer,
    state_url: str,
    processes: int,
    run_seconds: float,
    threads: int = THREADS_PER_PROCESS,
) -> LoadResult:
    """Run ``processes`` workers against ``server`` for ``run_seconds`` with a fresh window."""
    clear_state(state_url)
    httpx.post(server.base_url + "/_sandbox/stats/reset").raise_for_status()
    context = multiprocessing.get_context("spawn")
    ready, results = context.Queue(), context.Queue()
    go, start_at = context.Event(), context.Value("d", 0.0)
    workers = [
        context.Process(
            target=worker,
            args=(state_url, server.base_url, run_seconds, threads, ready, go, start_at, results),
            daemon=True,
        )
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
    clear_state(state_url)  # a shared PostgreSQL keeps nothing of the run
    label = "PostgreSQL" if state_url.startswith("postgresql") else "SQLite"
    return LoadResult(
        state=label,
        processes=processes,
        accepted=int(stats.get("accepted", 0)),
        rejected=int(stats.get("rejected", 0)),
        worker_429s=sum(c.rate_limited for c in counts),
        other_statuses=sum(c.other for c in counts),
        max_in_window=int(stats.get("max_in_window", 0)),
        elapsed_seconds=run_seconds,
        last_response_seconds=max(c.last_response for c in counts) - start_at.value,
    )


def main() -> None:
    rows = []
    server = start_sandbox()
    try:
        with tempfile.TemporaryDirectory() as directory:
            sqlite_url = f"sqlite:///{Path(directory) / 'rate-state.db'}"
            reason = postgres_unavailable()
            if reason:
                print(f"skipping PostgreSQL rows: {reason}")
            for state_url in (sqlite_url,) if reason else (sqlite_url, POSTGRES_URL):
                for processes in (1, 2, 4):
                    result = run_load(server, state_url, processes, run_seconds=8.0)
                    rows.append(
                        (
                            result.state,
                            processes,
                            result.accepted,
                            f"{result.elapsed_seconds:.1f}",
                            f"{100 * result.budget_use:.1f}%",
                            result.worker_429s,
                            f"{result.max_in_window} / {RATE}",
                        )
                    )
    finally:
        server.stop()
    print_table(
        f"Shared rate budget: {RATE} requests per {WINDOW_SECONDS:g} s, "
        f"{LATENCY_MS[0]}-{LATENCY_MS[1]} ms latency, {THREADS_PER_PROCESS} threads per process",
        ["state", "processes", "requests", "seconds", "budget use", "429s", "max in window"],
        rows,
    )


if __name__ == "__main__":
    main()
