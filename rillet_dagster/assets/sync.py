"""One sync pass of one entity: read from Rillet, load the warehouse, report what happened.

State handling: records are upserted batch by batch (each batch one transaction, monotonic, so a
rerun after a crash neither loses nor duplicates anything); the watermark is written only after
the whole pass has been read and loaded, so it is never ahead of the committed rows. Deletions
are inferred only from a complete full pass (a partial pass proves nothing).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import dagster as dg
from sqlalchemy import func, select
from sqlalchemy.engine import Connection, Engine

from rillet_dagster import catalog
from rillet_dagster.assets.events import (
    AppliedEvents,
    apply_pending_events,
    describe,
    queue_entity,
)
from rillet_dagster.catalog import EntitySpec
from rillet_dagster.clock import parse_timestamp
from rillet_dagster.rillet.client import RilletClient
from rillet_dagster.warehouse import load, state
from rillet_dagster.warehouse.schema import table_for, table_name

BATCH_SIZE = 1000


@dataclass
class TableTally:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped_older: int = 0
    soft_deleted: int = 0
    in_window: int = 0
    preview: list[Mapping[str, Any]] = field(default_factory=list)

    def add(self, result: load.UpsertResult) -> None:
        self.inserted += result.inserted
        self.updated += result.updated
        self.unchanged += result.unchanged
        self.skipped_older += result.skipped_older


@dataclass(frozen=True)
class Window:
    """The partition range of a run: [start, end); ``full`` when it starts at the first one."""

    start: datetime | None
    end: datetime | None
    full: bool

    def contains(self, moment: datetime | None) -> bool:
        if moment is None or self.start is None or self.end is None:
            return True
        return (self.full or moment >= self.start) and moment < self.end


def sync_entity(
    spec: EntitySpec,
    client: RilletClient,
    engine: Engine,
    *,
    window: Window,
    run_id: str,
    log: Any,
    state_url: str | None = None,
    read_rillet: bool = True,
) -> list[dg.MaterializeResult]:
    """Apply the entity's queued webhook events (given the state database), then run one pass
    of ``spec`` unless ``read_rillet`` is False; a MaterializeResult per table it fills."""
    synced_at = datetime.now(UTC)
    header = TableTally()
    children = {child.name: TableTally() for child in spec.children}
    extra = {"bill_payment": TableTally()} if spec.name == "bill" else {}
    loaded = 0
    updated_since = None if window.full else window.start

    def count(batch: list[dict[str, Any]], result: load.UpsertResult) -> None:
        header.add(result)
        header.in_window += len(batch)
        for record in batch:
            for child in spec.children:
                children[child.name].in_window += len(record.get(child.field) or [])
        if len(header.preview) < 5:
            header.preview.extend(batch[: 5 - len(header.preview)])
        if spec.name == "bill":
            _sync_bill_payments(client, engine, batch, extra["bill_payment"], run_id, synced_at)

    events = AppliedEvents()
    if state_url and spec.webhook_entity:
        state_engine = state.make_state_engine(state_url)
        try:
            events = apply_pending_events(
                spec, client, engine, state_engine, run_id=run_id, log=log, on_records=count
            )
        except Exception as error:
            if not read_rillet:
                raise
            # A full pass never depends on the queue: reading Rillet brings the same changes.
            log.warning(
                f"{spec.name}: the queued webhook events could not be applied now "
                f"({describe(error)}); they stay pending, and this pass reads Rillet anyway"
            )
        finally:
            state_engine.dispose()
        header.soft_deleted += events.deleted
    if not read_rillet:
        records: Iterable[dict[str, Any]] = []
        stream = None
    elif spec.single:
        record = client.get_single(spec.name)
        records = [record] if record is not None else []
        stream = None
    else:
        stream = client.iter_records(spec.name, updated_since=updated_since)
        records = stream
    refused: list[tuple[Any, load.RecordSchemaError]] = []
    for records_read in load.batches(records, BATCH_SIZE):
        batch = _load_refusing(engine, spec, records_read, header, refused, run_id, synced_at)
        loaded += len(batch)
        for record in batch:
            stamp = record.get("updated_at")
            moment = parse_timestamp(stamp) if isinstance(stamp, str) else None
            header.in_window += window.contains(moment)
            for child in spec.children:
                children[child.name].in_window += len(record.get(child.field) or [])
        if len(header.preview) < 5:
            header.preview.extend(batch[: 5 - len(header.preview)])
        if spec.name == "bill":
            _sync_bill_payments(client, engine, batch, extra["bill_payment"], run_id, synced_at)
        log.info(f"{spec.name}: loaded {loaded} records so far")
    if refused:
        _set_aside(spec, refused, state_url, log)
    complete = read_rillet and (stream is None or stream.complete)
    if stream is not None and stream.unidentified:
        # A record without an id might be any stored one: no deletion can be inferred.
        log.warning(
            f"{spec.name}: Rillet sent {stream.unidentified} record(s) without an id; "
            "records missing from this pass are not marked deleted"
        )
    if complete and updated_since is None and not (stream is not None and stream.unidentified):
        # Only a complete pass over everything proves that a missing record was deleted. The
        # stream already remembers the ids it yielded (compactly): no second set of them.
        seen: Container[str] = stream if stream is not None else {r["id"] for r in records}
        with engine.begin() as connection:
            header.soft_deleted = load.mark_missing_deleted(connection, spec, seen, synced_at)
    if complete and stream is not None and spec.incremental:
        with engine.begin() as connection:
            watermark = _committed_watermark(connection, spec, stream.watermark)
            if watermark is not None:
                load.set_watermark(connection, spec.name, watermark, run_id)
    watermark_text = None
    with engine.connect() as connection:
        stored = load.get_watermark(connection, spec.name)
        watermark_text = stored.isoformat() if stored else None
    stats = client.stats.as_metadata()
    webhook_metadata: dict[str, Any] = (
        {
            "webhook_events_applied": events.events - events.quarantined,
            "webhook_events_from_body": events.upserted,
            "webhook_events_read_again": events.fetched,
            "webhook_events_healed": events.healed,
            "webhook_events_quarantined": events.quarantined,
        }
        if spec.webhook_entity
        else {}
    )
    if events.first_quarantine_error:
        webhook_metadata["webhook_first_quarantine_error"] = events.first_quarantine_error
    if read_rillet:
        webhook_metadata["records_refused"] = len(refused)
    if refused:
        webhook_metadata["first_refused_record_error"] = str(refused[0][1])
    results = [_result(spec.name, header, stats, watermark_text, engine, webhook_metadata)]
    for child in spec.children:
        results.append(_result(child.name, children[child.name], stats, watermark_text, engine))
    for name, tally in extra.items():
        results.append(_result(name, tally, stats, watermark_text, engine))
    return results


def _load_refusing(
    engine: Engine,
    spec: EntitySpec,
    records: list[Any],
    tally: TableTally,
    refused: list[tuple[Any, load.RecordSchemaError]],
    run_id: str,
    synced_at: datetime,
) -> list[Any]:
    """Load Rillet's records (authoritative: its list is the truth); a record the warehouse
    cannot store is left out, into ``refused``, and the others load. Returns the loaded ones."""
    while records:
        try:
            with engine.begin() as connection:
                tally.add(
                    load.upsert_records(
                        connection,
                        spec,
                        records,
                        run_id=run_id,
                        synced_at=synced_at,
                        authoritative=True,
                    )
                )
            break
        except load.RecordSchemaError as error:
            culprits = [i for i, record in enumerate(records) if _names(record, error.record_id)]
            if not culprits:
                raise
            refused.extend((records[i], error) for i in culprits)
            records = [r for i, r in enumerate(records) if i not in set(culprits)]
    return records


def _names(record: Any, record_id: object) -> bool:
    """Whether ``record`` is the one a RecordSchemaError names (``None``: its id is unusable)."""
    if not isinstance(record, Mapping):
        return record_id is None
    found = record.get("id")
    if record_id is None:
        return not isinstance(found, str) or not found
    return found == record_id


def _set_aside(
    spec: EntitySpec,
    refused: list[tuple[Any, load.RecordSchemaError]],
    state_url: str | None,
    log: Any,
) -> None:
    """Quarantine the records a pass could not store, so that the entity's check shows them
    (``rillet-dagster events`` lists them; a requeue lets the next full pass try again)."""
    now = datetime.now(UTC)
    for _record, error in refused:
        log.warning(f"{spec.name}: a record from Rillet could not be stored, set aside: {error}")
    if not state_url:
        return
    items = [
        state.QueuedEvent(
            id=_refused_id(spec, record, error),
            entity=queue_entity(spec),
            event=state.SYNC_REFUSED,
            received_at=now,
            event_timestamp=now,
            body=_raw(record),
            status="quarantined",
            error=f"a sync read this record from Rillet but cannot store it: {error}",
        )
        for record, error in refused
    ]
    state_engine = state.make_state_engine(state_url)
    try:
        with state_engine.begin() as connection:
            state.ensure_state_schema(connection)
            state.enqueue_many(connection, items)
    finally:
        state_engine.dispose()


def _refused_id(spec: EntitySpec, record: Any, error: load.RecordSchemaError) -> str:
    """The same id for the same refused record in every pass (its id, else its content)."""
    if error.record_id is not None:
        name = f"{spec.name}:{error.record_id!r}"
    else:
        name = f"{spec.name}:content:{hashlib.sha256(_raw(record)).hexdigest()}"
    return str(uuid.uuid5(_REFUSED_NAMESPACE, name))


_REFUSED_NAMESPACE = uuid.UUID("7d0b6a52-93b4-4d1e-9f3c-2f6c1e0a4b8d")
_MAX_REFUSED_BODY = 1024 * 1024


def _raw(record: Any) -> bytes:
    """The refused record as JSON text for inspection (escaped, as it cannot be stored as is)."""
    try:
        text = json.dumps(record, default=str, ensure_ascii=True)
    except (ValueError, RecursionError):
        text = repr(record)[:_MAX_REFUSED_BODY]
    return text.encode("ascii", "backslashreplace")[:_MAX_REFUSED_BODY]


def _committed_watermark(
    connection: Connection, spec: EntitySpec, candidate: datetime | None
) -> datetime | None:
    """The pass's watermark, but never ahead of the newest ``updated_at`` actually stored.

    A pass that found nothing new reports its own lower bound; storing that would claim rows
    the warehouse does not hold, so the stored watermark stays at what was committed.
    """
    if candidate is None or not spec.has_updated_at:
        return candidate
    table = table_for(spec.name)
    newest = connection.execute(select(func.max(table.c.updated_at))).scalar_one_or_none()
    if newest is None:
        return None
    return min(candidate, newest)


def _sync_bill_payments(
    client: RilletClient,
    engine: Engine,
    bills: list[dict[str, Any]],
    tally: TableTally,
    run_id: str,
    synced_at: datetime,
) -> None:
    """Rillet has no org-wide bill-payment feed: read the payments of each changed bill."""
    spec = catalog.entity("bill_payment")
    table = table_for("bill_payment")
    for bill in bills:
        payments = client.children("bill_payment", bill["id"])
        with engine.begin() as connection:
            tally.add(
                load.upsert_records(
                    connection,
                    spec,
                    payments,
                    run_id=run_id,
                    synced_at=synced_at,
                    authoritative=True,
                )
            )
            live = connection.execute(
                select(table.c.id).where(
                    table.c.bill_id == bill["id"], table.c.deleted_at.is_(None)
                )
            ).scalars()
            gone = set(live) - {p["id"] for p in payments}
            if gone:
                load.soft_delete(connection, spec, gone, synced_at)
                tally.soft_deleted += len(gone)
        tally.in_window += len(payments)
        if len(tally.preview) < 5:
            tally.preview.extend(payments[: 5 - len(tally.preview)])


def _result(
    name: str,
    tally: TableTally,
    stats: Mapping[str, int | float],
    watermark: str | None,
    engine: Engine,
    extra: Mapping[str, Any] | None = None,
) -> dg.MaterializeResult:
    table = table_for(name)
    with engine.connect() as connection:
        query = select(func.count()).select_from(table)
        if "deleted_at" in table.c:
            query = query.where(table.c.deleted_at.is_(None))
        rows = int(connection.execute(query).scalar_one())
    metadata: dict[str, Any] = {
        "dagster/row_count": rows,
        "dagster/partition_row_count": tally.in_window,
        "dagster/table_name": table.name,
        "dagster/column_schema": dg.TableSchema(
            columns=[dg.TableColumn(c.name, str(c.type)) for c in table.columns]
        ),
        "rows_inserted": tally.inserted,
        "rows_updated": tally.updated,
        "rows_unchanged": tally.unchanged,
        "rows_skipped_older": tally.skipped_older,
        "rows_soft_deleted": tally.soft_deleted,
        "preview": dg.MetadataValue.md(_preview(tally.preview)),
        **{f"api_{k}": v for k, v in stats.items()},
    }
    if watermark:
        metadata["watermark"] = watermark
    metadata.update(extra or {})
    return dg.MaterializeResult(asset_key=asset_key(name), metadata=metadata)


def asset_key(name: str) -> dg.AssetKey:
    return dg.AssetKey(["rillet", table_name(name)])


def _preview(records: list[Mapping[str, Any]]) -> str:
    """A five-row markdown table of the first records (scalars only; money as its text)."""
    if not records:
        return "_no rows in this run_"
    columns: list[str] = []
    for record in records:
        for key, value in record.items():
            if key not in columns and len(columns) < 8 and _cell(value) is not None:
                columns.append(key)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for record in records:
        lines.append("| " + " | ".join(_cell(record.get(c)) or "" for c in columns) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str | None:
    if isinstance(value, Mapping) and set(value) == {"amount", "currency"}:
        return f"{value['amount']} {value['currency']}"
    if isinstance(value, str | int | bool) or value is None:
        text = "" if value is None else str(value)
        return text.replace("|", "\\|")[:60]
    return None
