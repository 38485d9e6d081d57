"""``rillet_webhook_sensor``: turns the webhook queue into runs of the affected entity assets.

Pending events are found by their status, never by a cursor of the highest id seen (on
PostgreSQL, transactions commit out of id order, so such a cursor skips events). Per entity with
pending events the sensor requests one run of its asset for the current partition, in
events-only mode (the bodies carry the objects: no API pass). A ``run_key`` is deduplicated by
Dagster forever, so the key carries an age generation: events still pending after
``stale_after_seconds`` (a failed run, a daemon that was down) get a new key and a new run.
A run already queued for the entity is left to pick them up, so a burst makes no run storm.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime

import dagster as dg

from rillet_dagster import catalog
from rillet_dagster.resources import RilletResource
from rillet_dagster.warehouse import state

SENSOR_NAME = "rillet_webhook_sensor"
TRIGGER_TAG = "rillet/trigger"
ENTITY_TAG = "rillet/entity"
# Ahead of backfills (priority 0); dagster.yaml caps concurrent webhook runs.
WEBHOOK_PRIORITY = "10"
_WAITING = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
]


def webhook_sensor(
    entity_assets: Sequence[dg.AssetsDefinition],
    *,
    minimum_interval_seconds: int = 5,
    stale_after_seconds: float = 180.0,
) -> dg.SensorDefinition:
    by_entity = {
        spec.webhook_entity: (spec, asset)
        for asset in entity_assets
        for spec in [catalog.entity(asset.op.name.removeprefix("sync_"))]
        if spec.webhook_entity
    }
    keys = [key for _, asset in by_entity.values() for key in asset.keys]

    @dg.sensor(
        name=SENSOR_NAME,
        minimum_interval_seconds=minimum_interval_seconds,
        target=dg.AssetSelection.assets(*keys),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Requests a run of each entity asset that has verified webhook events "
        "waiting in the queue (events-only, today's partition, ahead of backfills).",
    )
    def rillet_webhook_sensor(
        context: dg.SensorEvaluationContext, rillet: RilletResource
    ) -> dg.SensorResult:
        engine = state.make_state_engine(rillet.state_url)
        try:
            with engine.begin() as connection:
                state.ensure_state_schema(connection)
                summary = state.pending_summary(connection)
        finally:
            engine.dispose()
        now = datetime.now(UTC)
        requests: list[dg.RunRequest] = []
        keys_by_entity: dict[str, str] = {}
        for webhook_entity, pending in sorted(summary.items()):
            if webhook_entity not in by_entity:
                continue
            spec, asset = by_entity[webhook_entity]
            if _waiting_run(context.instance, spec.name):
                continue
            generation = int(
                (now - pending.oldest_received_at).total_seconds() // stale_after_seconds
            )
            run_key = (
                f"webhook:{spec.name}:{pending.oldest_received_at.isoformat()}:"
                f"{pending.count}:{generation}"
            )
            keys_by_entity[spec.name] = run_key
            partitions = asset.partitions_def
            requests.append(
                dg.RunRequest(
                    run_key=run_key,
                    asset_selection=list(asset.keys),
                    partition_key=partitions.get_last_partition_key() if partitions else None,
                    run_config={"ops": {asset.op.name: {"config": {"events_only": True}}}},
                    tags={
                        TRIGGER_TAG: "webhook",
                        ENTITY_TAG: spec.name,
                        "dagster/priority": WEBHOOK_PRIORITY,
                    },
                )
            )
        if not requests:
            return dg.SensorResult(
                skip_reason=f"no webhook events waiting ({sum(p.count for p in summary.values())}"
                " pending, each already has a queued run)"
                if summary
                else "no webhook events waiting",
                cursor=context.cursor,
            )
        return dg.SensorResult(run_requests=requests, cursor=json.dumps(keys_by_entity))

    return rillet_webhook_sensor


def _waiting_run(instance: dg.DagsterInstance, entity: str) -> bool:
    runs = instance.get_run_records(
        filters=dg.RunsFilter(statuses=_WAITING, tags={TRIGGER_TAG: "webhook", ENTITY_TAG: entity}),
        limit=1,
    )
    return bool(runs)
