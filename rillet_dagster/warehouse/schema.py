"""Warehouse tables generated from the catalog, and the engine that reads and writes them.

One header table per entity (``invoices``) and one table per nested array (``invoice_items``),
derived from :mod:`rillet_dagster.catalog` alone: adding a catalog entry or field adds a table or a
column, and :func:`ensure_schema` applies it to an existing warehouse without dropping anything.

Header table columns:
    ``id`` (primary key); one typed column per catalog key field (``price.type`` ->
    ``price_type``); per money field an exact amount plus ``<amount>_currency``; ``updated_at``
    and ``deleted_at`` (soft delete); ``_record`` (the full record as received, so unknown fields
    are never lost); ``_record_hash`` (to tell an unchanged re-delivery from an update);
    ``_synced_at`` and ``_run_id`` (which load wrote the row).

Child table columns:
    ``parent_id`` + ``line_key`` (the line's id, or its index as text) as primary key,
    ``line_index``, typed key fields, money columns and ``_record``.

Table and column names come from the catalog only and must be plain snake-case identifiers; a
name from anywhere else (a run config, a query parameter) is rejected by :func:`table_for`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Date,
    Engine,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    create_engine,
    event,
    exc,
    inspect,
)
from sqlalchemy.engine import URL, Connection
from sqlalchemy.schema import CreateIndex, CreateTable
from sqlalchemy.types import TypeEngine

from rillet_dagster import catalog
from rillet_dagster.catalog import ChildSpec, EntitySpec
from rillet_dagster.warehouse.types import RECORD_JSON, ExactDecimal, UtcDateTime, dumps, loads

WATERMARKS_TABLE = "rillet_watermarks"

# Execution option read by the SQLite "begin" hook: writers take the write lock up front, so a
# read-then-write transaction can never find its snapshot stale half-way through.
SQLITE_BEGIN_IMMEDIATE = "rillet_sqlite_begin_immediate"

_IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]*$")
# PostgreSQL truncates longer identifiers silently, which could merge two columns into one.
_MAX_IDENTIFIER = 63

# Field-name conventions of the Rillet API, applied to every entity alike.
_DATE_NAMES = frozenset({"date", "start", "end"})
_BOOLEAN_NAMES = frozenset(
    {
        "intercompany",
        "overdue",
        "include_in_arr_mrr",
        "pending",
        "excluded",
        "ten_ninety_nine_eligible",
        "deactivated",
    }
)
_INTEGER_NAMES = frozenset({"payment_terms", "interval_months"})
# JSON numbers or decimal strings that may be fractional: kept exact like money.
_DECIMAL_NAMES = frozenset({"quantity", "percentage", "exchange_rate"})


class FieldKind:
    """How a key field's JSON value becomes a column value (see ``load.py``)."""

    TEXT = "text"
    DATE = "date"
    TIMESTAMP = "timestamp"
    BOOLEAN = "boolean"
    INTEGER = "integer"
    DECIMAL = "decimal"


def field_kind(path: str) -> str:
    """The kind of column for a key field, from its last path segment's name."""
    name = path.rsplit(".", 1)[-1]
    if name in _DATE_NAMES or name.endswith(("_date", "_on")):
        return FieldKind.DATE
    if name.endswith("_at"):
        return FieldKind.TIMESTAMP
    if name in _BOOLEAN_NAMES or name.startswith(("is_", "has_")):
        return FieldKind.BOOLEAN
    if name in _INTEGER_NAMES or name.endswith(("_months", "_days")):
        return FieldKind.INTEGER
    if name in _DECIMAL_NAMES:
        return FieldKind.DECIMAL
    return FieldKind.TEXT


_KIND_TYPES: dict[str, type[TypeEngine[Any]]] = {
    FieldKind.TEXT: Text,
    FieldKind.DATE: Date,
    FieldKind.TIMESTAMP: UtcDateTime,
    FieldKind.BOOLEAN: Boolean,
    FieldKind.INTEGER: Integer,
    FieldKind.DECIMAL: ExactDecimal,
}


def column_name(path: str) -> str:
    """Column for a dotted field path: ``price.amount`` -> ``price_amount``."""
    return _checked(path.replace(".", "_"), f"field {path!r}")


def currency_column(path: str) -> str:
    return column_name(path) + "_currency"


def table_name(name: str) -> str:
    """Plural snake case: ``invoice`` -> ``invoices``, ``journal_entry`` -> ``journal_entries``."""
    _checked(name, "entity name")
    return _checked(catalog.plural(name), "table name")


def _checked(identifier: str, what: str) -> str:
    if not _IDENTIFIER.match(identifier) or len(identifier) > _MAX_IDENTIFIER:
        raise ValueError(
            f"{what} {identifier!r} is not a plain snake-case identifier of at most "
            f"{_MAX_IDENTIFIER} characters"
        )
    return identifier


@dataclass(frozen=True)
class FieldColumn:
    """A key field and the column it fills."""

    path: tuple[str, ...]
    column: str
    kind: str


@dataclass(frozen=True)
class MoneyColumns:
    """A money field and its amount and currency columns."""

    path: tuple[str, ...]
    amount: str
    currency: str


def field_columns(key_fields: Sequence[str]) -> tuple[FieldColumn, ...]:
    return tuple(
        FieldColumn(tuple(p.split(".")), column_name(p), field_kind(p)) for p in key_fields
    )


def money_columns(money_fields: Sequence[str]) -> tuple[MoneyColumns, ...]:
    return tuple(
        MoneyColumns(tuple(p.split(".")), column_name(p), currency_column(p)) for p in money_fields
    )


def _data_columns(key_fields: Sequence[str], money_fields: Sequence[str]) -> list[Column[Any]]:
    columns: list[Column[Any]] = [
        Column(f.column, _KIND_TYPES[f.kind]()) for f in field_columns(key_fields)
    ]
    for money in money_columns(money_fields):
        columns.append(Column(money.amount, ExactDecimal()))
        columns.append(Column(money.currency, String(3)))
    return columns


def _unique(table: str, columns: Iterable[Column[Any]]) -> None:
    seen: set[str] = set()
    for column in columns:
        if column.name in seen:
            raise ValueError(
                f"table {table}: two catalog fields both map to column {column.name!r}"
            )
        seen.add(column.name)


def _header_table(spec: EntitySpec, metadata: MetaData) -> Table:
    name = table_name(spec.name)
    columns: list[Column[Any]] = [
        Column("id", String, primary_key=True),
        *_data_columns(spec.key_fields, spec.money_fields),
        Column("updated_at", UtcDateTime()),
        Column("deleted_at", UtcDateTime()),
        # NULL only for a tombstone of a record never loaded (a delete that arrived first).
        Column("_record", RECORD_JSON),
        Column("_record_hash", String(32)),
        Column("_synced_at", UtcDateTime(), nullable=False),
        Column("_run_id", String),
    ]
    _unique(name, columns)
    return Table(
        name,
        metadata,
        *columns,
        Index(f"ix_{name}_updated_at", "updated_at"),
        comment=spec.description,
    )


def _child_table(spec: EntitySpec, child: ChildSpec, metadata: MetaData) -> Table:
    name = table_name(child.name)
    columns: list[Column[Any]] = [
        # No FOREIGN KEY to the header: lines are only ever written by the loader, in the
        # transaction that writes their parent, and headers are never hard-deleted; a database
        # foreign key would check every line again (measured: ~40% of PostgreSQL line loading).
        Column("parent_id", String, nullable=False),
        Column("line_key", String, nullable=False),
        Column("line_index", Integer, nullable=False),
        *_data_columns(child.key_fields, child.money_fields),
        Column("_record", RECORD_JSON, nullable=False),
    ]
    _unique(name, columns)
    key = f"id of each {child.field!r} line" if child.key else f"index in {child.field!r}"
    return Table(
        name,
        metadata,
        *columns,
        PrimaryKeyConstraint("parent_id", "line_key", name=f"pk_{name}"),
        comment=f"One row is a line of {spec.name}.{child.field}, keyed by parent id + {key}.",
    )


def build_metadata(entities: Iterable[EntitySpec] = catalog.ENTITIES) -> MetaData:
    """Every warehouse table for ``entities``, plus the watermark table."""
    metadata = MetaData()
    for spec in entities:
        _header_table(spec, metadata)
        for child in spec.children:
            _child_table(spec, child, metadata)
    Table(
        WATERMARKS_TABLE,
        metadata,
        Column("entity", String, primary_key=True),
        Column("watermark", UtcDateTime()),
        Column("updated_at", UtcDateTime(), nullable=False),
        Column("run_id", String),
        comment="One row per entity: the highest updated_at committed by a complete sync.",
    )
    return metadata


METADATA = build_metadata()


def table_for(name: str, metadata: MetaData = METADATA) -> Table:
    """The table of catalog entity (or child) ``name``; any other name raises ``KeyError``."""
    known = {spec.name for spec in catalog.ENTITIES} | {
        child.name for spec in catalog.ENTITIES for child in spec.children
    }
    table = metadata.tables.get(table_name(name)) if name in known else None
    if table is None:
        raise KeyError(
            f"unknown warehouse entity {name!r}; the catalog knows: {', '.join(sorted(known))}"
        )
    return table


def ensure_schema(engine: Engine, metadata: MetaData = METADATA) -> list[str]:
    """Create missing tables, columns and indexes; never drop or alter anything.

    Safe to run from several processes at once: a statement that loses a creation race to
    another process is treated as done once the object is seen to exist.

    Returns:
        What this call changed, e.g. ``["created table invoices", "added column invoices.foo"]``.
    """
    changes: list[str] = []
    for table in metadata.sorted_tables:
        if not inspect(engine).has_table(table.name, schema=table.schema):
            if _run_ddl(engine, CreateTable(table), partial(_table_exists, engine, table)):
                changes.append(f"created table {table.name}")
            continue
        existing = {c["name"] for c in inspect(engine).get_columns(table.name, schema=table.schema)}
        for column in table.columns:
            if column.name in existing:
                continue
            statement = _add_column_sql(engine, table, column)
            if _run_ddl(engine, statement, partial(_column_exists, engine, table, column.name)):
                changes.append(f"added column {table.name}.{column.name}")
    for table in metadata.sorted_tables:
        indexes = {i["name"] for i in inspect(engine).get_indexes(table.name, schema=table.schema)}
        for index in table.indexes:
            if index.name not in indexes and _run_ddl(
                engine, CreateIndex(index), partial(_index_exists, engine, table, index.name)
            ):
                changes.append(f"created index {index.name}")
    return changes


def _table_exists(engine: Engine, table: Table) -> bool:
    return inspect(engine).has_table(table.name, schema=table.schema)


def _index_exists(engine: Engine, table: Table, name: str | None) -> bool:
    indexes = inspect(engine).get_indexes(table.name, schema=table.schema)
    return any(i["name"] == name for i in indexes)


def _column_exists(engine: Engine, table: Table, column: str) -> bool:
    columns = inspect(engine).get_columns(table.name, schema=table.schema)
    return any(c["name"] == column for c in columns)


def _add_column_sql(engine: Engine, table: Table, column: Column[Any]) -> str:
    dialect = engine.dialect
    preparer = dialect.identifier_preparer
    column_type = column.type.compile(dialect=dialect)
    # Added columns are nullable whatever the model says: existing rows have no value for them.
    return (
        f"ALTER TABLE {preparer.format_table(table)} "
        f"ADD COLUMN {preparer.quote(column.name)} {column_type}"
    )


def _run_ddl(engine: Engine, statement: Any, done_by_other: Callable[[], bool]) -> bool:
    """Run one DDL statement in its own transaction; False if another process did it first.

    A lost race surfaces differently per backend ("already exists", "duplicate column", a
    unique violation in PostgreSQL's catalog), so the error is not parsed: the object is
    looked up, and only if it is still missing is the error raised.
    """
    try:
        with write_transaction(engine) as conn:
            if isinstance(statement, str):
                conn.exec_driver_sql(statement)
            else:
                conn.execute(statement)
    except (exc.OperationalError, exc.ProgrammingError, exc.IntegrityError):
        if done_by_other():
            return False
        raise
    return True


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A connection in one write transaction, committed on success and rolled back on error.

    On SQLite the transaction begins ``IMMEDIATE`` (with an engine from
    :func:`~rillet_dagster.warehouse.schema.make_engine`): it holds the write lock from the
    start, so what it reads stays true until it commits. Use it to write rows and the watermark
    atomically::

        with write_transaction(engine) as conn:
            upsert_records(conn, spec, records, run_id=run_id, synced_at=started)
            set_watermark(conn, spec.name, high_water, run_id)
    """
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            conn.execution_options(**{SQLITE_BEGIN_IMMEDIATE: True})
        with conn.begin():
            yield conn


def make_engine(
    url: str | URL, *, sqlite_synchronous: str = "FULL", **engine_kwargs: Any
) -> Engine:
    """An engine for the warehouse, SQLite or PostgreSQL, set up for exact money.

    JSON columns are written by :func:`~rillet_dagster.warehouse.types.dumps` (a ``Decimal`` keeps
    its exact digits) and read with ``parse_float=Decimal``. On SQLite every connection uses WAL,
    a 30 s busy timeout and enforced foreign keys, and transactions are real ``BEGIN``s issued by
    SQLAlchemy (pysqlite's own implicit transactions start late, which breaks atomic
    read-then-write and savepoints); a writer begins ``IMMEDIATE`` when the connection carries the
    :data:`SQLITE_BEGIN_IMMEDIATE` execution option.

    Args:
        url: SQLAlchemy URL (``sqlite:///path.db`` or ``postgresql+psycopg://...``).
        sqlite_synchronous: SQLite ``PRAGMA synchronous`` (``FULL`` keeps every commit across a
            power loss).
        engine_kwargs: passed to :func:`sqlalchemy.create_engine` (``connect_args``...).
    """
    engine_kwargs.setdefault("json_serializer", dumps)
    engine_kwargs.setdefault("json_deserializer", loads)
    engine = create_engine(url, **engine_kwargs)
    if engine.dialect.name == "sqlite":
        synchronous = sqlite_synchronous.upper()
        if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"sqlite_synchronous {sqlite_synchronous!r} is not a SQLite level")
        _configure_sqlite(engine, synchronous)
    return engine


def _configure_sqlite(engine: Engine, synchronous: str) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get(SQLITE_BEGIN_IMMEDIATE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
