"""Warehouse load: rows/s upserting 100k invoices with their items, beside ``DataFrame.to_sql``.

The invoices are the sandbox's own, cloned under new ids. Our loader is timed end to end
(validation, exact money, JSON of every record, monotonic ``ON CONFLICT`` upsert, item rows) on a
fresh SQLite file and a fresh PostgreSQL schema. pandas ``to_sql`` gets the same rows already
flattened (money as decimal text, record JSON as text) into tables it creates itself: plain
inserts with none of that work, the baseline the speed column compares with. A second to_sql
line adds the time flattening the records took, for an end-to-end comparison.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import Engine, exc, text

from bench.table import print_table
from rillet_dagster import catalog
from rillet_dagster.warehouse import ensure_schema, make_engine, upsert_records
from rillet_dagster.warehouse.schema import column_name
from rillet_dagster.warehouse.types import dumps

INVOICES = 100_000
POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
NOW = datetime(2026, 11, 28, 12, tzinfo=UTC)


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


def _money_text(value: Any) -> str | None:
    return None if value is None else value["amount"]


def flatten(invoices: list[dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The same header and item rows as the loader writes, as DataFrames for ``to_sql``."""
    spec = catalog.entity("invoice")
    items = spec.children[0]
    headers, lines = [], []
    for record in invoices:
        row: dict[str, Any] = {"id": record["id"]}
        for field in spec.key_fields:
            row[column_name(field)] = record.get(field)
        for field in spec.money_fields:
            money = record.get(field)
            row[column_name(field)] = _money_text(money)
            row[column_name(field) + "_currency"] = money and money["currency"]
        row["updated_at"] = record["updated_at"]
        row["_record"] = dumps(record)
        headers.append(row)
        for index, item in enumerate(record["items"]):
            line: dict[str, Any] = {
                "parent_id": record["id"],
                "line_key": item["id"],
                "line_index": index,
            }
            for field in items.key_fields:
                line[column_name(field)] = item.get(field)
            for field in items.money_fields:
                money = item.get(field)
                line[column_name(field)] = _money_text(money)
                line[column_name(field) + "_currency"] = money and money["currency"]
            line["_record"] = dumps(item)
            lines.append(line)
    return pd.DataFrame(headers), pd.DataFrame(lines)


def time_loader(engine: Engine, invoices: list[dict[str, Any]]) -> tuple[int, float]:
    ensure_schema(engine)
    started = time.perf_counter()
    result = upsert_records(
        engine, catalog.entity("invoice"), invoices, run_id="bench", synced_at=NOW
    )
    seconds = time.perf_counter() - started
    if result.inserted != len(invoices):
        raise RuntimeError(f"expected {len(invoices)} inserts, got {result}")
    return result.inserted + result.child_rows, seconds


def time_to_sql(engine: Engine, frames: tuple[pd.DataFrame, pd.DataFrame]) -> tuple[int, float]:
    started = time.perf_counter()
    for name, frame in zip(("bench_invoices", "bench_invoice_items"), frames, strict=True):
        frame.to_sql(name, engine, if_exists="replace", index=False, chunksize=5000)
    seconds = time.perf_counter() - started
    return sum(len(f) for f in frames), seconds


def _postgres(schema: str) -> Engine:
    return make_engine(POSTGRES_URL, connect_args={"options": f"-csearch_path={schema}"})


def _with_postgres(run: Callable[[Engine], tuple[int, float]]) -> tuple[int, float] | None:
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


def _with_sqlite(run: Callable[[Engine], tuple[int, float]]) -> tuple[int, float]:
    with tempfile.TemporaryDirectory() as folder:
        engine = make_engine(f"sqlite:///{Path(folder) / 'warehouse.db'}")
        try:
            return run(engine)
        finally:
            engine.dispose()


def main() -> None:
    invoices = build_invoices()
    # A sync holds one page of records at a time, not 100k: keep the garbage collector from
    # rescanning this prebuilt input during every timed run (it would tax both methods).
    gc.freeze()
    started = time.perf_counter()
    frames = flatten(invoices)
    flatten_seconds = time.perf_counter() - started
    gc.freeze()
    measured: dict[tuple[str, str], tuple[int, float] | None] = {}
    for backend, run in (("SQLite", _with_sqlite), ("PostgreSQL", _with_postgres)):
        measured[(backend, "upsert_records")] = run(lambda e: time_loader(e, invoices))
        to_sql = run(lambda e: time_to_sql(e, frames))
        measured[(backend, "DataFrame.to_sql (pre-flattened rows)")] = to_sql
        # The same records the loader starts from: flattening and JSON are part of the job.
        measured[(backend, "flatten + DataFrame.to_sql")] = (
            None if to_sql is None else (to_sql[0], to_sql[1] + flatten_seconds)
        )
    rows = []
    for (backend, method), result in measured.items():
        baseline = measured[(backend, "DataFrame.to_sql (pre-flattened rows)")]
        if result is None or baseline is None:
            rows.append((backend, method, "-", "-", "-", "-", "-"))
            continue
        count, seconds = result
        rows.append(
            (
                backend,
                method,
                f"{count:,}",
                f"{seconds:.2f}",
                f"{count / seconds:,.0f}",
                f"{len(invoices) / seconds:,.0f}",
                f"{baseline[1] / seconds:.2f}x",
            )
        )
    print_table(
        f"Warehouse: {INVOICES:,} invoices + their items into a fresh database (one transaction)",
        ["backend", "method", "rows", "seconds", "rows/s", "invoices/s", "speed vs to_sql"],
        rows,
    )


if __name__ == "__main__":
    main()
