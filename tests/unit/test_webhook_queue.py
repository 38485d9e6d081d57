"""The durable webhook queue (``warehouse/state.py``) on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from rillet_dagster.warehouse.state import (
    QueuedEvent,
    count_duplicate,
    enqueue,
    enqueue_many,
    ensure_state_schema,
    get_event,
    ids_present,
    make_state_engine,
    mark_applied,
    pending_events,
    pending_summary,
    queue_counters,
    record_failure,
)
from tests.pg import postgres_url

T0 = datetime(2026, 11, 28, 12, tzinfo=UTC)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
    else:
        url = postgres_url("webhook_queue")
    engine = make_state_engine(url)
    with engine.begin() as connection:
        ensure_state_schema(connection)
        ensure_state_schema(connection)  # idempotent
    yield engine
    engine.dispose()


def event(n: int, entity: str = "INVOICE", minutes: int = 0, **overrides: object) -> QueuedEvent:
    values: dict[str, object] = {
        "id": str(uuid.UUID(int=n)),
        "entity": entity,
        "event": "CREATED",
        "received_at": T0 + timedelta(minutes=minutes),
        "event_timestamp": T0 - timedelta(seconds=1),
        "body": b'{"id":"x","memo":"caf\xc3\xa9"}  ',
        **overrides,
    }
    return QueuedEvent(**values)  # type: ignore[arg-type]


def test_enqueue_once_and_count_redeliveries(engine: Engine) -> None:  # W9
    first = event(1)
    with engine.begin() as connection:
        assert enqueue(connection, first)
    with engine.begin() as connection:
        assert not enqueue(connection, event(1, body=b"other", minutes=5))
        assert not enqueue(connection, event(1, minutes=6))
    with engine.connect() as connection:
        stored = get_event(connection, first.id.upper())
        assert stored is not None
        assert stored.body == first.body  # raw bytes, untouched by the redeliveries
        assert stored.received_at == first.received_at
        assert stored.duplicates == 2
        assert queue_counters(connection) == {
            "pending": 1, "applied": 0, "poison": 0, "unknown": 0, "quarantined": 0,
            "discarded": 0, "duplicates": 2,
        }  # fmt: skip


def test_enqueue_many_with_repeats_in_one_batch(engine: Engine) -> None:  # W16
    with engine.begin() as connection:
        enqueue(connection, event(1))
    batch = [event(2), event(1), event(2), event(3), event(2)]
    with engine.begin() as connection:
        assert enqueue_many(connection, batch) == [True, False, False, True, False]
        assert enqueue_many(connection, []) == []
    with engine.connect() as connection:
        counters = queue_counters(connection)
        assert (counters["pending"], counters["duplicates"]) == (3, 3)
        assert get_event(connection, event(2).id).duplicates == 2  # type: ignore[union-attr]


def test_count_duplicate_only_for_stored_ids(engine: Engine) -> None:
    with engine.begin() as connection:
        enqueue(connection, event(1))
        assert count_duplicate(connection, event(1).id, T0)
        assert not count_duplicate(connection, event(2).id, T0)
    with engine.connect() as connection:
        assert ids_present(connection, [event(1).id, event(2).id]) == {event(1).id}


def test_pending_oldest_first_by_entity_then_applied(engine: Engine) -> None:
    with engine.begin() as connection:
        enqueue(connection, event(3, minutes=3))
        enqueue(connection, event(1, minutes=1))
        enqueue(connection, event(2, "CREDIT_MEMO", minutes=2))
        enqueue(connection, event(4, "BILL", minutes=0, status="poison", error="not JSON"))
        enqueue(connection, event(5, "THING", minutes=0, status="unknown"))
    with engine.connect() as connection:
        assert [e.id for e in pending_events(connection)] == [event(n).id for n in (1, 2, 3)]
        assert [e.id for e in pending_events(connection, "invoice")] == [event(1).id, event(3).id]
        assert [e.id for e in pending_events(connection, "credit-memo")] == [event(2).id]
        assert len(pending_events(connection, limit=1)) == 1
        summary = pending_summary(connection)
    assert {
        k: (v.count, v.oldest_received_at, v.newest_received_at) for k, v in summary.items()
    } == {
        "INVOICE": (2, T0 + timedelta(minutes=1), T0 + timedelta(minutes=3)),
        "CREDIT_MEMO": (1, T0 + timedelta(minutes=2), T0 + timedelta(minutes=2)),
    }
    with engine.begin() as connection:
        assert record_failure(connection, [event(1).id], "run failed") == 1
        assert mark_applied(connection, [event(1).id, event(4).id], "run-1", at=T0) == 1
        assert mark_applied(connection, [], "run-1") == 0
    with engine.connect() as connection:
        applied = get_event(connection, event(1).id)
        assert applied is not None
        assert (applied.status, applied.attempts, applied.error) == ("applied", 2, None)
        assert get_event(connection, event(4).id).status == "poison"  # type: ignore[union-attr]
        assert [e.id for e in pending_events(connection)] == [event(2).id, event(3).id]
        assert queue_counters(connection)["applied"] == 1


def test_sqlite_is_durable_and_fails_fast(tmp_path: Path) -> None:
    engine = make_state_engine(f"sqlite:///{tmp_path / 's.db'}", busy_timeout_seconds=0.25)
    with engine.connect() as connection:
        pragmas = [
            connection.exec_driver_sql(f"PRAGMA {name}").scalar()
            for name in ("journal_mode", "synchronous", "busy_timeout")
        ]
    assert pragmas == ["wal", 2, 250]  # synchronous=FULL is 2
    engine.dispose()


@pytest.mark.postgres
def test_postgres_commits_synchronously() -> None:
    engine = make_state_engine(postgres_url("webhook_queue_sync"))
    with engine.connect() as connection:
        assert connection.execute(text("SHOW synchronous_commit")).scalar() == "on"
    engine.dispose()
