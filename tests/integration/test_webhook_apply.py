"""Queued webhook events applied by the entity assets, and the sensor that requests those runs
(test-matrix rows Q1, Q2, Q5, Q6, D3)."""

from __future__ import annotations

import copy
import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.scheduler.instigation import InstigatorTick, TickStatus
from dagster._core.test_utils import create_test_daemon_workspace_context
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
from dagster._daemon import sensor as sensor_daemon

from rillet_dagster import catalog
from rillet_dagster.assets import entities as entities_module
from rillet_dagster.assets import events as events_module
from rillet_dagster.assets.entities import build_entity_assets
from rillet_dagster.assets.sync import Window, sync_entity
from rillet_dagster.automation import webhook_sensor as webhook_sensor_module
from rillet_dagster.automation.webhook_sensor import (
    ENTITIES_TAG,
    SENSOR_NAME,
    webhook_job,
    webhook_sensor,
)
from rillet_dagster.clock import isoformat_z
from rillet_dagster.resources import RilletResource, WarehouseResource
from rillet_dagster.rillet.client import RilletClient
from rillet_dagster.sandbox.server import SandboxOptions, SandboxServer, build_sandbox
from rillet_dagster.settings import Settings
from rillet_dagster.warehouse import state
from rillet_dagster.warehouse.applied import applied_events
from rillet_dagster.warehouse.load import read_records
from rillet_dagster.warehouse.schema import ensure_schema, make_engine, table_for
from tests import canary

KEY = canary.api_key("webhook-apply")
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


# ----------------------------------------------------------------------------- Q1: the daemon

# The code location the sensor daemon evaluates: the webhook sensor and job over this test's
# sandbox and databases. Loaded in this process, so that the test can hold a run half-way.
Q1_LOCATION = """
import dagster as dg
from rillet_dagster.assets.entities import build_entity_assets
from rillet_dagster.automation.webhook_sensor import webhook_job, webhook_sensor
from rillet_dagster.resources import RilletResource, WarehouseResource
from rillet_dagster.settings import Settings

assets = build_entity_assets(Settings.from_env({{"RILLET_START_DATE": {start!r}}}))
job = webhook_job(assets)
defs = dg.Definitions(
    assets=assets,
    jobs=[job],
    sensors=[webhook_sensor(assets, job, gather_seconds=0)],
    resources={{
        "rillet": RilletResource(
            base_url={base_url!r},
            api_key={key!r},
            state_url={state_url!r},
            rate_limit_requests=1_000_000,
        ),
        "warehouse": WarehouseResource(url={warehouse_url!r}),
    }},
)
"""


class Daemon:
    """Ticks of the sensor daemon: Dagster's own tick loop (``execute_sensor_iteration``, what
    ``dagster-daemon`` runs), with its crash hooks, against a real instance."""

    def __init__(self, workspace: WorkspaceProcessContext) -> None:
        self.workspace = workspace
        self.instance = workspace.instance

    def tick(self, crash_after_launch: Exception | None = None) -> InstigatorTick:
        flags = {SENSOR_NAME: {"RUN_LAUNCHED": crash_after_launch}} if crash_after_launch else None
        iteration = sensor_daemon.execute_sensor_iteration(
            self.workspace, log, None, None, debug_crash_flags=flags
        )
        list(iteration)  # a generator: it yields to let the daemon heartbeat
        sensor = next(
            repository.get_sensor(SENSOR_NAME)
            for entry in self.workspace.create_request_context()
            .get_code_location_entries()
            .values()
            if entry.code_location
            for repository in entry.code_location.get_repositories().values()
        )
        ticks = self.instance.get_ticks(sensor.get_remote_origin_id(), sensor.selector_id, limit=1)
        return ticks[0]

    def runs(self) -> list[dg.DagsterRun]:
        return list(reversed(self.instance.get_runs()))  # oldest first

    def launch(self, run: dg.DagsterRun) -> None:
        """What the run queue does when the run's turn comes (the launcher runs it here)."""
        self.instance.launch_run(run.run_id, self.workspace.create_request_context())


def applied_by_run(instance: dg.DagsterInstance, run_id: str) -> int:
    """``webhook_events_applied`` of the run's customer materialization: every event the run
    took from the queue, an event it found already in the warehouse included."""
    (entry,) = [
        e
        for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
        if e.asset_materialization
        and e.asset_materialization.asset_key == dg.AssetKey(["rillet", "customers"])
    ]
    return int(entry.asset_materialization.metadata["webhook_events_applied"].value)  # type: ignore[union-attr,arg-type]


def test_q1_a_tick_crashed_after_launch_and_ticks_during_the_run_apply_each_event_once(
    server: SandboxServer,
    urls: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    today: date,
) -> None:
    """Q1 with Dagster's sensor daemon code and the queued run coordinator of dagster.yaml:
    a tick that crashes right after launching its run (before the tick is recorded) is retried
    without a second run; a tick while that run executes asks for the same run_key again, which
    Dagster does not launch twice; an event arriving after the run read the queue gets a new key
    and a run of its own; every event is applied once, by one run."""
    customer = truth(server, "customer")[0]
    now = datetime.now(UTC)
    bodies = [
        {**customer, "name": f"Q1 {n}", "updated_at": stamp(now + timedelta(seconds=n))}
        for n in range(3)
    ]
    first, second = (queue(urls["state"], "CUSTOMER", "UPDATED", b) for b in bodies[:2])
    location = tmp_path / "q1_location.py"
    location.write_text(
        Q1_LOCATION.format(
            start=(today - timedelta(days=2)).isoformat(),
            base_url=server.base_url,
            key=KEY,
            state_url=urls["state"],
            warehouse_url=urls["warehouse"],
        )
    )
    # The daemon ticks a sensor at most every minimum_interval_seconds: here, back to back.
    monkeypatch.setattr(sensor_daemon, "is_under_min_interval", lambda *a, **k: False)
    # The first run stops twice, until the test lets it go on: when it has read its batch from
    # the queue (not applied yet), and when it has applied it and found the queue empty (the
    # step not yet ended). Both outside any transaction, as a slow run would be.
    holds = {"batch read": threading.Event(), "queue emptied": threading.Event()}
    go_on = {name: threading.Event() for name in holds}

    def hold(name: str) -> None:
        if not go_on[name].is_set():
            holds[name].set()
            assert go_on[name].wait(60), f"the test never let the run go on ({name})"

    apply_batch: Callable[..., Any] = events_module._apply_isolating
    sync: Callable[..., Any] = entities_module.sync_entity

    def apply_after_a_hold(*args: Any, **kwargs: Any) -> Any:
        hold("batch read")
        return apply_batch(*args, **kwargs)

    def sync_then_hold(*args: Any, **kwargs: Any) -> Any:
        yield from sync(*args, **kwargs)
        hold("queue emptied")

    monkeypatch.setattr(events_module, "_apply_isolating", apply_after_a_hold)
    monkeypatch.setattr(entities_module, "sync_entity", sync_then_hold)
    overrides = {
        "run_coordinator": {
            "module": "dagster._core.run_coordinator",
            "class": "QueuedRunCoordinator",
        },
        # A launched run executes in this process, where the test can hold it (see hold).
        "run_launcher": {
            "module": "dagster._core.launcher.sync_in_memory_run_launcher",
            "class": "SyncInMemoryRunLauncher",
        },
    }
    target = InProcessWorkspaceLoadTarget(
        InProcessCodeLocationOrigin(
            LoadableTargetOrigin(
                python_file=str(location), attribute="defs", working_directory=str(tmp_path)
            )
        )
    )
    with (
        dg.instance_for_test(overrides=overrides) as instance,
        create_test_daemon_workspace_context(target, instance) as workspace,
    ):
        daemon = Daemon(workspace)
        crashed = daemon.tick(crash_after_launch=RuntimeError("daemon died after the launch"))
        assert crashed.status == TickStatus.FAILURE
        (run_1,) = daemon.runs()
        key_1 = run_1.tags["dagster/run_key"]
        assert run_1.status == dg.DagsterRunStatus.QUEUED
        # Dagster retries the crashed tick's request: that run_key has a run already.
        retried = daemon.tick()
        assert list(retried.run_keys) == [key_1] and retried.run_ids == []
        assert [r.run_id for r in daemon.runs()] == [run_1.run_id]

        executing = threading.Thread(target=daemon.launch, args=(run_1,))
        executing.start()
        try:
            assert holds["batch read"].wait(60), "the run never read the queue"
            # Started, its events still pending: the sensor asks for the same key; no new run.
            during = daemon.tick()
            assert list(during.run_keys) == [key_1] and during.run_ids == []
            assert [r.run_id for r in daemon.runs()] == [run_1.run_id]
            go_on["batch read"].set()
            assert holds["queue emptied"].wait(60), "the run never finished its batch"
            # The run has applied its batch and found the queue empty; a new event arrives.
            third = queue(urls["state"], "CUSTOMER", "UPDATED", bodies[2])
            arrived = daemon.tick()
            (key_2,) = arrived.run_keys
            assert key_2 != key_1 and len(arrived.run_ids) == 1
            queued = daemon.tick()  # the new run waits in the queue: nothing asked for again
            assert list(queued.run_keys) == [] and queued.status == TickStatus.SKIPPED
        finally:
            for event in go_on.values():
                event.set()
            executing.join(60)
        run_2 = instance.get_run_by_id(arrived.run_ids[0])
        assert run_2 is not None and run_2.tags["dagster/run_key"] == key_2
        daemon.launch(run_2)
        done = daemon.tick()
        assert done.status == TickStatus.SKIPPED and done.skip_reason == "no webhook events waiting"
        runs = daemon.runs()
        assert [r.run_id for r in runs] == [run_1.run_id, run_2.run_id]
        assert [r.status for r in runs] == [dg.DagsterRunStatus.SUCCESS] * 2
        # Each event was taken from the queue by one run only, and applied by it.
        assert [applied_by_run(instance, r.run_id) for r in runs] == [2, 1]
    engine = make_engine(urls["warehouse"])
    with engine.connect() as connection:
        ledger = connection.execute(sa.select(applied_events.c.id, applied_events.c.run_id)).all()
    engine.dispose()
    assert sorted(ledger) == sorted(
        [(first, run_1.run_id), (second, run_1.run_id), (third, run_2.run_id)]
    )
    counters = statuses(urls["state"])
    assert (counters["pending"], counters["applied"], counters["quarantined"]) == (0, 3, 0)
    assert warehouse_rows(urls, "customer")[customer["id"]] == bodies[2]
