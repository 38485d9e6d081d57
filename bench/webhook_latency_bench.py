"""Webhooks end to end with the daemon running: time from a change in the simulator to its row
in the warehouse (goal: p95 under 30 s).

The sandbox delivers signed webhooks to a real receiver process; ``dagster-daemon`` runs the
code location, whose ``rillet_webhook_sensor`` requests events-only runs that the daemon
launches. Every second one customer is renamed; the clock stops when the warehouse row carries
that change.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from bench.table import print_table
from rillet_dagster import catalog
from rillet_dagster.assets.sync import Window, sync_entity
from rillet_dagster.rillet.client import RilletClient
from rillet_dagster.sandbox.activity import Activity
from rillet_dagster.sandbox.server import SandboxOptions, SandboxServer, build_sandbox
from rillet_dagster.warehouse.schema import ensure_schema, make_engine, table_for

ROOT = Path(__file__).resolve().parents[1]
KEY = "bench-webhook-key"
CHANGES = 60
INTERVAL_SECONDS = 1.0
RECEIVER_PORT = 8791


def _wait_http(port: int, timeout: float = 30) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"receiver on port {port} did not start")


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="rillet-bench-webhook-"))
    home = work / "dagster_home"
    home.mkdir()
    shutil.copyfile(ROOT / "dagster.yaml", home / "dagster.yaml")
    token = base64.b64encode(secrets.token_bytes(32)).decode()
    options = SandboxOptions(
        size="tiny",
        api_keys=(KEY,),
        rate_limit=1_000_000,
        webhook_urls=(f"http://127.0.0.1:{RECEIVER_PORT}/webhooks/rillet",),
        webhook_tokens=(token,),
    )
    server = SandboxServer(build_sandbox(options)).start()
    warehouse_url = f"sqlite:///{work}/warehouse.db"
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "RILLET_BASE_URL": server.base_url,
        "RILLET_API_KEY": KEY,
        "RILLET_WAREHOUSE_URL": warehouse_url,
        "RILLET_STATE_URL": f"sqlite:///{work}/state.db",
        "RILLET_RATE_LIMIT": "1000000/60",
        "RILLET_WEBHOOK_SECRETS": token,
    }
    engine = make_engine(warehouse_url)
    ensure_schema(engine)
    with RilletClient(api_key=KEY, base_url=server.base_url) as client:
        sync_entity(
            catalog.entity("customer"),
            client,
            engine,
            window=Window(None, None, True),
            run_id="bench",
            log=_Quiet(),
        )
    bin_dir = Path(sys.executable).parent
    receiver = subprocess.Popen(  # our own entry point
        [str(bin_dir / "rillet-dagster"), "receiver", "--port", str(RECEIVER_PORT)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    daemon = subprocess.Popen(
        [str(bin_dir / "dagster-daemon"), "run", "-w", str(ROOT / "workspace.yaml")],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    latencies: list[float] = []
    try:
        _wait_http(RECEIVER_PORT)
        time.sleep(15)  # the daemon loads the code location before its first sensor tick
        changes = Activity(server.sandbox.writer, server.sandbox.world, rate_per_second=1.0)
        waiting: list[tuple[str, str, float]] = []  # (customer id, updated_at, changed at)
        customers = table_for("customer")
        deadline = time.monotonic() + CHANGES * INTERVAL_SECONDS + 120
        made = 0
        next_change = time.monotonic()
        while (made < CHANGES or waiting) and time.monotonic() < deadline:
            now = time.monotonic()
            if made < CHANGES and now >= next_change:
                changes.update_customer()
                record = max(
                    server.sandbox.world.store["customer"].all_records(),
                    key=lambda r: r["updated_at"],
                )
                waiting.append((record["id"], record["updated_at"], now))
                made += 1
                next_change += INTERVAL_SECONDS
            with engine.connect() as connection:
                rows = dict(
                    connection.execute(
                        sa.select(customers.c.id, customers.c.updated_at).where(
                            customers.c.id.in_({w[0] for w in waiting})
                        )
                    ).all()
                )
            for entry in list(waiting):
                record_id, stamp, started = entry
                loaded = rows.get(record_id)
                if loaded is not None and loaded >= datetime.fromisoformat(stamp).astimezone(UTC):
                    latencies.append(time.monotonic() - started)
                    waiting.remove(entry)
            time.sleep(0.1)
        lost = len(waiting)
    finally:
        daemon.send_signal(signal.SIGINT)
        receiver.terminate()
        for process in (daemon, receiver):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        server.stop()
        engine.dispose()
        shutil.rmtree(work, ignore_errors=True)
    ordered = sorted(latencies)
    p95 = ordered[max(0, int(len(ordered) * 0.95) - 1)] if ordered else float("nan")
    print_table(
        f"Webhook change -> warehouse row, daemon running ({CHANGES} changes, one per "
        f"{INTERVAL_SECONDS:g} s; goal p95 < 30 s)",
        ["changes", "arrived", "not arrived", "p50 s", "p95 s", "max s"],
        [
            (
                CHANGES,
                len(latencies),
                lost,
                f"{statistics.median(ordered):.1f}" if ordered else "-",
                f"{p95:.1f}",
                f"{ordered[-1]:.1f}" if ordered else "-",
            )
        ],
    )


class _Quiet:
    def info(self, message: str) -> None:
        pass


if __name__ == "__main__":
    main()
