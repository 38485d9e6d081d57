"""One bad webhook event never stops the others (issue 13, finding 1): it is isolated, healed
from Rillet's version of its record when that can be stored, else quarantined with its error;
operators list, requeue and discard with ``rillet-dagster events``; retention purges what was
applied. On SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa

from rillet_dagster import catalog
from rillet_dagster.assets.entities import QUARANTINE_CHECK, build_entity_assets
from rillet_dagster.assets.events import apply_pending_events
from rillet_dagster.assets.sync import sync_entity
from rillet_dagster.automation.retention import purge
from rillet_dagster.clock import isoformat_z
from rillet_dagster.resources import RilletResource, WarehouseResource
from rillet_dagster.rillet.client import RetryPolicy, RilletClient
from rillet_dagster.rillet.errors import RilletConnectionError
from rillet_dagster.sandbox.server import SandboxOptions, SandboxServer, build_sandbox
from rillet_dagster.settings import Settings
from rillet_dagster.warehouse import state
from rillet_dagster.warehouse.applied import applied_events, ensure_applied_table, record_applied
from rillet_dagster.warehouse.schema import ensure_schema, make_engine
from tests.integration.test_webhook_apply import (
    EVERYTHING,
    KEY,
    apply_only,
    queue,
    statuses,
    truth,
    warehouse_rows,
)
from tests.pg import postgres_url

log = logging.getLogger(__name__)


@pytest.fixture
def server() -> Iterator[SandboxServer]:
    options = SandboxOptions(size="tiny", api_keys=(KEY,), rate_limit=1_000_000)
    started = SandboxServer(build_sandbox(options)).start()
    yield started
    started.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    if request.param == "sqlite":
        return {
            "warehouse": f"sqlite:///{tmp_path}/warehouse.db",
            "state": f"sqlite:///{tmp_path}/state.db",
        }
    name = request.node.name.split("[")[0].removeprefix("test_")[:30]
    return {"warehouse": postgres_url(f"qw_{name}"), "state": postgres_url(f"qs_{name}")}


def full_sync(server: SandboxServer, urls: dict[str, str], entity: str) -> None:
    """A full pass, which applies the queue first (as sync_all and the backstop do)."""
    engine = make_engine(urls["warehouse"])
    ensure_schema(engine)
    with RilletClient(api_key=KEY, base_url=server.base_url) as client:
        sync_entity(
            catalog.entity(entity),
            client,
            engine,
            window=EVERYTHING,
            run_id="full",
            log=log,
            state_url=urls["state"],
        )
    engine.dispose()


def now_stamp(offset: timedelta = timedelta()) -> str:
    return isoformat_z(datetime.now(UTC) + offset)


def raw_body(record: dict[str, Any], **fields: str) -> bytes:
    """``record`` as JSON with ``fields`` spliced in as raw JSON text (values json.dumps
    cannot produce: lone surrogates, huge exponents)."""
    text = json.dumps({**record, **dict.fromkeys(fields, "@@")})
    for name, raw in fields.items():
        text = text.replace(f'"{name}": "@@"', f'"{name}": {raw}', 1)
    return text.encode()


def queued(state_url: str, status: str) -> list[state.QueuedEvent]:
    engine = state.make_state_engine(state_url)
    with engine.connect() as connection:
        events = state.set_aside_events(connection, statuses=[status])  # type: ignore[list-item]
    engine.dispose()
    return events


def test_bad_events_are_healed_or_quarantined_and_every_good_one_applies(
    server: SandboxServer, urls: dict[str, str]
) -> None:
    full_sync(server, urls, "customer")
    customers = truth(server, "customer")
    good = [
        {**c, "name": f"{c['name']} (renamed)", "updated_at": now_stamp()} for c in customers[:4]
    ]
    for body in good:
        queue(urls["state"], "CUSTOMER", "UPDATED", body)
    surrogate, huge, future = customers[4], customers[5], customers[6]
    # Healed: the body cannot be stored, Rillet's version of the record can.
    queue(urls["state"], "CUSTOMER", "UPDATED", raw_body(surrogate, name='"\\ud800"'))
    queue(urls["state"], "CUSTOMER", "UPDATED", raw_body(huge, name="1e200000"))
    # Not trusted: stamped a century ahead, it would pin the row against Rillet's versions.
    pinned = {**future, "name": "from the future", "updated_at": "2099-01-01T00:00:00.000Z"}
    queue(urls["state"], "CUSTOMER", "UPDATED", pinned)
    # Quarantined: nothing in them names a record that could be read again.
    too_many_digits = b'{"id": ' + b"9" * 5000 + b"}"
    queue(urls["state"], "CUSTOMER", "UPDATED", too_many_digits)
    queue(urls["state"], "CUSTOMER", "UPDATED", b"[" * 100_000 + b"]" * 100_000)

    apply_only(server, urls, "customer")

    counts = statuses(urls["state"])
    assert (counts["pending"], counts["applied"], counts["quarantined"]) == (0, 7, 2)
    rows = warehouse_rows(urls, "customer")
    for body in good:
        assert rows[body["id"]] == body
    for record in (surrogate, huge, future):
        assert rows[record["id"]] == record  # Rillet's version
    errors = [event.error or "" for event in queued(urls["state"], "quarantined")]
    assert any("must be an object with a string id" in error for error in errors), errors
    assert any("Recursion" in error or "nested" in error for error in errors), errors
    assert all("no record id" in error for error in errors)
    # A full pass never depends on the queue and leaves the warehouse equal to Rillet.
    full_sync(server, urls, "customer")
    assert warehouse_rows(urls, "customer") == {c["id"]: c for c in truth(server, "customer")}


def test_a_transient_failure_quarantines_nothing_and_leaves_every_event_pending(
    server: SandboxServer, urls: dict[str, str]
) -> None:
    invoice, paid = truth(server, "invoice")[:2]
    payment = {"id": str(uuid.uuid4()), "invoice_id": paid["id"], "status": "CLEARED"}
    queue(urls["state"], "INVOICE", "PAYMENT_UPDATED", payment)
    queue(urls["state"], "INVOICE", "UPDATED", {**invoice, "updated_at": now_stamp()})
    base_url = server.base_url
    server.stop()  # Rillet unreachable: says nothing about the events
    engine = make_engine(urls["warehouse"])
    ensure_schema(engine)
    state_engine = state.make_state_engine(urls["state"])
    retry = RetryPolicy(max_attempts=1)
    with (
        RilletClient(api_key=KEY, base_url=base_url, retry=retry) as client,
        pytest.raises(RilletConnectionError),
    ):
        apply_pending_events(
            catalog.entity("invoice"), client, engine, state_engine, run_id="r", log=log
        )
    counts = statuses(urls["state"])
    assert (counts["pending"], counts["quarantined"]) == (2, 0)
    with state_engine.connect() as connection:
        attempts = [e.attempts for e in state.pending_events(connection)]
    assert attempts == [1, 1]
    engine.dispose()
    state_engine.dispose()


def test_the_entity_asset_shows_quarantined_events_in_metadata_and_a_check(
    server: SandboxServer, urls: dict[str, str]
) -> None:
    settings = Settings.from_env(
        {"RILLET_START_DATE": (datetime.now(UTC).date() - timedelta(days=2)).isoformat()}
    )
    asset = next(a for a in build_entity_assets(settings) if a.op.name == "sync_customer")
    resources = {
        "rillet": RilletResource(
            base_url=server.base_url,
            api_key=KEY,
            state_url=urls["state"],
            rate_limit_requests=1_000_000,
        ),
        "warehouse": WarehouseResource(url=urls["warehouse"]),
    }
    customer = truth(server, "customer")[0]
    queue(urls["state"], "CUSTOMER", "UPDATED", {**customer, "updated_at": now_stamp()})
    queue(urls["state"], "CUSTOMER", "DELETED", b"{not json")
    with dg.DagsterInstance.ephemeral() as instance:
        run = dg.materialize(
            [asset],
            resources=resources,
            instance=instance,
            run_config={"ops": {"sync_customer": {"config": {"events_only": True}}}},
            partition_key=datetime.now(UTC).date().isoformat(),
        )
        assert run.success
        metadata = run.asset_materializations_for_node("sync_customer")[0].metadata
        assert metadata["webhook_events_applied"].value == 1
        assert metadata["webhook_events_quarantined"].value == 1
        assert "JSONDecodeError" in metadata["webhook_first_quarantine_error"].value
        (check,) = run.get_asset_check_evaluations()
        assert check.check_name == QUARANTINE_CHECK and not check.passed
        assert check.severity == dg.AssetCheckSeverity.WARN
        assert check.metadata["quarantined"].value == 1
        assert "events requeue --entity CUSTOMER" in check.metadata["what_to_do"].value
    cli(urls, "discard", "--all")
    with dg.DagsterInstance.ephemeral() as instance:
        run = dg.materialize(
            [asset],
            resources=resources,
            instance=instance,
            run_config={"ops": {"sync_customer": {"config": {"events_only": True}}}},
            partition_key=datetime.now(UTC).date().isoformat(),
        )
        (check,) = run.get_asset_check_evaluations()
        assert check.passed and check.metadata["quarantined"].value == 0


def cli(urls: dict[str, str], *args: str) -> str:
    environment = {
        **os.environ,
        "RILLET_STATE_URL": urls["state"],
        "RILLET_WAREHOUSE_URL": urls["warehouse"],
    }
    done = subprocess.run(
        [sys.executable, "-m", "rillet_dagster.cli", "events", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_operators_list_requeue_and_discard_quarantined_events(
    server: SandboxServer, urls: dict[str, str]
) -> None:
    customers = truth(server, "customer")
    first = queue(urls["state"], "CUSTOMER", "UPDATED", b'{"id": 1e999999999999}')
    second = queue(urls["state"], "CUSTOMER", "UPDATED", b'"not an object"')
    apply_only(server, urls, "customer")
    assert statuses(urls["state"])["quarantined"] == 2

    summary = cli(urls)
    assert "quarantined 2" in summary and "CUSTOMER: 2 quarantined" in summary
    listing = [json.loads(line) for line in cli(urls, "list", "--json").splitlines()]
    assert {item["id"] for item in listing} == {first, second}
    assert all(item["error"] for item in listing)

    assert "discarded 1" in cli(urls, "discard", "--id", second)
    # A fixed body (as after a code fix) applies once requeued.
    engine = state.make_state_engine(urls["state"])
    with engine.begin() as connection:
        connection.execute(
            sa.update(state.webhook_events)
            .where(state.webhook_events.c.id == first)
            .values(body=json.dumps({**customers[0], "updated_at": now_stamp()}).encode())
        )
    engine.dispose()
    assert "requeued 1" in cli(urls, "requeue", "--entity", "customer")
    apply_only(server, urls, "customer")
    counts = statuses(urls["state"])
    assert (counts["applied"], counts["discarded"], counts["quarantined"]) == (1, 1, 0)
    assert "no quarantined events" in cli(urls, "list")


def test_the_cli_refuses_an_ambiguous_choice(urls: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rillet_dagster.cli", "events", "requeue"],
        env={**os.environ, "RILLET_STATE_URL": urls["state"]},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "exactly one of --id, --entity, --all" in done.stderr


def test_retention_purges_settled_events_and_ledger_rows_and_keeps_the_rest(
    urls: dict[str, str],
) -> None:
    now = datetime.now(UTC)
    old, recent = now - timedelta(days=8), now - timedelta(days=1)
    ids = {name: queue(urls["state"], "CUSTOMER", "UPDATED", {"id": name}) for name in "abcdef"}
    state_engine = state.make_state_engine(urls["state"])
    warehouse = make_engine(urls["warehouse"])
    with state_engine.begin() as connection:
        state.mark_applied(connection, [ids["a"]], "r", at=old)
        state.mark_applied(connection, [ids["b"]], "r", at=recent)
        state.quarantine(connection, ids["c"], "kept until an operator acts")
        state.quarantine(connection, ids["d"], "discarded long ago")
        state.discard(connection, ids=[ids["d"]], at=old)
    with warehouse.begin() as connection:
        ensure_applied_table(connection)
        record_applied(connection, [(ids["a"], "CUSTOMER", "UPDATED")], run_id="r", at=old)
        record_applied(connection, [(ids["b"], "CUSTOMER", "UPDATED")], run_id="r", at=recent)
    purged = purge(state_engine, warehouse, 7, now)
    assert (purged.events, purged.ledger_rows) == (2, 1)
    with state_engine.connect() as connection:
        left = {e.id for e in state.pending_events(connection)}
        counters = state.queue_counters(connection)
    assert left == {ids["e"], ids["f"]}
    assert (counters["applied"], counters["quarantined"], counters["discarded"]) == (1, 1, 0)
    with warehouse.connect() as connection:
        ledger = connection.execute(sa.select(applied_events.c.id)).scalars().all()
    assert ledger == [ids["b"]]
    state_engine.dispose()
    warehouse.dispose()


def test_the_purge_job_and_its_schedule_are_in_the_definitions() -> None:
    from rillet_dagster.definitions import defs

    job = defs.resolve_job_def("purge_webhook_events")
    schedule = defs.resolve_schedule_def("daily_webhook_event_purge")
    assert schedule.job_name == job.name
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING


def test_a_record_rillet_sends_that_cannot_be_stored_is_set_aside_and_the_pass_goes_on(
    server: SandboxServer, urls: dict[str, str]
) -> None:
    customers = truth(server, "customer")
    broken = customers[2]
    collection = server.sandbox.world.store["customer"]
    seq = collection.seq_of(broken["id"])
    assert seq is not None

    def serve(record: dict[str, Any]) -> None:
        with server.sandbox.world.store.lock:
            collection.replace(seq, record, collection.updated_us(seq))

    serve({**broken, "name": 1e308})  # sent as 1e+308: a number wider than any column stores
    full_sync(server, urls, "customer")  # no exception: the others load
    rows = warehouse_rows(urls, "customer")
    assert set(rows) == {c["id"] for c in customers} - {broken["id"]}
    (refused,) = queued(urls["state"], "quarantined")
    assert refused.event == state.SYNC_REFUSED and refused.entity == "CUSTOMER"
    assert broken["id"] in (refused.error or "") and "name" in (refused.error or "")
    full_sync(server, urls, "customer")  # the same record again: still one row set aside
    assert len(queued(urls["state"], "quarantined")) == 1
    # Fixed at the source; requeued, the next full pass reads it again.
    serve(broken)
    assert "full sync reads them again" in cli(urls, "requeue", "--all")
    full_sync(server, urls, "customer")
    assert warehouse_rows(urls, "customer") == {c["id"]: c for c in truth(server, "customer")}
    assert queued(urls["state"], "quarantined") == []


def test_a_malformed_body_is_read_again_alone_not_with_its_batch(
    server: SandboxServer, urls: dict[str, str]
) -> None:
    """Finding 10: one body the loader refuses costs one request, not one per body of its batch;
    an id shaped like a path (``.``) never reaches Rillet and its event is quarantined."""
    invoices = truth(server, "invoice")
    for invoice in invoices[:40]:
        queue(urls["state"], "INVOICE", "UPDATED", {**invoice, "updated_at": now_stamp()})
    malformed = invoices[40]
    queue(urls["state"], "INVOICE", "UPDATED", raw_body(malformed, items='"not a list"'))
    dotted = {"id": str(uuid.uuid4()), "invoice_id": ".", "status": "CLEARED"}
    queue(urls["state"], "INVOICE", "PAYMENT_UPDATED", dotted)
    client = apply_only(server, urls, "invoice")
    assert client.stats.requests == 1  # the malformed invoice, read again alone
    counts = statuses(urls["state"])
    assert (counts["applied"], counts["quarantined"]) == (41, 1)
    (quarantined,) = queued(urls["state"], "quarantined")
    assert "InvalidRecordIdError" in (quarantined.error or "")
    assert warehouse_rows(urls, "invoice")[malformed["id"]] == malformed


def test_retention_keeps_the_queue_bounded_under_a_sustained_load(urls: dict[str, str]) -> None:
    """Thirty days of 40 events a day, applied as they come, purged nightly at 7 days: the
    queue never holds more than 8 days of traffic."""
    state_engine = state.make_state_engine(urls["state"])
    warehouse = make_engine(urls["warehouse"])
    start = datetime(2026, 1, 1, tzinfo=UTC)
    sizes = []
    for day in range(30):
        now = start + timedelta(days=day)
        ids = [str(uuid.uuid4()) for _ in range(40)]
        with state_engine.begin() as connection:
            state.ensure_state_schema(connection)
            state.enqueue_many(
                connection,
                [
                    state.QueuedEvent(i, "CUSTOMER", "UPDATED", now, now, b'{"id": "x"}')
                    for i in ids
                ],
            )
            state.mark_applied(connection, ids, "run", at=now)
        purge(state_engine, warehouse, 7, now)
        with state_engine.connect() as connection:
            sizes.append(sum(state.queue_counters(connection)[s] for s in state.STATUSES))
    assert max(sizes) <= 8 * 40
    assert sizes[-1] == 8 * 40  # days 22..29 (a cutoff is exclusive)
    state_engine.dispose()
    warehouse.dispose()


def test_a_list_record_without_an_id_or_with_a_bad_stamp_never_stops_the_pass(
    server: SandboxServer, urls: dict[str, str]
) -> None:
    """Neither is stored nor lost: both are set aside, and since a record without an id could
    be any stored one, that pass infers no deletion."""
    full_sync(server, urls, "customer")
    customers = truth(server, "customer")
    collection = server.sandbox.world.store["customer"]
    anonymous, badly_stamped = customers[1], customers[3]
    with server.sandbox.world.store.lock:
        # What the sandbox serves for these two (its cache of each record's JSON).
        collection._json[collection.seq_of(anonymous["id"])] = b'{"name": "who am I"}'
        stamped = {**badly_stamped, "updated_at": "yesterday-ish"}
        collection._json[collection.seq_of(badly_stamped["id"])] = json.dumps(stamped).encode()
    full_sync(server, urls, "customer")
    assert warehouse_rows(urls, "customer") == {c["id"]: c for c in customers}  # none deleted
    refused = queued(urls["state"], "quarantined")
    assert len(refused) == 2 and {e.event for e in refused} == {state.SYNC_REFUSED}
    errors = " ".join(e.error or "" for e in refused)
    assert "'id'" in errors and "updated_at" in errors
    full_sync(server, urls, "customer")
    assert len(queued(urls["state"], "quarantined")) == 2  # the same two, not two more
