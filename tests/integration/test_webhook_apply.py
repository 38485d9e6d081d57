"""Queued webhook events applied by the entity assets, and the sensor that requests those runs
(test-matrix rows Q1, Q2, Q5, Q6, D3)."""

from __future__ import annotations

import copy
import json
import logging
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa

from rillet_dagster import catalog
from rillet_dagster.assets import events as events_module
from rillet_dagster.assets.entities import build_entity_assets
from rillet_dagster.assets.sync import Window, sync_entity
from rillet_dagster.automation import webhook_sensor as webhook_sensor_module
from rillet_dagster.automation.webhook_sensor import ENTITIES_TAG, webhook_job, webhook_sensor
from rillet_dagster.clock import isoformat_z
from rillet_dagster.resources import RilletResource, WarehouseResource
from rillet_dagster.rillet.client import RilletClient
from rillet_dagster.sandbox.server import SandboxOptions, SandboxServer, build_sandbox
from rillet_dagster.settings import Settings
from rillet_dagster.warehouse import state
from rillet_dagster.warehouse.applied import applied_events
from rillet_dagster.warehouse.load import read_records
from rillet_dagster.warehouse.schema import ensure_schema, make_engine, table_for

KEY = "webhook-apply-key-0123456789"
EVERYTHING = Window(start=None, end=None, full=True)
log = logging.getLogger(__name__)


@pytest.fixture
def server() -> Iterator[SandboxServer]:
    options = SandboxOptions(size="tiny", api_keys=(KEY,), rate_limit=1_000_000)
    started = SandboxServer(build_sandbox(options)).start()
    yield started
    started.stop()


@pytest.fixture
def urls(tmp_path: Path) -> dict[str, str]:
    return {
        "warehouse": f"sqlite:///{tmp_path}/warehouse.db",
        "state": f"sqlite:///{tmp_path}/state.db",
    }


def truth(server: SandboxServer, entity: str) -> list[dict[str, Any]]:
    with server.sandbox.world.store.lock:
        return list(server.sandbox.world.store[entity].all_records())


def queue(state_url: str, entity: str, event: str, body: Any, at: datetime | None = None) -> str:
    """Store an event as the receiver does (verified; raw bytes)."""
    event_id = str(uuid.uuid4())
    at = at or datetime.now(UTC)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    engine = state.make_state_engine(state_url)
    with engine.begin() as connection:
        state.ensure_state_schema(connection)
        state.enqueue(
            connection,
            state.QueuedEvent(
                id=event_id,
                entity=state.canonical_name(entity),
                event=state.canonical_name(event),
                received_at=datetime.now(UTC),
                event_timestamp=at,
                body=raw,
            ),
        )
    engine.dispose()
    return event_id


def statuses(state_url: str) -> dict[str, int]:
    engine = state.make_state_engine(state_url)
    with engine.connect() as connection:
        counters = state.queue_counters(connection)
    engine.dispose()
    return counters


def apply_only(server: SandboxServer, urls: dict[str, str], entity: str) -> RilletClient:
    engine = make_engine(urls["warehouse"])
    ensure_schema(engine)
    with RilletClient(api_key=KEY, base_url=server.base_url) as client:
        sync_entity(
            catalog.entity(entity),
            client,
            engine,
            window=EVERYTHING,
            run_id="webhook-run",
            log=log,
            state_url=urls["state"],
            read_rillet=False,
        )
    engine.dispose()
    return client


def full_sync(server: SandboxServer, urls: dict[str, str], entity: str) -> None:
    engine = make_engine(urls["warehouse"])
    ensure_schema(engine)
    with RilletClient(api_key=KEY, base_url=server.base_url) as client:
        sync_entity(
            catalog.entity(entity), client, engine, window=EVERYTHING, run_id="full", log=log
        )
    engine.dispose()


def stamp(moment: datetime) -> str:
    return isoformat_z(moment)


def warehouse_rows(urls: dict[str, str], entity: str, **options: Any) -> dict[str, dict[str, Any]]:
    engine = make_engine(urls["warehouse"])
    rows = {r["id"]: r for r in read_records(engine, entity, **options)}
    engine.dispose()
    return rows


def deleted_at(urls: dict[str, str], entity: str, record_id: str) -> datetime | None:
    engine = make_engine(urls["warehouse"])
    table = table_for(entity)
    with engine.connect() as connection:
        value = connection.execute(
            sa.select(table.c.deleted_at).where(table.c.id == record_id)
        ).scalar_one()
    engine.dispose()
    return value


# ----------------------------------------------------------------------------- applying


def test_full_bodies_apply_with_no_api_request_and_never_regress(
    server: SandboxServer, urls: dict[str, str]
) -> None:
    full_sync(server, urls, "invoice")
    a, b, c = truth(server, "invoice")[:3]
    now = datetime.now(UTC)
    newer = {**copy.deepcopy(a), "memo": "changed by webhook", "updated_at": stamp(now)}
    older = {**copy.deepcopy(b), "memo": "stale copy", "updated_at": "2020-01-01T00:00:00.000Z"}
    late_update = {**copy.deepcopy(c), "memo": "before the delete", "updated_at": stamp(now)}
    queue(urls["state"], "INVOICE", "UPDATED", newer)
    queue(urls["state"], "INVOICE", "UPDATED", older)  # Q5: out of order, older than stored
    queue(urls["state"], "INVOICE", "DELETED", c["id"], at=now + timedelta(seconds=5))
    queue(urls["state"], "INVOICE", "UPDATED", late_update)  # Q6: older than the tombstone
    client = apply_only(server, urls, "invoice")
    assert client.stats.requests == 0
    rows = warehouse_rows(urls, "invoice")
    assert rows[a["id"]] == newer
    assert rows[b["id"]] == b
    assert c["id"] not in rows and deleted_at(urls, "invoice", c["id"]) is not None
    assert statuses(urls["state"])["pending"] == 0
    assert statuses(urls["state"])["applied"] == 4


def test_an_event_without_the_object_is_read_again_by_id(
    server: SandboxServer, urls: dict[str, str]
) -> None:
    invoice = truth(server, "invoice")[5]
    payment = {"id": str(uuid.uuid4()), "invoice_id": invoice["id"], "status": "CLEARED"}
    queue(urls["state"], "invoice", "payment-updated", payment)  # CARBON's payment shape
    client = apply_only(server, urls, "invoice")
    assert client.stats.requests == 1
    assert warehouse_rows(urls, "invoice")[invoice["id"]] == invoice


def test_a_failed_run_leaves_its_events_pending_and_a_later_run_applies_them(
    server: SandboxServer, urls: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Q2: the failure comes after half the batch's rows were written: nothing of it shows."""
    full_sync(server, urls, "customer")
    customers = truth(server, "customer")
    now = datetime.now(UTC)
    changed = [{**c, "name": f"{c['name']} (renamed)", "updated_at": stamp(now)} for c in customers]
    for body in changed:
        queue(urls["state"], "CUSTOMER", "UPDATED", body)
    victim = customers[-1]["id"]
    queue(urls["state"], "CUSTOMER", "DELETED", victim, at=now + timedelta(seconds=1))

    def broken_soft_delete(*args: Any, **kwargs: Any) -> int:
        # The database gone: says nothing about the events, so none is set aside.
        raise sa.exc.OperationalError("DELETE", {}, Exception("warehouse went away half-way"))

    monkeypatch.setattr(events_module.load, "soft_delete", broken_soft_delete)
    with pytest.raises(sa.exc.OperationalError, match="half-way"):
        apply_only(server, urls, "customer")
    assert statuses(urls["state"])["pending"] == len(changed) + 1
    assert warehouse_rows(urls, "customer") == {c["id"]: c for c in customers}  # untouched
    monkeypatch.undo()
    apply_only(server, urls, "customer")
    rows = warehouse_rows(urls, "customer")
    assert rows == {c["id"]: c for c in changed if c["id"] != victim}
    assert statuses(urls["state"])["pending"] == 0


def test_a_crash_after_the_warehouse_commit_never_applies_an_event_twice(
    server: SandboxServer, urls: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    full_sync(server, urls, "customer")
    customer = truth(server, "customer")[0]
    body = {**customer, "name": "Once Only", "updated_at": stamp(datetime.now(UTC))}
    event_id = queue(urls["state"], "CUSTOMER", "UPDATED", body)

    def lost_mark(*args: Any, **kwargs: Any) -> int:
        raise ConnectionError("state database unreachable after the warehouse commit")

    monkeypatch.setattr(state, "mark_applied", lost_mark)
    with pytest.raises(ConnectionError):
        apply_only(server, urls, "customer")
    monkeypatch.undo()
    assert statuses(urls["state"])["pending"] == 1
    engine = make_engine(urls["warehouse"])
    with engine.connect() as connection:
        ledger = connection.execute(sa.select(applied_events.c.id)).scalars().all()
    engine.dispose()
    assert ledger == [event_id]
    apply_only(server, urls, "customer")
    assert statuses(urls["state"]) | {"duplicates": 0} == {
        "pending": 0,
        "applied": 1,
        "poison": 0,
        "unknown": 0,
        "quarantined": 0,
        "discarded": 0,
        "duplicates": 0,
    }
    assert warehouse_rows(urls, "customer")[customer["id"]] == body


# ----------------------------------------------------------------------------- the sensor


def definitions_for(server: SandboxServer, urls: dict[str, str]) -> tuple[Any, dict[str, Any]]:
    settings = Settings.from_env(
        {"RILLET_START_DATE": (datetime.now(UTC).date() - timedelta(days=2)).isoformat()}
    )
    assets = build_entity_assets(settings)
    resources = {
        "rillet": RilletResource(
            base_url=server.base_url,
            api_key=KEY,
            state_url=urls["state"],
            rate_limit_requests=1_000_000,
        ),
        "warehouse": WarehouseResource(url=urls["warehouse"]),
    }
    return assets, resources


def evaluate(sensor: dg.SensorDefinition, instance: Any, resources: Any, cursor: str | None = None):
    with dg.build_sensor_context(instance=instance, resources=resources, cursor=cursor) as context:
        return sensor(context)


def test_the_sensor_requests_one_events_only_run_for_every_pending_entity(
    server: SandboxServer, urls: dict[str, str]
) -> None:
    assets, resources = definitions_for(server, urls)
    job = webhook_job(assets)
    sensor = webhook_sensor(assets, job, gather_seconds=0)
    customer, invoice = truth(server, "customer")[0], truth(server, "invoice")[0]
    now = stamp(datetime.now(UTC))
    queue(urls["state"], "CUSTOMER", "UPDATED", {**customer, "name": "Live", "updated_at": now})
    queue(urls["state"], "INVOICE", "UPDATED", {**invoice, "memo": "live", "updated_at": now})
    queue(urls["state"], "INVOICE", "CREATED", {**invoice, "memo": "live", "updated_at": now})
    assert job.tags["rillet/trigger"] == "webhook"
    assert int(job.tags["dagster/priority"]) > 0
    with dg.DagsterInstance.ephemeral() as instance:
        result = evaluate(sensor, instance, resources)
        assert len(result.run_requests) == 1  # one run, however many entities
        request = result.run_requests[0]
        assert request.tags[ENTITIES_TAG] == "customer,invoice"
        assert request.run_config == {
            "ops": {
                "sync_customer": {"config": {"events_only": True}},
                "sync_invoice": {"config": {"events_only": True}},
                # Payments have no webhooks of their own: read alongside the invoices.
                "sync_invoice_payment": {"config": {"events_only": False}},
            }
        }
        assert request.partition_key == datetime.now(UTC).date().isoformat()
        again = evaluate(sensor, instance, resources)
        # Q1: a re-tick asks for the same key, which Dagster runs once.
        assert [r.run_key for r in again.run_requests] == [request.run_key]
        chosen = [a for a in assets if a.op.name in request.run_config["ops"]]
        run = dg.materialize(
            chosen,
            resources=resources,
            instance=instance,
            partition_key=request.partition_key,
            run_config=request.run_config,
            tags={**job.tags, **request.tags},
        )
        assert run.success
        metadata = run.asset_materializations_for_node("sync_invoice")[0].metadata
        assert metadata["webhook_events_applied"].value == 2
        assert metadata["api_requests"].value == 0
        after = evaluate(sensor, instance, resources)
        assert after.run_requests == []
        # An event arriving later makes a new key: a new run, not a rerun of the old key.
        queue(urls["state"], "CUSTOMER", "UPDATED", {**customer, "name": "Later"})
        later = evaluate(sensor, instance, resources)
        assert [r.tags[ENTITIES_TAG] for r in later.run_requests] == ["customer"]
        assert later.run_requests[0].run_key != request.run_key
    assert warehouse_rows(urls, "invoice")[invoice["id"]]["memo"] == "live"
    assert warehouse_rows(urls, "customer")[customer["id"]]["name"] == "Live"


def test_events_are_gathered_before_a_run_is_requested(
    server: SandboxServer, urls: dict[str, str]
) -> None:
    """A run costs a process start: a fresh event waits for company (a run every ~15 s under a
    steady stream), unless enough events wait already."""
    assets, resources = definitions_for(server, urls)
    queue(urls["state"], "CUSTOMER", "UPDATED", truth(server, "customer")[0])
    with dg.DagsterInstance.ephemeral() as instance:
        gathering = evaluate(webhook_sensor(assets, gather_seconds=3600), instance, resources)
        assert gathering.run_requests == []
        assert "gathering webhook events" in str(gathering.skip_reason)
        ripe = evaluate(webhook_sensor(assets, gather_seconds=0), instance, resources)
        assert len(ripe.run_requests) == 1
    assert webhook_sensor_module.GATHER_SECONDS + 5 + 10 < 30  # wait + tick + start < the goal


def test_events_left_pending_are_requested_again_under_a_new_key(
    server: SandboxServer, urls: dict[str, str]
) -> None:
    assets, resources = definitions_for(server, urls)
    customer = truth(server, "customer")[0]
    queue(urls["state"], "CUSTOMER", "UPDATED", customer)
    with dg.DagsterInstance.ephemeral() as instance:
        fresh = evaluate(
            webhook_sensor(assets, gather_seconds=0, stale_after_seconds=3600), instance, resources
        )
        stale = evaluate(
            webhook_sensor(assets, gather_seconds=0, stale_after_seconds=1e-3), instance, resources
        )
    assert fresh.run_requests[0].run_key != stale.run_requests[0].run_key


def test_a_queued_webhook_run_is_not_requested_twice(
    server: SandboxServer, urls: dict[str, str]
) -> None:
    assets, resources = definitions_for(server, urls)
    queue(urls["state"], "CUSTOMER", "UPDATED", truth(server, "customer")[0])
    with dg.DagsterInstance.ephemeral() as instance:
        instance.create_run_for_job(
            dg.GraphDefinition("queued").to_job(),
            status=dg.DagsterRunStatus.NOT_STARTED,  # waiting to start, like a queued run
            tags={"rillet/trigger": "webhook", ENTITIES_TAG: "customer"},
        )
        result = evaluate(webhook_sensor(assets, gather_seconds=0), instance, resources)
        assert result.run_requests == [] and "a queued run will apply them" in str(
            result.skip_reason
        )
        # An entity the queued run does not cover gets a run of its own.
        queue(urls["state"], "INVOICE", "UPDATED", truth(server, "invoice")[0])
        other = evaluate(webhook_sensor(assets, gather_seconds=0), instance, resources)
    assert [r.tags[ENTITIES_TAG] for r in other.run_requests] == ["invoice"]


def test_d3_a_failing_evaluation_requests_nothing_and_keeps_the_cursor(
    server: SandboxServer, urls: dict[str, str], tmp_path: Path
) -> None:
    assets, resources = definitions_for(server, urls)
    sensor = webhook_sensor(assets, gather_seconds=0)
    queue(urls["state"], "CUSTOMER", "UPDATED", truth(server, "customer")[0])
    broken = {
        **resources,
        "rillet": RilletResource(
            base_url=server.base_url,
            api_key=KEY,
            state_url="postgresql+psycopg://nobody@127.0.0.1:1/none",
        ),
    }
    with dg.DagsterInstance.ephemeral() as instance:
        with (
            dg.build_sensor_context(instance=instance, resources=broken, cursor="old") as context,
            pytest.raises(Exception, match=r"127\.0\.0\.1"),
        ):
            sensor(context)
        assert context.cursor == "old"
        result = evaluate(sensor, instance, resources, cursor="old")
    assert len(result.run_requests) == 1


def test_q4_a_backlog_drains_in_one_run_per_entity(
    server: SandboxServer, urls: dict[str, str]
) -> None:
    """5,000 events queued while the daemon was down: no run storm, every event applied."""
    assets, resources = definitions_for(server, urls)
    customers, invoices = truth(server, "customer"), truth(server, "invoice")
    engine = state.make_state_engine(urls["state"])
    start = datetime.now(UTC)
    with engine.begin() as connection:
        state.ensure_state_schema(connection)
        for n in range(5000):
            entity, pool = ("CUSTOMER", customers) if n % 2 else ("INVOICE", invoices)
            record = pool[(n // 2) % len(pool)]
            moment = start + timedelta(microseconds=n)
            body = {**record, "updated_at": stamp(moment)}
            state.enqueue(
                connection,
                state.QueuedEvent(
                    id=str(uuid.uuid4()),
                    entity=entity,
                    event="UPDATED",
                    received_at=moment,
                    event_timestamp=moment,
                    body=json.dumps(body).encode(),
                ),
            )
    engine.dispose()
    messages: list[str] = []
    with dg.DagsterInstance.ephemeral() as instance:
        result = evaluate(webhook_sensor(assets, gather_seconds=0), instance, resources)
        assert len(result.run_requests) == 1  # one run drains every entity: no run storm
        for request in result.run_requests:
            chosen = [a for a in assets if a.op.name in request.run_config["ops"]]
            run = dg.materialize(
                chosen,
                resources=resources,
                instance=instance,
                partition_key=request.partition_key,
                run_config=request.run_config,
                tags=request.tags,
            )
            assert run.success
            messages += [entry.message for entry in instance.all_logs(run.run_id)]
    assert statuses(urls["state"])["pending"] == 0
    assert statuses(urls["state"])["applied"] == 5000
    drained = [m for m in messages if "applied 500 webhook events" in m]
    assert len(drained) == 10  # the drain is logged batch by batch, in the run's own log
    rows = warehouse_rows(urls, "customer")
    assert {r["id"] for r in customers} == set(rows)
