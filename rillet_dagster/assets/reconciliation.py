"""The warehouse ledger against Rillet's trial balance, one row per account and measure.

``ledger/trial_balance_reconciliation`` is partitioned like the trial balance (day x subsidiary)
and depends on both sides: the trial-balance snapshot and the synced journal entries (the
reporting-currency lines for ``consolidated``). Each row holds Rillet's figure, the figure the
warehouse's lines roll up to, and the difference, so the lineage shows where the check
``ledger_reproduces_trial_balance`` gets its numbers and an analyst can query them.

Rolled up like Rillet's trial balance: beginning balance = every live line dated before the
period; debit and credit totals = the lines within it; ending = beginning + debits - credits.

No ``from __future__ import annotations`` here: Dagster reads the asset function's annotations
at definition time to find its resources.
"""

from collections import defaultdict
from decimal import Decimal
from typing import Any

import dagster as dg
from sqlalchemy import (
    Column,
    Date,
    Integer,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    and_,
    select,
)
from sqlalchemy.engine import Engine

from rillet_dagster import catalog
from rillet_dagster.assets import models
from rillet_dagster.assets.reports import (
    daily_report_partitions,
    period_of_partition,
    report_asset_key,
)
from rillet_dagster.assets.sync import asset_key
from rillet_dagster.resources import WarehouseResource
from rillet_dagster.settings import Settings
from rillet_dagster.warehouse import reports as store
from rillet_dagster.warehouse.reports import ReportKey
from rillet_dagster.warehouse.types import ExactDecimal

ZERO = Decimal(0)
MEASURES = ("beginning_balance", "debit_total", "credit_total", "ending_balance")
# Differences listed in the materialization's metadata.
SHOWN = 20

RECONCILIATION = Table(
    "model_trial_balance_reconciliation",
    models.MODEL_METADATA,
    Column("period_start", Date, nullable=False),
    Column("period_end", Date, nullable=False),
    Column("subsidiary_key", String, nullable=False),
    Column("account_id", String, nullable=False),
    Column("account_code", String),
    Column("account_name", Text),
    Column("measure", String, nullable=False),
    Column("rillet_amount", ExactDecimal(), nullable=False),
    Column("warehouse_amount", ExactDecimal(), nullable=False),
    Column("difference", ExactDecimal(), nullable=False),
    Column("currency", String(3)),
    Column("ledger_lines", Integer, nullable=False),
    PrimaryKeyConstraint(
        "period_end", "subsidiary_key", "account_id", "measure", name="pk_model_tb_reconciliation"
    ),
    comment="One row is an account's trial-balance measure in a partition: Rillet's figure, the "
    "warehouse ledger's, and warehouse minus Rillet.",
)


def reconciliation_key() -> dg.AssetKey:
    return models.model_key("trial_balance_reconciliation")


def reconciliation_rows(engine: Engine, key: ReportKey) -> list[dict[str, Any]]:
    """Rillet's trial balance of ``key`` beside the warehouse ledger rolled up the same way."""
    if key.period_start is None:
        raise ValueError("the trial balance reconciliation needs a period start")
    with engine.connect() as conn:
        lines = models.ledger_lines(conn, subsidiary_key=key.subsidiary_key, through=key.period_end)
        names = models.account_names(conn)
    ours: dict[str, dict[str, Decimal]] = defaultdict(lambda: dict.fromkeys(MEASURES, ZERO))
    for line in lines:
        sums = ours[line.account_id or ""]
        if line.date < key.period_start:
            sums["beginning_balance"] += line.signed
        elif line.side == models.DEBIT:
            sums["debit_total"] += line.amount
        else:
            sums["credit_total"] += line.amount
    for sums in ours.values():
        sums["ending_balance"] = (
            sums["beginning_balance"] + sums["debit_total"] - sums["credit_total"]
        )
    theirs: dict[str, dict[str, Decimal]] = defaultdict(dict)
    currency = None
    for line in store.read_lines(engine, key):
        if line["line_type"] == "account":
            theirs[line["account_id"]][line["measure"]] = line["amount"]
            currency = line["currency"]
            names.setdefault(line["account_id"], (line["account_code"], line["account_name"], None))
    accounts = sorted(set(theirs) | {a for a, s in ours.items() if any(s.values())})
    rows = []
    for account in accounts:
        code, name, _ = names.get(account, (None, None, None))
        for measure in MEASURES:
            rillet = theirs.get(account, {}).get(measure, ZERO)
            warehouse = ours.get(account, {}).get(measure, ZERO)
            rows.append(
                {
                    "period_start": key.period_start,
                    "period_end": key.period_end,
                    "subsidiary_key": key.subsidiary_key,
                    "account_id": account,
                    "account_code": code,
                    "account_name": name,
                    "measure": measure,
                    "rillet_amount": rillet,
                    "warehouse_amount": warehouse,
                    "difference": warehouse - rillet,
                    "currency": currency,
                    "ledger_lines": len(lines),
                }
            )
    return rows


def partition_filter(key: ReportKey) -> Any:
    return and_(
        RECONCILIATION.c.period_end == key.period_end,
        RECONCILIATION.c.subsidiary_key == key.subsidiary_key,
    )


def read_reconciliation(engine: Engine, key: ReportKey) -> list[dict[str, Any]]:
    models.ensure_model_schema(engine)
    with engine.connect() as conn:
        query = select(RECONCILIATION).where(partition_filter(key))
        ordered = query.order_by(RECONCILIATION.c.account_code, RECONCILIATION.c.account_id)
        return [dict(row) for row in conn.execute(ordered).mappings()]


def _money(amount: Decimal, currency: str | None) -> str:
    return format(amount, "f") + (f" {currency}" if currency else "")


def _differences_table(rows: list[dict[str, Any]]) -> str:
    off = [row for row in rows if row["difference"] != 0]
    if not off:
        return "_every account agrees to the cent_"
    lines = ["| account | measure | Rillet | warehouse | difference |", "|---|---|---|---|---|"]
    for row in off[:SHOWN]:
        lines.append(
            f"| {row['account_code']} {row['account_name'] or ''} | {row['measure']} | "
            f"{_money(row['rillet_amount'], row['currency'])} | "
            f"{_money(row['warehouse_amount'], row['currency'])} | "
            f"{format(row['difference'], 'f')} |"
        )
    return "\n".join(lines)


def reconciliation_asset(settings: Settings) -> dg.AssetsDefinition:
    partitions = daily_report_partitions(settings)
    spec = catalog.report("trial_balance")

    @dg.asset(
        key=reconciliation_key(),
        group_name=models.GROUP,
        kinds={"sql"},
        partitions_def=partitions,
        deps=[
            report_asset_key("trial_balance"),
            *(
                asset_key(name)
                for name in (
                    "journal_entry",
                    "journal_entry_item",
                    "reporting_journal_entry",
                    "reporting_journal_entry_item",
                    "account",
                )
            ),
        ],
        description=RECONCILIATION.comment,
    )
    def trial_balance_reconciliation(
        context: dg.AssetExecutionContext, warehouse: WarehouseResource
    ) -> dg.MaterializeResult:
        engine = warehouse.engine
        models.ensure_model_schema(engine)
        store.ensure_report_schema(engine)
        key = period_of_partition(spec, partitions, context.partition_key).key(spec.name)
        rows = reconciliation_rows(engine, key)
        models.replace_model(engine, RECONCILIATION, rows, partition_filter(key))
        differences = [row for row in rows if row["difference"] != 0]
        largest = max((abs(row["difference"]) for row in rows), default=ZERO)
        currency = rows[0]["currency"] if rows else None
        return dg.MaterializeResult(
            metadata={
                "dagster/partition_row_count": len(rows),
                "dagster/table_name": RECONCILIATION.name,
                "period_start": key.period_start.isoformat() if key.period_start else "",
                "period_end": key.period_end.isoformat(),
                "subsidiary": key.subsidiary_key,
                "accounts": len({row["account_id"] for row in rows}),
                "ledger_lines": rows[0]["ledger_lines"] if rows else 0,
                "differences": len(differences),
                "largest_difference": _money(largest, currency),
                "differences_table": dg.MetadataValue.md(_differences_table(rows)),
            }
        )

    return trial_balance_reconciliation
