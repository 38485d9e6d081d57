"""The durable webhook queue in the state database (``RILLET_STATE_URL``).

One row per delivered event, keyed by ``X-Rillet-Id``: the receiver inserts it and commits
(SQLite ``synchronous=FULL``, PostgreSQL's default synchronous commit) before it answers 2xx, so
an acknowledged event survives a crash. A redelivery of a stored id changes nothing but the
``duplicates`` counter. The sensor side reads :func:`pending_events`, groups them by entity and,
in the transaction that writes the warehouse rows, calls :func:`mark_applied`.

Statuses:
    ``pending``: verified, known entity/event, waiting to be applied.
    ``applied``: its change is in the warehouse (``applied_at``, ``run_id``).
    ``poison``: validly signed but the body is not JSON of the expected shape; kept for
        inspection, never applied (``error`` says why).
    ``unknown``: validly signed for an entity/event pair the catalog does not know (Rillet added
        one); acknowledged as Rillet requires, kept, not applied.
    ``quarantined``: could not be applied, neither from its body nor from Rillet's current
        version of its record (``error`` says why); set aside so that every other event
        applies, kept until ``rillet-dagster events requeue`` or ``discard``.
    ``discarded``: a quarantined event an operator gave up on (``applied_at`` holds when).

Retention: :func:`purge_settled` deletes applied and discarded events after an age (the
``purge_webhook_events`` schedule); pending, quarantined, poison and unknown rows stay until an
operator acts on them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    delete,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from rillet_dagster.warehouse.schema import SQLITE_BEGIN_IMMEDIATE, make_engine
from rillet_dagster.warehouse.types import UtcDateTime

WEBHOOK_EVENTS_TABLE = "rillet_webhook_events"

EventStatus = Literal["pending", "applied", "poison", "unknown", "quarantined", "discarded"]
STATUSES: tuple[EventStatus, ...] = (
    "pending",
    "applied",
    "poison",
    "unknown",
    "quarantined",
    "discarded",
)
# What an operator may requeue or discard.
SET_ASIDE: tuple[EventStatus, ...] = ("quarantined", "poison", "unknown")
# The event name of a record that a sync pass read from Rillet but could not store.
SYNC_REFUSED = "SYNC_REFUSED"

STATE_METADATA = MetaData()

webhook_events = Table(
    WEBHOOK_EVENTS_TABLE,
    STATE_METADATA,
    Column("id", String(36), primary_key=True, comment="X-Rillet-Id, lower-case"),
    Column("entity", String(64), nullable=False, comment="canonical X-Rillet-Entity (INVOICE)"),
    Column("event", String(64), nullable=False, comment="canonical X-Rillet-Event (CREATED)"),
    Column("received_at", UtcDateTime(), nullable=False),
    Column("event_timestamp", UtcDateTime(), nullable=False, comment="X-Rillet-Timestamp"),
    Column("body", LargeBinary(), nullable=False, comment="raw request body, byte for byte"),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer(), nullable=False, server_default=text("0")),
    Column("duplicates", Integer(), nullable=False, server_default=text("0")),
    Column("last_duplicate_at", UtcDateTime(), nullable=True),
    Column("applied_at", UtcDateTime(), nullable=True),
    Column("run_id", String(64), nullable=True),
    Column("error", Text(), nullable=True),
    # The sensor's query: pending events oldest first (optionally of one entity).
    Index("ix_rillet_webhook_events_status_received", "status", "received_at"),
)


@dataclass(frozen=True)
class QueuedEvent:
    """One row of the queue."""

    id: str
    entity: str
    event: str
    received_at: datetime
    event_timestamp: datetime
    body: bytes
    status: EventStatus = "pending"
    attempts: int = 0
    duplicates: int = 0
    error: str | None = None


@dataclass(frozen=True)
class PendingSummary:
    count: int
    oldest_received_at: datetime
    newest_received_at: datetime


def canonical_name(value: str) -> str:
    """``payment-updated`` and ``PAYMENT_UPDATED`` are the same event name."""
    return value.strip().upper().replace("-", "_")


def make_state_engine(
    url: str,
    *,
    busy_timeout_seconds: float = 5.0,
    connect_timeout_seconds: int = 5,
    pre_ping: bool = True,
    **engine_kwargs: Any,
) -> Engine:
    """An engine for the queue with short waits, so that a locked or unreachable database
    becomes an error (HTTP 503) well within Rillet's 30 s delivery timeout.

    SQLite: WAL, ``synchronous=FULL`` (a commit survives power loss) and a ``busy_timeout`` of
    ``busy_timeout_seconds``. PostgreSQL: ``connect_timeout`` and, with ``pre_ping``, a ping on
    each checkout so that a restarted server costs no failed request (a caller that retries
    on ``connection_invalidated`` itself can save that round trip).
    """
    if url.startswith("sqlite"):
        engine = make_engine(url, sqlite_synchronous="FULL", **engine_kwargs)
        busy_ms = int(busy_timeout_seconds * 1000)

        # Registered after make_engine's own hook, so this busy timeout replaces its 30 s one.
        @event.listens_for(engine, "connect")
        def _busy_timeout(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            finally:
                cursor.close()

        return engine.execution_options(**{SQLITE_BEGIN_IMMEDIATE: True})
    connect_args = dict(engine_kwargs.pop("connect_args", {}))
    connect_args.setdefault("connect_timeout", connect_timeout_seconds)
    return make_engine(url, pool_pre_ping=pre_ping, connect_args=connect_args, **engine_kwargs)


def ensure_state_schema(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        # Concurrent CREATE TABLEs (two receivers starting) race on the catalog.
        connection.execute(text("SELECT pg_advisory_xact_lock(hashtext('rillet_webhook_events'))"))
    STATE_METADATA.create_all(connection, checkfirst=True)


def _insert(connection: Connection) -> Any:
    if connection.dialect.name == "postgresql":
        return postgresql.insert(webhook_events)
    if connection.dialect.name == "sqlite":
        return sqlite.insert(webhook_events)
    raise ValueError(
        f"the webhook queue supports SQLite and PostgreSQL, not {connection.dialect.name}"
    )


def _upsert(connection: Connection) -> Any:
    """INSERT ... ON CONFLICT (id) DO UPDATE duplicates + 1 RETURNING duplicates, built once."""
    dialect = connection.dialect.name
    statement = _UPSERTS.get(dialect)
    if statement is None:
        base = _insert(connection)
        statement = base.on_conflict_do_update(
            index_elements=[webhook_events.c.id],
            set_={
                "duplicates": webhook_events.c.duplicates + 1,
                "last_duplicate_at": base.excluded.received_at,
            },
        ).returning(webhook_events.c.duplicates, sort_by_parameter_order=True)
        _UPSERTS[dialect] = statement
    return statement


_UPSERTS: dict[str, Any] = {}


def enqueue_many(connection: Connection, items: Sequence[QueuedEvent]) -> list[bool]:
    """Store each item unless its id is already queued; per item, True if it was new.

    A redelivery leaves the stored row (body, status, times) untouched and only adds 1 to
    ``duplicates``; so does a repeat of an id within ``items``. One multi-row statement does the
    work (a statement per row costs more CPU than the receiver's whole HTTP handling). The caller
    commits; only after that commit may it acknowledge the deliveries.
    """
    if not items:
        return []
    position: dict[str, int] = {}
    params = []
    repeats: dict[str, int] = {}
    for item in items:
        key = item.id.lower()
        if key in position:
            # PostgreSQL refuses to upsert one row twice in a statement; count repeats apart.
            repeats[key] = repeats.get(key, 0) + 1
            continue
        position[key] = len(params)
        params.append(
            {
                "id": key,
                "entity": item.entity,
                "event": item.event,
                "received_at": item.received_at,
                "event_timestamp": item.event_timestamp,
                "body": item.body,
                "status": item.status,
                "attempts": item.attempts,
                "duplicates": 0,
                "last_duplicate_at": None,
                "applied_at": None,
                "run_id": None,
                "error": item.error,
            }
        )
    seen = [d == 0 for d in connection.execute(_upsert(connection), params).scalars()]
    received = items[-1].received_at
    for key, count in repeats.items():
        connection.execute(
            update(webhook_events)
            .where(webhook_events.c.id == key)
            .values(duplicates=webhook_events.c.duplicates + count, last_duplicate_at=received)
        )
    results = []
    first: set[str] = set()
    for item in items:
        key = item.id.lower()
        results.append(seen[position[key]] and key not in first)
        first.add(key)
    return results


def enqueue(connection: Connection, item: QueuedEvent) -> bool:
    """Store ``item`` unless its id is already queued; True if it was new (see
    :func:`enqueue_many`)."""
    return enqueue_many(connection, [item])[0]


def count_duplicate(connection: Connection, event_id: str, at: datetime) -> bool:
    """Add 1 to ``duplicates`` of a stored id; False if the id is not in the queue."""
    result = connection.execute(
        update(webhook_events)
        .where(webhook_events.c.id == event_id.lower())
        .values(duplicates=webhook_events.c.duplicates + 1, last_duplicate_at=at)
    )
    return result.rowcount == 1


def _row(row: Any) -> QueuedEvent:
    return QueuedEvent(
        id=row.id,
        entity=row.entity,
        event=row.event,
        received_at=row.received_at,
        event_timestamp=row.event_timestamp,
        body=bytes(row.body),
        status=row.status,
        attempts=row.attempts,
        duplicates=row.duplicates,
        error=row.error,
    )


def get_event(connection: Connection, event_id: str) -> QueuedEvent | None:
    row = connection.execute(
        select(webhook_events).where(webhook_events.c.id == event_id.lower())
    ).first()
    return None if row is None else _row(row)


def pending_events(
    connection: Connection, entity: str | None = None, limit: int = 1000
) -> list[QueuedEvent]:
    """Pending events, oldest received first (ties by id), optionally of one webhook entity.

    Args:
        entity: ``X-Rillet-Entity`` value in any accepted form (``INVOICE``, ``credit-memo``).
        limit: at most this many rows.
    """
    query = select(webhook_events).where(webhook_events.c.status == "pending")
    if entity is not None:
        query = query.where(webhook_events.c.entity == canonical_name(entity))
    query = query.order_by(webhook_events.c.received_at, webhook_events.c.id).limit(limit)
    return [_row(row) for row in connection.execute(query)]


def mark_applied(
    connection: Connection, ids: Iterable[str], run_id: str, at: datetime | None = None
) -> int:
    """Mark pending events applied by ``run_id``; returns how many changed.

    Call it in the transaction that writes their warehouse rows, so that both commit or neither.
    """
    id_list = [i.lower() for i in ids]
    if not id_list:
        return 0
    result = connection.execute(
        update(webhook_events)
        .where(webhook_events.c.id.in_(id_list), webhook_events.c.status == "pending")
        .values(
            status="applied",
            applied_at=at or datetime.now(UTC),
            run_id=run_id,
            attempts=webhook_events.c.attempts + 1,
            error=None,
        )
    )
    return result.rowcount


def record_failure(connection: Connection, ids: Iterable[str], error: str) -> int:
    """Count a failed apply attempt; the events stay pending and are picked up again."""
    id_list = [i.lower() for i in ids]
    if not id_list:
        return 0
    result = connection.execute(
        update(webhook_events)
        .where(webhook_events.c.id.in_(id_list), webhook_events.c.status == "pending")
        .values(attempts=webhook_events.c.attempts + 1, error=error[:2000])
    )
    return result.rowcount


def pending_summary(connection: Connection) -> dict[str, PendingSummary]:
    """Per canonical webhook entity: how many events are pending, the oldest and newest arrival."""
    rows = connection.execute(
        select(
            webhook_events.c.entity,
            func.count().label("count"),
            func.min(webhook_events.c.received_at).label("oldest"),
            func.max(webhook_events.c.received_at).label("newest"),
        )
        .where(webhook_events.c.status == "pending")
        .group_by(webhook_events.c.entity)
    )
    return {
        row.entity: PendingSummary(int(row.count), _utc(row.oldest), _utc(row.newest))
        for row in rows
    }


def _utc(moment: datetime | str) -> datetime:
    # min() and max() over a TypeDecorator column come back raw on SQLite (ISO text).
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def queue_counters(connection: Connection) -> dict[str, int]:
    """Rows per status (every status present, 0 if none) and ``duplicates``: redeliveries seen."""
    counts = dict.fromkeys(STATUSES, 0)
    for status, count in connection.execute(
        select(webhook_events.c.status, func.count()).group_by(webhook_events.c.status)
    ):
        counts[status] = int(count)
    total = connection.execute(select(func.coalesce(func.sum(webhook_events.c.duplicates), 0)))
    return {**counts, "duplicates": int(total.scalar_one())}


def ids_present(connection: Connection, ids: Sequence[str]) -> set[str]:
    """Which of ``ids`` are in the queue (any status)."""
    wanted = [i.lower() for i in ids]
    found: set[str] = set()
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        found.update(
            connection.execute(
                select(webhook_events.c.id).where(webhook_events.c.id.in_(chunk))
            ).scalars()
        )
    return found


def quarantine(connection: Connection, event_id: str, error: str) -> int:
    """Set a pending event aside with its error; the others go on without it."""
    result = connection.execute(
        update(webhook_events)
        .where(webhook_events.c.id == event_id.lower(), webhook_events.c.status == "pending")
        .values(status="quarantined", attempts=webhook_events.c.attempts + 1, error=error[:4000])
    )
    return result.rowcount


@dataclass(frozen=True)
class QuarantineSummary:
    count: int
    first_error: str
    first_event_id: str


def quarantine_summary(connection: Connection) -> dict[str, QuarantineSummary]:
    """Per canonical entity: how many events are quarantined and the oldest one's error."""
    counts = dict(
        connection.execute(
            select(webhook_events.c.entity, func.count())
            .where(webhook_events.c.status == "quarantined")
            .group_by(webhook_events.c.entity)
        ).all()
    )
    summaries = {}
    for entity, count in counts.items():
        first = connection.execute(
            select(webhook_events.c.id, webhook_events.c.error)
            .where(webhook_events.c.status == "quarantined", webhook_events.c.entity == entity)
            .order_by(webhook_events.c.received_at, webhook_events.c.id)
            .limit(1)
        ).one()
        summaries[entity] = QuarantineSummary(int(count), first.error or "", first.id)
    return summaries


def set_aside_events(
    connection: Connection,
    *,
    entity: str | None = None,
    statuses: Sequence[EventStatus] = ("quarantined",),
    limit: int = 1000,
) -> list[QueuedEvent]:
    """Quarantined (or other set-aside) events, oldest first, optionally of one entity."""
    query = select(webhook_events).where(webhook_events.c.status.in_(list(statuses)))
    if entity is not None:
        query = query.where(webhook_events.c.entity == canonical_name(entity))
    query = query.order_by(webhook_events.c.received_at, webhook_events.c.id).limit(limit)
    return [_row(row) for row in connection.execute(query)]


def _set_aside_where(
    ids: Sequence[str] | None, entity: str | None, statuses: Sequence[EventStatus]
) -> Any:
    unknown = set(statuses) - set(SET_ASIDE)
    if unknown:
        raise ValueError(f"only {', '.join(SET_ASIDE)} events can be requeued or discarded")
    condition = webhook_events.c.status.in_(list(statuses))
    if ids is not None:
        condition = condition & webhook_events.c.id.in_([i.lower() for i in ids])
    if entity is not None:
        condition = condition & (webhook_events.c.entity == canonical_name(entity))
    return condition


def requeue(
    connection: Connection,
    *,
    ids: Sequence[str] | None = None,
    entity: str | None = None,
    statuses: Sequence[EventStatus] = ("quarantined",),
) -> tuple[int, int]:
    """Make set-aside events pending again (attempts and error cleared).

    A record that a sync pass could not store has no event to replay: its row is removed, and
    the next full pass reads the record again. Returns ``(requeued, removed)``.
    """
    where = _set_aside_where(ids, entity, statuses)
    removed = connection.execute(
        delete(webhook_events).where(where, webhook_events.c.event == SYNC_REFUSED)
    ).rowcount
    requeued = connection.execute(
        update(webhook_events)
        .where(where)
        .values(status="pending", attempts=0, error=None, applied_at=None, run_id=None)
    ).rowcount
    return requeued, removed


def discard(
    connection: Connection,
    *,
    ids: Sequence[str] | None = None,
    entity: str | None = None,
    statuses: Sequence[EventStatus] = ("quarantined",),
    at: datetime | None = None,
) -> int:
    """Give up on set-aside events: ``discarded``, purged with the applied ones later."""
    result = connection.execute(
        update(webhook_events)
        .where(_set_aside_where(ids, entity, statuses))
        .values(status="discarded", applied_at=at or datetime.now(UTC))
    )
    return result.rowcount


def purge_settled(connection: Connection, older_than: datetime) -> int:
    """Delete applied and discarded events settled before ``older_than``; returns how many."""
    result = connection.execute(
        delete(webhook_events).where(
            webhook_events.c.status.in_(["applied", "discarded"]),
            webhook_events.c.applied_at < older_than,
        )
    )
    return result.rowcount
