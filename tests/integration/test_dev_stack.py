"""The README's main command, run as a user runs it: ``rillet-dagster dev`` on a fresh home.

One stack for the module (the session fixture ``dev_stack``): its first run must end "ready"
with every check passed, the warehouse must hold exactly the sandbox, the console must stay
quiet, the README's other commands must work as written from another shell (the stack's
``.env``), and a launched ``sync_all`` must start within seconds and succeed while a steady
stream of webhooks keeps being applied.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pytest
from dagster_graphql import DagsterGraphQLClient
from sqlalchemy import select

from rillet_dagster import catalog
from rillet_dagster.warehouse import state
from rillet_dagster.warehouse.schema import make_engine, table_for, table_name
from tests.dev_stack import DevStack
from tests.warehouse_compare import assert_warehouse_equals_records, parse

pytestmark = [pytest.mark.slow, pytest.mark.serial, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent
# Entities whose sandbox collection the live activity never touches while we compare.
# What the sandbox's live activity changes every second (and what follows from it).
LIVE = ["customer", "invoice", "invoice_payment", "journal_entry"]
# Singletons (the organization, the last closed period) are not lists of records; the reporting
# view of journal entries has no webhooks, so a deleted entry leaves it at the next full sync.
STILL = [
    spec.name
    for spec in catalog.ENTITIES
    if spec.name not in {*LIVE, "reporting_journal_entry"} and not spec.single
]


def test_the_first_run_ends_ready_with_every_check_passed(dev_stack: DevStack) -> None:
    ready = dev_stack.wait_ready()
    assert int(ready.group(2)) > 0
    line = next(line for line in dev_stack.lines if "ready (" in line)
    assert "FAILED" not in line, line
    assert "FAILED" not in dev_stack.console, dev_stack.console
    # What the user is told, in order: the UI, the sync's progress, the reports, ready.
    assert re.search(r"sync: \d+/\d+ entities, [\d,]+ records", dev_stack.console)
    assert "reports: launched" in dev_stack.console


def test_the_console_stays_quiet(dev_stack: DevStack) -> None:
    dev_stack.wait_ready()
    console = dev_stack.console
    for noise in ("DEBUG", "Traceback", "SupersessionWarning", "dagster.yaml", "INFO"):
        assert noise not in console, (noise, console)
    assert len(dev_stack.lines) < 60, console


def _live_ids(engine: Any, name: str) -> set[str]:
    table = table_for(name)
    query = select(table.c.id)
    if "deleted_at" in table.c:
        query = query.where(table.c.deleted_at.is_(None))
    with engine.connect() as conn:
        return set(conn.scalars(query))


def _sandbox_records(stack: DevStack, name: str) -> list[dict[str, Any]]:
    """The sandbox's ground truth: every live record, as its API serves it (exact numbers)."""
    answer = httpx.get(f"{stack.sandbox_url}/_sandbox/records/{table_name(name)}", timeout=30)
    answer.raise_for_status()
    return parse(answer.content)


def _sandbox_ids(stack: DevStack, name: str) -> set[str]:
    return {record["id"] for record in _sandbox_records(stack, name)}


def test_the_warehouse_holds_exactly_the_sandbox(dev_stack: DevStack) -> None:
    """Entities the live activity never touches: every column of every header and child table
    equal (tests/warehouse_compare.py). The ones it changes every second: every record the
    sandbox has at a moment is in the warehouse within a minute (webhooks), and nothing the
    warehouse shows as live is unknown to the sandbox."""
    dev_stack.wait_ready()
    engine = make_engine(dev_stack.warehouse_url)
    try:
        still = {name: _sandbox_records(dev_stack, name) for name in STILL}
        assert_warehouse_equals_records(engine, still)
        for name in LIVE:
            before = _live_ids(engine, name)  # first: anything newer is in the truth below
            truth = _sandbox_ids(dev_stack, name)
            unknown = before - truth  # deleted in the sandbox (or never there)
            deadline = time.monotonic() + 60
            while True:
                ours = _live_ids(engine, name)
                missing = (truth & _sandbox_ids(dev_stack, name)) - ours
                stale = unknown & ours
                if (not missing and not stale) or time.monotonic() > deadline:
                    break
                time.sleep(2)
            assert not missing, (name, "never arrived", sorted(missing)[:5])
            assert not stale, (name, "live in the warehouse, not in the sandbox", sorted(stale)[:5])
    finally:
        engine.dispose()


def _readme_command(pattern: str) -> str:
    """A command of the README's, joined across its line continuations."""
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            if re.search(pattern, line):
                return line.strip()
    raise AssertionError(f"the README has no command matching {pattern!r}")


def _run_as_written(command: str, stack: DevStack) -> subprocess.CompletedProcess[str]:
    """Run a README command from the stack's folder (where its .env is), in a clean shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RILLET_", "DAGSTER_"))}
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    command = command.replace(".venv/bin/", f"{BIN}/")
    return subprocess.run(
        ["bash", "-c", command],
        cwd=stack.folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_readme_dagster_commands_work_as_written_in_another_shell(dev_stack: DevStack) -> None:
    dev_stack.wait_ready()
    env_text = dev_stack.env_file.read_text()
    assert f"DAGSTER_HOME={dev_stack.home}" in env_text
    month_end = _readme_command(r"dagster job execute .* -j month_end_pack")
    done = _run_as_written(month_end, dev_stack)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "RUN_SUCCESS" in done.stdout + done.stderr
    assert not (dev_stack.folder / ".rillet").exists()  # the dev settings were found
    last_month = (datetime.now(UTC).date().replace(day=1) - timedelta(days=1)).replace(day=1)
    partition = f"{last_month.isoformat()}|consolidated"
    with dg.DagsterInstance.from_config(str(dev_stack.home)) as instance:
        runs = instance.get_runs(
            filters=dg.RunsFilter(job_name="month_end_pack", tags={"dagster/partition": partition}),
            limit=1,
        )
        assert runs and runs[0].status == dg.DagsterRunStatus.SUCCESS  # in the UI's instance
    for job in ("sync_all", "refresh_models"):
        done = _run_as_written(_readme_command(rf"dagster job execute .* -j {job}\b"), dev_stack)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert "RUN_SUCCESS" in done.stdout + done.stderr, job


def test_readme_sandbox_and_sql_commands_work_as_written(dev_stack: DevStack) -> None:
    dev_stack.wait_ready()
    query = _readme_command(r"sqlite3 \.dagster_home/warehouse\.db")
    query = query.replace(".dagster_home/warehouse.db", str(dev_stack.home / "warehouse.db"))
    done = _run_as_written(query, dev_stack)
    assert done.returncode == 0 and done.stdout.count("\n") == 5, done
    records = _readme_command(r"curl .*/_sandbox/records/")
    records = records.replace("127.0.0.1:8765", f"127.0.0.1:{dev_stack.sandbox_port}")
    done = _run_as_written(records, dev_stack)
    assert done.returncode == 0, done.stderr
    assert isinstance(json.loads(done.stdout), list) and json.loads(done.stdout)
    for name in ("invoices", "invoice"):  # the table name and the catalog name
        answer = httpx.get(f"{dev_stack.sandbox_url}/_sandbox/records/{name}", timeout=30)
        assert answer.status_code == 200, answer.text
    unknown = httpx.get(f"{dev_stack.sandbox_url}/_sandbox/records/nope", timeout=30)
    assert unknown.status_code == 404 and "invoices" in unknown.json()["detail"]


def _stream_changes(sandbox_url: str, stop: threading.Event, period: float = 0.1) -> int:
    """One change every ``period`` seconds through the sandbox API (each one a webhook)."""
    headers = {"Authorization": "Bearer sandbox-key", "X-Rillet-API-Version": "4"}
    made = 0
    with httpx.Client(base_url=sandbox_url, headers=headers, timeout=10) as api:
        customers = api.get("/customers", params={"limit": 50}).json()["customers"]
        while not stop.is_set():
            customer = customers[made % len(customers)]
            body = {k: v for k, v in customer.items() if k not in {"id", "updated_at"}}
            body["payment_terms"] = (15, 30, 45, 60)[made % 4]
            answer = api.put(f"/customers/{customer['id']}", json=body)
            assert answer.status_code == 200, answer.text
            made += 1
            stop.wait(period)
    return made


def instance_events(stack: DevStack, run_id: str, kind: dg.DagsterEventType) -> list[float]:
    with dg.DagsterInstance.from_config(str(stack.home)) as instance:
        return [r.timestamp for r in instance.get_records_for_run(run_id, of_type=kind).records]


def test_a_launched_sync_starts_within_10_s_while_webhooks_keep_flowing(
    dev_stack: DevStack,
) -> None:
    dev_stack.wait_ready()
    stop = threading.Event()
    made: list[int] = []
    streamer = threading.Thread(
        target=lambda: made.append(_stream_changes(dev_stack.sandbox_url, stop)), daemon=True
    )
    streamer.start()
    time.sleep(10)  # a steady state: webhook runs queued and running
    client = DagsterGraphQLClient("127.0.0.1", port_number=dev_stack.ui_port)
    launched_at = datetime.now(UTC)
    today = launched_at.date().isoformat()  # as the hourly backstop launches it
    run_id = client.submit_job_execution(
        "sync_all", repository_location_name="rillet_dagster", tags={"dagster/partition": today}
    )
    with dg.DagsterInstance.from_config(str(dev_stack.home)) as instance:
        deadline = time.monotonic() + 300
        record = None
        while time.monotonic() < deadline:
            record = instance.get_run_record_by_id(run_id)
            if record is not None and record.dagster_run.is_finished:
                break
            time.sleep(1)
    stop.set()
    streamer.join(timeout=30)
    assert record is not None and record.dagster_run.status == dg.DagsterRunStatus.SUCCESS
    assert record.start_time is not None and record.end_time is not None
    # Out of the queue (the coordinator launched it: what a starved run never gets) within
    # 10 s; its process then imports Dagster and the code location before the first step.
    starting = instance_events(dev_stack, run_id, dg.DagsterEventType.RUN_STARTING)
    dequeued = starting[0] - launched_at.timestamp()
    assert dequeued < 10, f"sync_all left the queue {dequeued:.1f} s after it was launched"
    started = record.start_time - launched_at.timestamp()
    assert started < 20, f"sync_all's process started {started:.1f} s after it was launched"
    # The events of the sync's last seconds get their run (gathered 10 s, then a process).
    engine = state.make_state_engine(f"sqlite:///{dev_stack.home / 'state.db'}")
    events = state.webhook_events
    window = select(events.c.event_timestamp, events.c.applied_at).where(
        events.c.entity == "CUSTOMER",
        events.c.received_at >= launched_at,
        events.c.received_at <= datetime.fromtimestamp(record.end_time, UTC),
    )
    deadline = time.monotonic() + 90
    while True:
        with engine.connect() as conn:
            rows = conn.execute(window).all()
        if all(applied is not None for _, applied in rows) or time.monotonic() > deadline:
            break
        time.sleep(2)
    engine.dispose()
    assert made and made[0] > 100
    assert len(rows) > 50, "the stream's webhooks did not arrive while the sync ran"
    lags = sorted(
        (applied - changed).total_seconds() for changed, applied in rows if applied is not None
    )
    assert len(lags) == len(rows), f"{len(rows) - len(lags)} events of the sync's time not applied"
    p95 = statistics.quantiles(lags, n=20)[-1]
    assert p95 < 30, f"webhook lag p95 {p95:.1f} s during the sync (max {lags[-1]:.1f} s)"


@pytest.mark.stops_dev_stack
def test_ctrl_c_stops_every_child_without_a_traceback(dev_stack: DevStack) -> None:
    """Runs after every other user of the session's stack (conftest orders it last)."""
    stack = dev_stack
    assert stack.process is not None
    group = stack.process.pid
    code = stack.stop()
    assert code == 0, stack.console
    assert "Traceback" not in stack.console and "Aborted" not in stack.console, stack.console
    assert stack.lines[-1].endswith("stopped"), stack.console
    assert not stack.env_file.exists()  # its settings went with it
    pattern = f"--ui-port {stack.ui_port}|-p {stack.ui_port}|--port {stack.receiver_port}"
    leftovers = subprocess.run(
        ["pgrep", "-f", pattern], capture_output=True, text=True, check=False
    ).stdout.split()
    assert not leftovers, f"processes left running: {leftovers}"
    for port in (stack.ui_port, stack.sandbox_port, stack.receiver_port):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)  # nothing of its process group is left
