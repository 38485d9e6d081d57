"""Report snapshot tables: Rillet's financial reports in long form, one partition at a time.

Two tables, both keyed by (report, period end, subsidiary key), the grain of a report partition:

``report_lines``
    One row per amount of a report response: ``report``, ``period_start`` (NULL for the balance
    sheet, which is as of a date), ``period_end`` (the as-of date or the period's last day),
    ``subsidiary_key`` (a subsidiary id or ``consolidated``) and ``subsidiary_id`` (NULL when
    consolidated), ``line`` (position in the response, so the report reads back in Rillet's
    order), ``line_type`` (``account``, ``group``, ``section``, ``summary`` or ``total``),
    ``section`` and ``group_path`` (nested group names joined by `` > ``), ``name``,
    ``account_id`` / ``account_code`` / ``account_name``, ``breakdown_id`` / ``breakdown_type`` /
    ``breakdown_name`` (the report column), ``measure`` (``amount`` for statements; the column
    name such as ``ending_balance`` for the trial balance; ``margin`` for summary margins, which
    are ratios and carry no currency), ``amount`` (exact decimal) and ``currency``.

``report_snapshots``
    One row per partition: the report's currency, its line count, when and by which run it was
    taken, and ``_response``, the full response as received (so nothing Rillet sent is lost).

A partition is replaced atomically: its old rows are deleted and the new ones inserted in one
transaction, so a reader sees the previous snapshot or the new one, never a mix.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    Column,
    Date,
    Engine,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    and_,
    cast,
    delete,
    insert,
    select,
)
from sqlalchemy.engine import Connection

from rillet_dagster.rillet.money import Money
from rillet_dagster.warehouse.schema import ensure_schema, write_transaction
from rillet_dagster.warehouse.types import RECORD_JSON, ExactDecimal, UtcDateTime, loads

CONSOLIDATED = "consolidated"
LINES_TABLE = "report_lines"
SNAPSHOTS_TABLE = "report_snapshots"
GROUP_SEPARATOR = " > "
# The trial balance's money columns in Rillet's order; the FX pair is optional (rillet-api §4).
TRIAL_BALANCE_MEASURES = (
    "beginning_balance",
    "debit_total",
    "credit_total",
    "debit_fx_total",
    "credit_fx_total",
    "ending_balance",
)

REPORT_METADATA = MetaData()

LINES = Table(
    LINES_TABLE,
    REPORT_METADATA,
    Column("report", String, nullable=False),
    Column("period_start", Date),
    Column("period_end", Date, nullable=False),
    Column("subsidiary_key", String, nullable=False),
    Column("subsidiary_id", String),
    Column("line", Integer, nullable=False),
    Column("line_type", String, nullable=False),
    Column("section", Text),
    Column("group_path", Text),
    Column("name", Text),
    Column("account_id", String),
    Column("account_code", String),
    Column("account_name", Text),
    Column("breakdown_id", String),
    Column("breakdown_type", String),
    Column("breakdown_name", Text),
    Column("measure", String, nullable=False),
    Column("amount", ExactDecimal()),
    Column("currency", String(3)),
    PrimaryKeyConstraint("report", "period_end", "subsidiary_key", "line", name="pk_report_lines"),
    Index("ix_report_lines_account", "report", "account_id"),
    comment="One row is one amount of a Rillet report snapshot (long form).",
)

SNAPSHOTS = Table(
    SNAPSHOTS_TABLE,
    REPORT_METADATA,
    Column("report", String, nullable=False),
    Column("period_start", Date),
    Column("period_end", Date, nullable=False),
    Column("subsidiary_key", String, nullable=False),
    Column("subsidiary_id", String),
    Column("currency", String(3)),
    Column("line_count", Integer, nullable=False),
    Column("_response", RECORD_JSON, nullable=False),
    Column("_snapshot_at", UtcDateTime(), nullable=False),
    Column("_run_id", String),
    PrimaryKeyConstraint("report", "period_end", "subsidiary_key", name="pk_report_snapshots"),
    comment="One row is one report partition: when it was taken and the full response.",
)


def ensure_report_schema(engine: Engine) -> list[str]:
    """Create the report tables (and any new column) if missing; idempotent, never drops."""
    return ensure_schema(engine, REPORT_METADATA)


@dataclass(frozen=True)
class ReportKey:
    """One report partition: which report, which period, which subsidiary."""

    report: str
    period_start: date | None
    period_end: date
    subsidiary_key: str

    @property
    def subsidiary_id(self) -> str | None:
        return None if self.subsidiary_key == CONSOLIDATED else self.subsidiary_key


@dataclass(frozen=True)
class ReportLine:
    """One amount of a report, before it gets its partition columns."""

    line_type: str
    measure: str
    amount: Decimal | None
    currency: str | None
    section: str | None = None
    group_path: str | None = None
    name: str | None = None
    account_id: str | None = None
    account_code: str | None = None
    account_name: str | None = None
    breakdown_id: str | None = None
    breakdown_type: str | None = None
    breakdown_name: str | None = None


# --------------------------------------------------------------------------- flattening


def flatten_report(report: str, body: Mapping[str, Any]) -> list[ReportLine]:
    """Every amount of a report response, in response order.

    The trial balance is a flat list of accounts with several money columns; the statements
    are nested sections and groups with one amount per breakdown column, plus summaries.
    """
    if report == "trial_balance":
        return _trial_balance_lines(body)
    return _statement_lines(body)


def _trial_balance_lines(body: Mapping[str, Any]) -> list[ReportLine]:
    lines: list[ReportLine] = []
    for account in body.get("accounts") or []:
        for measure in TRIAL_BALANCE_MEASURES:
            if account.get(measure) is None:
                continue
            money = Money.parse(account[measure])
            lines.append(
                ReportLine(
                    line_type="account",
                    measure=measure,
                    amount=money.amount,
                    currency=money.currency,
                    section="Accounts",
                    name=account.get("name"),
                    account_id=account.get("id"),
                    account_code=account.get("code"),
                    account_name=account.get("name"),
                )
            )
    totals = body.get("totals") or {}
    for measure in TRIAL_BALANCE_MEASURES:
        if totals.get(measure) is None:
            continue
        money = Money.parse(totals[measure])
        lines.append(
            ReportLine(
                line_type="total",
                measure=measure,
                amount=money.amount,
                currency=money.currency,
                section="Totals",
                name="Totals",
            )
        )
    return lines


class _Columns:
    """The report's breakdown columns by id, to name each amount's column."""

    def __init__(self, breakdowns: Sequence[Mapping[str, Any]]) -> None:
        self._by_id = {
            str(b.get("id") if b.get("id") is not None else "total"): b for b in breakdowns
        }

    def fields(self, breakdown_id: Any) -> dict[str, str | None]:
        key = None if breakdown_id is None else str(breakdown_id)
        found = self._by_id.get(key or "", {})
        return {
            "breakdown_id": key,
            "breakdown_type": found.get("type"),
            "breakdown_name": found.get("name"),
        }


def _statement_lines(body: Mapping[str, Any]) -> list[ReportLine]:
    columns = _Columns(body.get("breakdowns") or [])
    lines: list[ReportLine] = []

    def amounts(values: Sequence[Mapping[str, Any]], **where: Any) -> None:
        for value in values or []:
            money = Money.parse(value["amount"])
            lines.append(
                ReportLine(
                    measure="amount",
                    amount=money.amount,
                    currency=money.currency,
                    **columns.fields(value.get("breakdown_id")),
                    **where,
                )
            )

    def accounts(section: str, path: str, items: Sequence[Mapping[str, Any]]) -> None:
        for account in items or []:
            amounts(
                account.get("balances") or [],
                line_type="account",
                section=section,
                group_path=path,
                name=account.get("name"),
                account_id=account.get("id"),
                account_code=account.get("code"),
                account_name=account.get("name"),
            )

    def groups(section: str, parent: str, items: Sequence[Mapping[str, Any]]) -> None:
        for group in items or []:
            path = f"{parent}{GROUP_SEPARATOR}{group['name']}" if parent else str(group["name"])
            amounts(
                group.get("totals") or [],
                line_type="group",
                section=section,
                group_path=path,
                name=group["name"],
            )
            accounts(section, path, group.get("accounts") or [])
            groups(section, path, group.get("groups") or [])

    for section in body.get("sections") or []:
        name = str(section["name"])
        amounts(section.get("totals") or [], line_type="section", section=name, name=name)
        accounts(name, "", section.get("accounts") or [])
        groups(name, "", section.get("groups") or [])
    for summary in body.get("summaries") or []:
        amounts(
            summary.get("amounts") or [],
            line_type="summary",
            section="Summaries",
            name=summary["name"],
        )
        for margin in summary.get("margins") or []:
            # Parsed from JSON with parse_float=Decimal, so the ratio keeps Rillet's digits.
            lines.append(
                ReportLine(
                    line_type="summary",
                    measure="margin",
                    amount=Decimal(str(margin["value"])),
                    currency=None,
                    section="Summaries",
                    name=summary["name"],
                    **columns.fields(margin.get("breakdown_id")),
                )
            )
    return lines


# --------------------------------------------------------------------------- writing, reading


def _partition_filter(table: Table, key: ReportKey) -> Any:
    return and_(
        table.c.report == key.report,
        table.c.period_end == key.period_end,
        table.c.subsidiary_key == key.subsidiary_key,
    )


def replace_partition(
    engine: Engine,
    key: ReportKey,
    body: Mapping[str, Any],
    lines: Sequence[ReportLine],
    *,
    run_id: str,
    snapshot_at: datetime,
) -> int:
    """Swap the partition's rows for ``lines`` in one transaction; the number of rows written."""
    partition = {
        "report": key.report,
        "period_start": key.period_start,
        "period_end": key.period_end,
        "subsidiary_key": key.subsidiary_key,
        "subsidiary_id": key.subsidiary_id,
    }
    rows = [{**partition, "line": index, **asdict(line)} for index, line in enumerate(lines)]
    with write_transaction(engine) as conn:
        conn.execute(delete(LINES).where(_partition_filter(LINES, key)))
        conn.execute(delete(SNAPSHOTS).where(_partition_filter(SNAPSHOTS, key)))
        if rows:
            conn.execute(insert(LINES), rows)
        conn.execute(
            insert(SNAPSHOTS),
            [
                {
                    **partition,
                    "currency": body.get("currency"),
                    "line_count": len(rows),
                    "_response": dict(body),
                    "_snapshot_at": snapshot_at,
                    "_run_id": run_id,
                }
            ],
        )
    return len(rows)


def read_lines(target: Engine | Connection, key: ReportKey) -> list[dict[str, Any]]:
    """The partition's rows in report order, amounts as ``Decimal``."""
    with _connection(target) as conn:
        result = conn.execute(
            select(LINES).where(_partition_filter(LINES, key)).order_by(LINES.c.line)
        )
        return [dict(row) for row in result.mappings()]


def read_response(target: Engine | Connection, key: ReportKey) -> dict[str, Any] | None:
    """The stored response of a partition (numbers as ``Decimal``), or None if never taken."""
    with _connection(target) as conn:
        text = conn.execute(
            select(cast(SNAPSHOTS.c._response, Text)).where(_partition_filter(SNAPSHOTS, key))
        ).scalar_one_or_none()
    return None if text is None else loads(text)


@contextmanager
def _connection(target: Engine | Connection) -> Iterator[Connection]:
    """The given connection, or a fresh one from an engine (closed afterwards)."""
    if isinstance(target, Connection):
        yield target
        return
    with target.connect() as conn:
        yield conn


def iter_partition_keys(target: Engine | Connection, report: str) -> Iterator[ReportKey]:
    """Every stored partition of ``report`` (for backfill audits and tests)."""
    with _connection(target) as conn:
        rows = conn.execute(
            select(SNAPSHOTS.c.period_start, SNAPSHOTS.c.period_end, SNAPSHOTS.c.subsidiary_key)
            .where(SNAPSHOTS.c.report == report)
            .order_by(SNAPSHOTS.c.period_end, SNAPSHOTS.c.subsidiary_key)
        ).all()
    for start, end, subsidiary in rows:
        yield ReportKey(report, start, end, subsidiary)
