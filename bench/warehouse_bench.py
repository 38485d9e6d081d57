"""Warehouse load: rows/s of a first load and of two re-syncs, on SQLite and PostgreSQL.

The invoices are the sandbox's own, cloned under new ids: 100k invoices with their items. Each
backend gets a fresh database and, one after the other in it, three loads of the same 100k
invoices, each one ``upsert_records(..., authoritative=True)`` call (one transaction, the
loader's default 5,000-record batches) as a sync pass loads them:

* first load: every id new. SQLite: ``executemany`` of the ``INSERT ... ON CONFLICT`` (no
  conflict happens). PostgreSQL: no id of a batch is stored, so the batch is ``COPY``ed straight
  into the table (in a savepoint, one per batch), no ``ON CONFLICT`` at all.
* re-sync, 10% changed: every tenth invoice has a new ``memo`` and a later ``updated_at``; the
  other 90% are identical to what is stored. Every record is still validated, serialized and
  hashed, and each batch's stored ``(updated_at, deleted_at, _record_hash)`` read; the unchanged
  ones stop there (no statement), the changed ones are upserted through ``ON CONFLICT DO
  UPDATE`` (PostgreSQL: ``COPY`` into a temporary stage, then one ``INSERT ... SELECT ... ON
  CONFLICT`` per batch, the staged path) and their items replaced (``DELETE`` + insert).
* re-sync, all changed: the same, for every invoice.

The "write path" column is counted, not assumed: every statement SQLAlchemy sends is classified
(``ON CONFLICT`` statements and the rows they carried, savepoints = direct ``COPY`` attempts,
``TRUNCATE`` of the stage = staged upserts, ``DELETE`` of replaced items), and the loader's own
counts of inserted, updated and unchanged invoices are checked against what each case expects.
rows/s is input rows (invoices + items read by the load) per second, the sync's throughput; rows
written are the header and item rows inserted or replaced. Peak RSS is the whole process's
(``VmHWM``, reset before each case through ``/proc/self/clear_refs``), so it includes the 100k
prebuilt input records and their flattened DataFrames; the growth over the RSS at the case's
start is what the load itself added.

pandas ``to_sql`` gets the same rows already flattened (money as decimal text, record JSON as
text) into tables it creates itself: plain inserts with none of the loader's work, the baseline
the first load's speed column compares with. A second to_sql line adds the time flattening the
records took, for an end-to-end comparison.
"""

from __future__ import annotations

import functools
import gc
import json
import re
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
from sqlalchemy import Engine, event, exc, text

from bench.table import print_table
from rillet_dagster import catalog
from rillet_dagster.warehouse import ensure_schema, make_engine, upsert_records
from rillet_dagster.warehouse.load import UpsertResult
from rillet_dagster.warehouse.schema import column_name
from rillet_dagster.warehouse.types import dumps

INVOICES = 100_000
CHANGED_EVERY = 10  # the 10% re-sync changes every tenth invoice
POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
NOW = datetime(2026, 11, 28, 12, tzinfo=UTC)
FIRST_LOAD = "first load (all new)"
RESYNC_SOME = f"re-sync, {100 // CHANGED_EVERY}% changed"
RESYNC_ALL = "re-sync, all changed"
TO_SQL = "DataFrame.to_sql (pre-flattened rows)"
FLATTEN_TO_SQL = "flatten + DataFrame.to_sql"

T = TypeVar("T")


def build_invoices(count: int = INVOICES) -> list[dict[str, Any]]:
    from rillet_dagster.sandbox.data import generate

    world = generate(seed=7, size="tiny", now=NOW)
    templates = [json.dumps(r) for r in world.store["invoice"].all_records()]
    invoices = []
    for index in range(count):
        record = json.loads(templates[index % len(templates)])
        record["id"] = str(uuid.UUID(int=index + 1))
        record["invoice_number"] = f"INV-BENCH-{index:07d}"
        for line, item in enumerate(record["items"]):
            item["id"] = str(uuid.UUID(int=(index + 1) << 16 | line))
        invoices.append(record)
    return invoices


def changed(invoices: list[dict[str, Any]], every: int, edit: int) -> list[dict[str, Any]]:
    """The same invoices with every ``every``-th one edited (new memo, ``updated_at`` an hour
    per ``edit`` later); the others are the very same objects, so they hash as stored."""
    later = (NOW + timedelta(hours=edit)).isoformat().replace("+00:00", "Z")
    return [
        dict(record, memo=f"bench edit {edit}", updated_at=later) if index % every == 0 else record
        for index, record in enumerate(invoices)
    ]


def _money_text(value: Any) -> str | None:
    return None if value is None else value["amount"]


def flatten(invoices: list[dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The same header and item rows as the loader writes, as DataFrames for ``to_sql``."""
    spec = catalog.entity("invoice")
    items = spec.children[0]
    headers, lines = [], []
    for record in invoices:
        row: dict[str, Any] = {"id": record["id"]}
        for field_name in spec.key_fields:
            row[column_name(field_name)] = record.get(field_name)
        for field_name in spec.money_fields:
            money = record.get(field_name)
            row[column_name(field_name)] = _money_text(money)
            row[column_name(field_name) + "_currency"] = money and money["currency"]
        row["updated_at"] = record["updated_at"]
        row["_record"] = dumps(record)
        headers.append(row)
        for index, item in enumerate(record["items"]):
            line: dict[str, Any] = {
                "parent_id": record["id"],
                "line_key": item["id"],
                "line_index": index,
            }
            for field_name in items.key_fields:
                line[column_name(field_name)] = item.get(field_name)
            for field_name in items.money_fields:
                money = item.get(field_name)
                line[column_name(field_name)] = _money_text(money)
                line[column_name(field_name) + "_currency"] = money and money["currency"]
            line["_record"] = dumps(item)
            lines.append(line)
    return pd.DataFrame(headers), pd.DataFrame(lines)


# ----------------------------------------------------------------------------- measuring


def _peak_rss_kib() -> int | None:
    """``VmHWM`` of this process (KiB), or None where /proc does not have it."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(r"^VmHWM:\s+(\d+)", status, re.MULTILINE)
    return int(found.group(1)) if found else None


def _reset_peak_rss() -> int | None:
    """Start ``VmHWM`` again from the current RSS (Linux 4.0+); that RSS (KiB), or None."""
    with suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
        return _peak_rss_kib()
    return None


@dataclass
class Statements:
    """What SQLAlchemy sent: statements by kind, and the rows ``ON CONFLICT`` ones carried."""

    kinds: Counter[str] = field(default_factory=Counter)
    conflict_rows: int = 0  # rows bound to INSERT ... ON CONFLICT (SQLite's executemany)

    def record(self, statement: str, parameters: Any, executemany: bool) -> None:
        words = statement.lstrip().split(None, 1)
        verb = words[0].upper() if words else ""
        if verb == "INSERT" and "ON CONFLICT" in statement.upper():
            self.kinds["on_conflict"] += 1
            self.conflict_rows += len(parameters) if executemany else 1
        else:
            self.kinds[verb.lower()] += 1


@contextmanager
def counting(engine: Engine) -> Iterator[Statements]:
    statements = Statements()

    def before(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
    ) -> None:
        statements.record(statement, parameters, executemany)

    event.listen(engine, "before_cursor_execute", before)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", before)


@dataclass
class Measured:
    backend: str
    case: str
    input_rows: int
    seconds: float
    rows_written: int = 0
    result: UpsertResult | None = None
    statements: Statements | None = None
    peak_rss_kib: int | None = None
    start_rss_kib: int | None = None

    @property
    def path(self) -> str:
        """The write path, from the statements counted."""
        counted = self.statements
        if counted is None:
            return "to_sql (its own tables, plain INSERTs)"
        kinds = counted.kinds
        if self.backend == "PostgreSQL":
            parts = []
            if kinds["savepoint"]:
                parts.append(f"direct COPY x{kinds['savepoint']}")
            if kinds["on_conflict"]:
                parts.append(f"stage COPY + INSERT..SELECT ON CONFLICT x{kinds['on_conflict']}")
        else:
            parts = [f"INSERT ON CONFLICT x{kinds['on_conflict']} ({counted.conflict_rows:,} rows)"]
        if kinds["delete"]:
            parts.append(f"item DELETE x{kinds['delete']}")
        return "; ".join(parts) or "no write"


def _expect(result: UpsertResult, case: str, count: int) -> None:
    changed_count = count if case != RESYNC_SOME else -(-count // CHANGED_EVERY)
    expected = {
        FIRST_LOAD: (count, 0, 0),
        RESYNC_SOME: (0, changed_count, count - changed_count),
        RESYNC_ALL: (0, count, 0),
    }[case]
    got = (result.inserted, result.updated, result.unchanged)
    if got != expected:
        raise RuntimeError(f"{case}: expected (inserted, updated, unchanged) {expected}, got {got}")


def load_cases(engine: Engine, backend: str, invoices: list[dict[str, Any]]) -> list[Measured]:
    """First load, then the two re-syncs, into the same (fresh) database."""
    ensure_schema(engine)
    input_rows = len(invoices) + sum(len(r["items"]) for r in invoices)
    cases: tuple[tuple[str, Callable[[], list[dict[str, Any]]]], ...] = (
        (FIRST_LOAD, lambda: invoices),
        (RESYNC_SOME, lambda: changed(invoices, CHANGED_EVERY, 1)),
        (RESYNC_ALL, lambda: changed(invoices, 1, 2)),
    )
    measured = []
    for case, make_records in cases:
        records = make_records()  # built before the clock starts, one case at a time
        gc.collect()
        gc.freeze()  # the prebuilt input: not rescanned by the collector during the timed load
        start_rss = _reset_peak_rss()
        with counting(engine) as statements:
            started = time.perf_counter()
            result = upsert_records(
                engine,
                catalog.entity("invoice"),
                records,
                run_id=f"bench-{case}",
                synced_at=NOW,
                authoritative=True,
            )
            seconds = time.perf_counter() - started
        _expect(result, case, len(invoices))
        measured.append(
            Measured(
                backend,
                case,
                input_rows,
                seconds,
                rows_written=result.written + result.child_rows,
                result=result,
                statements=statements,
                peak_rss_kib=_peak_rss_kib(),
                start_rss_kib=start_rss,
            )
        )
        del records
    return measured


def time_to_sql(
    engine: Engine, backend: str, frames: tuple[pd.DataFrame, pd.DataFrame]
) -> list[Measured]:
    start_rss = _reset_peak_rss()
    started = time.perf_counter()
    for name, frame in zip(("bench_invoices", "bench_invoice_items"), frames, strict=True):
        frame.to_sql(name, engine, if_exists="replace", index=False, chunksize=5000)
    seconds = time.perf_counter() - started
    rows = sum(len(f) for f in frames)
    peak = _peak_rss_kib()
    return [
        Measured(backend, TO_SQL, rows, seconds, rows, peak_rss_kib=peak, start_rss_kib=start_rss)
    ]


def _postgres(schema: str) -> Engine:
    return make_engine(POSTGRES_URL, connect_args={"options": f"-csearch_path={schema}"})


def _with_postgres(run: Callable[[Engine], T]) -> T | None:
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    admin = make_engine(POSTGRES_URL)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except exc.SQLAlchemyError as error:  # a missing server is reported, not fatal
        print(f"PostgreSQL unavailable ({type(error).__name__}); skipped")
        admin.dispose()
        return None
    engine = _postgres(schema)
    try:
        return run(engine)
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _with_sqlite(run: Callable[[Engine], T]) -> T:
    with tempfile.TemporaryDirectory() as folder:
        engine = make_engine(f"sqlite:///{Path(folder) / 'warehouse.db'}")
        try:
            return run(engine)
        finally:
            engine.dispose()


def _row(item: Measured, baseline: Measured | None) -> Sequence[object]:
    result = item.result
    invoices = (
        "-"
        if result is None
        else f"{result.inserted:,} / {result.updated:,} / {result.unchanged:,}"
    )
    speed = (
        f"{baseline.seconds / item.seconds:.2f}x"
        if baseline is not None and item.case in (FIRST_LOAD, TO_SQL, FLATTEN_TO_SQL)
        else ""
    )
    rss = "-"
    if item.peak_rss_kib is not None and item.start_rss_kib is not None:
        growth_mb = round((item.peak_rss_kib - item.start_rss_kib) / 1024)
        rss = f"{item.peak_rss_kib / 1024:,.0f} ({growth_mb:+,d})"
    return (
        item.backend,
        item.case,
        item.path,
        invoices,
        f"{item.rows_written:,}",
        f"{item.seconds:.2f}",
        f"{item.input_rows / item.seconds:,.0f}",
        rss,
        speed,
    )


def main() -> None:
    invoices = build_invoices()
    # A sync holds one page of records at a time, not 100k: keep the garbage collector from
    # rescanning this prebuilt input during every timed run (it would tax both methods).
    gc.freeze()
    started = time.perf_counter()
    frames = flatten(invoices)
    flatten_seconds = time.perf_counter() - started
    gc.freeze()
    rows: list[Sequence[object]] = []
    for backend, run in (("SQLite", _with_sqlite), ("PostgreSQL", _with_postgres)):
        loads = run(functools.partial(load_cases, backend=backend, invoices=invoices))
        to_sql = run(functools.partial(time_to_sql, backend=backend, frames=frames))
        if loads is None or to_sql is None:
            continue
        baseline = to_sql[0]
        # The same records the loader starts from: flattening and JSON are part of the job.
        end_to_end = Measured(
            backend,
            FLATTEN_TO_SQL,
            baseline.input_rows,
            baseline.seconds + flatten_seconds,
            baseline.rows_written,
        )
        rows.extend(_row(item, baseline) for item in (*loads, baseline, end_to_end))
    print_table(
        f"Warehouse: {INVOICES:,} invoices + their items, upsert_records(authoritative=True) "
        "into a fresh database, then two re-syncs of the same ids (one transaction each)",
        [
            "backend",
            "case",
            "write path (statements counted)",
            "invoices inserted / updated / unchanged",
            "rows written",
            "seconds",
            "rows/s",
            "peak RSS MB (+ during the case)",
            "speed vs to_sql",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
