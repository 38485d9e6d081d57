"""``rillet_webhook_sensor``: turns the webhook queue into runs of ``apply_webhook_events``.

Pending events are found by their status, never by a cursor of the highest id seen (on
PostgreSQL, transactions commit out of id order, so such a cursor skips events). One run applies
every entity that has pending events, in one process (the ``apply_webhook_events`` job), in
events-only mode: the bodies carry the objects, so the run reads no list from Rillet, makes
almost no API request and claims no pool; it neither waits behind a sync nor blocks one. An
entity without webhooks of its own (invoice payments) is read incrementally in the runs of the
entity whose events announce it (``INVOICE``'s ``PAYMENT_UPDATED``): a request or two.

Run grouping: events are gathered for ``gather_seconds`` before a run is requested; an entity
already covered by a webhook run that has not started yet is left to that
run (it reads the queue when it starts), so a burst of events makes one queued run, not a storm;
``dagster.yaml`` lets one webhook run execute at a time. A ``run_key`` is deduplicated by Dagster
forever, so the key names the newest pending event (a later event makes a new key) and an age
generation: events still pending after ``stale_after_seconds`` (a failed run, a daemon that was
down) get a new key and so a new run.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import dagster as dg

from rillet_dagster import catalog
from rillet_dagster.resources import RilletResource
from rillet_dagster.warehouse import state

SENSOR_NAME = "rillet_webhook_sensor"
JOB_NAME = "apply_webhook_events"
TRIGGER_TAG = "rillet/trigger"
ENTITIES_TAG = "rillet/entities"
# Ahead of syncs and backfills; dagster.yaml runs one webhook run at a time.
WEBHOOK_PRIORITY = "10"
# A run is requested once the oldest pending event has waited this long (or this many events
# wait): each run costs a process start (seconds of CPU), so a steady stream is applied by a run
# every ~15 s rather than back to back, still well inside the 30 s that a change may take.
GATHER_SECONDS = 10.0
GATHER_EVENTS = 500
_WAITING = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
]


def webhook_fed(
    entity_assets: Sequence[dg.AssetsDefinition],
) -> dict[str, tuple[catalog.EntitySpec, dg.AssetsDefinition]]:
    """Webhook entity name (``INVOICE``) -> its catalog entry and entity asset."""
    return {
        spec.webhook_entity: (spec, asset)
        for asset in entity_assets
        for spec in [catalog.entity(asset.op.name.removeprefix("sync_"))]
        if spec.webhook_entity
    }


def read_alongside(
    entity_assets: Sequence[dg.AssetsDefinition],
) -> dict[str, list[dg.AssetsDefinition]]:
    """Webhook entity name -> entity assets without webhooks of their own that its events
    announce (invoice payments, on ``INVOICE``'s ``PAYMENT_UPDATED``)."""
    alongside: dict[str, list[dg.AssetsDefinition]] = {}
    for asset in entity_assets:
        spec = catalog.entity(asset.op.name.removeprefix("sync_"))
        if spec.read_on_webhooks_of:
            alongside.setdefault(spec.read_on_webhooks_of, []).append(asset)
    return alongside


def webhook_job(entity_assets: Sequence[dg.AssetsDefinition]) -> dg.UnresolvedAssetJobDefinition:
    keys = [key for _, asset in webhook_fed(entity_assets).values() for key in asset.keys]
    keys += [
        key for assets in read_alongside(entity_assets).values() for a in assets for key in a.keys
    ]
    # In one process: each step applies a batch of bodies to the warehouse in well under a
    # second, while a subprocess per step would spend seconds importing.
    return dg.define_asset_job(
        JOB_NAME,
        selection=dg.AssetSelection.assets(*keys),
        executor_def=dg.in_process_executor,
        description="Apply the verified webhook events waiting in the queue to the warehouse "
        "(events-only: no list is read from Rillet). Launched by rillet_webhook_sensor for the "
        "entities that have pending events.",
        tags={TRIGGER_TAG: "webhook", "dagster/priority": WEBHOOK_PRIORITY},
    )


def webhook_sensor(
    entity_assets: Sequence[dg.AssetsDefinition],
    job: dg.UnresolvedAssetJobDefinition | None = None,
    *,
    minimum_interval_seconds: int = 5,
    stale_after_seconds: float = 180.0,
    gather_seconds: float = GATHER_SECONDS,
) -> dg.SensorDefinition:
    by_entity = webhook_fed(entity_assets)
    alongside = read_alongside(entity_assets)

    @dg.sensor(
        name=SENSOR_NAME,
        minimum_interval_seconds=minimum_interval_seconds,
        job=job or webhook_job(entity_assets),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Requests one apply_webhook_events run for the entities that have verified "
        "webhook events waiting in the queue (events-only, today's partition, ahead of syncs).",
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
        pending = {name: summary[name] for name in sorted(summary) if name in by_entity}
        if not pending:
            return dg.SensorResult(skip_reason="no webhook events waiting")
        now = datetime.now(UTC)
        oldest = min(p.oldest_received_at for p in pending.values())
        waited = (now - oldest).total_seconds()
        if waited < gather_seconds and sum(p.count for p in pending.values()) < GATHER_EVENTS:
            return dg.SensorResult(
                skip_reason=f"gathering webhook events: the oldest has waited {waited:.0f} s "
                f"of {gather_seconds:g}"
            )
        covered = _covered_by_waiting_runs(context.instance)
        todo = {
            name: waiting
            for name, waiting in pending.items()
            if by_entity[name][0].name not in covered
        }
        if not todo:
            count = sum(p.count for p in pending.values())
            return dg.SensorResult(
                skip_reason=f"{count} webhook events waiting; a queued run will apply them"
            )
        oldest = min(p.oldest_received_at for p in todo.values())
        newest = max(p.newest_received_at for p in todo.values())
        generation = int((now - oldest).total_seconds() // stale_after_seconds)
        names = [by_entity[name][0].name for name in todo]
        assets = [by_entity[name][1] for name in todo]
        # Read incrementally (today's partition), not from events: they have none of their own.
        companions = [a for name in todo for a in alongside.get(name, []) if a not in assets]
        partitioned = next((a.partitions_def for a in assets if a.partitions_def), None)
        request = dg.RunRequest(
            run_key=f"webhook:{','.join(names)}:{newest.isoformat()}:{generation}",
            asset_selection=[key for asset in [*assets, *companions] for key in asset.keys],
            partition_key=partitioned.get_last_partition_key() if partitioned else None,
            run_config={
                "ops": {
                    **{asset.op.name: {"config": {"events_only": True}} for asset in assets},
                    **{asset.op.name: {"config": {"events_only": False}} for asset in companions},
                }
            },
            tags={ENTITIES_TAG: ",".join(names)},
        )
        return dg.SensorResult(run_requests=[request])

    return rillet_webhook_sensor


def _covered_by_waiting_runs(instance: dg.DagsterInstance) -> set[str]:
    """Entities that a webhook run not yet started will apply when it starts."""
    records = instance.get_run_records(
        filters=dg.RunsFilter(statuses=_WAITING, tags={TRIGGER_TAG: "webhook"}), limit=50
    )
    return {
        name
        for record in records
        for name in record.dagster_run.tags.get(ENTITIES_TAG, "").split(",")
        if name
    }
