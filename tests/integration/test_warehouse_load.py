"""The warehouse loader on real SQLite files and PostgreSQL: exact, monotonic, atomic, safe."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rillet_dagster import catalog
from rillet_dagster.catalog import EntitySpec
from rillet_dagster.sandbox.data import generate
from rillet_dagster.warehouse import (
    RecordSchemaError,
    build_metadata,
    ensure_schema,
    get_watermark,
    make_engine,
    mark_missing_deleted,
    read_records,
    read_table,
    set_watermark,
    soft_delete,
    table_for,
    upsert_records,
    write_transaction,
)
from rillet_dagster.warehouse import load as warehouse_load
from rillet_dagster.warehouse.schema import column_name
from rillet_dagster.warehouse.types import ExactDecimal, dumps
from tests.pg import require_postgres

POSTGRES_URL = os.environ.get(
    "RILLET_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
NOW = datetime(2026, 11, 28, 12, tzinfo=UTC)
INVOICE = catalog.entity("invoice")
BANK_TRANSACTION = catalog.entity("bank_transaction")
CONTRACT = catalog.entity("contract")
# Rillet amounts as S9 lists them: 0-10 decimals, up to 20 integer digits, negatives, -0.
AMOUNTS = [
    "0",
    "-0",
    "-0.00",
    "0.00",
    "1",
    "0.1",
    "1500.00",
    "-1500.00",
    "0.0000000001",
    "-0.0000000001",
    "99999999999999999999",
    "-99999999999999999999",
    "99999999999999999999.9999999999",
    "-12345678901234567890.0123456789",
    "10000000000000000000.1000000000",
    "7.2500",
    "33.333",
]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[sa.Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'warehouse.db'}")
    ensure_schema(engine)
    yield engine
    engine.dispose()


@contextmanager
def _postgres_schema() -> Iterator[sa.Engine]:
    """An engine whose tables live in a new schema of their own, dropped afterwards."""
    require_postgres()
    schema = f"wh_test_{uuid.uuid4().hex[:16]}"
    admin = sa.create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    engine = make_engine(POSTGRES_URL, connect_args={"options": f"-csearch_path={schema}"})
    try:
        ensure_schema(engine)
        yield engine
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(scope="module")
def _module_postgres() -> Iterator[sa.Engine]:
    with _postgres_schema() as engine:
        yield engine


@pytest.fixture
def postgres_engine(_module_postgres: sa.Engine) -> sa.Engine:
    """Empty warehouse tables in a schema made once per module: emptying them takes a tenth of
    the time of creating the catalog's tables for every test. Tests that change the schema
    itself take ``fresh_postgres_engine``."""
    with _module_postgres.begin() as conn:
        names = sa.inspect(conn).get_table_names()
        conn.execute(sa.text("TRUNCATE " + ", ".join(f'"{name}"' for name in names)))
    return _module_postgres


@pytest.fixture
def fresh_postgres_engine() -> Iterator[sa.Engine]:
    with _postgres_schema() as engine:
        yield engine


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest) -> sa.Engine:
    name = "sqlite_engine" if request.param == "sqlite" else "postgres_engine"
    return request.getfixturevalue(name)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fresh_engine(request: pytest.FixtureRequest) -> sa.Engine:
    """An engine whose schema a test may change: never shared with another test."""
    name = "sqlite_engine" if request.param == "sqlite" else "fresh_postgres_engine"
    return request.getfixturevalue(name)


@pytest.fixture(scope="module")
def world() -> Any:
    return generate(seed=7, size="tiny", now=NOW)


# ----------------------------------------------------------------------------- helpers


def at(minutes: int) -> datetime:
    return NOW + timedelta(minutes=minutes)


def stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def money(amount: str, currency: str = "USD") -> dict[str, str]:
    return {"amount": amount, "currency": currency}


def invoice(record_id: str, minutes: int, *, items: int = 2, total: str = "100.00") -> dict:
    return {
        "id": record_id,
        "invoice_number": f"INV-{record_id}",
        "customer_id": "cust-1",
        "invoice_date": "2026-11-01",
        "status": "OPEN",
        "overdue": False,
        "total": money(total),
        "items": [
            {
                "id": f"{record_id}-line-{n}",
                "description": f"line {n}",
                "quantity": n + 1,
                "total_amount": money(f"{n}.50"),
            }
            for n in range(items)
        ],
        "updated_at": stamp(at(minutes)),
    }


def transaction(record_id: str, amount: str) -> dict:
    return {"id": record_id, "net_amount": money(amount), "fee": money("0.00")}


def load(engine: sa.Engine, spec: EntitySpec, records: list[dict], **kwargs: Any) -> Any:
    kwargs.setdefault("run_id", "run-1")
    kwargs.setdefault("synced_at", NOW)
    return upsert_records(engine, spec, records, **kwargs)


def rows(engine: sa.Engine, name: str) -> list[dict[str, Any]]:
    table = table_for(name)
    key = table.c.parent_id if "parent_id" in table.c else table.c.id
    extra = [table.c.line_index] if "line_index" in table.c else []
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(table).order_by(key, *extra))]


def count(engine: sa.Engine, name: str) -> int:
    with engine.connect() as conn:
        return conn.scalar(sa.select(sa.func.count()).select_from(table_for(name)))


def table_names(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def sandbox_records(world: Any, spec: EntitySpec) -> list[dict]:
    if spec.single:
        return [world.store.singletons[spec.name]]
    return list(world.store[spec.name].all_records())


def by_key(record: dict) -> str:
    return record["id"]


def path_value(record: dict, path: str) -> Any:
    value: Any = record
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


# ----------------------------------------------------------------------------- round trips


def test_every_catalog_entity_round_trips_from_the_sandbox(engine: sa.Engine, world: Any) -> None:
    loaded = 0
    for spec in catalog.ENTITIES:
        if spec.name == "reporting_journal_entry":
            continue  # the sandbox serves none
        records = sandbox_records(world, spec)
        assert records, spec.name
        result = load(engine, spec, records)
        assert result.inserted == len(records), spec.name
        by_id = {r["id"]: r for r in records}
        assert sorted(read_records(engine, spec.name), key=by_key) == sorted(records, key=by_key)
        frame = read_table(engine, spec)
        assert len(frame) == len(records)
        for row in frame.to_dict("records"):
            record = by_id[row["id"]]
            assert row["_record"] == record
            for path in spec.money_fields:
                value = path_value(record, path)
                stored = row[column_name(path)]
                if value is None:
                    assert stored is None
                    continue
                assert isinstance(stored, Decimal), (spec.name, path, type(stored))
                assert format(stored, "f") == value["amount"]
                assert row[column_name(path) + "_currency"] == value["currency"]
        child_rows = 0
        for child in spec.children:
            lines = read_table(engine, child.name).to_dict("records")
            expected = [
                (r["id"], index, line)
                for r in records
                for index, line in enumerate(r.get(child.field) or [])
            ]
            assert len(lines) == len(expected), child.name
            child_rows += len(lines)
            stored_lines = {(line["parent_id"], line["line_index"]): line for line in lines}
            for parent_id, index, line in expected:
                row = stored_lines[(parent_id, index)]
                assert row["_record"] == line
                assert row["line_key"] == (str(index) if child.key is None else line[child.key])
                for path in child.money_fields:
                    value = path_value(line, path)
                    stored = row[column_name(path)]
                    if value is None:
                        assert stored is None
                    else:
                        assert isinstance(stored, Decimal)
                        assert format(stored, "f") == value["amount"]
        assert result.child_rows == child_rows, spec.name
        loaded += 1
    assert loaded == len(catalog.ENTITIES) - 1


def test_journal_entry_lines_balance_exactly_in_the_warehouse(
    engine: sa.Engine, world: Any
) -> None:
    spec = catalog.entity("journal_entry")
    load(engine, spec, sandbox_records(world, spec))
    totals: dict[str, Decimal] = {}
    for line in read_table(engine, "journal_entry_item").to_dict("records"):
        sign = 1 if line["side"] == "DEBIT" else -1
        totals[line["parent_id"]] = (
            totals.get(line["parent_id"], Decimal(0)) + sign * line["amount"]
        )
    assert totals
    assert set(totals.values()) == {Decimal(0)}


def test_stored_json_is_exactly_the_serialized_record(sqlite_engine: sa.Engine, world: Any) -> None:
    records = sandbox_records(world, INVOICE)[:20]
    load(sqlite_engine, INVOICE, records)
    with sqlite_engine.connect() as conn:
        stored = dict(conn.exec_driver_sql("SELECT id, _record FROM invoices").all())
        lines = conn.exec_driver_sql(
            "SELECT parent_id, line_index, _record FROM invoice_items"
        ).all()
    for record in records:
        assert stored[record["id"]] == dumps(record)
    by_id = {r["id"]: r for r in records}
    for parent_id, index, text in lines:
        assert text == dumps(by_id[parent_id]["items"][index])


def test_two_full_refreshes_leave_identical_tables(engine: sa.Engine, world: Any) -> None:
    spec = catalog.entity("bill")
    records = sandbox_records(world, spec)
    load(engine, spec, records, run_id="first")
    first = (rows(engine, "bill"), rows(engine, "bill_item"))
    again = load(engine, spec, records, run_id="second", synced_at=at(60))
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, len(records))
    assert (rows(engine, "bill"), rows(engine, "bill_item")) == first


# ----------------------------------------------------------------------------- money (S9, S10)


@pytest.mark.parametrize("amount", AMOUNTS)
def test_money_round_trips_exactly(engine: sa.Engine, amount: str) -> None:
    load(engine, BANK_TRANSACTION, [transaction("t-1", amount)])
    [row] = read_table(engine, BANK_TRANSACTION).to_dict("records")
    stored = row["net_amount"]
    assert isinstance(stored, Decimal)
    assert stored == Decimal(amount)
    # Every digit, trailing zeros included. PostgreSQL's NUMERIC has no negative zero: "-0.00"
    # comes back as "0.00", the same number with the same scale.
    expected = amount.lstrip("-") if engine.dialect.name == "postgresql" and stored == 0 else amount
    assert format(stored, "f") == expected
    assert stored.as_tuple().exponent == Decimal(amount).as_tuple().exponent
    assert row["_record"]["net_amount"]["amount"] == amount


_amounts = st.builds(
    lambda sign, whole, fraction: f"{sign}{whole}{'.' + fraction if fraction else ''}",
    st.sampled_from(["", "-"]),
    st.integers(min_value=0, max_value=10**20 - 1).map(str),
    st.text("0123456789", max_size=10),
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(amounts=st.lists(_amounts, min_size=1, max_size=20))
def test_money_round_trips_exactly_on_sqlite_for_any_amount(
    sqlite_engine: sa.Engine, amounts: list[str]
) -> None:
    ids = [f"h-{uuid.uuid4().hex}" for _ in amounts]
    load(
        sqlite_engine,
        BANK_TRANSACTION,
        [transaction(i, a) for i, a in zip(ids, amounts, strict=True)],
    )
    table = table_for("bank_transaction")
    with sqlite_engine.connect() as conn:
        query = sa.select(table.c.id, table.c.net_amount).where(table.c.id.in_(ids))
        stored = {record_id: amount for record_id, amount in conn.execute(query)}
    for record_id, amount in zip(ids, amounts, strict=True):
        assert isinstance(stored[record_id], Decimal)
        assert format(stored[record_id], "f") == amount  # sign of zero and trailing zeros too


def test_plain_numeric_on_sqlite_loses_digits(tmp_path: Path) -> None:
    """Known-bad baseline: SQLAlchemy's Numeric on SQLite goes through a float."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'numeric.db'}")
    table = sa.Table(
        "amounts",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("amount", sa.Numeric),
    )
    table.metadata.create_all(engine)
    amounts = [Decimal(a) for a in AMOUNTS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sa.exc.SAWarning)  # "does *not* support Decimal"
        with engine.begin() as conn:
            conn.execute(table.insert(), [{"id": i, "amount": a} for i, a in enumerate(amounts)])
        with engine.connect() as conn:
            back = dict(conn.execute(sa.select(table.c.id, table.c.amount)).all())
    lost = [a for i, a in enumerate(amounts) if back[i] != a or str(back[i]) != str(a)]
    assert Decimal("99999999999999999999.9999999999") in lost
    assert Decimal("-12345678901234567890.0123456789") in lost
    assert Decimal("1500.00") in lost  # the scale: "1500.00" comes back as 1500.0000000000
    engine.dispose()


@pytest.mark.parametrize("amount", [0.1, 100.0, True])
def test_float_amount_is_refused_and_nothing_is_written(engine: sa.Engine, amount: Any) -> None:
    records = [transaction("ok", "1.00"), {"id": "bad", "net_amount": money(amount)}]  # type: ignore[arg-type]
    with pytest.raises(RecordSchemaError) as caught:
        load(engine, BANK_TRANSACTION, records)
    assert caught.value.entity == "bank_transaction"
    assert caught.value.record_id == "bad"
    assert caught.value.field == "net_amount.amount"
    assert count(engine, "bank_transaction") == 0


def test_float_in_a_line_amount_or_quantity_is_refused(engine: sa.Engine) -> None:
    record = invoice("inv-1", 0)
    record["items"][1]["total_amount"]["amount"] = 2.5
    with pytest.raises(RecordSchemaError, match=r"items\[1\]\.total_amount\.amount"):
        load(engine, INVOICE, [record])
    record = invoice("inv-1", 0)
    record["items"][0]["quantity"] = 1.5
    with pytest.raises(RecordSchemaError, match=r"items\[0\]\.quantity"):
        load(engine, INVOICE, [record])
    assert count(engine, "invoice") == count(engine, "invoice_item") == 0


def test_json_numbers_parsed_as_decimal_stay_exact(engine: sa.Engine) -> None:
    body = (
        '{"id": "t-num", "net_amount": {"amount": 12345678901234567890.0123456789, '
        '"currency": "USD"}, "fee": {"amount": 0.10, "currency": "USD"}, "rate": 1.1}'
    )
    record = json.loads(body, parse_float=Decimal)
    load(engine, BANK_TRANSACTION, [record])
    [row] = read_table(engine, BANK_TRANSACTION).to_dict("records")
    assert row["net_amount"] == Decimal("12345678901234567890.0123456789")
    assert str(row["fee"]) == "0.10"
    assert row["_record"] == record
    assert isinstance(row["_record"]["rate"], Decimal)
    assert read_records(engine, "bank_transaction") == [record]


def test_no_money_column_ever_holds_a_float(engine: sa.Engine, world: Any) -> None:
    for spec in (INVOICE, BANK_TRANSACTION, CONTRACT):
        load(engine, spec, sandbox_records(world, spec))
        for name in (spec.name, *(c.name for c in spec.children)):
            frame = read_table(engine, name)
            table = table_for(name)
            for column in table.columns:
                if column.name.endswith("_currency") or not _is_exact(column):
                    continue
                values = frame[column.name].dropna().tolist()
                assert frame[column.name].dtype == object
                assert all(isinstance(v, Decimal) for v in values), (name, column.name)


def _is_exact(column: sa.Column) -> bool:
    return isinstance(column.type, ExactDecimal)


def test_pandas_read_sql_would_turn_money_into_floats(engine: sa.Engine) -> None:
    amount = "12345678901234567890.0123456789"
    load(engine, BANK_TRANSACTION, [transaction("t-1", amount), transaction("t-2", "0.10")])
    table = table_for("bank_transaction")
    with engine.connect() as conn:
        default = pd.read_sql(sa.select(table.c.id, table.c.net_amount), conn)
    assert default["net_amount"].dtype == "float64"  # pandas' default coerce_float=True
    assert Decimal(default["net_amount"][0]) != Decimal(amount)
    ours = read_table(engine, BANK_TRANSACTION)
    assert ours["net_amount"].dtype == object
    assert ours["net_amount"].tolist() == [Decimal(amount), Decimal("0.10")]
    assert str(ours["net_amount"][1]) == "0.10"


# ----------------------------------------------------------------------------- monotonic upserts


def test_older_never_overwrites_newer_and_equal_replaces(engine: sa.Engine) -> None:
    first = load(engine, INVOICE, [invoice("a", 10, total="1.00"), invoice("b", 10)])
    assert (first.inserted, first.updated, first.child_rows) == (2, 0, 4)

    newer = load(engine, INVOICE, [invoice("a", 20, total="2.00")], run_id="run-2")
    assert (newer.inserted, newer.updated, newer.skipped_older) == (0, 1, 0)

    older = load(engine, INVOICE, [invoice("a", 15, total="1.50")], run_id="run-3")
    assert (older.updated, older.skipped_older, older.child_rows) == (0, 1, 0)
    [row] = [r for r in rows(engine, "invoice") if r["id"] == "a"]
    assert row["total"] == Decimal("2.00")
    assert row["_run_id"] == "run-2"
    assert row["updated_at"] == at(20)

    equal = load(engine, INVOICE, [invoice("a", 20, total="3.00")], run_id="run-4")
    assert (equal.updated, equal.unchanged, equal.skipped_older) == (1, 0, 0)
    [row] = [r for r in rows(engine, "invoice") if r["id"] == "a"]
    assert row["total"] == Decimal("3.00")


def test_an_authoritative_load_replaces_a_row_pinned_by_a_future_updated_at(
    engine: sa.Engine,
) -> None:
    """Rillet's list is the truth: a webhook body stamped 2099 must not pin the row."""
    pinned = invoice("a", 0, total="666.00", items=3)
    pinned["updated_at"] = "2099-01-01T00:00:00.000Z"
    load(engine, INVOICE, [pinned, invoice("b", 0)], run_id="webhook")
    rillet = invoice("a", 10, total="1.00")

    # The monotonic (webhook) path still refuses a version older than the stored one...
    assert load(engine, INVOICE, [rillet], run_id="late-webhook").skipped_older == 1
    assert read_records(engine, INVOICE)[0] == pinned

    # ...but a pass over Rillet's list replaces it, lines included.
    result = load(engine, INVOICE, [rillet, invoice("b", 0)], run_id="sync", authoritative=True)
    assert (result.updated, result.unchanged, result.skipped_older) == (1, 1, 0)
    assert read_records(engine, INVOICE) == [rillet, invoice("b", 0)]
    [row] = [r for r in rows(engine, "invoice") if r["id"] == "a"]
    assert (row["total"], row["updated_at"], row["_run_id"]) == (Decimal("1.00"), at(10), "sync")
    assert [r["line_key"] for r in rows(engine, "invoice_item") if r["parent_id"] == "a"] == [
        "a-line-0",
        "a-line-1",
    ]
    # Rillet's version is now stored: the same pass again changes nothing.
    assert load(engine, INVOICE, [rillet], authoritative=True).unchanged == 1


def test_an_authoritative_load_revives_a_tombstone_older_than_the_read_only(
    engine: sa.Engine,
) -> None:
    """A record Rillet lists is live there, unless it was deleted after the list was read."""
    load(engine, INVOICE, [invoice("old", 0), invoice("new", 0)])
    soft_delete(engine, INVOICE, ["old"], at(30))
    soft_delete(engine, INVOICE, ["new"], at(90))
    listed = [invoice("old", 20, total="2.00"), invoice("new", 20, total="2.00")]
    # The monotonic path: both tombstones are newer than the version's updated_at.
    assert load(engine, INVOICE, listed).skipped_older == 2
    # The list was read at minute 60: after the first deletion, before the second.
    result = load(engine, INVOICE, listed, synced_at=at(60), authoritative=True)
    assert (result.updated, result.skipped_older) == (1, 1)
    by_id = {r["id"]: r for r in rows(engine, "invoice")}
    assert by_id["old"]["deleted_at"] is None
    assert by_id["old"]["total"] == Decimal("2.00")
    assert by_id["new"]["deleted_at"] == at(90)
    assert by_id["new"]["total"] == Decimal("100.00")


def test_rerunning_the_same_batch_changes_nothing(engine: sa.Engine, world: Any) -> None:
    records = sandbox_records(world, INVOICE)
    load(engine, INVOICE, records)
    before = (rows(engine, "invoice"), rows(engine, "invoice_item"))
    again = load(engine, INVOICE, records, run_id="rerun", synced_at=at(5))
    assert again.unchanged == len(records)
    assert (again.inserted, again.updated, again.skipped_older, again.child_rows) == (0, 0, 0, 0)
    assert (rows(engine, "invoice"), rows(engine, "invoice_item")) == before


def test_records_without_updated_at_always_replace(engine: sa.Engine) -> None:
    contract = {"id": "c-1", "name": "v1", "total_value": money("10.00"), "items": []}
    load(engine, CONTRACT, [contract])
    assert load(engine, CONTRACT, [contract]).unchanged == 1
    changed = load(engine, CONTRACT, [{**contract, "name": "v2"}], synced_at=at(-60))
    assert changed.updated == 1
    assert rows(engine, "contract")[0]["name"] == "v2"


def test_duplicate_ids_in_one_input_keep_the_newest(engine: sa.Engine) -> None:
    records = [invoice("a", 30, total="3.00"), invoice("a", 10, total="1.00"), invoice("b", 5)]
    result = load(engine, INVOICE, records)
    assert (result.inserted, result.duplicates) == (2, 1)
    assert [r["total"] for r in rows(engine, "invoice")] == [Decimal("3.00"), Decimal("100.00")]
    # The same id in two batches (two pages): the newest still wins.
    result = load(engine, INVOICE, [invoice("c", 30), invoice("c", 10)], batch_size=1)
    assert (result.inserted, result.skipped_older) == (1, 1)
    assert [r["updated_at"] for r in rows(engine, "invoice") if r["id"] == "c"] == [at(30)]


def test_child_rows_are_replaced_per_parent(engine: sa.Engine) -> None:
    load(engine, INVOICE, [invoice("a", 0, items=3), invoice("b", 0, items=2)])
    changed = invoice("a", 10, items=2)
    changed["items"][0]["total_amount"] = money("9.99")
    result = load(engine, INVOICE, [changed])
    assert (result.updated, result.child_rows) == (1, 2)
    lines = rows(engine, "invoice_item")
    assert [(r["parent_id"], r["line_key"]) for r in lines] == [
        ("a", "a-line-0"),
        ("a", "a-line-1"),
        ("b", "b-line-0"),
        ("b", "b-line-1"),
    ]
    assert lines[0]["total_amount"] == Decimal("9.99")
    # An older version of "a" does not bring its third line back.
    assert load(engine, INVOICE, [invoice("a", 5, items=3)]).skipped_older == 1
    assert count(engine, "invoice_item") == 4


def test_lines_without_ids_are_keyed_by_index(engine: sa.Engine) -> None:
    customer = catalog.entity("customer")
    record = {
        "id": "cu-1",
        "name": "Acme",
        "payment_terms": 30,
        "emails": [{"email": "a@x.example", "type": "MAIN"}, {"email": "b@x.example"}],
        "updated_at": stamp(at(0)),
    }
    assert load(engine, customer, [record]).child_rows == 2
    emails = rows(engine, "customer_email")
    assert [(e["line_key"], e["line_index"], e["email"]) for e in emails] == [
        ("0", 0, "a@x.example"),
        ("1", 1, "b@x.example"),
    ]


# ----------------------------------------------------------------------------- deletes


def test_tombstone_wins_over_an_older_update_and_a_newer_one_resurrects(
    engine: sa.Engine,
) -> None:
    load(engine, INVOICE, [invoice("a", 0), invoice("b", 0)])
    assert soft_delete(engine, INVOICE, ["a"], at(30)) == 1
    before = rows(engine, "invoice")

    late = load(engine, INVOICE, [invoice("a", 20, total="5.00")])
    assert (late.updated, late.skipped_older) == (0, 1)
    assert rows(engine, "invoice") == before
    assert [r["id"] for r in read_records(engine, "invoice")] == ["b"]
    assert len(read_records(engine, "invoice", include_deleted=True)) == 2

    same_time = load(engine, INVOICE, [invoice("a", 30)])
    assert same_time.skipped_older == 1

    newer = load(engine, INVOICE, [invoice("a", 40, total="6.00")])
    assert newer.updated == 1
    [row] = [r for r in rows(engine, "invoice") if r["id"] == "a"]
    assert row["deleted_at"] is None
    assert row["total"] == Decimal("6.00")


def test_soft_delete_changes_nothing_but_deleted_at(engine: sa.Engine) -> None:
    load(engine, INVOICE, [invoice("a", 0)])
    [before] = rows(engine, "invoice")
    lines = rows(engine, "invoice_item")
    soft_delete(engine, INVOICE, ["a"], at(30))
    [after] = rows(engine, "invoice")
    assert after.pop("deleted_at") == at(30)
    before.pop("deleted_at")
    assert after == before
    assert rows(engine, "invoice_item") == lines
    assert soft_delete(engine, INVOICE, ["a"], at(20)) == 0  # the later tombstone stays
    assert rows(engine, "invoice")[0]["deleted_at"] == at(30)


def test_delete_arriving_before_the_record_still_wins(engine: sa.Engine) -> None:
    assert soft_delete(engine, INVOICE, ["ghost"], at(30)) == 1
    assert read_records(engine, "invoice") == []
    late = load(engine, INVOICE, [invoice("ghost", 10)])
    assert late.skipped_older == 1
    assert read_records(engine, "invoice") == []
    assert load(engine, INVOICE, [invoice("ghost", 31)]).updated == 1
    assert [r["id"] for r in read_records(engine, "invoice")] == ["ghost"]


def test_mark_missing_deleted_marks_exactly_the_unseen(engine: sa.Engine) -> None:
    ids = [f"t-{n}" for n in range(10)]
    load(engine, BANK_TRANSACTION, [transaction(i, "1.00") for i in ids])
    seen = set(ids) - {"t-2", "t-5", "t-7"}
    assert mark_missing_deleted(engine, BANK_TRANSACTION, seen, at(10)) == 3
    deleted = {r["id"] for r in rows(engine, "bank_transaction") if r["deleted_at"] is not None}
    assert deleted == {"t-2", "t-5", "t-7"}
    assert mark_missing_deleted(engine, BANK_TRANSACTION, seen, at(20)) == 0
    # A record written by another run after the pass started is not the pass's to delete.
    load(engine, BANK_TRANSACTION, [transaction("t-new", "1.00")], synced_at=at(30))
    assert mark_missing_deleted(engine, BANK_TRANSACTION, seen, at(25)) == 0
    assert mark_missing_deleted(engine, BANK_TRANSACTION, set(), at(40)) == 8


def test_mark_missing_deleted_with_more_ids_than_one_statement_holds(engine: sa.Engine) -> None:
    ids = [f"t-{n:05d}" for n in range(12_000)]
    load(engine, BANK_TRANSACTION, [transaction(i, "1.00") for i in ids])
    seen = set(ids[1:-1])
    assert mark_missing_deleted(engine, BANK_TRANSACTION, seen, at(10)) == 2
    assert soft_delete(engine, BANK_TRANSACTION, ids, at(20)) == len(ids) - 2


# ----------------------------------------------------------------------------- schema drift (S14)


def test_unknown_fields_are_kept_in_the_record(engine: sa.Engine) -> None:
    record = invoice("a", 0)
    record["brand_new_field"] = {"nested": [1, "two", None], "amount": "1.23"}
    record["items"][0]["line_extra"] = True
    load(engine, INVOICE, [record])
    assert read_records(engine, "invoice") == [record]
    assert rows(engine, "invoice_item")[0]["_record"]["line_extra"] is True


@pytest.mark.parametrize("field", ["invoice_number", "customer_id", "items", "updated_at"])
def test_missing_required_field_names_entity_id_and_field(engine: sa.Engine, field: str) -> None:
    records = [invoice("good", 0), invoice("bad", 0)]
    del records[1][field]
    with pytest.raises(RecordSchemaError) as caught:
        load(engine, INVOICE, records)
    error = caught.value
    assert (error.entity, error.record_id, error.field) == ("invoice", "bad", field)
    assert "invoice" in str(error)
    assert "'bad'" in str(error)
    assert field in str(error)
    assert count(engine, "invoice") == 0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda r: r.update(invoice_date="01/11/2026"), "invoice_date"),
        (lambda r: r.update(overdue="yes"), "overdue"),
        (lambda r: r.update(total={"amount": "1.00", "currency": "usd"}), "total.currency"),
        (lambda r: r.update(total="1.00"), "total"),
        (lambda r: r.update(updated_at="yesterday"), "updated_at"),
        (lambda r: r["items"][1].pop("id"), "items[1].id"),
        (lambda r: r["items"].append(dict(r["items"][0])), "items[2].id"),
        (lambda r: r.update(items={"not": "a list"}), "items"),
        (lambda r: r.update(id=7), "id"),
        (lambda r: r.update(total={"amount": 1.5, "currency": "USD"}), "total.amount"),
        (lambda r: r.update(total={"amount": "1,00", "currency": "USD"}), "total.amount"),
        (lambda r: r.update(total={"currency": "USD"}), "total"),
        (lambda r: r.update(invoice_number=["x"]), "invoice_number"),
        (lambda r: r["items"][0].update(quantity=0.5), "items[0].quantity"),
        (lambda r: r["items"][1].update(total_amount=money("x")), "items[1].total_amount.amount"),
        (
            lambda r: r["items"][1].update(total_amount=money("1", "EURO")),
            "items[1].total_amount.currency",
        ),
    ],
)
def test_values_of_the_wrong_shape_are_typed_errors(
    engine: sa.Engine, change: Any, field: str
) -> None:
    record = invoice("a", 0)
    change(record)
    with pytest.raises(RecordSchemaError) as caught:
        load(engine, INVOICE, [record])
    assert caught.value.field == field
    assert count(engine, "invoice") == 0


def test_values_are_stored_in_canonical_form_and_the_record_as_received(
    engine: sa.Engine,
) -> None:
    record = invoice("a", 0)
    record.update(
        total={"amount": "0100.50", "currency": "USD"},
        overdue=True,
        sent_at="2026-11-01T10:00:00.5+02:00",
    )
    record["items"][0].update(quantity="1E+2", total_amount={"amount": 7, "currency": "EUR"})
    record["items"][1]["total_amount"] = money("-0.000")
    load(engine, INVOICE, [record])
    [row] = rows(engine, "invoice")
    assert (row["total"], row["overdue"]) == (Decimal("100.50"), True)
    assert row["sent_at"] == datetime(2026, 11, 1, 8, 0, 0, 500000, tzinfo=UTC)
    lines = rows(engine, "invoice_item")
    assert lines[0]["quantity"] == Decimal("100")
    assert (lines[0]["total_amount"], lines[0]["total_amount_currency"]) == (Decimal(7), "EUR")
    # PostgreSQL NUMERIC has no negative zero; the scale is kept on both backends.
    assert lines[1]["total_amount"].as_tuple().exponent == -3
    [stored] = read_records(engine, INVOICE)
    assert stored["total"]["amount"] == "0100.50"
    assert stored["items"][0]["quantity"] == "1E+2"


# ----------------------------------------------------------------------------- PostgreSQL paths


@pytest.mark.postgres
def test_postgres_first_load_copies_straight_into_the_table_with_lz4(
    postgres_engine: sa.Engine,
) -> None:
    records = [invoice(f"i-{n}", 0, items=3) for n in range(50)]
    records[0]["memo"] = "x" * 20_000  # large enough to be compressed out of line
    result = load(postgres_engine, INVOICE, records)
    assert (result.inserted, result.updated, result.child_rows) == (50, 0, 150)
    with postgres_engine.connect() as conn:
        available = conn.scalar(
            sa.text(
                "SELECT 'lz4' = ANY(enumvals) FROM pg_settings "
                "WHERE name = 'default_toast_compression'"
            )
        )
        method = conn.scalar(
            sa.text("SELECT pg_column_compression(_record) FROM invoices WHERE id = 'i-0'")
        )
        session_default = conn.scalar(sa.text("SHOW default_toast_compression"))
    assert method == ("lz4" if available else "pglz")
    assert session_default == "pglz"  # SET LOCAL: the load leaves the session alone
    assert read_records(postgres_engine, INVOICE)[0]["memo"] == "x" * 20_000


@pytest.mark.postgres
def test_postgres_copy_that_meets_a_concurrent_insert_falls_back_to_the_upsert(
    postgres_engine: sa.Engine,
) -> None:
    # As if another writer inserted "a" between the stored-row lookup and the COPY.
    load(postgres_engine, INVOICE, [invoice("a", 10, total="1.00")], run_id="other")
    plan = warehouse_load._plan(INVOICE)
    with postgres_engine.begin() as conn:
        extractor = warehouse_load._Extractor(plan, postgres=True, run_id="me", synced_at=NOW)
        entries = [
            extractor.entry(invoice("a", 20, total="2.00")),
            extractor.entry(invoice("b", 0)),
        ]
        writer = warehouse_load._PostgresWriter(conn, plan, authoritative=False)
        inserted, updated = writer.upsert(entries, stored={})
    assert (sorted(inserted), updated) == (["b"], ["a"])
    assert [(r["id"], r["total"], r["_run_id"]) for r in rows(postgres_engine, "invoice")] == [
        ("a", Decimal("2.00"), "me"),
        ("b", Decimal("100.00"), "me"),
    ]


# ----------------------------------------------------------------------------- atomicity (S2)


def test_a_failure_in_a_later_batch_leaves_nothing_written(engine: sa.Engine) -> None:
    load(engine, INVOICE, [invoice("existing", 0)])
    before = (rows(engine, "invoice"), rows(engine, "invoice_item"))
    records = [invoice(f"n-{n}", 10) for n in range(25)] + [invoice("existing", 20, total="9")]
    del records[15]["invoice_number"]  # the second batch of 10 is invalid
    with pytest.raises(RecordSchemaError, match="n-15"):
        load(engine, INVOICE, records, batch_size=10)
    assert (rows(engine, "invoice"), rows(engine, "invoice_item")) == before


def _load_with_watermark_then_crash(engine: sa.Engine) -> None:
    with write_transaction(engine) as conn:
        load(conn, INVOICE, [invoice("a", 10)])
        set_watermark(conn, INVOICE, at(10), "run-1")
        raise RuntimeError("crash between the load and the commit")


def test_rows_and_watermark_commit_together_or_not_at_all(engine: sa.Engine) -> None:
    with pytest.raises(RuntimeError, match="crash"):
        _load_with_watermark_then_crash(engine)
    assert count(engine, "invoice") == 0
    assert get_watermark(engine, "invoice") is None

    with write_transaction(engine) as conn:
        load(conn, INVOICE, [invoice("a", 10)])
        set_watermark(conn, INVOICE, at(10), "run-1")
    assert count(engine, "invoice") == 1
    assert get_watermark(engine, INVOICE) == at(10)


def test_a_failed_load_inside_a_caller_transaction_is_undone_alone(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        load(conn, INVOICE, [invoice("a", 10)])
        bad = invoice("b", 10)
        del bad["customer_id"]
        with pytest.raises(RecordSchemaError):
            load(conn, INVOICE, [invoice("c", 10), bad])
    assert [r["id"] for r in rows(engine, "invoice")] == ["a"]


def test_watermark_never_moves_backwards(engine: sa.Engine) -> None:
    assert get_watermark(engine, "invoice") is None
    assert set_watermark(engine, "invoice", at(10), "run-1") == at(10)
    assert set_watermark(engine, "invoice", at(5), "run-2") == at(10)
    assert get_watermark(engine, "invoice") == at(10)
    assert set_watermark(engine, "invoice", at(11), "run-3") == at(11)
    with engine.connect() as conn:
        assert get_watermark(conn, "invoice") == at(11)
    assert get_watermark(engine, "customer") is None


# ----------------------------------------------------------------------------- hostile input (X3)


HOSTILE = [
    "'; DROP TABLE invoices; --",
    "Robert'); DROP TABLE invoice_items;--",
    "\"quoted\" 'single' `back` \\backslash\\ \\u0000 literally",
    "unicode: 日本語 Ünïcödé 🎉 \u202e rtl \ufeff bom",
    "x" * 1_000_000,
]


def test_hostile_strings_are_stored_literally(engine: sa.Engine) -> None:
    tables_before = table_names(engine)
    records = []
    for n, text in enumerate(HOSTILE):
        record = invoice(f"h-{n}", 0)
        record["invoice_number"] = text
        record["items"][0]["description"] = text
        record[text[:100]] = text  # as an unknown field name too
        records.append(record)
    load(engine, INVOICE, records)
    assert table_names(engine) == tables_before
    stored = {r["id"]: r for r in rows(engine, "invoice")}
    for n, text in enumerate(HOSTILE):
        assert stored[f"h-{n}"]["invoice_number"] == text
        assert stored[f"h-{n}"]["_record"] == records[n]
    lines = [r for r in rows(engine, "invoice_item") if r["line_index"] == 0]
    assert [r["description"] for r in lines] == HOSTILE
    assert count(engine, "invoice") == len(HOSTILE)


def test_nul_characters(engine: sa.Engine) -> None:
    record = invoice("nul", 0)
    record["items"][1]["description"] = "before\x00after"
    if engine.dialect.name == "sqlite":
        load(engine, INVOICE, [record])
        assert rows(engine, "invoice_item")[1]["description"] == "before\x00after"
        assert read_records(engine, "invoice") == [record]
    else:
        # PostgreSQL text and jsonb cannot hold U+0000: a typed error says where it is.
        with pytest.raises(RecordSchemaError, match="NUL") as caught:
            load(engine, INVOICE, [record])
        assert caught.value.field == "items[1].description"
        assert count(engine, "invoice") == 0


def test_identifiers_from_outside_the_catalog_are_rejected(engine: sa.Engine) -> None:
    tables_before = table_names(engine)
    hostile = "invoice; DROP TABLE invoices; --"
    for call in (
        lambda: table_for(hostile),
        lambda: get_watermark(engine, hostile),
        lambda: set_watermark(engine, hostile, NOW, "run"),
        lambda: read_table(engine, hostile),
        lambda: read_records(engine, hostile),
    ):
        with pytest.raises(KeyError, match="catalog knows"):
            call()
    assert table_names(engine) == tables_before


# ----------------------------------------------------------------------------- ensure_schema


def test_ensure_schema_adds_a_new_catalog_field_and_is_idempotent(
    fresh_engine: sa.Engine,
) -> None:
    engine = fresh_engine
    load(engine, INVOICE, [invoice("a", 0)])
    assert ensure_schema(engine) == []
    grown = dataclasses.replace(
        INVOICE,
        key_fields=(*INVOICE.key_fields, "memo", "terms.net_days"),
        money_fields=(*INVOICE.money_fields, "shipping"),
    )
    changes = ensure_schema(engine, build_metadata([grown]))
    assert changes == [
        "added column invoices.memo",
        "added column invoices.terms_net_days",
        "added column invoices.shipping",
        "added column invoices.shipping_currency",
    ]
    assert ensure_schema(engine, build_metadata([grown])) == []
    record = invoice("b", 0)
    record.update(memo="hello", terms={"net_days": 30}, shipping=money("4.10"))
    load(engine, grown, [record])
    frame = read_table(engine, grown).set_index("id")
    assert frame.loc["b", "memo"] == "hello"
    assert frame.loc["b", "terms_net_days"] == 30
    assert frame.loc["b", "shipping"] == Decimal("4.10")
    assert pd.isna(frame.loc["a", "memo"])  # older rows kept, new column empty
    assert read_records(engine, "invoice")[0] == invoice("a", 0)


def test_ensure_schema_from_two_processes_at_once(tmp_path: Path) -> None:
    _race_ensure_schema(f"sqlite:///{tmp_path / 'race.db'}", "", tmp_path)


@pytest.mark.postgres
def test_ensure_schema_from_two_processes_at_once_on_postgres(tmp_path: Path) -> None:
    require_postgres()
    schema = f"wh_race_{uuid.uuid4().hex[:16]}"  # empty: the processes create every table
    admin = sa.create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        _race_ensure_schema(POSTGRES_URL, schema, tmp_path)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


# One of the two processes: connected and imported before the start line (the race is in the
# DDL, not in Python's start-up), it waits for the "go" file, then prints what it changed and
# when it ran.
_ENSURE_SCHEMA_PROCESS = """
import json, sys, time
from pathlib import Path
from rillet_dagster.warehouse.schema import ensure_schema, make_engine
url, search_path, folder, name = sys.argv[1:]
options = {"connect_args": {"options": f"-csearch_path={search_path}"}} if search_path else {}
engine = make_engine(url, **options)
with engine.connect():
    pass
Path(folder, name).touch()
go, deadline = Path(folder, "go"), time.monotonic() + 60
while not go.exists():
    if time.monotonic() > deadline:
        sys.exit("no go file within 60 s")
    time.sleep(0.0005)
started = time.time()
changes = ensure_schema(engine)
print(json.dumps({"changes": changes, "started": started, "ended": time.time()}))
"""


def _race_ensure_schema(url: str, search_path: str, folder: Path) -> None:
    """Two real processes (as two runs starting at once are) create one empty warehouse's schema:
    both succeed, and every table and index is created once, by one of them."""
    names = ("first", "second")
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _ENSURE_SCHEMA_PROCESS, url, search_path, str(folder), name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    try:
        deadline = time.monotonic() + 60
        while not all((folder / name).exists() for name in names):
            assert all(p.poll() is None for p in processes), "a process ended before the start"
            assert time.monotonic() < deadline, "the processes did not get ready"
            time.sleep(0.005)
        (folder / "go").touch()
        outputs = [p.communicate(timeout=120) for p in processes]
    finally:
        for process in processes:
            process.kill()
            process.wait()
    assert [p.returncode for p in processes] == [0, 0], [err[-3000:] for _, err in outputs]
    reports = [json.loads(out) for out, _ in outputs]
    # They ran at the same time: each started before the other had finished.
    assert max(r["started"] for r in reports) < min(r["ended"] for r in reports)
    metadata = build_metadata()
    expected = [f"created table {name}" for name in metadata.tables]
    expected += [f"created index {i.name}" for t in metadata.tables.values() for i in t.indexes]
    made = [change for report in reports for change in report["changes"]]
    assert sorted(made) == sorted(expected)  # complete, and nothing done twice
    options = {"connect_args": {"options": f"-csearch_path={search_path}"}} if search_path else {}
    engine = make_engine(url, **options)
    try:
        assert ensure_schema(engine) == []
    finally:
        engine.dispose()
