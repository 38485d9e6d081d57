"""Sandbox simulator: generator start-up time and list pages served per second on one core.

The server runs in its own process pinned to one core; load comes from client processes pinned
to the other core, over keep-alive HTTP on loopback, each following next_cursor through a
100-record list and starting over at the end.
"""

from __future__ import annotations

import http.client
import json
import multiprocessing
import os
import resource
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.table import print_table

KEY = "bench-key"
STARTUP_SIZES = {
    "about 100k records": "customers=600,vendors=120,journal_entries=55000",
    "1M journal entries": "customers=600,vendors=120,journal_entries=1000000",
}


def _startup(size: str, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    from rillet_dagster.sandbox.data import generate

    started = time.perf_counter()
    world = generate(seed=7, size=size, now=datetime(2026, 11, 28, 12, tzinfo=UTC))
    seconds = time.perf_counter() - started
    records = sum(len(c) for c in world.store.collections.values())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put((records, seconds, peak_mb))


def measure_startup() -> list[tuple[str, int, float, float]]:
    context = multiprocessing.get_context("spawn")
    results = []
    for label, size in STARTUP_SIZES.items():
        queue = context.Queue()
        process = context.Process(target=_startup, args=(size, queue))
        process.start()
        records, seconds, peak_mb = queue.get(timeout=600)
        process.join()
        results.append((label, records, seconds, peak_mb))
    return results


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _client(port: int, path: str, seconds: float, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > 1:  # type: ignore[operator]
        os.sched_setaffinity(0, {1})
    connection = http.client.HTTPConnection("127.0.0.1", port)
    headers = {"Authorization": f"Bearer {KEY}", "X-Rillet-API-Version": "4"}
    cursor, done, records = None, 0, 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        query = f"{path}?limit=100" + (f"&cursor={cursor}" if cursor else "")
        connection.request("GET", query, headers=headers)
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {body[:200]!r}")
        done += 1
        # Only the pagination tail is parsed: the client must not be the bottleneck.
        tail = body[body.rfind(b'"pagination"') :]
        cursor = json.loads(b"{" + tail).get("pagination", {}).get("next_cursor")
        records += body.count(b'"updated_at"') or 100
    queue.put((done, records))


def measure_lists(seconds: float = 5.0, clients: int = 3) -> list[tuple[str, int, float]]:
    port = _free_port()
    command = [
        sys.executable, "-m", "rillet_dagster.cli", "sandbox", "--port", str(port),
        "--size", "medium", "--api-key", KEY, "--rate-limit", "1000000000/60",
    ]  # fmt: skip
    pin = ["taskset", "-c", "0"] if Path("/usr/bin/taskset").exists() else []
    server = subprocess.Popen(
        pin + command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert server.stdout is not None
        while "RILLET_API_KEY" not in server.stdout.readline():
            pass
        _wait_for_port(port)
        context = multiprocessing.get_context("spawn")
        results = []
        for label, path in (("journal entries", "/journal-entries"), ("invoices", "/invoices")):
            queue = context.Queue()
            workers = [
                context.Process(target=_client, args=(port, path, seconds, queue))
                for _ in range(clients)
            ]
            for worker in workers:
                worker.start()
            totals = [queue.get(timeout=seconds + 60) for _ in workers]
            for worker in workers:
                worker.join()
            requests = sum(t[0] for t in totals)
            results.append((label, requests, requests / seconds))
        return results
    finally:
        server.terminate()
        server.wait(timeout=10)


def _wait_for_port(port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)  # the benchmark's own start-up wait, never in tests
    raise RuntimeError(f"sandbox did not listen on port {port} within {timeout} s")


def main() -> None:
    lists = measure_lists()
    print_table(
        "Sandbox: 100-record list pages served on one core (medium size, 3 keep-alive clients)",
        ["list", "requests in 5 s", "requests/s"],
        [(label, n, f"{rate:.0f}") for label, n, rate in lists],
    )
    startup = measure_startup()
    print_table(
        "Sandbox: generator start-up",
        ["size", "records", "seconds", "peak RSS MB"],
        [(label, f"{n:,}", f"{s:.1f}", f"{m:.0f}") for label, n, s, m in startup],
    )


if __name__ == "__main__":
    main()
