"""Apply the queued webhook events of one entity to the warehouse.

Rillet's webhook bodies are the whole object, so most events cost no API request: a full body
is upserted (monotonic, so an older event arriving late never wins), a delete body (the bare
id) soft-deletes with the event's time as the tombstone, and anything else (say a payment
object on ``PAYMENT_UPDATED``) is read again by id. Each batch of events is recorded in the
warehouse in the transaction that writes its rows, then marked applied in the queue; a failure
leaves every event of the batch pending for the next run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Engine

from rillet_dagster.catalog import EntitySpec, WebhookEvent
from rillet_dagster.rillet.client import RilletClient
from rillet_dagster.rillet.errors import NotFoundError
from rillet_dagster.warehouse import load, state
from rillet_dagster.warehouse.applied import already_applied, ensure_applied_table, record_applied
from rillet_dagster.warehouse.load import RecordSchemaError
from rillet_dagster.warehouse.types import loads

BATCH_SIZE = 500
# Where a non-object body names the record to read again (CARBON's payment shape).
_PARENT_ID_FIELDS = ("invoice_id", "credit_memo_id")


@dataclass
class AppliedEvents:
    """What applying the queue did for one entity in one run."""

    events: int = 0
    already_applied: int = 0
    upserted: int = 0
    fetched: int = 0
    deleted: int = 0
    result: load.UpsertResult | None = None
    records: list[dict[str, Any]] | None = None

    def merge(self, other: AppliedEvents) -> None:
        self.events += other.events
        self.already_applied += other.already_applied
        self.upserted += other.upserted
        self.fetched += other.fetched
        self.deleted += other.deleted


@dataclass
class _Plan:
    bodies: dict[str, dict[str, Any]]  # full objects by record id (newest wins in the load)
    deletes: dict[str, datetime]  # record id -> deletion time
    fetch: set[str]  # record ids to read again


def apply_pending_events(
    spec: EntitySpec,
    client: RilletClient,
    engine: Engine,
    state_engine: Engine,
    *,
    run_id: str,
    log: Any,
    max_events: int = 50_000,
    on_records: Any = None,
) -> AppliedEvents:
    """Apply every pending event of ``spec`` (oldest first, in batches); returns the totals.

    Args:
        on_records: called with each batch's upserted records and its UpsertResult, so the
            caller can count rows and fetch dependants (bill payments).
    """
    if spec.webhook_entity is None:
        return AppliedEvents()
    with engine.begin() as connection:
        ensure_applied_table(connection)
    with state_engine.begin() as connection:
        state.ensure_state_schema(connection)
    total = AppliedEvents()
    while total.events < max_events:
        with state_engine.connect() as connection:
            pending = state.pending_events(connection, spec.webhook_entity, limit=BATCH_SIZE)
        if not pending:
            break
        ids = [event.id for event in pending]
        try:
            done = _apply_batch(spec, client, engine, pending, run_id, on_records)
        except Exception as error:
            with state_engine.begin() as connection:
                state.record_failure(connection, ids, f"{type(error).__name__}: {error}")
            raise
        with state_engine.begin() as connection:
            state.mark_applied(connection, ids, run_id)
        total.merge(done)
        log.info(
            f"{spec.name}: applied {done.events} webhook events ({done.upserted} from their "
            f"bodies, {done.fetched} read again, {done.deleted} deletions, "
            f"{done.already_applied} already in the warehouse)"
        )
    return total


def _apply_batch(
    spec: EntitySpec,
    client: RilletClient,
    engine: Engine,
    pending: list[state.QueuedEvent],
    run_id: str,
    on_records: Any,
) -> AppliedEvents:
    with engine.connect() as connection:
        done = already_applied(connection, [event.id for event in pending])
    todo = [event for event in pending if event.id not in done]
    plan = _plan(spec, todo)
    fetched = _fetch(spec, client, plan)
    records = [*plan.bodies.values(), *fetched]
    now = datetime.now(UTC)
    with engine.begin() as connection:
        try:
            result = load.upsert_records(connection, spec, records, run_id=run_id, synced_at=now)
        except RecordSchemaError:
            # A body that looked whole but is not: read those records again instead.
            plan.fetch.update(plan.bodies)
            plan.bodies.clear()
            records = _fetch(spec, client, plan)
            fetched = records
            result = load.upsert_records(connection, spec, records, run_id=run_id, synced_at=now)
        deleted = 0
        for record_id, at in plan.deletes.items():
            deleted += load.soft_delete(connection, spec, [record_id], at, run_id=run_id)
        record_applied(connection, [(e.id, e.entity, e.event) for e in todo], run_id=run_id, at=now)
        if on_records is not None:
            on_records(records, result)
    return AppliedEvents(
        events=len(pending),
        already_applied=len(pending) - len(todo),
        upserted=len(plan.bodies),
        fetched=len(fetched),
        deleted=deleted,
        result=result,
        records=records,
    )


def _plan(spec: EntitySpec, events: list[state.QueuedEvent]) -> _Plan:
    plan = _Plan(bodies={}, deletes={}, fetch=set())
    for event in events:
        body = loads(event.body)
        if event.event == WebhookEvent.DELETED:
            record_id = body if isinstance(body, str) else _id_of(body)
            if record_id:
                # The latest deletion time wins; soft_delete keeps tombstones monotonic too.
                previous = plan.deletes.get(record_id)
                if previous is None or event.event_timestamp > previous:
                    plan.deletes[record_id] = event.event_timestamp
            continue
        if _is_whole(spec, body):
            current = plan.bodies.get(body["id"])
            if current is None or str(body.get("updated_at", "")) >= str(
                current.get("updated_at", "")
            ):
                plan.bodies[body["id"]] = body
            continue
        parent = _parent_id(body)
        if parent:
            plan.fetch.add(parent)
    plan.fetch -= set(plan.bodies)
    return plan


def _fetch(spec: EntitySpec, client: RilletClient, plan: _Plan) -> list[dict[str, Any]]:
    records = []
    for record_id in sorted(plan.fetch):
        try:
            records.append(client.get(spec.name, record_id))
        except NotFoundError:
            plan.deletes.setdefault(record_id, datetime.now(UTC))
    return records


def _is_whole(spec: EntitySpec, body: Any) -> bool:
    if not isinstance(body, Mapping) or not isinstance(body.get("id"), str):
        return False
    if spec.has_updated_at and not isinstance(body.get("updated_at"), str):
        return False
    return not any(field in body for field in _PARENT_ID_FIELDS)


def _parent_id(body: Any) -> str | None:
    if isinstance(body, Mapping):
        for field in _PARENT_ID_FIELDS:
            if isinstance(body.get(field), str):
                return body[field]
        return _id_of(body)
    return None


def _id_of(body: Any) -> str | None:
    if isinstance(body, Mapping) and isinstance(body.get("id"), str):
        return body["id"]
    return None
