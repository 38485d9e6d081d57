"""Retention: applied webhook events and their warehouse ledger rows are purged after an age.

The queue keeps each raw body (up to the receiver's body cap) and the warehouse keeps one ledger
row per applied event; without a purge both grow with every delivery. Applied and discarded
events older than ``RILLET_EVENT_RETENTION_DAYS`` (default 7) go daily, so the queue holds at most
that many days of traffic whatever the load; pending, quarantined, poison and unknown events stay
until they are applied or an operator acts (``rillet-dagster events``).

No ``from __future__ import annotations``: Dagster reads the op's annotations at definition time.
"""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import dagster as dg
from sqlalchemy import Engine

from rillet_dagster.resources import RilletResource, WarehouseResource
from rillet_dagster.settings import Settings
from rillet_dagster.warehouse import state
from rillet_dagster.warehouse.applied import ensure_applied_table, purge_applied

PURGE_JOB = "purge_webhook_events"


@dataclass(frozen=True)
class Purged:
    events: int
    ledger_rows: int
    cutoff: datetime


def purge(state_engine: Engine, warehouse: Engine, days: float, now: datetime) -> Purged:
    """Delete what settled more than ``days`` before ``now``, in both databases."""
    cutoff = now - timedelta(days=days)
    with state_engine.begin() as connection:
        state.ensure_state_schema(connection)
        events = state.purge_settled(connection, cutoff)
    with warehouse.begin() as connection:
        ensure_applied_table(connection)
        ledger_rows = purge_applied(connection, cutoff)
    return Purged(events, ledger_rows, cutoff)


class PurgeConfig(dg.Config):
    retention_days: float = 7.0


def purge_job(settings: Settings) -> dg.JobDefinition:
    @dg.op(
        name="purge_settled_webhook_events",
        description="Delete applied and discarded webhook events (and their warehouse ledger "
        "rows) older than the retention period.",
    )
    def purge_op(
        context: dg.OpExecutionContext,
        config: PurgeConfig,
        rillet: RilletResource,
        warehouse: WarehouseResource,
    ) -> dg.Output[int]:
        if not 0 < config.retention_days <= 3650:
            raise dg.DagsterInvariantViolationError(
                f"retention_days={config.retention_days} must be between 0 and 3650"
            )
        state_engine = state.make_state_engine(rillet.state_url)
        try:
            purged = purge(state_engine, warehouse.engine, config.retention_days, datetime.now(UTC))
        finally:
            state_engine.dispose()
        context.log.info(
            f"purged {purged.events} webhook events and {purged.ledger_rows} ledger rows "
            f"settled before {purged.cutoff.isoformat()}"
        )
        return dg.Output(
            purged.events,
            metadata={
                "events_purged": purged.events,
                "ledger_rows_purged": purged.ledger_rows,
                "cutoff": purged.cutoff.isoformat(),
            },
        )

    @dg.job(
        name=PURGE_JOB,
        executor_def=dg.in_process_executor,
        config={
            "ops": {
                "purge_settled_webhook_events": {
                    "config": {"retention_days": settings.event_retention_days}
                }
            }
        },
        tags={"rillet/trigger": "retention"},
        description="Purge applied webhook events older than RILLET_EVENT_RETENTION_DAYS "
        f"(now {settings.event_retention_days:g} days); quarantined ones are kept.",
    )
    def _job() -> None:
        purge_op()

    return _job


def purge_schedule(job: dg.JobDefinition) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name="daily_webhook_event_purge",
        job=job,
        cron_schedule="41 3 * * *",
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Every night, purge webhook events applied longer ago than the retention "
        "period, so that the queue and the warehouse ledger stay bounded.",
    )
