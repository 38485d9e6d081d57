"""``python3 run.py dev`` from a set-up clone to a complete, reconciled company (goal: every check
green in under 180 s on this machine).

Runs the real command (``rillet-dagster dev``, sandbox activity on) on a fresh home and free
ports, and measures from its start: the UI answering, the warehouse holding exactly the
sandbox's ids for every entity, the "ready" line (every report, model and check of the first run
materialized), and the webhook lag (change in the sandbox to ``applied`` in the queue) p95 of
the events that arrived while the sync ran.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
from sqlalchemy import select
from sqlalchemy.engine import Engine

from bench.table import print_table
from rillet_dagster import catalog
from rillet_dagster.warehouse import state
from rillet_dagster.warehouse.schema import make_engine, table_for, table_name
from tests.dev_stack import DevStack, running_dev

GOAL_SECONDS = 180


def _warehouse_matches(stack: DevStack, engine: Engine) -> bool:
    for spec in catalog.ENTITIES:
        # The organization and the last closed period are not lists; the reporting view of
        # journal entries has no webhooks (a deletion leaves it at the next full sync).
        if spec.single or spec.name == "reporting_journal_entry":
            continue
        table = table_for(spec.name)
        answer = httpx.get(
            f"{stack.sandbox_url}/_sandbox/records/{table_name(spec.name)}", timeout=30
        )
        truth = {record["id"] for record in answer.json()}
        query = select(table.c.id)
        if "deleted_at" in table.c:
            query = query.where(table.c.deleted_at.is_(None))
        with engine.connect() as conn:
            if set(conn.scalars(query)) != truth:
                return False
    return True


def _lag_p95(stack: DevStack, since: datetime, until: datetime) -> tuple[float, int]:
    engine = state.make_state_engine(f"sqlite:///{stack.home / 'state.db'}")
    events = state.webhook_events
    with engine.connect() as conn:
        rows = conn.execute(
            select(events.c.event_timestamp, events.c.applied_at).where(
                events.c.received_at >= since, events.c.received_at <= until
            )
        ).all()
    engine.dispose()
    lags = [(applied - changed).total_seconds() for changed, applied in rows if applied]
    if len(lags) < 2:
        return float("nan"), len(rows)
    return statistics.quantiles(lags, n=20)[-1], len(rows)


def one_round(folder: Path) -> list[object]:
    with running_dev(folder) as stack:
        started = time.monotonic()
        ui = float(stack.wait_for(r"Dagster UI answers .*\((\d+) s after start\)", 300).group(1))
        stack.wait_for(r"sync: launched", 120)
        sync_from = datetime.now(UTC)
        engine = make_engine(stack.warehouse_url)
        complete = None
        sync_to = None
        ready = None
        last_check = 0.0
        try:
            while time.monotonic() - started < 600:
                if sync_to is None and any("sync: done" in line for line in stack.lines):
                    sync_to = datetime.now(UTC)
                # Every 5 s: reading every entity from both sides is a load of its own.
                checked = time.monotonic() - last_check >= 5
                if complete is None and sync_to is not None and checked:
                    last_check = time.monotonic()
                    if _warehouse_matches(stack, engine):
                        complete = time.monotonic() - started
                found = [line for line in stack.lines if "ready (" in line]
                if found:
                    ready = stack.wait_ready(1)
                    break
                time.sleep(1)
        finally:
            engine.dispose()
        if ready is None:
            raise SystemExit("dev never said ready:\n" + stack.console)
        while complete is None and time.monotonic() - started < 600:
            engine = make_engine(stack.warehouse_url)
            if _warehouse_matches(stack, engine):
                complete = time.monotonic() - started
            engine.dispose()
            time.sleep(5)
        lag, events = _lag_p95(stack, sync_from, sync_to or datetime.now(UTC))
        line = next(line for line in stack.lines if "ready (" in line)
        failed = "FAILED" in line
    ready_seconds = float(ready.group(1))
    return [
        f"{ui:.0f}",
        f"{complete:.0f}" if complete is not None else "never",
        f"{ready_seconds:.0f}",
        f"{ready.group(2)}{' (some FAILED)' if failed else ''}",
        f"{lag:.1f} ({events} events)",
        "yes" if ready_seconds < GOAL_SECONDS and not failed else "NO",
    ]


def main(rounds: int = 2) -> None:
    rows = []
    for index in range(rounds):
        with tempfile.TemporaryDirectory(prefix="dev-ready-") as folder:
            print(f"round {index + 1}: rillet-dagster dev on a fresh home ...", flush=True)
            rows.append([index + 1, *one_round(Path(folder))])
    print_table(
        "dev-ready: `rillet-dagster dev` (small sandbox, 1 change/s) to a reconciled company, "
        "seconds after start",
        [
            "round",
            "UI answers",
            "warehouse = sandbox",
            "ready (reports, models, checks)",
            "checks passed",
            "webhook lag p95 during sync (s)",
            f"< {GOAL_SECONDS} s, all green",
        ],
        rows,
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
