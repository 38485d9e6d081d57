"""Analyst models computed in the warehouse from the synced tables, exact to the cent.

Every model is rebuilt in full from the synced entity tables and swapped in one transaction.
Amounts are summed in Python as ``Decimal``: SQLite keeps exact money as text, and SQL ``SUM``
over text would go through a float there.

Models (group ``finance_models``; tables ``model_<name>``):

* ``ledger/general_ledger``: one row per journal-entry line, with its account, the entry's date,
  subsidiary and currency, and ``signed_amount`` (debit positive, credit negative).
* ``ledger/account_balances``: one row per account, subsidiary and day with activity: the day's
  debits, credits, net change and closing balance (debit positive, the entry's currency).
* ``ledger/ar_aging``: one row per invoice still open as of a date (today unless configured):
  total, payments and credit-memo applications up to that date, the open amount, days past due
  and the aging bucket.
* ``ledger/revenue_by_customer_month``: one row per customer, month and currency: invoiced net
  amount less credited net amount, by document date.

No ``from __future__ import annotations`` here: Dagster reads the asset functions' annotations
at definition time to find their config and resources.
"""

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import dagster as dg
from sqlalchemy import (
    Column,
    Date,
    Engine,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    delete,
    insert,
    select,
)
from sqlalchemy.engine import Connection

from rillet_dagster.assets.sync import asset_key
from rillet_dagster.resources import WarehouseResource
from rillet_dagster.warehouse.reports import CONSOLIDATED
from rillet_dagster.warehouse.schema import ensure_schema, table_for, write_transaction
from rillet_dagster.warehouse.types import ExactDecimal

GROUP = "finance_models"
ZERO = Decimal(0)
DEBIT = "DEBIT"

MODEL_METADATA = MetaData()

GENERAL_LEDGER = Table(
    "model_general_ledger",
    MODEL_METADATA,
    Column("entry_id", String, nullable=False),
    Column("line_key", String, nullable=False),
    Column("date", Date, nullable=False),
    Column("subsidiary_id", String),
    Column("entry_name", Text),
    Column("account_id", String),
    Column("account_code", String),
    Column("account_name", Text),
    Column("account_type", String),
    Column("side", String, nullable=False),
    Column("amount", ExactDecimal(), nullable=False),
    Column("signed_amount", ExactDecimal(), nullable=False),
    Column("currency", String(3)),
    Column("description", Text),
    PrimaryKeyConstraint("entry_id", "line_key", name="pk_model_general_ledger"),
    comment="One row is a journal-entry line with its account; signed_amount is debit-positive.",
)

ACCOUNT_BALANCES = Table(
    "model_account_balances",
    MODEL_METADATA,
    Column("date", Date, nullable=False),
    Column("subsidiary_id", String, nullable=False),
    Column("account_id", String, nullable=False),
    Column("account_code", String),
    Column("account_name", Text),
    Column("currency", String(3), nullable=False),
    Column("debits", ExactDecimal(), nullable=False),
    Column("credits", ExactDecimal(), nullable=False),
    Column("net_change", ExactDecimal(), nullable=False),
    Column("closing_balance", ExactDecimal(), nullable=False),
    PrimaryKeyConstraint(
        "date", "subsidiary_id", "account_id", "currency", name="pk_model_account_balances"
    ),
    comment="One row is an account's activity and debit-positive closing balance on a day.",
)

AR_AGING = Table(
    "model_ar_aging",
    MODEL_METADATA,
    Column("as_of_date", Date, nullable=False),
    Column("invoice_id", String, nullable=False),
    Column("invoice_number", String),
    Column("customer_id", String),
    Column("customer_name", Text),
    Column("subsidiary_id", String),
    Column("invoice_date", Date),
    Column("due_date", Date),
    Column("currency", String(3)),
    Column("total", ExactDecimal(), nullable=False),
    Column("paid", ExactDecimal(), nullable=False),
    Column("credited", ExactDecimal(), nullable=False),
    Column("open_amount", ExactDecimal(), nullable=False),
    Column("days_past_due", Integer, nullable=False),
    Column("bucket", String, nullable=False),
    PrimaryKeyConstraint("as_of_date", "invoice_id", name="pk_model_ar_aging"),
    comment="One row is an invoice open on as_of_date, with its open amount and aging bucket.",
)

REVENUE_BY_CUSTOMER_MONTH = Table(
    "model_revenue_by_customer_month",
    MODEL_METADATA,
    Column("month", Date, nullable=False),
    Column("customer_id", String, nullable=False),
    Column("customer_name", Text),
    Column("currency", String(3), nullable=False),
    Column("invoiced", ExactDecimal(), nullable=False),
    Column("credited", ExactDecimal(), nullable=False),
    Column("revenue", ExactDecimal(), nullable=False),
    PrimaryKeyConstraint("month", "customer_id", "currency", name="pk_model_revenue_by_customer"),
    comment="One row is a customer's invoiced less credited net amount in a month and currency.",
)

AGING_BUCKETS = ((0, "current"), (30, "1-30"), (60, "31-60"), (90, "61-90"))
OVERDUE_90 = "90+"
# A payment that failed never reached the bank; uncleared ones are in transit but applied.
NOT_PAID = frozenset({"FAILED"})


def ensure_model_schema(engine: Engine) -> None:
    ensure_schema(engine, MODEL_METADATA)


# --------------------------------------------------------------------------- ledger queries


@dataclass(frozen=True)
class LedgerLine:
    entry_id: str
    line_key: str
    date: date
    subsidiary_id: str | None
    account_id: str | None
    account_code: str | None
    side: str
    amount: Decimal
    currency: str | None

    @property
    def signed(self) -> Decimal:
        return self.amount if self.side == DEBIT else -self.amount


def ledger_lines(
    conn: Connection, *, subsidiary_key: str | None = None, through: date | None = None
) -> list[LedgerLine]:
    """Live journal-entry lines up to ``through`` (inclusive).

    ``subsidiary_key`` None: every line in its own currency; a subsidiary id: that subsidiary's
    lines in its currency; ``consolidated``: the reporting-currency lines of
    ``/reports/journal-entries``, which is what Rillet's consolidated reports add up.
    """
    consolidated = subsidiary_key == CONSOLIDATED
    entries = table_for("reporting_journal_entry" if consolidated else "journal_entry")
    items = table_for("reporting_journal_entry_item" if consolidated else "journal_entry_item")
    amount = items.c.reporting_amount if consolidated else items.c.amount
    currency = items.c.reporting_amount_currency if consolidated else items.c.amount_currency
    query = (
        select(
            entries.c.id,
            items.c.line_key,
            entries.c.date,
            entries.c.subsidiary_id,
            items.c.account_id,
            items.c.account_code,
            items.c.side,
            amount,
            currency,
        )
        .join(items, items.c.parent_id == entries.c.id)
        .where(entries.c.deleted_at.is_(None))
    )
    if subsidiary_key is not None and not consolidated:
        query = query.where(entries.c.subsidiary_id == subsidiary_key)
    if through is not None:
        query = query.where(entries.c.date <= through)
    return [
        LedgerLine(*row[:7], row[7] if row[7] is not None else ZERO, row[8])
        for row in conn.execute(query.order_by(entries.c.date, entries.c.id, items.c.line_index))
    ]


def account_names(conn: Connection) -> dict[str, tuple[str | None, str | None, str | None]]:
    """Account id -> (code, name, type) from the synced chart of accounts."""
    accounts = table_for("account")
    rows = conn.execute(
        select(accounts.c.id, accounts.c.code, accounts.c.name, accounts.c.type)
    ).all()
    return {row[0]: (row[1], row[2], row[3]) for row in rows}


# --------------------------------------------------------------------------- model builders


def general_ledger_rows(conn: Connection) -> list[dict[str, Any]]:
    names = account_names(conn)
    entries = table_for("journal_entry")
    items = table_for("journal_entry_item")
    query = (
        select(
            entries.c.id,
            items.c.line_key,
            entries.c.date,
            entries.c.subsidiary_id,
            entries.c.name,
            items.c.account_id,
            items.c.account_code,
            items.c.side,
            items.c.amount,
            items.c.amount_currency,
            entries.c.currency,
            items.c.description,
        )
        .join(items, items.c.parent_id == entries.c.id)
        .where(entries.c.deleted_at.is_(None))
        .order_by(entries.c.date, entries.c.id, items.c.line_index)
    )
    rows = []
    for row in conn.execute(query).mappings():
        code, name, kind = names.get(row["account_id"] or "", (None, None, None))
        amount = row["amount"] if row["amount"] is not None else ZERO
        rows.append(
            {
                "entry_id": row["id"],
                "line_key": row["line_key"],
                "date": row["date"],
                "subsidiary_id": row["subsidiary_id"],
                "entry_name": row["name"],
                "account_id": row["account_id"],
                "account_code": row["account_code"] or code,
                "account_name": name,
                "account_type": kind,
                "side": row["side"],
                "amount": amount,
                "signed_amount": amount if row["side"] == DEBIT else -amount,
                "currency": row["amount_currency"] or row["currency"],
                "description": row["description"],
            }
        )
    return rows


def account_balance_rows(conn: Connection) -> list[dict[str, Any]]:
    names = account_names(conn)
    days: dict[tuple[str, str, str], dict[date, list[Decimal]]] = defaultdict(dict)
    for line in ledger_lines(conn):
        key = (line.subsidiary_id or "", line.account_id or "", line.currency or "")
        totals = days[key].setdefault(line.date, [ZERO, ZERO])
        totals[0 if line.side == DEBIT else 1] += line.amount
    rows = []
    for (subsidiary, account, currency), by_day in days.items():
        code, name, _ = names.get(account, (None, None, None))
        balance = ZERO
        for day in sorted(by_day):
            debits, credits = by_day[day]
            balance += debits - credits
            rows.append(
                {
                    "date": day,
                    "subsidiary_id": subsidiary,
                    "account_id": account,
                    "account_code": code,
                    "account_name": name,
                    "currency": currency,
                    "debits": debits,
                    "credits": credits,
                    "net_change": debits - credits,
                    "closing_balance": balance,
                }
            )
    return rows


def aging_bucket(days_past_due: int) -> str:
    for limit, name in AGING_BUCKETS:
        if days_past_due <= limit:
            return name
    return OVERDUE_90


def ar_aging_rows(conn: Connection, as_of: date) -> list[dict[str, Any]]:
    """Invoices open on ``as_of``: total less payments and credits dated on or before it."""
    invoices = table_for("invoice")
    payments = table_for("invoice_payment")
    memos = table_for("credit_memo")
    applications = table_for("credit_memo_application")
    customers = _customer_names(conn)
    paid: dict[str, Decimal] = defaultdict(Decimal)
    for invoice_id, amount, status in conn.execute(
        select(payments.c.invoice_id, payments.c.amount, payments.c.status).where(
            payments.c.deleted_at.is_(None), payments.c.date <= as_of
        )
    ):
        if status not in NOT_PAID and amount is not None:
            paid[invoice_id] += amount
    credited: dict[str, Decimal] = defaultdict(Decimal)
    for invoice_id, amount in conn.execute(
        select(applications.c.invoice_id, applications.c.amount)
        .join(memos, memos.c.id == applications.c.parent_id)
        .where(memos.c.deleted_at.is_(None), applications.c.application_date <= as_of)
    ):
        if amount is not None:
            credited[invoice_id] += amount
    rows = []
    query = select(invoices).where(
        invoices.c.deleted_at.is_(None), invoices.c.invoice_date <= as_of
    )
    for invoice in conn.execute(query.order_by(invoices.c.invoice_date, invoices.c.id)).mappings():
        total = invoice["total"] if invoice["total"] is not None else ZERO
        open_amount = total - paid[invoice["id"]] - credited[invoice["id"]]
        if open_amount == 0:
            continue
        due = invoice["due_date"] or invoice["invoice_date"]
        past_due = max(0, (as_of - due).days) if due else 0
        rows.append(
            {
                "as_of_date": as_of,
                "invoice_id": invoice["id"],
                "invoice_number": invoice["invoice_number"],
                "customer_id": invoice["customer_id"],
                "customer_name": customers.get(invoice["customer_id"] or ""),
                "subsidiary_id": invoice["subsidiary_id"],
                "invoice_date": invoice["invoice_date"],
                "due_date": invoice["due_date"],
                "currency": invoice["total_currency"],
                "total": total,
                "paid": paid[invoice["id"]],
                "credited": credited[invoice["id"]],
                "open_amount": open_amount,
                "days_past_due": past_due,
                "bucket": aging_bucket(past_due),
            }
        )
    return rows


def revenue_rows(conn: Connection) -> list[dict[str, Any]]:
    invoices = table_for("invoice")
    memos = table_for("credit_memo")
    customers = _customer_names(conn)
    totals: dict[tuple[date, str, str], list[Decimal]] = defaultdict(lambda: [ZERO, ZERO])
    sources = (
        (0, invoices.c.invoice_date, invoices),
        (1, memos.c.credit_memo_date, memos),
    )
    for index, day_column, table in sources:
        query = select(
            day_column, table.c.customer_id, table.c.net_amount, table.c.net_amount_currency
        ).where(table.c.deleted_at.is_(None), day_column.is_not(None))
        for day, customer, amount, currency in conn.execute(query):
            if amount is None:
                continue
            totals[(day.replace(day=1), customer or "", currency or "")][index] += amount
    return [
        {
            "month": month,
            "customer_id": customer,
            "customer_name": customers.get(customer),
            "currency": currency,
            "invoiced": invoiced,
            "credited": credited,
            "revenue": invoiced - credited,
        }
        for (month, customer, currency), (invoiced, credited) in sorted(totals.items())
    ]


def _customer_names(conn: Connection) -> dict[str, str]:
    customers = table_for("customer")
    return {row[0]: row[1] for row in conn.execute(select(customers.c.id, customers.c.name))}


def replace_model(
    engine: Engine, table: Table, rows: Sequence[Mapping[str, Any]], where: Any = None
) -> int:
    """Swap the model's rows (or those matching ``where``) for ``rows`` in one transaction."""
    with write_transaction(engine) as conn:
        statement = delete(table) if where is None else delete(table).where(where)
        conn.execute(statement)
        if rows:
            conn.execute(insert(table), list(rows))
    return len(rows)


# --------------------------------------------------------------------------- assets


def model_key(name: str) -> dg.AssetKey:
    return dg.AssetKey(["ledger", name])


def _deps(*entities: str) -> list[dg.AssetKey]:
    return [asset_key(name) for name in entities]


class AgingConfig(dg.Config):
    as_of_date: str = ""  # YYYY-MM-DD; empty means today (UTC)


def _result(table: Table, rows: int, **extra: Any) -> dg.MaterializeResult:
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": rows,
            "dagster/table_name": table.name,
            "dagster/column_schema": dg.TableSchema(
                columns=[dg.TableColumn(c.name, str(c.type)) for c in table.columns]
            ),
            **extra,
        }
    )


@dg.asset(
    key=model_key("general_ledger"),
    group_name=GROUP,
    kinds={"sql"},
    deps=_deps("journal_entry", "journal_entry_item", "account"),
    description=GENERAL_LEDGER.comment,
)
def general_ledger(warehouse: WarehouseResource) -> dg.MaterializeResult:
    ensure_model_schema(warehouse.engine)
    with warehouse.engine.connect() as conn:
        rows = general_ledger_rows(conn)
    return _result(GENERAL_LEDGER, replace_model(warehouse.engine, GENERAL_LEDGER, rows))


@dg.asset(
    key=model_key("account_balances"),
    group_name=GROUP,
    kinds={"sql"},
    deps=_deps("journal_entry", "journal_entry_item", "account"),
    description=ACCOUNT_BALANCES.comment,
)
def account_balances(warehouse: WarehouseResource) -> dg.MaterializeResult:
    ensure_model_schema(warehouse.engine)
    with warehouse.engine.connect() as conn:
        rows = account_balance_rows(conn)
    return _result(ACCOUNT_BALANCES, replace_model(warehouse.engine, ACCOUNT_BALANCES, rows))


@dg.asset(
    key=model_key("ar_aging"),
    group_name=GROUP,
    kinds={"sql"},
    deps=_deps("invoice", "invoice_payment", "credit_memo", "credit_memo_application", "customer"),
    description=AR_AGING.comment,
)
def ar_aging(config: AgingConfig, warehouse: WarehouseResource) -> dg.MaterializeResult:
    as_of = date.fromisoformat(config.as_of_date) if config.as_of_date else datetime.now(UTC).date()
    ensure_model_schema(warehouse.engine)
    with warehouse.engine.connect() as conn:
        rows = ar_aging_rows(conn, as_of)
    written = replace_model(warehouse.engine, AR_AGING, rows, AR_AGING.c.as_of_date == as_of)
    open_total = _by_currency((row["currency"], row["open_amount"]) for row in rows)
    return _result(AR_AGING, written, as_of_date=as_of.isoformat(), open_amount=open_total)


@dg.asset(
    key=model_key("revenue_by_customer_month"),
    group_name=GROUP,
    kinds={"sql"},
    deps=_deps("invoice", "credit_memo", "customer"),
    description=REVENUE_BY_CUSTOMER_MONTH.comment,
)
def revenue_by_customer_month(warehouse: WarehouseResource) -> dg.MaterializeResult:
    ensure_model_schema(warehouse.engine)
    with warehouse.engine.connect() as conn:
        rows = revenue_rows(conn)
    written = replace_model(warehouse.engine, REVENUE_BY_CUSTOMER_MONTH, rows)
    return _result(REVENUE_BY_CUSTOMER_MONTH, written)


def _by_currency(pairs: Iterable[tuple[str | None, Decimal]]) -> str:
    """Totals per currency as text (metadata values cannot be Decimal)."""
    totals: dict[str, Decimal] = defaultdict(Decimal)
    for currency, amount in pairs:
        totals[currency or "?"] += amount
    return ", ".join(f"{format(v, 'f')} {k}" for k, v in sorted(totals.items())) or "0"


MODEL_ASSETS = (general_ledger, account_balances, ar_aging, revenue_by_customer_month)
