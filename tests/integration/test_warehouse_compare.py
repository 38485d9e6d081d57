"""The power of the "warehouse equals the sandbox" check (tests/warehouse_compare.py): a warehouse
loaded from a tiny sandbox passes, and each corruption made to it directly in SQL fails with
exactly one difference, naming the entity, the row and the column."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal

import pytest
import sqlalchemy as sa

from rillet_dagster import catalog
from rillet_dagster.assets.sync import Window, sync_entity
from rillet_dagster.rillet.client import RilletClient
from rillet_dagster.sandbox.server import SandboxOptions, SandboxServer, build_sandbox
from rillet_dagster.warehouse.schema import ensure_schema, make_engine, table_for
from tests import canary
from tests.pg import postgres_url
from tests.warehouse_compare import assert_warehouse_equals_sandbox

KEY = canary.api_key("compare")
# Money on headers and lines, lines keyed by id (invoice items) and by index (customer emails),
# and a soft delete; small tables, so that each check takes a few milliseconds.
ENTITIES = ("customer", "invoice")


@dataclass
class Loaded:
    server: SandboxServer
    engine: sa.Engine
    deleted_id: str  # a customer the sandbox deleted after the warehouse had it


def sync_all(server: SandboxServer, engine: sa.Engine) -> None:
    with RilletClient(api_key=KEY, base_url=server.base_url) as client:
        for name in ENTITIES:
            sync_entity(
                catalog.entity(name),
                client,
                engine,
                window=Window(start=None, end=None, full=True),
                run_id="compare",
                log=logging.getLogger(__name__),
            )


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def loaded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Loaded]:
    """A tiny sandbox synced into a fresh warehouse, with one tombstone (deleted_at set)."""
    options = SandboxOptions(size="tiny", api_keys=(KEY,), rate_limit=1_000_000)
    server = SandboxServer(build_sandbox(options)).start()
    folder = tmp_path_factory.mktemp("compare")
    url = f"sqlite:///{folder}/w.db" if request.param == "sqlite" else postgres_url(folder.name)
    engine = make_engine(url)
    ensure_schema(engine)
    writer = server.sandbox.writer
    body = {"name": "Short-lived", "emails": [{"email": "a@b.example", "type": "MAIN_SENDER"}]}
    deleted = writer.create_customer(body=body)["id"]
    sync_all(server, engine)
    writer.delete_customer(id=deleted)
    sync_all(server, engine)  # a complete pass: the customer it no longer lists is marked deleted
    yield Loaded(server, engine, deleted)
    engine.dispose()
    server.stop()


def _first_line(
    conn: sa.Connection, entity: str, child: str, *where: sa.ColumnElement[bool]
) -> tuple[str, str]:
    """(parent_id, line_key) of the first line of a live parent: the lines of a deleted one are
    left as they were, and not compared."""
    headers, lines = table_for(entity), table_for(child)
    live = sa.select(headers.c.id).where(headers.c.deleted_at.is_(None))
    query = (
        sa.select(lines.c.parent_id, lines.c.line_key)
        .where(lines.c.parent_id.in_(live), *where)
        .order_by(lines.c.parent_id, lines.c.line_key)
    )
    row = conn.execute(query.limit(1)).first()
    assert row is not None, "the tiny sandbox has no such row"
    return row[0], row[1]


def _money_changed(conn: sa.Connection, loaded: Loaded) -> str:
    invoices = table_for("invoice")
    invoice_id = conn.scalars(sa.select(invoices.c.id).order_by(invoices.c.id)).first()
    total = conn.scalar(sa.select(invoices.c.total).where(invoices.c.id == invoice_id))
    assert isinstance(total, Decimal)
    conn.execute(
        sa.update(invoices).where(invoices.c.id == invoice_id).values(total=total + Decimal("0.01"))
    )
    return rf"invoice {invoice_id}: total: expected Decimal\('{total}'\), got"


def _line_money_changed(conn: sa.Connection, loaded: Loaded) -> str:
    items = table_for("invoice_item")
    parent, key = _first_line(conn, "invoice", "invoice_item")
    where = sa.and_(items.c.parent_id == parent, items.c.line_key == key)
    amount = conn.scalar(sa.select(items.c.total_amount).where(where))
    assert isinstance(amount, Decimal)
    conn.execute(sa.update(items).where(where).values(total_amount=amount - Decimal("0.01")))
    return rf"invoice_item {parent}/{key}: total_amount: expected Decimal\('{amount}'\)"


def _money_digit_dropped(conn: sa.Connection, loaded: Loaded) -> str:
    """Same value, one trailing zero fewer: exact money keeps every digit it was given."""
    items = table_for("invoice_item")
    ends_in_zero = sa.cast(items.c.total_amount, sa.Text).like("%.%0")
    parent, key = _first_line(conn, "invoice", "invoice_item", ends_in_zero)
    where = sa.and_(items.c.parent_id == parent, items.c.line_key == key)
    amount = conn.scalar(sa.select(items.c.total_amount).where(where))
    assert isinstance(amount, Decimal)
    shorter = Decimal(str(amount)[:-1])
    assert shorter == amount
    conn.execute(sa.update(items).where(where).values(total_amount=shorter))
    return rf"invoice_item {parent}/{key}: total_amount: expected Decimal\('{amount}'\)"


def _line_deleted(conn: sa.Connection, loaded: Loaded) -> str:
    emails = table_for("customer_email")
    parent, key = _first_line(conn, "customer", "customer_email")
    conn.execute(sa.delete(emails).where(emails.c.parent_id == parent, emails.c.line_key == key))
    return rf"customer_email {parent}/{key}: line missing"


def _deleted_made_live(conn: sa.Connection, loaded: Loaded) -> str:
    customers = table_for("customer")
    cleared = conn.execute(
        sa.update(customers)
        .where(customers.c.id == loaded.deleted_id, customers.c.deleted_at.is_not(None))
        .values(deleted_at=None)
    )
    assert cleared.rowcount == 1, "the deleted customer was synced, so its row has deleted_at"
    return rf"customer {loaded.deleted_id}: live in the warehouse, but deleted in the sandbox"


def _extra_row(conn: sa.Connection, loaded: Loaded) -> str:
    invoices = table_for("invoice")
    extra = str(uuid.uuid4())
    source = conn.scalars(
        sa.select(invoices.c.id).where(invoices.c.deleted_at.is_(None)).order_by(invoices.c.id)
    ).first()
    # A copy of a live row under a new id (and hash: a shared one is a difference of its own).
    new = {"id": extra, "_record_hash": uuid.uuid4().hex}
    copied = [sa.literal(new[c.name]).label(c.name) if c.name in new else c for c in invoices.c]
    conn.execute(
        sa.insert(invoices).from_select(
            [c.name for c in invoices.c], sa.select(*copied).where(invoices.c.id == source)
        )
    )
    return rf"invoice {extra}: live in the warehouse, but unknown to the sandbox"


def _text_column_changed(conn: sa.Connection, loaded: Loaded) -> str:
    invoices = table_for("invoice")
    invoice_id = conn.scalars(sa.select(invoices.c.id).order_by(invoices.c.id)).first()
    conn.execute(sa.update(invoices).where(invoices.c.id == invoice_id).values(status="TAMPERED"))
    return rf"invoice {invoice_id}: status: expected '\w+', got 'TAMPERED'"


CORRUPTIONS: dict[str, Callable[[sa.Connection, Loaded], str]] = {
    "header money +0.01": _money_changed,
    "line money -0.01": _line_money_changed,
    "money loses a trailing zero": _money_digit_dropped,
    "line deleted": _line_deleted,
    "deleted_at cleared": _deleted_made_live,
    "extra live row": _extra_row,
    "typed column changed": _text_column_changed,
}


def test_the_loaded_warehouse_equals_the_sandbox(loaded: Loaded) -> None:
    assert_warehouse_equals_sandbox(loaded.server, loaded.engine, ENTITIES)


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_each_corruption_is_reported(loaded: Loaded, corruption: str) -> None:
    """Made in a transaction that is rolled back: the next corruption starts from a clean copy."""
    with loaded.engine.connect() as conn:
        transaction = conn.begin()
        try:
            pattern = CORRUPTIONS[corruption](conn, loaded)
            with pytest.raises(AssertionError) as failure:
                assert_warehouse_equals_sandbox(loaded.server, conn, ENTITIES)
        finally:
            transaction.rollback()
    message = str(failure.value)
    assert "(1 difference in customer, invoice)" in message, message
    assert re.search(pattern, message), message
