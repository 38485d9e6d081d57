"""Rillet's financial reports as partitioned snapshots: one asset per catalog report.

Each report is partitioned by period x subsidiary (a ``MultiPartitionsDefinition``): the
period is a day for the trial balance and a month for the statements; the subsidiary is a
dynamic partition of ``rillet_subsidiaries`` (kept in step with the synced subsidiaries by a
sensor) or ``consolidated``, which calls Rillet without ``subsidiary_id``. A run fetches the
report once and replaces that partition's rows in ``report_lines`` atomically.

No single-run backfill policy: Dagster has open bugs with single-run backfills of
multi-partitioned assets, and a report costs one request per partition anyway.

No ``from __future__ import annotations`` here: Dagster reads the asset functions' annotations
at definition time to find their resources.
"""

import calendar
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import dagster as dg
from sqlalchemy import select
from sqlalchemy.engine import Engine

from rillet_dagster import catalog
from rillet_dagster.catalog import ReportSpec
from rillet_dagster.resources import RilletResource, WarehouseResource
from rillet_dagster.settings import Settings
from rillet_dagster.warehouse import reports as store
from rillet_dagster.warehouse.reports import CONSOLIDATED, ReportKey
from rillet_dagster.warehouse.schema import table_for

GROUP = "rillet_reports"
SUBSIDIARY_PARTITIONS_NAME = "rillet_subsidiaries"
PERIOD = "period"
SUBSIDIARY = "subsidiary"
# Reports kept as snapshots; the ARR waterfall is a paginated per-customer list, not a statement.
SNAPSHOT_REPORTS = (
    "trial_balance",
    "balance_sheet",
    "income_statement",
    "cash_flow_statement",
    "executive_pl",
)
DAILY_REPORTS = frozenset({"trial_balance"})
MONTHLY_REPORTS = tuple(name for name in SNAPSHOT_REPORTS if name not in DAILY_REPORTS)
# How far back report partitions go before RILLET_START_DATE: a year of monthly statements is
# what a year-over-year comparison needs, and older months can still be added by moving it.
HISTORY_MONTHS = 12

subsidiary_partitions = dg.DynamicPartitionsDefinition(name=SUBSIDIARY_PARTITIONS_NAME)


def live_subsidiaries(engine: Engine) -> list[str]:
    table = table_for("subsidiary")
    with engine.connect() as conn:
        return sorted(conn.scalars(select(table.c.id).where(table.c.deleted_at.is_(None))))


def subsidiary_partition_changes(
    engine: Engine, existing: Iterable[str]
) -> tuple[list[str], list[str]]:
    """(added, removed) that make ``rillet_subsidiaries`` the live subsidiaries + consolidated.

    Before any subsidiary is synced nothing changes: ``consolidated`` alone would let the
    period-close sensor pack a month for it and move its cursor past the real subsidiaries.
    """
    live = live_subsidiaries(engine)
    if not live:
        return [], []
    wanted, current = {*live, CONSOLIDATED}, set(existing)
    return sorted(wanted - current), sorted(current - wanted)


def subsidiary_name(engine: Engine, key: str) -> str:
    """What an analyst calls the partition's subsidiary (partition keys are Rillet's ids)."""
    if key == CONSOLIDATED:
        return "Consolidated (every subsidiary, reporting currency)"
    table = table_for("subsidiary")
    with engine.connect() as conn:
        name = conn.scalar(select(table.c.trade_name).where(table.c.id == key))
    return str(name) if name else key


def keep_subsidiary_partitions(instance: dg.DagsterInstance, engine: Engine) -> str | None:
    """Bring ``rillet_subsidiaries`` in step with the warehouse now; says what changed."""
    added, removed = subsidiary_partition_changes(
        engine, instance.get_dynamic_partitions(SUBSIDIARY_PARTITIONS_NAME)
    )
    if added:
        instance.add_dynamic_partitions(SUBSIDIARY_PARTITIONS_NAME, added)
    for key in removed:
        instance.delete_dynamic_partition(SUBSIDIARY_PARTITIONS_NAME, key)
    if added or removed:
        return f"subsidiary partitions: added {added}, removed {removed}"
    return None


def reports_start(settings: Settings) -> date:
    """The first day of report partitions: HISTORY_MONTHS before the start date's month."""
    months = settings.start_date.year * 12 + settings.start_date.month - 1 - HISTORY_MONTHS
    return date(months // 12, months % 12 + 1, 1)


def daily_report_partitions(settings: Settings) -> dg.MultiPartitionsDefinition:
    # end_offset=0: the last partition is yesterday, the last complete day.
    days = dg.DailyPartitionsDefinition(start_date=reports_start(settings).isoformat())
    return dg.MultiPartitionsDefinition({PERIOD: days, SUBSIDIARY: subsidiary_partitions})


def monthly_report_partitions(settings: Settings) -> dg.MultiPartitionsDefinition:
    # end_offset=0: the last partition is the last complete month.
    months = dg.MonthlyPartitionsDefinition(start_date=reports_start(settings).isoformat())
    return dg.MultiPartitionsDefinition({PERIOD: months, SUBSIDIARY: subsidiary_partitions})


def partitions_for(name: str, settings: Settings) -> dg.MultiPartitionsDefinition:
    if name in DAILY_REPORTS:
        return daily_report_partitions(settings)
    return monthly_report_partitions(settings)


def report_asset_key(name: str) -> dg.AssetKey:
    catalog.report(name)  # an unknown name fails here, with the known ones listed
    return dg.AssetKey(["rillet", "reports", name])


def partition_key(period: str, subsidiary: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({PERIOD: period, SUBSIDIARY: subsidiary})


def month_end(day: date) -> date:
    return day.replace(day=calendar.monthrange(day.year, day.month)[1])


@dataclass(frozen=True)
class ReportPeriod:
    """What one partition asks Rillet for."""

    start: date | None  # None: a balance as of ``end``
    end: date
    subsidiary_key: str

    def params(self) -> dict[str, str]:
        params = (
            {"as_of_date": self.end.isoformat()}
            if self.start is None
            else {"from_date": self.start.isoformat(), "to_date": self.end.isoformat()}
        )
        if self.subsidiary_key != CONSOLIDATED:
            params["subsidiary_id"] = self.subsidiary_key
        return params

    def key(self, report: str) -> ReportKey:
        return ReportKey(report, self.start, self.end, self.subsidiary_key)


def report_period(spec: ReportSpec, period_key: str, subsidiary_key: str) -> ReportPeriod:
    """The request behind a partition.

    Trial balance (daily key): month to date, from the first of the month through the day, so
    the ending balance is the balance as of the day and the debit and credit totals are the
    month's activity so far. Balance sheet (monthly key): as of the month's last day. Other
    statements (monthly key): the whole month.
    """
    day = date.fromisoformat(period_key)
    if spec.name in DAILY_REPORTS:
        return ReportPeriod(day.replace(day=1), day, subsidiary_key)
    if "as_of_date" in spec.required:
        return ReportPeriod(None, month_end(day), subsidiary_key)
    return ReportPeriod(day, month_end(day), subsidiary_key)


def period_of_partition(
    spec: ReportSpec, partitions: dg.MultiPartitionsDefinition, key: str
) -> ReportPeriod:
    dimensions = partitions.get_partition_key_from_str(key).keys_by_dimension
    return report_period(spec, dimensions[PERIOD], dimensions[SUBSIDIARY])


def _headline(lines: list[store.ReportLine]) -> str:
    """Section totals, summaries and totals as a markdown table (money as text)."""
    shown = [line for line in lines if line.line_type in ("section", "summary", "total")]
    if not shown:
        return "_the report has no totals for this partition_"
    rows = ["| line | column | measure | amount |", "|---|---|---|---|"]
    for line in shown:
        amount = "" if line.amount is None else format(line.amount, "f")
        currency = f" {line.currency}" if line.currency else ""
        column = line.breakdown_name or line.breakdown_id or ""
        rows.append(f"| {line.name} | {column} | {line.measure} | {amount}{currency} |")
    return "\n".join(rows)


def _description(spec: ReportSpec) -> str:
    grain = (
        "One partition per day (month to date) and subsidiary"
        if spec.name in DAILY_REPORTS
        else "One partition per month and subsidiary"
    )
    return (
        f"{spec.description} Rillet's {spec.path}, stored in long form in "
        f"`{store.LINES_TABLE}` (report = '{spec.name}'). {grain}; `consolidated` is the "
        "organization in its reporting currency."
    )


def report_asset(spec: ReportSpec, partitions: dg.MultiPartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        key=report_asset_key(spec.name),
        description=_description(spec),
        group_name=GROUP,
        partitions_def=partitions,
        kinds={"rillet", "sql"},
        tags={"rillet/report": spec.name},
        retry_policy=dg.RetryPolicy(
            max_retries=2, delay=10, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
        ),
    )
    def snapshot(
        context: dg.AssetExecutionContext, rillet: RilletResource, warehouse: WarehouseResource
    ) -> dg.MaterializeResult:
        period = period_of_partition(spec, partitions, context.partition_key)
        with rillet.client() as client:
            body = client.report(spec.name, **period.params())
            stats = client.stats.as_metadata()
        lines = store.flatten_report(spec.name, body)
        engine = warehouse.engine
        store.ensure_report_schema(engine)
        written = store.replace_partition(
            engine,
            period.key(spec.name),
            body,
            lines,
            run_id=context.run.run_id,
            snapshot_at=datetime.now(UTC),
        )
        metadata: dict[str, Any] = {
            "dagster/partition_row_count": written,
            "dagster/table_name": store.LINES_TABLE,
            "period_start": period.start.isoformat() if period.start else "",
            "period_end": period.end.isoformat(),
            "subsidiary": period.subsidiary_key,
            "subsidiary_name": subsidiary_name(engine, period.subsidiary_key),
            "currency": str(body.get("currency") or ""),
            "totals": dg.MetadataValue.md(_headline(lines)),
            **{f"api_{k}": v for k, v in stats.items()},
        }
        return dg.MaterializeResult(metadata=metadata)

    return snapshot


def build_report_assets(settings: Settings) -> list[dg.AssetsDefinition]:
    return [
        report_asset(catalog.report(name), partitions_for(name, settings))
        for name in SNAPSHOT_REPORTS
    ]
