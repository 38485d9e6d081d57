"""Property (issue 13): whatever JSON values land in whatever fields of some webhook bodies,
every good event applies, every bad one is applied, healed from Rillet or quarantined, and the
next full pass leaves the warehouse equal to the sandbox. On SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rillet_dagster import catalog
from rillet_dagster.assets.sync import Window, sync_entity
from rillet_dagster.clock import isoformat_z
from rillet_dagster.rillet.client import RilletClient
from rillet_dagster.sandbox.server import SandboxOptions, SandboxServer, build_sandbox
from rillet_dagster.warehouse import state
from rillet_dagster.warehouse.load import read_records
from rillet_dagster.warehouse.schema import ensure_schema, make_engine, table_for
from tests.integration.test_webhook_apply import KEY, queue, truth
from tests.pg import postgres_url

log = logging.getLogger(__name__)
EVERYTHING = Window(start=None, end=None, full=True)
ENTITIES = ("customer", "invoice")
MARKER = "@@hostile@@"

# Values no json.dumps of Python data produces, written as raw JSON text.
SPECIAL = st.sampled_from(
    [
        '"\\ud800"',
        '"tail \\udfff"',
        "1e200000",
        "1.0e999999999999",
        "-1e-400000",
        "3000000000",
        str(2**63),
        "1" + "0" * 5000,
        '"."',
        '".."',
        '"a/b"',
        '"\\u0000"',
        "[" * 300 + "]" * 300,
        '"2099-01-01T00:00:00.000Z"',
        '"not a timestamp"',
        "null",
        "{}",
        "[]",
    ]
)
PLAIN = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
).map(json.dumps)
VALUES = st.one_of(SPECIAL, PLAIN)


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    options = SandboxOptions(size="tiny", api_keys=(KEY,), rate_limit=1_000_000)
    started = SandboxServer(build_sandbox(options)).start()
    yield started
    started.stop()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "postgresql":
        postgres_url("qp_probe")  # skips (or fails in CI) without PostgreSQL
    return request.param


def leaf_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place a value sits in ``value`` (keys and list indexes), the containers too."""
    paths = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            paths += leaf_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            paths += leaf_paths(item, (*prefix, index))
    return paths


def hostile_body(record: dict[str, Any], path: tuple[Any, ...], raw: str) -> bytes:
    """``record`` with the value at ``path`` replaced by the raw JSON text ``raw``."""
    copy = json.loads(json.dumps(record))
    target = copy
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = MARKER
    return json.dumps(copy).replace(json.dumps(MARKER), raw, 1).encode()


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    good = draw(st.integers(min_value=1, max_value=4))  # customers 0..good-1 get good events
    bad = draw(
        st.lists(
            st.tuples(
                st.sampled_from(ENTITIES),
                st.integers(min_value=0, max_value=1_000),  # which record
                st.integers(min_value=0, max_value=10_000),  # which path (or a new field)
                VALUES,
            ),
            min_size=1,
            max_size=6,
        )
    )
    return {"good": good, "bad": bad}


def fresh_urls(backend: str, folder: str) -> dict[str, str]:
    if backend == "sqlite":
        return {"warehouse": f"sqlite:///{folder}/w.db", "state": f"sqlite:///{folder}/s.db"}
    urls = {"warehouse": postgres_url("qp_warehouse"), "state": postgres_url("qp_state")}
    return urls


def sync(server: SandboxServer, urls: dict[str, str], *, read_rillet: bool) -> None:
    engine = make_engine(urls["warehouse"])
    ensure_schema(engine)
    with RilletClient(api_key=KEY, base_url=server.base_url) as client:
        for entity in ENTITIES:
            sync_entity(
                catalog.entity(entity),
                client,
                engine,
                window=EVERYTHING,
                run_id="property",
                log=log,
                state_url=urls["state"],
                read_rillet=read_rillet,
            )
    engine.dispose()


def event_statuses(urls: dict[str, str]) -> dict[str, str]:
    engine = state.make_state_engine(urls["state"])
    with engine.connect() as connection:
        rows = connection.execute(
            sa.select(state.webhook_events.c.id, state.webhook_events.c.status)
        ).all()
    engine.dispose()
    return dict(rows)  # type: ignore[arg-type]


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios())
def test_hostile_values_never_stop_the_good_events_and_a_full_pass_heals_everything(
    server: SandboxServer, backend: str, scenario: dict[str, Any]
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        urls = fresh_urls(backend, folder)
        sync(server, urls, read_rillet=True)
        customers = truth(server, "customer")
        now = isoformat_z(datetime.now(UTC))
        good_ids = {}
        for customer in customers[: scenario["good"]]:
            body = {**customer, "name": f"{customer['name']} (good)", "updated_at": now}
            good_ids[queue(urls["state"], "CUSTOMER", "UPDATED", body)] = body
        bad_ids = []
        for entity, which, where, raw in scenario["bad"]:
            records = truth(server, entity)
            if entity == "customer":
                records = records[scenario["good"] :]
            record = records[which % len(records)]
            paths = leaf_paths(record)
            path = paths[where % len(paths)] if where % 5 else ("unmapped_field",)
            webhook_entity = catalog.entity(entity).webhook_entity
            assert webhook_entity is not None
            bad_ids.append(
                queue(urls["state"], webhook_entity, "UPDATED", hostile_body(record, path, raw))
            )

        sync(server, urls, read_rillet=False)  # the webhook run: events only

        statuses = event_statuses(urls)
        assert all(statuses[i] == "applied" for i in good_ids), statuses
        assert all(statuses[i] in ("applied", "quarantined") for i in bad_ids), statuses
        engine = make_engine(urls["warehouse"])
        stored = {r["id"]: r for r in read_records(engine, "customer")}
        for body in good_ids.values():
            assert stored[body["id"]] == body

        sync(server, urls, read_rillet=True)  # a full pass: Rillet's truth everywhere

        for entity in ENTITIES:
            expected = {r["id"]: r for r in truth(server, entity)}
            assert {r["id"]: r for r in read_records(engine, entity)} == expected, entity
        items = table_for("invoice_item")
        with engine.connect() as connection:
            count = connection.execute(sa.select(sa.func.count()).select_from(items)).scalar_one()
        assert count == sum(len(r.get("items") or []) for r in truth(server, "invoice"))
        engine.dispose()
        assert "pending" not in set(event_statuses(urls).values())
