"""Schedules: the hourly backstop sync of today's partition (catches anything a webhook missed)."""

from __future__ import annotations

import dagster as dg

from rillet_dagster.automation.jobs import sync_all


def hourly_backstop(partitions: dg.DailyPartitionsDefinition) -> dg.ScheduleDefinition:
    @dg.schedule(
        name="hourly_backstop_sync",
        job=sync_all,
        cron_schedule="17 * * * *",
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Every hour, sync today's partition of every entity (and the full-refresh "
        "entities) so that nothing a webhook missed stays missing for long.",
    )
    def _schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        today = partitions.get_partition_key_for_timestamp(
            context.scheduled_execution_time.timestamp()
        )
        return dg.RunRequest(
            run_key=f"backstop-{context.scheduled_execution_time.isoformat()}",
            partition_key=today,
            tags={"rillet/trigger": "schedule"},
        )

    return _schedule
