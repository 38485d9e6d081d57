"""The receiver as a real ``rillet-dagster receiver`` process (test-matrix 7.1 W15, W16).

W15: the process is SIGKILLed under load at random moments, three times over one SQLite queue;
every event that got a 2xx before the kill must be in the queue afterwards (persist-before-ack).
W16: 1,000 events each sent 4 times by 50 concurrent senders are stored exactly once.
"""

from __future__ import annotations

import base64
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from rillet_dagster.warehouse.state import ids_present, make_state_engine, queue_counters
from tests.integration.test_receiver import PATH, TOKEN, Delivery, invoice_body

_SCRIPT = Path(sys.executable).parent / "rillet-dagster"
# The installed console script when there is one, so the test runs what an operator runs.
RECEIVER = [str(_SCRIPT) if _SCRIPT.exists() else sys.executable, "receiver"]
if not _SCRIPT.exists():
    RECEIVER[1:1] = ["-m", "rillet_dagster.cli"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_receiver(
    state_url: str, port: int, env_extra: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "RILLET_WEBHOOK_SECRETS": TOKEN, **(env_extra or {})}
    process = subprocess.Popen(
        [*RECEIVER, "--port", str(port), "--state-url", state_url, "--log-level", "warning"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"receiver exited: {process.stderr.read().decode()}")  # type: ignore[union-attr]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.05)
    process.kill()
    raise AssertionError("receiver did not become healthy within 30 s")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def test_sigkill_under_load_loses_no_acknowledged_event(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:  # W15
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    rng = random.Random(15)
    acknowledged: list[str] = []
    lock = threading.Lock()
    kills = 3
    for _ in range(kills):
        port = _free_port()
        process = start_receiver(state_url, port)
        processes.append(process)
        stop = threading.Event()

        def send(seed: int, port: int = port, stop: threading.Event = stop) -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
                while not stop.is_set():
                    delivery = Delivery(invoice_body(seed))
                    try:
                        response = client.post(
                            PATH, content=delivery.body, headers=delivery.headers()
                        )
                    except httpx.TransportError:
                        return  # the receiver is gone: this one was never acknowledged
                    if 200 <= response.status_code < 300:
                        with lock:
                            acknowledged.append(delivery.event_id)

        senders = [threading.Thread(target=send, args=(n,)) for n in range(8)]
        for thread in senders:
            thread.start()
        # Kill at a random point of a stream of acknowledgements (a count, not a time, so that
        # a busy machine still kills a receiver under load).
        target = len(acknowledged) + rng.randint(120, 400)
        deadline = time.monotonic() + 60
        while len(acknowledged) < target:
            assert time.monotonic() < deadline, f"only {len(acknowledged)} acknowledged"
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
        stop.set()
        for thread in senders:
            thread.join(10)
    engine = make_state_engine(state_url)
    with engine.connect() as connection:
        present = ids_present(connection, acknowledged)
        stored = queue_counters(connection)["pending"]
    engine.dispose()
    print(f"{len(acknowledged)} acknowledged over {kills} kills, all present")
    missing = set(acknowledged) - present
    assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged events were lost"
    assert stored >= len(acknowledged)


def test_concurrent_redeliveries_stored_exactly_once(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:  # W16
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    port = _free_port()
    processes.append(start_receiver(state_url, port))
    deliveries = [Delivery(invoice_body(n)) for n in range(1000)]
    sends = [d for d in deliveries for _ in range(4)]
    random.Random(16).shuffle(sends)
    local = threading.local()

    def send(delivery: Delivery) -> tuple[int, float]:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        started = time.monotonic()
        response = local.client.post(PATH, content=delivery.body, headers=delivery.headers())
        return response.status_code, time.monotonic() - started

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(send, sends))
    assert [status for status, _ in results].count(200) == 4000
    assert max(seconds for _, seconds in results) < 30
    engine = make_state_engine(state_url)
    with engine.connect() as connection:
        counters = queue_counters(connection)
    engine.dispose()
    assert (counters["pending"], counters["duplicates"]) == (1000, 3000)


def test_cli_refuses_to_start_without_valid_tokens(tmp_path: Path) -> None:
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    base = {k: v for k, v in os.environ.items() if k != "RILLET_WEBHOOK_SECRETS"}
    missing = subprocess.run(
        [*RECEIVER, "--state-url", state_url],
        env=base,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode != 0
    assert b"RILLET_WEBHOOK_SECRETS" in missing.stderr
    secret = "not!base64-but-secret"
    invalid = subprocess.run(
        [*RECEIVER, "--state-url", state_url, "--secrets-env", "MY_TOKENS"],
        env={**base, "MY_TOKENS": f"{TOKEN},{secret}"},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert invalid.returncode != 0
    assert b"MY_TOKENS: webhook token 2" in invalid.stderr
    assert secret.encode() not in invalid.stderr and TOKEN.encode() not in invalid.stderr


def test_cli_refuses_short_tokens_and_impossible_budgets(tmp_path: Path) -> None:
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    base = {k: v for k, v in os.environ.items() if k != "RILLET_WEBHOOK_SECRETS"}
    short = base64.b64encode(b"123456").decode()  # 6 bytes: guessable offline from one delivery
    refused = subprocess.run(
        [*RECEIVER, "--state-url", state_url, "--port", str(_free_port())],
        env={**base, "RILLET_WEBHOOK_SECRETS": f"{TOKEN},{short}"},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode != 0
    message = refused.stderr.decode()
    assert "RILLET_WEBHOOK_SECRETS: webhook token 2: decodes to 6 bytes" in message
    assert "at least 16" in message
    assert "base64.b64encode(secrets.token_bytes(32))" in message
    assert "Traceback" not in message and short not in message
    budget = subprocess.run(
        [*RECEIVER, "--state-url", state_url, "--port", str(_free_port()),
         "--max-body-bytes", "2048", "--max-buffered-bytes", "1024"],
        env={**base, "RILLET_WEBHOOK_SECRETS": TOKEN},
        capture_output=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert budget.returncode != 0
    assert b"max_buffered_bytes (1024) must be at least max_body_bytes (2048)" in budget.stderr
    assert b"Traceback" not in budget.stderr
