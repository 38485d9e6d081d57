"""Values the warehouse cannot store, huge exponents, and pinned rows (issue 13), on SQLite and
PostgreSQL.

One record that does not fit is refused as a :class:`RecordSchemaError` naming entity, id and
field (never a driver error or a crash), so that the webhook apply side can quarantine that one
event; no number costs memory by its magnitude; a table stays readable whatever one row holds;
and a full pass replaces whatever a webhook body left, since Rillet's list is the truth.
"""

from __future__ import annotations

import logging
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa

from rillet_dagster import catalog
from rillet_dagster.assets.sync import Window, sync_entity
from rillet_dagster.rillet.client import RilletClient
from rillet_dagster.sandbox.server import SandboxOptions, SandboxServer, build_sandbox
from rillet_dagster.warehouse import (
    RecordSchemaError,
    ensure_schema,
    make_engine,
    read_records,
    read_table,
    table_for,
    upsert_records,
)
from rillet_dagster.warehouse.types import loads
from tests import canary
from tests.pg import postgres_url

NOW = datetime(2026, 11, 28, 12, tzinfo=UTC)
KEY = canary.api_key("hostile")


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[sa.Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'warehouse.db'}")
    ensure_schema(engine)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def _module_postgres() -> Iterator[sa.Engine]:
    engine = make_engine(postgres_url("hostile_values"))
    ensure_schema(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def postgres_engine(_module_postgres: sa.Engine) -> sa.Engine:
    with _module_postgres.begin() as conn:
        names = sa.inspect(conn).get_table_names()
        conn.execute(sa.text("TRUNCATE " + ", ".join(f'"{name}"' for name in names)))
    return _module_postgres


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest) -> sa.Engine:
    name = "sqlite_engine" if request.param == "sqlite" else "postgres_engine"
    return request.getfixturevalue(name)


def load(engine: sa.Engine, entity: str, records: list[Any], **kwargs: Any) -> Any:
    kwargs.setdefault("run_id", "run-1")
    kwargs.setdefault("synced_at", NOW)
    return upsert_records(engine, catalog.entity(entity), records, **kwargs)


def count(engine: sa.Engine, entity: str) -> int:
    with engine.connect() as conn:
        return conn.scalar(sa.select(sa.func.count()).select_from(table_for(entity)))


def customer(record_id: str = "cu-1", **fields: Any) -> dict[str, Any]:
    return {"id": record_id, "name": "Acme", "updated_at": "2026-11-01T00:00:00Z", **fields}


def transaction(record_id: str = "t-1", amount: Any = "1.00") -> dict[str, Any]:
    return {"id": record_id, "net_amount": {"amount": amount, "currency": "USD"}}


def invoice(record_id: str = "inv-1") -> dict[str, Any]:
    return {
        "id": record_id,
        "invoice_number": "INV-1",
        "customer_id": "cu-1",
        "updated_at": "2026-11-01T00:00:00Z",
        "items": [
            {"id": "l-0", "description": "a", "quantity": 1},
            {"id": "l-1", "description": "b", "quantity": 2},
        ],
    }


# ----------------------------------------------------------------------------- finding 1: values

# (entity, record as JSON text, as Rillet could send it, the field the error must name)
UNSTORABLE = {
    "surrogate in a text column": (
        "customer",
        '{"id": "cu-1", "name": "\\ud800", "updated_at": "2026-11-01T00:00:00Z"}',
        "name",
    ),
    "surrogate in an unmapped field": (
        "customer",
        '{"id": "cu-1", "name": "A", "updated_at": "2026-11-01T00:00:00Z",'
        ' "notes": {"text": ["ok", "a\\udc00b"]}}',
        "notes.text[1]",
    ),
    "surrogate in an unmapped key": (
        "tax_rate",
        '{"id": "tr-1", "extra": {"k\\ud800": 1}}',
        "extra.k\\ud800",
    ),
    "surrogate in a line": (
        "invoice",
        '{"id": "inv-1", "invoice_number": "1", "customer_id": "c", "updated_at":'
        ' "2026-11-01T00:00:00Z", "items": [{"id": "l-0"}, {"id": "l-1", "description":'
        ' "\\ud800"}]}',
        "items[1].description",
    ),
    "integer column 3000000000": (
        "customer",
        '{"id": "cu-1", "name": "A", "updated_at": "2026-11-01T00:00:00Z",'
        ' "payment_terms": 3000000000}',
        "payment_terms",
    ),
    "integer column -2147483649": (
        "customer",
        '{"id": "cu-1", "name": "A", "updated_at": "2026-11-01T00:00:00Z",'
        ' "payment_terms": -2147483649}',
        "payment_terms",
    ),
    "integer column 2**63": (
        "customer",
        '{"id": "cu-1", "name": "A", "updated_at": "2026-11-01T00:00:00Z",'
        ' "payment_terms": 9223372036854775808}',
        "payment_terms",
    ),
    "integer column 1e200000": (
        "customer",
        '{"id": "cu-1", "name": "A", "updated_at": "2026-11-01T00:00:00Z",'
        ' "payment_terms": 1e200000}',
        "payment_terms",
    ),
    "nested integer column 1.0e999999999999": (
        "product",
        '{"id": "p-1", "price": {"interval_months": 1.0e999999999999}}',
        "price.interval_months",
    ),
    "money 1e200000": (
        "bank_transaction",
        '{"id": "t-1", "net_amount": {"amount": 1e200000, "currency": "USD"}}',
        "net_amount.amount",
    ),
    "money 1.0e999999999999": (
        "bank_transaction",
        '{"id": "t-1", "net_amount": {"amount": 1.0e999999999999, "currency": "USD"}}',
        "net_amount.amount",
    ),
    "money 1e-200000": (
        "bank_transaction",
        '{"id": "t-1", "net_amount": {"amount": 1e-200000, "currency": "USD"}}',
        "net_amount.amount",
    ),
    "money: a plain decimal string of 60 digits": (
        "bank_transaction",
        '{"id": "t-1", "net_amount": {"amount": "' + "9" * 60 + '", "currency": "USD"}}',
        "net_amount.amount",
    ),
    "money: 20000 decimals (over PostgreSQL's NUMERIC scale)": (
        "bank_transaction",
        '{"id": "t-1", "net_amount": {"amount": "0.' + "1" * 20_000 + '", "currency": "USD"}}',
        "net_amount.amount",
    ),
    "decimal column 1e200000": ("tax_rate", '{"id": "tr-1", "percentage": 1e200000}', "percentage"),
    "decimal column integer of 60 digits": (
        "tax_rate",
        '{"id": "tr-1", "percentage": ' + "7" * 60 + "}",
        "percentage",
    ),
    "decimal column in a line": (
        "invoice",
        '{"id": "inv-1", "invoice_number": "1", "customer_id": "c", "updated_at":'
        ' "2026-11-01T00:00:00Z", "items": [{"id": "l-0", "quantity": 1.0e999999999999}]}',
        "items[0].quantity",
    ),
    "text column 1e200000": ("tax_rate", '{"id": "tr-1", "name": 1e200000}', "name"),
    "unmapped field 1e200000": ("tax_rate", '{"id": "tr-1", "other": 1e200000}', "other"),
    "unmapped field 1e5000": ("tax_rate", '{"id": "tr-1", "x": {"y": [0, 1e5000]}}', "x.y[1]"),
    "unmapped field 1.0e999999999999": (
        "tax_rate",
        '{"id": "tr-1", "other": 1.0e999999999999}',
        "other",
    ),
    "unmapped field in a line": (
        "invoice",
        '{"id": "inv-1", "invoice_number": "1", "customer_id": "c", "updated_at":'
        ' "2026-11-01T00:00:00Z", "items": [{"id": "l-0", "extra": 1e200000}]}',
        "items[0].extra",
    ),
    "unmapped field NaN": ("tax_rate", '{"id": "tr-1", "other": [NaN]}', "other[0]"),
    "id .": ("tax_rate", '{"id": "."}', "id"),
    "id ..": ("tax_rate", '{"id": ".."}', "id"),
    "id with a slash": ("tax_rate", '{"id": "../tax-rates/x"}', "id"),
    "id with a newline": ("tax_rate", '{"id": "tr\\n1"}', "id"),
    "id with a NUL": ("tax_rate", '{"id": "tr\\u00001"}', "id"),
    "id with a surrogate": ("tax_rate", '{"id": "tr\\ud8001"}', "id"),
    "id of 300 characters": ("tax_rate", '{"id": "' + "a" * 300 + '"}', "id"),
}


@pytest.mark.parametrize("case", list(UNSTORABLE))
def test_an_unstorable_value_is_a_record_schema_error_naming_the_field(
    engine: sa.Engine, case: str
) -> None:
    entity, body, field = UNSTORABLE[case]
    record = loads(body)
    with pytest.raises(RecordSchemaError) as caught:
        load(engine, entity, [record])
    error = caught.value
    assert (error.entity, error.record_id, error.field) == (entity, record["id"], field)
    # The message can be stored and logged: valid UTF-8 and short, whatever the value was.
    str(error).encode()
    assert len(str(error)) < 600
    assert count(engine, entity) == 0


def test_values_at_the_bounds_are_stored_exactly(engine: sa.Engine) -> None:
    whole = "9" * 50
    fraction = "0." + "0" * 49 + "1"
    load(
        engine,
        "customer",
        [customer("a-lo", payment_terms=-(2**31)), customer("b-hi", payment_terms=2**31 - 1)],
    )
    load(engine, "bank_transaction", [transaction("w", "-" + whole), transaction("f", fraction)])
    record = loads('{"id": "tr-1", "percentage": 1E+49, "rate": 1E-50, "big": ' + "9" * 4000 + "}")
    load(engine, "tax_rate", [record])
    assert read_table(engine, "customer")["payment_terms"].tolist() == [-(2**31), 2**31 - 1]
    amounts = read_table(engine, "bank_transaction").set_index("id")["net_amount"]
    assert format(amounts["w"], "f") == "-" + whole
    assert format(amounts["f"], "f") == fraction
    [stored] = read_records(engine, "tax_rate")
    assert stored == record  # an integer of 4000 digits too: the parser's limit is 4300
    assert read_table(engine, "tax_rate")["percentage"].tolist() == [Decimal("1E+49")]


# ----------------------------------------------------------------------------- finding 2: memory


HUGE_EXPONENTS = {
    "money": (
        "bank_transaction",
        '{"id": "t-1", "net_amount": {"amount": 1.0e300000000, "currency": "USD"}}',
        "net_amount.amount",
    ),
    "decimal column": ("tax_rate", '{"id": "tr-1", "percentage": 1.0e300000000}', "percentage"),
    "integer column": (
        "customer",
        '{"id": "cu-1", "name": "A", "updated_at": "2026-11-01T00:00:00Z",'
        ' "payment_terms": 1.0e300000000}',
        "payment_terms",
    ),
    "unmapped field": ("tax_rate", '{"id": "tr-1", "unmapped": 1.0e300000000}', "unmapped"),
    "unmapped field, negative exponent": (
        "tax_rate",
        '{"id": "tr-1", "unmapped": 1.0e-300000000}',
        "unmapped",
    ),
}
WARM_UP = {
    "bank_transaction": transaction("warm-up"),
    "tax_rate": {"id": "warm-up"},
    "customer": customer("warm-up"),
}


@pytest.mark.parametrize("case", list(HUGE_EXPONENTS))
def test_a_huge_exponent_costs_no_memory(engine: sa.Engine, case: str) -> None:
    """A 47-byte field once took the loader to 1 GB: the number written out in full."""
    entity, body, field = HUGE_EXPONENTS[case]
    load(engine, entity, [WARM_UP[entity]])  # imports and compiled statements: not the record's
    record = loads(body)
    tracemalloc.start()
    try:
        with pytest.raises(RecordSchemaError) as caught:
            load(engine, entity, [record])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.field == field
    assert peak < 4_000_000, peak
    assert count(engine, entity) == 1


def test_a_refused_record_leaves_every_other_row_readable(engine: sa.Engine) -> None:
    good = [loads(f'{{"id": "tr-{n}", "percentage": 7.5, "rate": 0.{n}1}}') for n in range(3)]
    load(engine, "tax_rate", good)
    with pytest.raises(RecordSchemaError):
        load(engine, "tax_rate", [loads('{"id": "tr-bad", "other": 1e5000}')])
    assert read_records(engine, "tax_rate") == good
    assert read_table(engine, "tax_rate")["id"].tolist() == ["tr-0", "tr-1", "tr-2"]
    table = table_for("tax_rate")
    with engine.connect() as conn:
        assert len(pd.read_sql(sa.select(table), conn)) == 3
        assert len(pd.read_sql_table(table.name, conn)) == 3


def test_a_row_stored_before_the_bounds_does_not_break_reading_the_table(
    engine: sa.Engine,
) -> None:
    """A row an older loader wrote (a 5,001-digit integer in ``_record``) reads back, as a
    Decimal, and does not take the other rows with it."""
    load(engine, "tax_rate", [{"id": "tr-0", "name": "ok"}])
    huge = "1" + "0" * 5000
    with engine.begin() as conn:
        conn.execute(
            sa.insert(table_for("tax_rate")).values(
                id="tr-old", _record=sa.literal_column(f"'{{\"x\": {huge}}}'"), _synced_at=NOW
            )
        )
    frame = read_table(engine, "tax_rate").set_index("id")
    assert frame.loc["tr-old", "_record"] == {"x": Decimal(huge)}
    assert frame.loc["tr-0", "_record"] == {"id": "tr-0", "name": "ok"}
    assert read_records(engine, "tax_rate") == [{"id": "tr-0", "name": "ok"}, {"x": Decimal(huge)}]
    with engine.connect() as conn:
        assert len(pd.read_sql(sa.select(table_for("tax_rate")), conn)) == 2


# ----------------------------------------------------------------------------- finding 3: pins


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    options = SandboxOptions(size="tiny", api_keys=(KEY,), rate_limit=1_000_000)
    server = SandboxServer(build_sandbox(options)).start()
    yield server
    server.stop()


def _truth(server: SandboxServer, entity: str) -> dict[str, dict[str, Any]]:
    store = server.sandbox.world.store
    with store.lock:
        return {r["id"]: r for r in store[entity].all_records()}


def test_a_full_pass_replaces_rows_pinned_by_a_future_updated_at(
    engine: sa.Engine, sandbox: SandboxServer
) -> None:
    """A webhook body stamped 2099 pins a customer, a bill and its payment; one full pass puts
    Rillet's versions back."""
    customer_record = next(iter(_truth(sandbox, "customer").values()))
    bill = next(b for b in _truth(sandbox, "bill").values() if b.get("status") != "VOID")
    payments = [p for p in _truth(sandbox, "bill_payment").values() if p["bill_id"] == bill["id"]]
    future = "2099-01-01T00:00:00.000Z"
    load(engine, "customer", [{**customer_record, "name": "pinned", "updated_at": future}])
    load(engine, "bill", [{**bill, "updated_at": future, "memo": "pinned"}])
    for payment in payments:
        load(engine, "bill_payment", [{**payment, "memo": "pinned", "updated_at": future}])
    full = Window(start=None, end=None, full=True)
    log = logging.getLogger(__name__)
    with RilletClient(api_key=KEY, base_url=sandbox.base_url) as client:
        for entity in ("customer", "bill"):
            sync_entity(catalog.entity(entity), client, engine, window=full, run_id="s", log=log)
    stored = {r["id"]: r for r in read_records(engine, "customer")}
    assert stored[customer_record["id"]] == customer_record
    assert {r["id"]: r for r in read_records(engine, "bill")}[bill["id"]] == bill
    stored_payments = {r["id"]: r for r in read_records(engine, "bill_payment")}
    for payment in payments:
        assert stored_payments[payment["id"]] == payment
