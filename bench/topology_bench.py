"""The deployment's process topology (docker/ as processes, tests/topology.py) with Dagster's
instance storage on PostgreSQL against SQLite, side by side in one run.

Both rounds run the same services (code server, webserver, daemon, receiver) on the same tiny
sandbox, with the warehouse and the state database on PostgreSQL; only Dagster's own storage
(runs, event logs, schedules) differs. Measured: start to the UI answering, ``sync_all`` over
three days (run start to end, as the API reports it), and the webhook lag (receipt to applied)
of changes made one per second once the sync is done. Needs PostgreSQL on 127.0.0.1:5432.
"""

from __future__ import annotations

import base64
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from bench.table import print_table
from rillet_dagster.sandbox.activity import Activity
from rillet_dagster.sandbox.server import SandboxOptions, SandboxServer, build_sandbox
from tests.dev_stack import free_port
from tests.pg import ADMIN_URL
from tests.topology import (
    SERVICES,
    dagster_url,
    percentile,
    running,
    sync_all,
    wait_applied,
    wait_delivered,
)

KEY = "topology-bench-key-0123456789"
TOKEN = base64.b64encode(b"topology-bench-" + bytes(range(17))).decode()
CHANGES = 20


def _database(name: str) -> str:
    engine = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return sa.engine.make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def _round(storage: str) -> list[object]:
    today = datetime.now(UTC).date()
    receiver_port = free_port()
    sandbox = SandboxServer(
        build_sandbox(
            SandboxOptions(
                size="tiny",
                api_keys=(KEY,),
                rate_limit=1_000_000,
                webhook_urls=(f"http://127.0.0.1:{receiver_port}/webhooks/rillet",),
                webhook_tokens=(TOKEN,),
                webhook_time_factor=0.001,
            )
        )
    ).start()
    env = {
        "DAGSTER_PG_URL": dagster_url(_database("bench_topology_dagster")),
        "RILLET_PROFILE": "development",
        "RILLET_API_KEY": KEY,
        "RILLET_BASE_URL": sandbox.base_url,
        "RILLET_WAREHOUSE_URL": _database("bench_topology_warehouse"),
        "RILLET_STATE_URL": _database("bench_topology_state"),
        "RILLET_WEBHOOK_SECRETS": TOKEN,
        "RILLET_RATE_LIMIT": "100000/60",
        "RILLET_START_DATE": (today - timedelta(days=2)).isoformat(),
    }
    try:
        with (
            tempfile.TemporaryDirectory() as folder,
            running(Path(folder), env, storage) as deployment,
        ):
            deployment.ports["receiver"] = receiver_port
            began = time.monotonic()
            for service in SERVICES:
                deployment.start(service)
            deployment.wait_until(
                "UI", lambda: deployment.answers(f"{deployment.ui_url}/server_info"), 180
            )
            ui = time.monotonic() - began
            deployment.wait_until("code location", deployment.location_loaded, 180)
            days = [(today - timedelta(days=n)).isoformat() for n in (2, 1, 0)]
            sync = sync_all(deployment, days)
            if sync["status"] != "SUCCESS":
                raise RuntimeError(f"sync_all ended {sync['status']}\n{deployment.logs()}")
            activity = Activity(
                sandbox.sandbox.writer, sandbox.sandbox.world, rate_per_second=1.0, seed=5
            )
            for _ in range(CHANGES):
                activity.step()
                time.sleep(1)
            lags = wait_applied(deployment, wait_delivered(sandbox, 60), 240)
    finally:
        sandbox.stop()
    return [
        "PostgreSQL" if storage == "postgres" else "SQLite",
        f"{ui:.1f}",
        f"{sync['endTime'] - sync['startTime']:.1f}",
        len(lags),
        f"{statistics.median(lags):.1f}",
        f"{percentile(lags, 95):.1f}",
    ]


def main() -> None:
    rows = [_round(storage) for storage in ("postgres", "sqlite")]
    print_table(
        "docker/ topology as processes: Dagster instance storage PostgreSQL vs SQLite "
        "(`python3 run.py bench topology`)",
        [
            "instance storage",
            "start to UI (s)",
            "sync_all, 3 days tiny (s)",
            "webhooks",
            "lag p50 (s)",
            "lag p95 (s)",
        ],
        rows,
    )
