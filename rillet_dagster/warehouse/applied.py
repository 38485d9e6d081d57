"""Which webhook events the warehouse already holds, written with the rows they changed.

The queue lives in the state database and the rows in the warehouse, which may be two
databases. So a run records each event it applies in this warehouse table, in the very
transaction that writes the rows; marking the queue row ``applied`` comes after. If a run dies
between the two, the next run finds the event here and only marks it, never applies it twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy import Column, Connection, MetaData, String, Table, delete, select
from sqlalchemy.dialects import postgresql, sqlite

from rillet_dagster.warehouse.types import UtcDateTime

APPLIED_TABLE = "rillet_applied_webhook_events"

APPLIED_METADATA = MetaData()

applied_events = Table(
    APPLIED_TABLE,
    APPLIED_METADATA,
    Column("id", String(36), primary_key=True, comment="X-Rillet-Id of the applied event"),
    Column("entity", String(64), nullable=False),
    Column("event", String(64), nullable=False),
    Column("applied_at", UtcDateTime(), nullable=False),
    Column("run_id", String(64), nullable=False),
    comment="One row per webhook event whose change is in the warehouse.",
)

_CHUNK = 500


def ensure_applied_table(connection: Connection) -> None:
    APPLIED_METADATA.create_all(connection, checkfirst=True)


def already_applied(connection: Connection, ids: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(ids), _CHUNK):
        chunk = list(ids[start : start + _CHUNK])
        found.update(
            connection.scalars(select(applied_events.c.id).where(applied_events.c.id.in_(chunk)))
        )
    return found


def record_applied(
    connection: Connection,
    events: Iterable[tuple[str, str, str]],
    *,
    run_id: str,
    at: datetime,
) -> None:
    """Record ``(id, entity, event)`` triples as applied; ids already recorded are kept."""
    rows = [
        {"id": i, "entity": entity, "event": event, "applied_at": at, "run_id": run_id}
        for i, entity, event in events
    ]
    if not rows:
        return
    insert = postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert
    connection.execute(insert(applied_events).on_conflict_do_nothing(), rows)


def purge_applied(connection: Connection, older_than: datetime) -> int:
    """Forget events applied before ``older_than``; returns how many rows went.

    A row is only needed while its queue row may still say ``pending`` (a run that died
    between the two commits); the next run settles that within minutes, so days of retention
    are ample.
    """
    result = connection.execute(
        delete(applied_events).where(applied_events.c.applied_at < older_than)
    )
    return result.rowcount
