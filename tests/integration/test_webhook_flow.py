"""Webhooks end to end on real HTTP: the sandbox changes records and signs and delivers webhooks,
the receiver queues them, a sensor evaluation requests runs, and the runs bring the warehouse in
line with no API request for events that carry the whole object."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pytest

from rillet_dagster.assets.checks import FRESHNESS, last_materialized, raw_entities_are_fresh
from rillet_dagster.assets.entities import build_entity_assets
from rillet_dagster.automation.webhook_sensor import webhook_sensor
from rillet_dagster.definitions import build_definitions
from rillet_dagster.receiver.app import ReceiverConfig
from rillet_dagster.receiver.serve import build_server
from rillet_dagster.resources import RilletResource, WarehouseResource
from rillet_dagster.sandbox.activity import Activity
from rillet_dagster.sandbox.server import SandboxOptions, SandboxServer, build_sandbox
from rillet_dagster.settings import Settings
from rillet_dagster.warehouse import state
from rillet_dagster.warehouse.load import read_records
from rillet_dagster.warehouse.schema import make_engine
from tests import canary

KEY = canary.api_key("webhook-flow")
TOKEN = canary.webhook_token("webhook-flow")
ENTITIES = ("customer", "invoice")
# Read in the same webhook run: Rillet announces payments only as INVOICE PAYMENT_UPDATED.
ALONGSIDE = ("invoice_payment",)


@pytest.fixture
def receiver_url(tmp_path: Path) -> Iterator[str]:
    config = ReceiverConfig(state_url=f"sqlite:///{tmp_path}/state.db", secrets=(TOKEN,))
    server = build_server(config, "127.0.0.1", 0, log_level="warning")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "receiver did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/webhooks/rillet"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def server(receiver_url: str) -> Iterator[SandboxServer]:
    options = SandboxOptions(
        size="tiny",
        api_keys=(KEY,),
        rate_limit=1_000_000,
        webhook_urls=(receiver_url,),
        webhook_tokens=(TOKEN,),
        webhook_time_factor=0.001,
    )
    started = SandboxServer(build_sandbox(options)).start()
    yield started
    started.stop()


def wait_for_deliveries(server: SandboxServer, state_url: str, timeout: float = 30) -> int:
    """Until every delivery the sandbox made has been acknowledged, and is in the queue."""
    deadline = time.monotonic() + timeout
    while True:
        deliveries = httpx.get(f"{server.base_url}/_sandbox/deliveries").json()
        records = (
            deliveries.get("deliveries", deliveries) if isinstance(deliveries, dict) else deliveries
        )
        if records and all(d.get("status") == "delivered" for d in records):
            break
        assert time.monotonic() < deadline, records
        time.sleep(0.05)
    engine = state.make_state_engine(state_url)
    with engine.connect() as connection:
        stored = state.ids_present(connection, [d["id"] for d in records])
    engine.dispose()
    assert stored == {d["id"] for d in records}
    return len(records)


def first_day(today: date) -> str:
    """The start date for these tests' partitions: two days before the test's ``today``."""
    return (today - timedelta(days=2)).isoformat()


def test_changes_flow_from_rillet_to_the_warehouse_through_webhooks(
    server: SandboxServer, tmp_path: Path, today: date
) -> None:
    start = first_day(today)
    state_url = f"sqlite:///{tmp_path}/state.db"
    warehouse_url = f"sqlite:///{tmp_path}/warehouse.db"
    assets = build_entity_assets(Settings.from_env({"RILLET_START_DATE": start}))
    resources: dict[str, Any] = {
        "rillet": RilletResource(
            base_url=server.base_url,
            api_key=KEY,
            state_url=state_url,
            rate_limit_requests=1_000_000,
        ),
        "warehouse": WarehouseResource(url=warehouse_url),
    }
    chosen = {
        name: next(a for a in assets if a.op.name == f"sync_{name}")
        for name in (*ENTITIES, *ALONGSIDE)
    }
    tags = {
        "dagster/asset_partition_range_start": start,
        "dagster/asset_partition_range_end": today.isoformat(),
    }
    with dg.DagsterInstance.ephemeral() as instance:
        for asset in chosen.values():
            first = dg.materialize([asset], resources=resources, instance=instance, tags=tags)
            assert first.success
        changes = Activity(server.sandbox.writer, server.sandbox.world, rate_per_second=1.0)
        for _ in range(3):
            changes.new_customer()
            changes.update_customer()
            changes.new_invoice()
            changes.pay_invoice()
        delivered = wait_for_deliveries(server, state_url)
        assert delivered >= 12
        with dg.build_sensor_context(instance=instance, resources=resources) as context:
            result = webhook_sensor(assets, gather_seconds=0)(context)
        assert len(result.run_requests) == 1  # every entity with events, in one run
        request = result.run_requests[0]
        assert set(ENTITIES) <= set(request.tags["rillet/entities"].split(","))
        run = dg.materialize(
            [a for a in assets if a.op.name in request.run_config["ops"]],
            resources=resources,
            instance=instance,
            partition_key=request.partition_key,
            run_config=request.run_config,
            tags=request.tags,
        )
        assert run.success
        for name in ENTITIES:
            metadata = run.asset_materializations_for_node(f"sync_{name}")[0].metadata
            assert metadata["webhook_events_applied"].value > 0
            assert metadata["api_requests"].value == 0  # every body carried the object
        assert request.run_config["ops"]["sync_invoice_payment"] == {
            "config": {"events_only": False}
        }
    engine = make_engine(warehouse_url)
    for name in (*ENTITIES, *ALONGSIDE):
        with server.sandbox.world.store.lock:
            expected = {r["id"]: r for r in server.sandbox.world.store[name].all_records()}
        assert {r["id"]: r for r in read_records(engine, name)} == expected, name
    engine.dispose()


def test_q7_deliveries_rillet_gave_up_on_are_recovered_by_the_backstop(
    tmp_path: Path, today: date
) -> None:
    """The receiver is down until Rillet stops retrying: the hourly backstop run recovers every
    change, and the freshness check would have raised the alarm had it not run."""
    start = first_day(today)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_url = f"http://127.0.0.1:{closed.getsockname()[1]}/webhooks/rillet"
    closed.close()  # nothing listens there: every delivery attempt is refused
    options = SandboxOptions(
        size="tiny",
        api_keys=(KEY,),
        rate_limit=1_000_000,
        webhook_urls=(dead_url,),
        webhook_tokens=(TOKEN,),
        webhook_time_factor=0.0001,
    )
    server = SandboxServer(build_sandbox(options)).start()
    try:
        state_url = f"sqlite:///{tmp_path}/state.db"
        warehouse_url = f"sqlite:///{tmp_path}/warehouse.db"
        settings = Settings.from_env({"RILLET_START_DATE": start})
        assets = build_entity_assets(settings)
        resources: dict[str, Any] = {
            "rillet": RilletResource(
                base_url=server.base_url,
                api_key=KEY,
                state_url=state_url,
                rate_limit_requests=1_000_000,
            ),
            "warehouse": WarehouseResource(url=warehouse_url),
        }
        invoices = next(a for a in assets if a.op.name == "sync_invoice")
        tags = {
            "dagster/asset_partition_range_start": start,
            "dagster/asset_partition_range_end": today.isoformat(),
        }
        with dg.DagsterInstance.ephemeral() as instance:
            assert dg.materialize([invoices], resources=resources, instance=instance, tags=tags)
            changes = Activity(server.sandbox.writer, server.sandbox.world, rate_per_second=1.0)
            for _ in range(3):
                changes.new_invoice()
                changes.pay_invoice()
            deadline = time.monotonic() + 60
            while True:  # until Rillet has given up on every delivery
                records = httpx.get(f"{server.base_url}/_sandbox/deliveries").json()
                records = (
                    records.get("deliveries", records) if isinstance(records, dict) else records
                )
                if records and all(d["status"] == "failed" for d in records):
                    break
                assert time.monotonic() < deadline, records
                time.sleep(0.05)
            defs = build_definitions(settings)
            schedule = defs.resolve_schedule_def("hourly_backstop_sync")
            with dg.build_schedule_context(
                instance=instance,
                scheduled_execution_time=datetime.now(UTC),
                repository_def=defs.get_repository_def(),
            ) as context:
                request = schedule.evaluate_tick(context).run_requests[0]  # type: ignore[index]
            backstop = dg.materialize(
                [invoices],
                resources=resources,
                instance=instance,
                partition_key=request.partition_key,
                tags=request.tags,
            )
            assert backstop.success

            # Staleness is visible: had the backstop not run, the freshness check fails once
            # the window has passed since the last sync.
            def last(entity: str) -> datetime | None:
                return last_materialized(instance, entity)

            fresh = raw_entities_are_fresh(last)
            assert not [p for p in fresh.problems if p.startswith("invoice:")]
            later = raw_entities_are_fresh(
                last, now=datetime.now(UTC) + FRESHNESS + timedelta(hours=1)
            )
            assert [p for p in later.problems if p.startswith("invoice: last synced")]
        engine = make_engine(warehouse_url)
        with server.sandbox.world.store.lock:
            expected = {r["id"]: r for r in server.sandbox.world.store["invoice"].all_records()}
        assert {r["id"]: r for r in read_records(engine, "invoice")} == expected
        engine.dispose()
    finally:
        server.stop()
