"""Report jobs and schedules: the daily trial-balance snapshot and the month-end pack fallback.

Every run asks for one multi-partition key (period x subsidiary), one run per subsidiary
partition (``consolidated`` included), so a failure in one subsidiary retries alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime, timedelta

import dagster as dg

from rillet_dagster.assets.reconciliation import reconciliation_key
from rillet_dagster.assets.reports import (
    MONTHLY_REPORTS,
    SUBSIDIARY_PARTITIONS_NAME,
    partition_key,
    report_asset_key,
    reports_start,
)
from rillet_dagster.settings import Settings

DAILY_TRIAL_BALANCE_JOB = "daily_trial_balance"
MONTH_END_PACK_JOB = "month_end_pack"

# In one process, like sync_all: each step is one API call and a small write.
daily_trial_balance_job = dg.define_asset_job(
    DAILY_TRIAL_BALANCE_JOB,
    executor_def=dg.in_process_executor,
    selection=dg.AssetSelection.assets(report_asset_key("trial_balance"), reconciliation_key()),
    description="Snapshot the trial balance (month to date) of one day and subsidiary, reconcile "
    "it with the warehouse ledger, and run both assets' checks.",
)

month_end_pack_job = dg.define_asset_job(
    MONTH_END_PACK_JOB,
    executor_def=dg.in_process_executor,
    selection=dg.AssetSelection.assets(*(report_asset_key(name) for name in MONTHLY_REPORTS)),
    description="Snapshot every monthly statement (balance sheet, income statement, cash flow, "
    "executive P&L) of one month and subsidiary, with their checks.",
)


def subsidiary_keys(instance: dg.DagsterInstance) -> list[str]:
    return sorted(instance.get_dynamic_partitions(SUBSIDIARY_PARTITIONS_NAME))


def month_start(day: date) -> date:
    return day.replace(day=1)


def previous_month(day: date) -> date:
    return month_start(month_start(day) - timedelta(days=1))


def month_end_requests(
    month: date, subsidiaries: Sequence[str], *, run_key_prefix: str, trigger: str
) -> list[dg.RunRequest]:
    """One month-end pack run per subsidiary partition of ``month``."""
    period = month.isoformat()
    return [
        dg.RunRequest(
            run_key=f"{run_key_prefix}-{period}-{subsidiary}",
            job_name=MONTH_END_PACK_JOB,
            partition_key=partition_key(period, subsidiary),
            tags={"rillet/trigger": trigger, "rillet/month": period[:7]},
        )
        for subsidiary in subsidiaries
    ]


def _scheduled_day(context: dg.ScheduleEvaluationContext) -> date:
    moment: datetime = context.scheduled_execution_time
    return moment.date()


def daily_trial_balance_schedule(settings: Settings) -> dg.ScheduleDefinition:
    first = reports_start(settings)

    @dg.schedule(
        name="daily_trial_balance_snapshot",
        job=daily_trial_balance_job,
        cron_schedule="30 2 * * *",
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Every night, snapshot yesterday's trial balance (month to date) for every "
        "subsidiary and consolidated.",
    )
    def _schedule(context: dg.ScheduleEvaluationContext) -> Sequence[dg.RunRequest] | dg.SkipReason:
        yesterday = _scheduled_day(context) - timedelta(days=1)
        if yesterday < first:
            return dg.SkipReason(f"{yesterday} is before the first report partition {first}")
        subsidiaries = subsidiary_keys(context.instance)
        if not subsidiaries:
            return dg.SkipReason(
                "no subsidiary partitions yet: sync subsidiaries and let the "
                "rillet_subsidiary_partitions sensor add them"
            )
        day = yesterday.isoformat()
        return [
            dg.RunRequest(
                run_key=f"daily-trial-balance-{day}-{subsidiary}",
                partition_key=partition_key(day, subsidiary),
                tags={"rillet/trigger": "schedule"},
            )
            for subsidiary in subsidiaries
        ]

    return _schedule


def month_end_fallback_schedule(settings: Settings) -> dg.ScheduleDefinition:
    """The month-end pack for last month, for partitions the period-close sensor has not run.

    Rillet's close can be late or never come through the API (the sensor only sees
    ``/books/periods/last-closed`` move): on the 15th the pack is taken anyway, once.
    """
    first = reports_start(settings)

    @dg.schedule(
        name="month_end_pack_fallback",
        job=month_end_pack_job,
        cron_schedule="0 6 15 * *",
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="On the 15th, take last month's statements for every subsidiary whose pack "
        "the period-close sensor has not already taken.",
    )
    def _schedule(context: dg.ScheduleEvaluationContext) -> Sequence[dg.RunRequest] | dg.SkipReason:
        month = previous_month(_scheduled_day(context))
        if month < first:
            return dg.SkipReason(f"{month} is before the first report partition {first}")
        subsidiaries = subsidiary_keys(context.instance)
        done = set.intersection(
            *(
                context.instance.get_materialized_partitions(report_asset_key(name))
                for name in MONTHLY_REPORTS
            )
        )
        missing = [s for s in subsidiaries if partition_key(month.isoformat(), s) not in done]
        if not missing:
            return dg.SkipReason(f"the {month:%Y-%m} pack exists for every subsidiary")
        return month_end_requests(
            month, missing, run_key_prefix="month-end-fallback", trigger="schedule"
        )

    return _schedule


def build_report_jobs() -> list[dg.UnresolvedAssetJobDefinition]:
    return [daily_trial_balance_job, month_end_pack_job]


def build_report_schedules(settings: Settings) -> list[dg.ScheduleDefinition]:
    return [daily_trial_balance_schedule(settings), month_end_fallback_schedule(settings)]
