"""Sensors. Each sensor is built by its own function; add new ones beside them the same way.

* :func:`subsidiary_partitions_sensor`: keeps the dynamic partitions ``rillet_subsidiaries`` in
  step with the synced ``subsidiaries`` table (plus ``consolidated``).
* :func:`period_close_sensor`: when Rillet's last closed period moves forward, requests the
  month-end pack for each newly closed month and every subsidiary partition.
* :func:`models_after_sync_sensor`: after every successful ``sync_all``, rebuilds the analyst
  models and runs their checks.

No ``from __future__ import annotations`` here: Dagster reads the sensor functions'
annotations at definition time to find their resources.
"""

from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta

import dagster as dg

from rillet_dagster.assets.reports import (
    SUBSIDIARY_PARTITIONS_NAME,
    reports_start,
    subsidiary_partition_changes,
    subsidiary_partitions,
)
from rillet_dagster.automation.jobs import refresh_models, sync_all
from rillet_dagster.automation.report_schedules import (
    month_end_pack_job,
    month_end_requests,
    month_start,
    subsidiary_keys,
)
from rillet_dagster.resources import RilletResource, WarehouseResource
from rillet_dagster.settings import Settings


def subsidiary_partitions_sensor() -> dg.SensorDefinition:
    @dg.sensor(
        name="rillet_subsidiary_partitions",
        minimum_interval_seconds=300,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Keep the report partitions rillet_subsidiaries equal to the synced "
        "subsidiaries (plus consolidated); the subsidiaries sync does it too, this is the "
        "backstop. Report rows of a removed subsidiary stay in the warehouse.",
    )
    def _sensor(
        context: dg.SensorEvaluationContext, warehouse: WarehouseResource
    ) -> dg.SensorResult | dg.SkipReason:
        existing = context.instance.get_dynamic_partitions(SUBSIDIARY_PARTITIONS_NAME)
        added, removed = subsidiary_partition_changes(warehouse.engine, existing)
        if not added and not removed:
            if not existing:
                return dg.SkipReason("no subsidiaries synced yet")
            return dg.SkipReason(f"{len(existing)} subsidiary partitions, all current")
        requests: list[dg.AddDynamicPartitionsRequest | dg.DeleteDynamicPartitionsRequest] = []
        if added:
            requests.append(subsidiary_partitions.build_add_request(added))
        if removed:
            requests.append(subsidiary_partitions.build_delete_request(removed))
        context.log.info(f"subsidiary partitions: added {added}, removed {removed}")
        return dg.SensorResult(dynamic_partitions_requests=requests)

    return _sensor


def _months(first: date, last: date) -> list[date]:
    months = []
    month = month_start(first)
    while month <= last:
        months.append(month)
        month = date(month.year + month.month // 12, month.month % 12 + 1, 1)
    return months


def period_close_sensor(settings: Settings) -> dg.SensorDefinition:
    """The cursor is the end date of the last closed period already handled.

    Without a cursor (first tick) only the latest closed month is requested: the history is a
    backfill, not a flood of runs. When the period moves forward by several months at once,
    each of them is requested. Without subsidiary partitions yet nothing is requested and the
    cursor stays, so the next tick tries again.
    """
    first = reports_start(settings)

    @dg.sensor(
        name="rillet_period_close",
        job=month_end_pack_job,
        minimum_interval_seconds=900,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="When Rillet's last closed period (/books/periods/last-closed) moves "
        "forward, take the month-end pack of each newly closed month for every subsidiary.",
    )
    def _sensor(
        context: dg.SensorEvaluationContext, rillet: RilletResource
    ) -> dg.SensorResult | dg.SkipReason:
        with rillet.client() as client:
            period = client.get_single("book_period")
        if period is None:
            return dg.SkipReason("Rillet has not closed any period yet")
        closed_end = date.fromisoformat(str(period["end"]))
        handled = date.fromisoformat(context.cursor) if context.cursor else None
        if handled is not None and closed_end <= handled:
            return dg.SkipReason(f"last closed period still ends {closed_end}")
        subsidiaries = subsidiary_keys(context.instance)
        if not subsidiaries:
            return dg.SkipReason("no subsidiary partitions yet; will retry")
        # A month's partition exists once the month is over (by this machine's clock): a close
        # that looks later than that waits, and the cursor stops at what was requested.
        newest = previous_month_end(datetime.now(UTC).date())
        reachable = min(closed_end, newest)
        start = reachable if handled is None else handled.replace(day=1)
        months = [m for m in _months(start, reachable) if m >= first and _closed(m, reachable)]
        if handled is not None:
            months = [m for m in months if m > month_start(handled)]
        requests = _requests(months, subsidiaries, str(period.get("closed_on") or ""))
        return dg.SensorResult(
            run_requests=requests, cursor=max(reachable, handled or reachable).isoformat()
        )

    return _sensor


def previous_month_end(today: date) -> date:
    return today.replace(day=1) - timedelta(days=1)


def _closed(month: date, closed_end: date) -> bool:
    """A month is closed when the closed period reaches its last day."""
    following = date(month.year + month.month // 12, month.month % 12 + 1, 1)
    return following.toordinal() - 1 <= closed_end.toordinal()


def _requests(
    months: Sequence[date], subsidiaries: Sequence[str], closed_on: str
) -> list[dg.RunRequest]:
    # closed_on is in the run key: run keys are deduplicated forever, so after a cursor reset a
    # later close of the same month is still packed, while a repeat of one close is not.
    return [
        request
        for month in months
        for request in month_end_requests(
            month,
            subsidiaries,
            run_key_prefix=f"period-close-{closed_on}",
            trigger="period_close",
        )
    ]


def models_after_sync_sensor() -> dg.SensorDefinition:
    """Models follow the synced tables: the hourly backstop keeps them at most an hour behind
    (webhook runs change single rows and do not rebuild them)."""

    @dg.run_status_sensor(
        name="rillet_models_after_sync",
        run_status=dg.DagsterRunStatus.SUCCESS,
        monitored_jobs=[sync_all],
        request_job=refresh_models,
        minimum_interval_seconds=5,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="After every successful sync_all, rebuild the analyst models (refresh_models) "
        "and run their checks.",
    )
    def _sensor(context: dg.RunStatusSensorContext) -> dg.RunRequest:
        return dg.RunRequest(
            run_key=f"models-after-{context.dagster_run.run_id}",
            tags={"rillet/after_run": context.dagster_run.run_id},
        )

    return _sensor


def build_report_sensors(settings: Settings) -> list[dg.SensorDefinition]:
    return [subsidiary_partitions_sensor(), period_close_sensor(settings)]
