"""Report schedules and sensors emit the right multi-partition run requests (no network)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pytest

from rillet_dagster import catalog
from rillet_dagster.assets.reports import (
    CONSOLIDATED,
    MONTHLY_REPORTS,
    SUBSIDIARY_PARTITIONS_NAME,
    partition_key,
    report_asset_key,
)
from rillet_dagster.definitions import build_definitions
from rillet_dagster.resources import RilletResource, WarehouseResource
from rillet_dagster.rillet.client import RilletClient
from rillet_dagster.settings import Settings
from rillet_dagster.warehouse import load
from rillet_dagster.warehouse.schema import make_engine
from tests import canary

SUBSIDIARIES = ["1b7c0000-0000-4000-8000-000000000001", "2c8d0000-0000-4000-8000-000000000002"]
ALL = sorted([*SUBSIDIARIES, CONSOLIDATED])
SUBSIDIARY = catalog.entity("subsidiary")
# What /books/periods/last-closed answers; None means 404 (never closed).
CLOSED: dict[str, dict[str, str] | None] = {"period": None}


def last_closed(request: httpx.Request) -> httpx.Response:
    assert request.url.path == "/books/periods/last-closed"
    if CLOSED["period"] is None:
        return httpx.Response(
            404,
            json={"type": "https://rillet.io/not-found", "title": "Not Found", "status": 404},
            headers={"Content-Type": "application/problem+json"},
        )
    return httpx.Response(200, json=CLOSED["period"])


class StubRillet(RilletResource):
    """The real client over an in-memory transport that serves the last closed period."""

    @contextmanager
    def client(self) -> Iterator[RilletClient]:
        client = RilletClient(
            api_key=canary.api_key("report-automation"),
            base_url="http://rillet.test",
            transport=httpx.MockTransport(last_closed),
        )
        try:
            yield client
        finally:
            client.close()


@pytest.fixture
def defs(tmp_path: Path) -> dg.Definitions:
    return build_definitions(
        Settings.from_env(
            {
                "RILLET_START_DATE": "2025-06-01",
                "RILLET_WAREHOUSE_URL": f"sqlite:///{tmp_path}/w.db",
                "RILLET_STATE_URL": f"sqlite:///{tmp_path}/s.db",
            }
        )
    )


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as instance:
        yield instance


def with_subsidiaries(instance: dg.DagsterInstance) -> dg.DagsterInstance:
    instance.add_dynamic_partitions(SUBSIDIARY_PARTITIONS_NAME, ALL)
    return instance


def evaluate_schedule(
    defs: dg.Definitions, instance: dg.DagsterInstance, name: str, when: datetime
) -> Any:
    context = dg.build_schedule_context(
        instance=instance, scheduled_execution_time=when, repository_def=defs.get_repository_def()
    )
    return defs.resolve_schedule_def(name).evaluate_tick(context)


def evaluate_sensor(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    name: str,
    resources: dict[str, Any],
    cursor: str | None = None,
) -> Any:
    with dg.build_sensor_context(
        instance=instance,
        instance_ref=instance.get_ref(),
        cursor=cursor,
        definitions=defs,
        resources=resources,
    ) as context:
        return defs.resolve_sensor_def(name).evaluate_tick(context)


def keys_of(data: Any) -> list[str]:
    return sorted(str(r.partition_key) for r in data.run_requests or [])


def stub(tmp_path: Path) -> StubRillet:
    return StubRillet(
        base_url="http://rillet.test",
        api_key=canary.api_key("report-automation"),
        state_url=f"sqlite:///{tmp_path}/s.db",
    )


def test_daily_trial_balance_snapshots_yesterday_for_every_subsidiary(
    defs: dg.Definitions, instance: dg.DagsterInstance
) -> None:
    when = datetime(2025, 11, 28, 2, 30, tzinfo=UTC)
    data = evaluate_schedule(
        defs, with_subsidiaries(instance), "daily_trial_balance_snapshot", when
    )
    assert keys_of(data) == sorted(partition_key("2025-11-27", s) for s in ALL)
    assert len({r.run_key for r in data.run_requests}) == len(ALL)
    assert all(r.tags["rillet/trigger"] == "schedule" for r in data.run_requests)
    schedule = defs.resolve_schedule_def("daily_trial_balance_snapshot")
    assert schedule.job_name == "daily_trial_balance"


def test_daily_trial_balance_skips_until_subsidiaries_are_known(
    defs: dg.Definitions, instance: dg.DagsterInstance
) -> None:
    when = datetime(2025, 11, 28, 2, 30, tzinfo=UTC)
    data = evaluate_schedule(defs, instance, "daily_trial_balance_snapshot", when)
    assert not data.run_requests and "subsidiary" in (data.skip_message or "")


def test_month_end_fallback_requests_last_month_only_where_the_pack_is_missing(
    defs: dg.Definitions, instance: dg.DagsterInstance
) -> None:
    when = datetime(2025, 11, 15, 6, 0, tzinfo=UTC)
    data = evaluate_schedule(defs, with_subsidiaries(instance), "month_end_pack_fallback", when)
    assert keys_of(data) == sorted(partition_key("2025-10-01", s) for s in ALL)
    done = partition_key("2025-10-01", SUBSIDIARIES[0])
    for name in MONTHLY_REPORTS:
        instance.report_runless_asset_event(
            dg.AssetMaterialization(report_asset_key(name), partition=done)
        )
    data = evaluate_schedule(defs, instance, "month_end_pack_fallback", when)
    assert keys_of(data) == sorted(partition_key("2025-10-01", s) for s in ALL if s != ALL[0])


def test_period_close_requests_the_month_end_pack_when_the_closed_period_moves(
    defs: dg.Definitions, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    resources = {"rillet": stub(tmp_path)}
    CLOSED["period"] = None
    data = evaluate_sensor(defs, with_subsidiaries(instance), "rillet_period_close", resources)
    assert not data.run_requests and "not closed" in (data.skip_message or "")

    CLOSED["period"] = {"id": "p1", "start": "2025-10-01", "end": "2025-10-31",
                        "status": "CLOSED", "closed_on": "2025-11-10"}  # fmt: skip
    data = evaluate_sensor(defs, instance, "rillet_period_close", resources)
    assert keys_of(data) == sorted(partition_key("2025-10-01", s) for s in ALL)
    assert {r.job_name for r in data.run_requests} == {"month_end_pack"}
    assert all(r.tags["rillet/trigger"] == "period_close" for r in data.run_requests)
    assert data.cursor == "2025-10-31"

    data = evaluate_sensor(defs, instance, "rillet_period_close", resources, cursor="2025-10-31")
    assert not data.run_requests and data.cursor in (None, "2025-10-31")

    # Two months closed at once: both packs, oldest first, and the cursor moves to the end.
    CLOSED["period"] = {"id": "p2", "start": "2025-12-01", "end": "2025-12-31",
                        "status": "CLOSED", "closed_on": "2026-01-09"}  # fmt: skip
    data = evaluate_sensor(defs, instance, "rillet_period_close", resources, cursor="2025-10-31")
    assert keys_of(data) == sorted(
        partition_key(month, s) for month in ("2025-11-01", "2025-12-01") for s in ALL
    )
    assert data.cursor == "2025-12-31"


def test_period_close_waits_for_subsidiary_partitions_without_moving_its_cursor(
    defs: dg.Definitions, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    CLOSED["period"] = {"id": "p1", "start": "2025-10-01", "end": "2025-10-31",
                        "status": "CLOSED", "closed_on": "2025-11-10"}  # fmt: skip
    data = evaluate_sensor(defs, instance, "rillet_period_close", {"rillet": stub(tmp_path)})
    assert not data.run_requests and data.cursor is None


def test_subsidiary_partitions_follow_the_synced_table(
    defs: dg.Definitions, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path}/w.db"
    resources = {"warehouse": WarehouseResource(url=url)}
    engine = make_engine(url)
    records = [
        {
            "id": s,
            "currency": "USD",
            "timezone": "UTC",
            "trade_name": f"S{i}",
            "type": "LEGAL_ENTITY",
        }
        for i, s in enumerate(SUBSIDIARIES)
    ]
    evaluate_sensor(defs, instance, "rillet_subsidiary_partitions", resources)  # creates tables
    synced_at = datetime(2026, 11, 28, tzinfo=UTC)
    with engine.begin() as conn:
        load.upsert_records(conn, SUBSIDIARY, records, run_id="r1", synced_at=synced_at)
    data = evaluate_sensor(defs, instance, "rillet_subsidiary_partitions", resources)
    (added,) = data.dynamic_partitions_requests
    assert isinstance(added, dg.AddDynamicPartitionsRequest)
    assert sorted(added.partition_keys) == ALL
    instance.add_dynamic_partitions(SUBSIDIARY_PARTITIONS_NAME, list(added.partition_keys))

    with engine.begin() as conn:
        load.soft_delete(conn, SUBSIDIARY, [SUBSIDIARIES[1]], synced_at)
    data = evaluate_sensor(defs, instance, "rillet_subsidiary_partitions", resources)
    (removed,) = data.dynamic_partitions_requests
    assert isinstance(removed, dg.DeleteDynamicPartitionsRequest)
    assert list(removed.partition_keys) == [SUBSIDIARIES[1]]
    engine.dispose()
