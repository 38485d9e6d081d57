"""Webhook receiver: persisted events/s and latency for 2,000 signed deliveries; memory under
1,000 slow senders.

``rillet-dagster receiver`` runs as its own process pinned to one core (``taskset -c 0``) on a
fresh SQLite file (``synchronous=FULL``) and on a fresh PostgreSQL database (default settings,
synchronous commit). The client, pinned to the other core, is a small asyncio HTTP/1.1 sender
over keep-alive connections with the requests signed in advance, so that it measures the
receiver rather than itself. Events/s counts rows found in the queue afterwards divided by the
time from the first send to the last answer; every answer must be a 200.

Slow senders: :data:`SLOW_SENDERS` connections open at once, each sending a signed body of about
1 MiB in :data:`SLOW_CHUNKS` pieces with a pause after each. A 503 (the receiver's buffer budget
is spent) is retried on a new connection after a random 1-5 s, as Rillet's retries would, until
every event is stored (or :data:`SLOW_DEADLINE_SECONDS` pass). Memory is the receiver process's:
RSS before, its peak (``VmHWM``) and RSS once every sender has its 200.
``RECEIVER_BENCH_UNCAPPED=1`` adds a run with a 1 GiB buffer budget, as if there were none.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import random
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
from rillet_dagster.rillet.signatures import sign, signed_prefix
from rillet_dagster.warehouse.state import make_state_engine, queue_counters

EVENTS = 2000
CONNECTIONS = 8
TOKEN = base64.b64encode(b"receiver-bench-token-0123456789a").decode()
POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
POSTGRES_DATABASE = "rillet_bench_receiver"
_PIN = Path("/usr/bin/taskset").exists() and (os.cpu_count() or 1) > 1
SLOW_SENDERS = 1000
SLOW_BODY_BYTES = 1024 * 1024 - 1024  # just under the default 1 MiB cap
SLOW_CHUNKS = 16
SLOW_PAUSE_SECONDS = 0.1
SLOW_DEADLINE_SECONDS = 100.0


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


def _start_receiver(state_url: str, port: int, http: str, *options: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "rillet_dagster.cli", "receiver", "--port", str(port)]
    command += ["--state-url", state_url, "--log-level", "warning", "--http", http, *options]
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


def _memory_mb(pid: int) -> dict[str, float]:
    """``VmRSS`` (now) and ``VmHWM`` (peak resident) of a process, in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) * 1024 / 1e6
    return values


def measure(
    state_url: str, http: str = "httptools", connections: int = CONNECTIONS
) -> tuple[int, float, float, float, float, float]:
    """(persisted rows, seconds, events/s, p50 ms, p99 ms, peak RSS MB) for :data:`EVENTS`."""
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
        peak = _memory_mb(receiver.pid)["VmHWM"]
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
    return rows, seconds, rows / seconds, cuts[49] * 1000, cuts[98] * 1000, peak


class _SlowSender:
    """One event, sent again and again until it gets a 200; the body is shared padding."""

    def __init__(self, n: int, pad: bytes, timestamp: str) -> None:
        self.event_id = str(uuid.uuid4())
        self.start = b'{"id":"inv_%d","memo":"' % n
        self.end = b'"}'
        self.pad = pad
        head_fields = (timestamp, self.event_id, "INVOICE", "UPDATED")
        mac = hmac.new(base64.b64decode(TOKEN), signed_prefix(*head_fields), hashlib.sha256)
        for part in (self.start, pad, self.end):
            mac.update(part)
        length = len(self.start) + len(pad) + len(self.end)
        self.head = (
            "POST /webhooks/rillet HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\nX-Rillet-Signature: "
            f"{base64.b64encode(mac.digest()).decode()}\r\nX-Rillet-Timestamp: {timestamp}\r\n"
            f"X-Rillet-Id: {self.event_id}\r\nX-Rillet-Entity: INVOICE\r\n"
            "X-Rillet-Event: UPDATED\r\n\r\n"
        ).encode()

    async def send_once(self, port: int) -> int:
        """One attempt on a new connection: the status, or 0 if the connection broke."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answer = asyncio.ensure_future(reader.readline())
        try:
            with contextlib.suppress(ConnectionError):  # a busy answer closes the connection
                writer.write(self.head + self.start)
                view = memoryview(self.pad)
                step = -(-len(view) // SLOW_CHUNKS)
                for offset in range(0, len(view), step):
                    if answer.done():  # answered (503) before the body was read: stop sending
                        break
                    writer.write(view[offset : offset + step])
                    await writer.drain()
                    await asyncio.sleep(SLOW_PAUSE_SECONDS)
                else:
                    writer.write(self.end)
                    await writer.drain()
            status_line = await asyncio.wait_for(answer, 30)
            return int(status_line.split(b" ", 2)[1]) if status_line else 0
        except (ConnectionError, TimeoutError, IndexError, ValueError):
            return 0
        finally:
            answer.cancel()
            writer.close()

    async def deliver(self, port: int, deadline: float, rng: random.Random) -> tuple[int, int]:
        """(attempts, busy answers) until a 200 or the deadline."""
        attempts = busy = 0
        while time.monotonic() < deadline:
            attempts += 1
            status = await self.send_once(port)
            if status == 200:
                return attempts, busy
            busy += status == 503
            await asyncio.sleep(rng.uniform(1.0, 5.0))
        return attempts, busy


def measure_slow_senders(state_url: str, *options: str) -> dict[str, float]:
    """The slow-senders scenario against a fresh receiver started with ``options``."""
    timestamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    pad = b"x" * (SLOW_BODY_BYTES - 40)
    senders = [_SlowSender(n, pad, timestamp) for n in range(SLOW_SENDERS)]
    port = _free_port()
    receiver = _start_receiver(state_url, port, "httptools", *options)
    rng = random.Random(7)

    async def run_all() -> list[tuple[int, int]]:
        deadline = time.monotonic() + SLOW_DEADLINE_SECONDS
        return await asyncio.gather(*(s.deliver(port, deadline, rng) for s in senders))

    try:
        if _PIN:
            os.sched_setaffinity(0, {1})
        before = _memory_mb(receiver.pid)["VmRSS"]
        started = time.perf_counter()
        results = asyncio.run(run_all())
        seconds = time.perf_counter() - started
        time.sleep(1.0)  # let the last answers' buffers go
        memory = _memory_mb(receiver.pid)
    finally:
        if _PIN:
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        receiver.terminate()
        receiver.wait(15)
    engine = make_state_engine(state_url)
    with engine.connect() as connection:
        stored = queue_counters(connection)["pending"]
    engine.dispose()
    return {
        "stored": stored,
        "busy": sum(busy for _, busy in results),
        "seconds": seconds,
        "before": before,
        "peak": memory["VmHWM"],
        "after": memory["VmRSS"],
    }


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
            stored, seconds, rate, p50, p99, peak = measure(url, http, connections)
            rows.append(
                [name, http, connections, f"{stored:,}", f"{seconds:.2f}", f"{rate:,.0f}",
                 f"{p50:.1f}", f"{p99:.1f}", f"{peak:.0f}"]
            )  # fmt: skip
        slow_rows = []
        budgets: list[tuple[str, tuple[str, ...]]] = [("64 MiB (default)", ())]
        if os.environ.get("RECEIVER_BENCH_UNCAPPED"):
            # What a per-request cap alone allows; adds a minute or two and about 1 GB of RSS.
            budgets.append(("1 GiB (no shared cap)", ("--max-buffered-bytes", str(1 << 30))))
        for index, (budget, options) in enumerate(budgets):
            slow = measure_slow_senders(sqlite_url.format(f"slow{index}"), *options)
            slow_rows.append(
                [budget, f"{SLOW_SENDERS:,}", f"{slow['stored']:,}", f"{slow['busy']:,}",
                 f"{slow['seconds']:.1f}", f"{slow['before']:.0f}", f"{slow['peak']:.0f}",
                 f"{slow['after']:.0f}"]
            )  # fmt: skip
    print_table(
        f"Webhook receiver: {EVENTS:,} signed deliveries over concurrent keep-alive "
        "connections, receiver on one core",
        ["queue", "parser", "connections", "persisted", "seconds", "events/s", "p50 ms", "p99 ms",
         "peak RSS MB"],
        rows,
    )  # fmt: skip
    print_table(
        f"Webhook receiver, slow senders: {SLOW_SENDERS:,} connections at once, each a "
        f"{SLOW_BODY_BYTES / 2**20:.1f} MiB body in {SLOW_CHUNKS} pieces {SLOW_PAUSE_SECONDS:g} s "
        "apart; 503s retried after 1-5 s (SQLite queue, httptools)",
        ["buffer budget", "senders", "stored", "503 answers", "seconds", "RSS before MB",
         "peak RSS MB", "RSS after MB"],
        slow_rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
