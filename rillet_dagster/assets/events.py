"""Apply the queued webhook events of one entity to the warehouse.

Rillet's webhook bodies are the whole object, so most events cost no API request: a full body
is upserted (monotonic, so an older event arriving late never wins), a delete body (the bare
id) soft-deletes with the event's time as the tombstone, and anything else (say a payment
object on ``PAYMENT_UPDATED``) is read again by id. A body whose ``updated_at`` lies beyond
:data:`MAX_FUTURE_SKEW` is not trusted either (it would pin the row against older-looking true
versions): its record is read again. Each batch of events is recorded in the warehouse in the
transaction that writes its rows, then marked applied in the queue.

One bad event never stops the others. A batch that fails for a reason of its own (a body the
warehouse cannot store, an id Rillet refuses) is split in halves until the failing events stand
alone; such an event is tried once more from Rillet's current version of its record (reading
Rillet heals the row), and if that fails too it is quarantined with both errors. Failures that
say nothing about the events (Rillet or a database unreachable, a wrong API key) fail the run
and leave every event pending for the next one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine

from rillet_dagster.catalog import EntitySpec, WebhookEvent
from rillet_dagster.clock import parse_timestamp
from rillet_dagster.rillet.client import RilletClient
from rillet_dagster.rillet.errors import (
    MalformedResponseError,
    NotFoundError,
    RilletAPIError,
    RilletConnectionError,
    RilletError,
)
from rillet_dagster.warehouse import load, state
from rillet_dagster.warehouse.applied import already_applied, ensure_applied_table, record_applied
from rillet_dagster.warehouse.types import loads

BATCH_SIZE = 500
# Where a non-object body names the record to read again (CARBON's payment shape).
_PARENT_ID_FIELDS = ("invoice_id", "credit_memo_id")
# A body stamped further ahead than this is read again from Rillet: clocks drift by seconds,
# not by a quarter of an hour, so such a stamp is a bug or a forgery, not news.
MAX_FUTURE_SKEW = timedelta(minutes=15)
# Rillet statuses that are about the request's record, not about Rillet or the key.
_RECORD_STATUSES = frozenset({400, 404, 410, 422})


@dataclass
class AppliedEvents:
    """What applying the queue did for one entity in one run."""

    events: int = 0
    already_applied: int = 0
    upserted: int = 0
    fetched: int = 0
    deleted: int = 0
    healed: int = 0
    quarantined: int = 0
    first_quarantine_error: str | None = None
    result: load.UpsertResult | None = None
    records: list[dict[str, Any]] | None = None

    def merge(self, other: AppliedEvents) -> None:
        self.events += other.events
        self.already_applied += other.already_applied
        self.upserted += other.upserted
        self.fetched += other.fetched
        self.deleted += other.deleted
        self.healed += other.healed
        self.quarantined += other.quarantined
        self.first_quarantine_error = self.first_quarantine_error or other.first_quarantine_error


@dataclass
class _Plan:
    bodies: dict[str, dict[str, Any]]  # full objects by record id (newest wins in the load)
    deletes: dict[str, datetime]  # record id -> deletion time
    fetch: set[str]  # record ids to read again


@dataclass
class _Run:
    """One run's context; ``fetched`` keeps Rillet's answers while a failing batch is split,
    so that no record is read twice (``None``: Rillet says it is gone)."""

    spec: EntitySpec
    client: RilletClient
    engine: Engine
    state_engine: Engine
    run_id: str
    log: Any
    on_records: Any
    fetched: dict[str, dict[str, Any] | None] = field(default_factory=dict)


def queue_entity(spec: EntitySpec) -> str:
    """The queue's entity name for ``spec``: its webhook entity, else its canonical name (for
    records a sync pass could not store)."""
    return spec.webhook_entity or state.canonical_name(spec.name)


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` says nothing about the events being applied (retry them all later)."""
    if isinstance(error, httpx.TransportError | RilletConnectionError | MalformedResponseError):
        return True
    if isinstance(error, RilletAPIError):
        return error.status not in _RECORD_STATUSES
    if isinstance(error, RilletError):
        return True
    if isinstance(error, sa_exc.DBAPIError):
        return error.connection_invalidated or isinstance(
            error, sa_exc.OperationalError | sa_exc.InterfaceError
        )
    return isinstance(error, sa_exc.DisconnectionError | sa_exc.TimeoutError | OSError)


def describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 1000 else text[:997] + "..."


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

    Raises:
        Exception: a transient failure (see :func:`is_transient`); the events stay pending.
    """
    if spec.webhook_entity is None:
        return AppliedEvents()
    with engine.begin() as connection:
        ensure_applied_table(connection)
    with state_engine.begin() as connection:
        state.ensure_state_schema(connection)
    run = _Run(spec, client, engine, state_engine, run_id, log, on_records)
    total = AppliedEvents()
    while total.events < max_events:
        with state_engine.connect() as connection:
            pending = state.pending_events(connection, spec.webhook_entity, limit=BATCH_SIZE)
        if not pending:
            break
        done = _apply_isolating(run, pending)
        total.merge(done)
        log.info(
            f"{spec.name}: applied {done.events - done.quarantined} webhook events "
            f"({done.upserted} from their bodies, {done.fetched} read again, {done.deleted} "
            f"deletions, {done.already_applied} already in the warehouse, {done.healed} healed "
            f"from Rillet), {done.quarantined} quarantined"
        )
    return total


def _apply_isolating(run: _Run, events: list[state.QueuedEvent]) -> AppliedEvents:
    """Apply ``events`` in one transaction; on a failure of their own, split until the
    failing ones stand alone (each good event still applies in this run)."""
    ids = [event.id for event in events]
    try:
        done = _apply_batch(run, events)
    except Exception as error:
        if is_transient(error):
            with run.state_engine.begin() as connection:
                state.record_failure(connection, ids, describe(error))
            raise
        if len(events) == 1:
            return _heal_or_quarantine(run, events[0], error)
        middle = len(events) // 2
        done = _apply_isolating(run, events[:middle])
        done.merge(_apply_isolating(run, events[middle:]))
        return done
    with run.state_engine.begin() as connection:
        state.mark_applied(connection, ids, run.run_id)
    return done


def _heal_or_quarantine(run: _Run, event: state.QueuedEvent, error: BaseException) -> AppliedEvents:
    """A lone event that failed from its body: apply Rillet's current version of its record
    instead (the event's change is in it, or superseded); if that fails too, quarantine it."""
    first = describe(error)
    run.log.warning(f"{run.spec.name}: webhook event {event.id} could not be applied: {first}")
    record_id = _record_id_of(event)
    problem = "no record id in the body to read again"
    if record_id is not None:
        try:
            healed = _apply_batch(run, [event], read_again=record_id)
        except Exception as retry_error:
            if is_transient(retry_error):
                with run.state_engine.begin() as connection:
                    state.record_failure(connection, [event.id], first)
                raise
            problem = f"reading {run.spec.name} {record_id!r} again: {describe(retry_error)}"
        else:
            with run.state_engine.begin() as connection:
                state.mark_applied(connection, [event.id], run.run_id)
            run.log.info(f"{run.spec.name}: healed event {event.id} from Rillet's version")
            healed.healed = 1
            return healed
    reason = f"{first}; then {problem}"
    with run.state_engine.begin() as connection:
        state.quarantine(connection, event.id, reason)
    run.log.warning(f"{run.spec.name}: quarantined webhook event {event.id}: {reason}")
    return AppliedEvents(events=1, quarantined=1, first_quarantine_error=reason)


def _record_id_of(event: state.QueuedEvent) -> str | None:
    try:
        body = loads(event.body)
    except (ValueError, RecursionError):
        return None
    if isinstance(body, str) and event.event == WebhookEvent.DELETED:
        return body
    return _parent_id(body)


def _apply_batch(
    run: _Run, pending: list[state.QueuedEvent], *, read_again: str | None = None
) -> AppliedEvents:
    spec = run.spec
    with run.engine.connect() as connection:
        done = already_applied(connection, [event.id for event in pending])
    todo = [event for event in pending if event.id not in done]
    if read_again is None:
        plan = _plan(spec, todo, now=datetime.now(UTC))
    else:
        plan = _Plan(bodies={}, deletes={}, fetch={read_again} if todo else set())
    fetched = _fetch(run, plan)
    records = [*plan.bodies.values(), *fetched]
    now = datetime.now(UTC)
    with run.engine.begin() as connection:
        result = load.upsert_records(
            connection, spec, list(plan.bodies.values()), run_id=run.run_id, synced_at=now
        )
        # Rillet's own answers are the truth, whatever a stored (webhook) stamp says.
        _add(
            result,
            load.upsert_records(
                connection, spec, fetched, run_id=run.run_id, synced_at=now, authoritative=True
            ),
        )
        deleted = 0
        for record_id, at in plan.deletes.items():
            deleted += load.soft_delete(connection, spec, [record_id], at, run_id=run.run_id)
        record_applied(
            connection, [(e.id, e.entity, e.event) for e in todo], run_id=run.run_id, at=now
        )
        if run.on_records is not None:
            run.on_records(records, result)
    return AppliedEvents(
        events=len(pending),
        already_applied=len(pending) - len(todo),
        upserted=len(plan.bodies),
        fetched=len(fetched),
        deleted=deleted,
        result=result,
        records=records,
    )


def _add(total: load.UpsertResult, more: load.UpsertResult) -> None:
    for counter in fields(more):
        setattr(total, counter.name, getattr(total, counter.name) + getattr(more, counter.name))


def _plan(spec: EntitySpec, events: list[state.QueuedEvent], *, now: datetime) -> _Plan:
    plan = _Plan(bodies={}, deletes={}, fetch=set())
    trusted_until = now + MAX_FUTURE_SKEW
    untrusted: set[str] = set()
    for event in events:
        body = loads(event.body)
        if event.event == WebhookEvent.DELETED:
            record_id = body if isinstance(body, str) else _id_of(body)
            if not record_id:
                raise ValueError("a DELETED body must be the deleted id (a JSON string)")
            # The latest deletion time wins; soft_delete keeps tombstones monotonic too.
            previous = plan.deletes.get(record_id)
            if previous is None or event.event_timestamp > previous:
                plan.deletes[record_id] = event.event_timestamp
            continue
        if _is_whole(spec, body):
            if _stamped_ahead(body, trusted_until):
                untrusted.add(body["id"])
                continue
            current = plan.bodies.get(body["id"])
            if current is None or str(body.get("updated_at", "")) >= str(
                current.get("updated_at", "")
            ):
                plan.bodies[body["id"]] = body
            continue
        parent = _parent_id(body)
        if not parent:
            raise ValueError(f"a {event.event} body must be an object with a string id")
        plan.fetch.add(parent)
    for record_id in untrusted:
        plan.bodies.pop(record_id, None)
    plan.fetch |= untrusted
    plan.fetch -= set(plan.bodies)
    return plan


def _stamped_ahead(body: Mapping[str, Any], trusted_until: datetime) -> bool:
    stamp = body.get("updated_at")
    if not isinstance(stamp, str):
        return False
    try:
        return parse_timestamp(stamp) > trusted_until
    except (ValueError, OverflowError):
        return False  # the loader refuses it with the field's name


def _fetch(run: _Run, plan: _Plan) -> list[dict[str, Any]]:
    records = []
    for record_id in sorted(plan.fetch):
        if record_id not in run.fetched:
            try:
                run.fetched[record_id] = run.client.get(run.spec.name, record_id)
            except NotFoundError:
                run.fetched[record_id] = None
        record = run.fetched[record_id]
        if record is None:
            plan.deletes.setdefault(record_id, datetime.now(UTC))
        else:
            records.append(record)
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
