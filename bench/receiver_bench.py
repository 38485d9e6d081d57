"""Webhook receiver: persisted events/s and latency for 2,000 signed deliveries.

``rillet-dagster receiver`` runs as its own process pinned to one core (``taskset -c 0``) on a
fresh SQLite file (``synchronous=FULL``) and on a fresh PostgreSQL database (default settings,
synchronous commit). The client, pinned to the other core, is a small asyncio HTTP/1.1 sender
over keep-alive connections with the requests signed in advance, so that it measures the
receiver rather than itself. Events/s counts rows found in the queue afterwards divided by the
time from the first send to the last answer; every answer must be a 200.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import sqlalchemy as sa

from bench.table import print_table
from rillet_dagster.rillet.signatures import sign
from rillet_dagster.warehouse.state import make_state_engine, queue_counters

EVENTS = 2000
CONNECTIONS = 8
TOKEN = base64.b64encode(b"receiver-bench-token-0123456789a").decode()
POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
POSTGRES_DATABASE = "rillet_bench_receiver"
_PIN = Path("/usr/bin/taskset").exists() and (os.cpu_count() or 1) > 1


def _requests(count: int) -> list[bytes]:
    timestamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    out = []
    for n in range(count):
        event_id = str(uuid.uuid4())
        body = (
            f'{{"id":"inv_{n}","invoice_number":"INV-{n:06d}","status":"OPEN",'
            f'"total":{{"amount":"{n}.00","currency":"USD"}},"items":[{{"id":"l{n}",'
            f'"description":"Subscription","amount":{{"amount":"{n}.00","currency":"USD"}}}}]}}'
        ).encode()
        signature = sign(
            TOKEN, timestamp=timestamp, event_id=event_id, entity="INVOICE", event="UPDATED",
            body=body,
        )  # fmt: skip
        head = (
            "POST /webhooks/rillet HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nX-Rillet-Signature: {signature}\r\n"
            f"X-Rillet-Timestamp: {timestamp}\r\nX-Rillet-Id: {event_id}\r\n"
            "X-Rillet-Entity: INVOICE\r\nX-Rillet-Event: UPDATED\r\n\r\n"
        )
        out.append(head.encode() + body)
    return out


async def _send_all(
    port: int, requests: list[bytes], connections: int = CONNECTIONS
) -> tuple[list[float], list[int], float]:
    pending = iter(requests)
    latencies: list[float] = []
    statuses: list[int] = []

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for request in pending:
                started = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - started)
                statuses.append(int(head.split(b" ", 2)[1]))
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(connections)))
    return latencies, statuses, time.perf_counter() - started


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_receiver(state_url: str, port: int, http: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "rillet_dagster.cli", "receiver", "--port", str(port)]
    command += ["--state-url", state_url, "--log-level", "warning", "--http", http]
    pin = ["taskset", "-c", "0"] if _PIN else []
    env = {**os.environ, "RILLET_WEBHOOK_SECRETS": TOKEN}
    process = subprocess.Popen(pin + command, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the receiver did not become healthy")


def measure(
    state_url: str, http: str = "httptools", connections: int = CONNECTIONS
) -> tuple[int, float, float, float, float]:
    """(persisted rows, seconds, events/s, p50 ms, p99 ms) for :data:`EVENTS` deliveries."""
    requests = _requests(EVENTS)
    port = _free_port()
    receiver = _start_receiver(state_url, port, http)
    engine = make_state_engine(state_url)
    try:
        if _PIN:
            os.sched_setaffinity(0, {1})
        asyncio.run(_send_all(port, _requests(50)))  # warm-up on fresh connections
        with engine.connect() as connection:
            before = queue_counters(connection)["pending"]
        latencies, statuses, seconds = asyncio.run(_send_all(port, requests, connections))
    finally:
        if _PIN:
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        receiver.terminate()
        receiver.wait(15)
    if statuses.count(200) != EVENTS:
        raise RuntimeError(f"not every delivery got a 200: {sorted(set(statuses))}")
    with engine.connect() as connection:
        rows = queue_counters(connection)["pending"] - before
    engine.dispose()
    cuts = statistics.quantiles(latencies, n=100)
    return rows, seconds, rows / seconds, cuts[49] * 1000, cuts[98] * 1000


def _fresh_postgres() -> str | None:
    admin = sa.create_engine(
        POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
    )
    try:
        with admin.connect() as connection:
            connection.execute(
                sa.text(f'DROP DATABASE IF EXISTS "{POSTGRES_DATABASE}" WITH (FORCE)')
            )
            connection.execute(sa.text(f'CREATE DATABASE "{POSTGRES_DATABASE}"'))
    except sa.exc.OperationalError as error:
        print(f"PostgreSQL skipped: {type(error).__name__}", flush=True)
        return None
    finally:
        admin.dispose()
    return (
        sa.engine.make_url(POSTGRES_ADMIN_URL)
        .set(database=POSTGRES_DATABASE)
        .render_as_string(hide_password=False)
    )


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        sqlite_url = f"sqlite:///{Path(directory) / '{}.db'}"
        targets = [
            ("SQLite (synchronous=FULL)", "httptools", CONNECTIONS, sqlite_url.format("a")),
            ("SQLite (synchronous=FULL)", "h11", CONNECTIONS, sqlite_url.format("b")),
            ("SQLite (synchronous=FULL)", "httptools", 16, sqlite_url.format("c")),
        ]
        postgres = _fresh_postgres()
        if postgres:
            targets.append(("PostgreSQL (default)", "httptools", CONNECTIONS, postgres))
            targets.append(("PostgreSQL (default)", "httptools", 16, postgres))
        for name, http, connections, url in targets:
            stored, seconds, rate, p50, p99 = measure(url, http, connections)
            rows.append(
                [name, http, connections, f"{stored:,}", f"{seconds:.2f}", f"{rate:,.0f}",
                 f"{p50:.1f}", f"{p99:.1f}"]
            )  # fmt: skip
    print_table(
        f"Webhook receiver: {EVENTS:,} signed deliveries over concurrent keep-alive "
        "connections, receiver on one core",
        ["queue", "parser", "connections", "persisted", "seconds", "events/s", "p50 ms", "p99 ms"],
        rows,
    )


if __name__ == "__main__":
    main()
