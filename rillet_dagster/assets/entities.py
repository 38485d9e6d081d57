"""One ``@multi_asset`` per catalog entity, generated from the catalog (no hand-written copies).

Entities whose lists accept ``updated.gt`` are partitioned by day of ``updated_at`` with a
single-run backfill policy: a run over partitions [a, b) makes ONE pass with ``updated.gt = a``
(less the look-back), so backfilling K days costs one pass, not K. The first partition also
takes everything updated before it, and such a run is a complete pass that soft-deletes
records Rillet no longer has. Other entities are refreshed in full on every run.

No ``from __future__ import annotations`` here: Dagster reads the asset functions' annotations
at definition time to find their config and resources.
"""

from datetime import UTC, datetime, time
from typing import Any

import dagster as dg

from rillet_dagster import catalog
from rillet_dagster.assets.events import queue_entity
from rillet_dagster.assets.reports import keep_subsidiary_partitions
from rillet_dagster.assets.sync import Window, asset_key, sync_entity
from rillet_dagster.catalog import EntitySpec
from rillet_dagster.resources import RilletResource, WarehouseResource
from rillet_dagster.settings import Settings
from rillet_dagster.warehouse import state

# Bill payments have no feed of their own: they are read per changed bill, by the bill asset.
_RIDES_WITH = {"bill_payment": "bill"}


def daily_partitions(settings: Settings) -> dg.DailyPartitionsDefinition:
    # end_offset=1 includes today, so that fresh changes have a partition to land in.
    return dg.DailyPartitionsDefinition(start_date=settings.start_date.isoformat(), end_offset=1)


class SyncConfig(dg.Config):
    full_refresh: bool = False  # read everything and soft-delete what Rillet no longer has
    # Apply the queued webhook events only, without reading Rillet's list (webhook runs).
    events_only: bool = False


def _description(spec: EntitySpec) -> str:
    grain = spec.description
    if spec.incremental:
        return (
            f"{grain} A partition holds the records last updated on that day (the first one "
            "also everything before it); a run over several days reads Rillet once."
        )
    return f"{grain} Refreshed in full on every run; records Rillet no longer has are soft-deleted."


def _specs(spec: EntitySpec) -> list[dg.AssetSpec]:
    tables = [(spec.name, _description(spec))]
    tables += [
        (child.name, f"One row is one element of {spec.name}.{child.field}, keyed by parent id.")
        for child in spec.children
    ]
    tables += [
        (name, _description(catalog.entity(name)))
        for name, host in _RIDES_WITH.items()
        if host == spec.name
    ]
    return [
        dg.AssetSpec(
            key=asset_key(name),
            description=description,
            group_name=spec.group,
            kinds={"rillet", "sql"},
            tags={"rillet/entity": spec.name},
        )
        for name, description in tables
    ]


QUARANTINE_CHECK = "nothing_quarantined"


def quarantine_check_spec(spec: EntitySpec) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(
        QUARANTINE_CHECK,
        asset=asset_key(spec.name),
        description=f"No {spec.name} webhook event or record is set aside because it could not "
        "be stored (quarantined); when one is, the metadata names the first error and the "
        "command that lists, requeues or discards them.",
    )


def quarantine_check_result(spec: EntitySpec, state_url: str) -> dg.AssetCheckResult:
    """How many of the entity's events and records are quarantined, from the state database."""
    entity = queue_entity(spec)
    engine = state.make_state_engine(state_url)
    try:
        with engine.begin() as connection:
            state.ensure_state_schema(connection)
            summary = state.quarantine_summary(connection).get(entity)
    finally:
        engine.dispose()
    metadata: dict[str, Any] = {"quarantined": 0 if summary is None else summary.count}
    if summary is not None:
        metadata |= {
            "first_error": summary.first_error,
            "first_event_id": summary.first_event_id,
            "what_to_do": f"rillet-dagster events list --entity {entity}; after a fix, "
            f"rillet-dagster events requeue --entity {entity} (or discard)",
        }
    return dg.AssetCheckResult(
        asset_key=asset_key(spec.name),
        check_name=QUARANTINE_CHECK,
        passed=summary is None,
        severity=dg.AssetCheckSeverity.WARN,
        metadata=metadata,
    )


# Transient failures (a restarted database, Rillet down for a minute) are retried by Dagster;
# the load is idempotent, so a retried step converges on the same rows.
SYNC_RETRY_POLICY = dg.RetryPolicy(
    max_retries=2, delay=10, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)


def entity_asset(
    spec: EntitySpec,
    partitions: dg.DailyPartitionsDefinition,
    retry_policy: dg.RetryPolicy = SYNC_RETRY_POLICY,
) -> dg.AssetsDefinition:
    partitioned = spec.incremental

    @dg.multi_asset(
        name=f"sync_{spec.name}",
        specs=_specs(spec),
        check_specs=[quarantine_check_spec(spec)],
        partitions_def=partitions if partitioned else None,
        backfill_policy=dg.BackfillPolicy.single_run() if partitioned else None,
        can_subset=False,
        retry_policy=retry_policy,
    )
    def sync(
        context: dg.AssetExecutionContext,
        config: SyncConfig,
        rillet: RilletResource,
        warehouse: WarehouseResource,
    ):
        window = Window(start=None, end=None, full=True)
        if partitioned and not config.full_refresh:
            time_window = context.partition_time_window
            first = datetime.combine(partitions.start.date(), time(), UTC)
            window = Window(
                start=time_window.start.astimezone(UTC),
                end=time_window.end.astimezone(UTC),
                full=time_window.start.astimezone(UTC) <= first,
            )
        with rillet.client() as client:
            yield from sync_entity(
                spec,
                client,
                warehouse.engine,
                window=window,
                run_id=context.run.run_id,
                log=context.log,
                state_url=rillet.state_url,
                read_rillet=not config.events_only,
            )
        check = dg.AssetCheckKey(asset_key(spec.name), QUARANTINE_CHECK)
        if check in context.selected_asset_check_keys:
            yield quarantine_check_result(spec, rillet.state_url)
        if spec.name == "subsidiary":
            # Report partitions follow the subsidiaries as soon as they are synced, so that a
            # first sync can be followed by every subsidiary's reports at once.
            changed = keep_subsidiary_partitions(context.instance, warehouse.engine)
            if changed:
                context.log.info(changed)

    return sync


def build_entity_assets(settings: Settings) -> list[dg.AssetsDefinition]:
    partitions = daily_partitions(settings)
    return [
        entity_asset(spec, partitions) for spec in catalog.ENTITIES if spec.name not in _RIDES_WITH
    ]
