"""One check that the warehouse equals the sandbox: 0 lost, 0 duplicated, every column equal.

The expected rows are built here from the sandbox's own records and the catalog's declarations,
never with the loader's code: a comparison that ran the loader's extractor again would only
check the loader against itself. For each entity it compares

* the header table, column by column: ``id``; one typed column per key field (``price.type``
  -> ``price_type``, text, date, aware timestamp, boolean, integer or exact decimal, as the
  table declares it); per money field its amount as an exact ``Decimal`` (value and number of
  fraction digits, so ``10.50`` stored as ``10.5`` or ``10.500001`` fails) and its currency;
  ``updated_at`` as an aware instant; ``deleted_at`` (NULL for a live record); ``_record``
  parsed with ``parse_float=Decimal`` and compared strictly (``1`` is not ``true``, ``"1.50"``
  is not ``"1.5"``); the load metadata (``_record_hash``, ``_synced_at``, ``_run_id``) is not
  derived from the record, so only its form is checked (a 32-hex hash, distinct per record; an
  aware sync time; a run id);
* every child table of the entity, row by row, keyed by ``(parent_id, line_key)``: its
  ``line_index``, key fields, money and the line's ``_record``, for every live parent; a line
  whose parent row is missing altogether is an orphan;
* soft deletes: a record the sandbox deleted is absent or has ``deleted_at`` set, never live;
  a live record is present and live; no other row is live.

Columns the catalog does not explain (a table column no declaration produces, or a declared
one the table lacks) are reported too, so that a new column cannot go unchecked.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa

from rillet_dagster import catalog
from rillet_dagster.catalog import ChildSpec, EntitySpec
from rillet_dagster.sandbox.app import reporting_journal_entry
from rillet_dagster.sandbox.server import SandboxServer
from rillet_dagster.warehouse import schema
from rillet_dagster.warehouse.types import ExactDecimal, UtcDateTime

# How many differences a failure lists; the count of the rest follows.
MAX_SHOWN = 25
# Columns the loader fills from the load itself, not from the record (checked for form only).
LOAD_METADATA = ("_record_hash", "_synced_at", "_run_id")
_HASH = re.compile(r"[0-9a-f]{32}")
# The sandbox serves this view of the journal entries (local and reporting amounts).
_VIEWS = {"reporting_journal_entry": "journal_entry"}

Row = dict[str, Any]


@functools.cache
def table_for(name: str) -> sa.Table:
    """The warehouse table of entity or child ``name`` (looked up once: it is asked per row)."""
    return schema.table_for(name)


@dataclass(frozen=True)
class Truth:
    """What the sandbox holds for one entity: live records as served, and deleted ids."""

    live: dict[str, Row]
    deleted: frozenset[str] = frozenset()


_DECODER = json.JSONDecoder(parse_float=Decimal)  # built once: json.loads builds one per call


def parse(text: str | bytes) -> Any:
    """JSON as the API client reads it: non-integer numbers become ``Decimal``, never float."""
    return _DECODER.decode(text if isinstance(text, str) else text.decode())


def sandbox_truth(server: SandboxServer, entity: str) -> Truth:
    """The live records of ``entity`` exactly as the sandbox serves them, and its deleted ids.

    The store keeps deleted records in place (flagged): every position of the creation order
    is visited, so a record deleted since the sync is known as deleted, not as unknown.
    """
    world = server.sandbox.world
    store = world.store
    with store.lock:
        if entity in store.singletons:
            single = store.singletons[entity]
            return Truth({single["id"]: parse(json.dumps(single))} if single else {})
        source = store[_VIEWS.get(entity, entity)]
        live: dict[str, Row] = {}
        deleted: set[str] = set()
        # start_position("created") is the number of records ever created (deleted included).
        for seq in range(source.start_position("created")):
            record = source.record(seq)
            if source.is_deleted(seq):
                deleted.add(record["id"])
            elif entity in _VIEWS:
                live[record["id"]] = parse(json.dumps(reporting_journal_entry(world, record)))
            else:
                live[record["id"]] = parse(source.record_json(seq))
    return Truth(live, frozenset(deleted))


# ----------------------------------------------------------------------------- expectations


def _at(record: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path (``price.amount``), or None when any step is missing."""
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _column(path: str) -> str:
    return path.replace(".", "_")


def _exact(value: Any) -> Decimal:
    """An exact Decimal of a JSON number or decimal string (``1E+2`` is stored as ``100``)."""
    if isinstance(value, bool | float) or not isinstance(value, int | str | Decimal):
        raise TypeError(f"{value!r} is not an exact decimal number")
    number = Decimal(value)
    exponent = number.as_tuple().exponent
    return number.quantize(Decimal(1)) if isinstance(exponent, int) and exponent > 0 else number


def _instant(value: str) -> datetime:
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"timestamp {value!r} has no timezone")
    return moment


def _typed(value: Any, column: sa.Column[Any]) -> Any:
    """A record's value as the column should hold it, by the column's declared type."""
    if value is None:
        return None
    kind = column.type
    if isinstance(kind, ExactDecimal):
        return _exact(value)
    if isinstance(kind, UtcDateTime):
        return _instant(value)
    if isinstance(kind, sa.Date):
        return date.fromisoformat(value)
    if isinstance(kind, sa.Boolean):
        return value
    if isinstance(kind, sa.Integer):
        return int(_exact(value))
    # Text: a number or boolean in a text field is kept as its JSON text.
    if isinstance(value, str):
        return value
    if isinstance(value, Decimal):
        return format(value, "f")
    return json.dumps(value)


def _data_columns(
    table: sa.Table, key_fields: Sequence[str], money_fields: Sequence[str], source: Row
) -> Row:
    """The key-field and money columns of a record or line."""
    row: Row = {}
    for path in key_fields:
        name = _column(path)
        if name in table.c:  # a missing one is reported as an unexplained column
            row[name] = _typed(_at(source, path), table.c[name])
    for path in money_fields:
        money = _at(source, path)
        amount, currency = _column(path), _column(path) + "_currency"
        if amount in table.c and currency in table.c:
            row[amount] = None if money is None else _exact(money["amount"])
            row[currency] = None if money is None else money["currency"]
    return row


def expected_header(spec: EntitySpec, record: Row) -> Row:
    """The header row a live record should have (load metadata aside)."""
    table = table_for(spec.name)
    stamp = record.get("updated_at")
    return {
        "id": record["id"],
        **_data_columns(table, spec.key_fields, spec.money_fields, record),
        "updated_at": None if stamp is None else _instant(stamp),
        "deleted_at": None,
        "_record": record,
    }


def expected_lines(child: ChildSpec, record: Row) -> dict[str, Row]:
    """The rows of one child table for one record, by line key."""
    table = table_for(child.name)
    lines: dict[str, Row] = {}
    for index, line in enumerate(record.get(child.field) or []):
        key = str(index) if child.key is None else str(line[child.key])
        lines[key] = {
            "parent_id": record["id"],
            "line_key": key,
            "line_index": index,
            **_data_columns(table, child.key_fields, child.money_fields, line),
            "_record": line,
        }
    return lines


def _declared(table: sa.Table, key_fields: Sequence[str], money_fields: Sequence[str]) -> set[str]:
    return {_column(p) for p in key_fields} | {
        name for p in money_fields for name in (_column(p), _column(p) + "_currency")
    }


def _unexplained(table: sa.Table, declared: set[str]) -> list[str]:
    present = {c.name for c in table.columns}
    return [
        f"{table.name}: column {name!r} {where}"
        for names, where in (
            (present - declared, "is in the table but no declaration fills it (unchecked)"),
            (declared - present, "is declared by the catalog but missing from the table"),
        )
        for name in sorted(names)
    ]


# ----------------------------------------------------------------------------- comparison


def _difference(expected: Any, got: Any, path: str = "") -> str | None:
    """Where ``got`` differs from ``expected`` (a path, ``""`` for the value itself), or None.

    Strict: types must match (``1`` is not ``True``, a float is never a Decimal), a Decimal
    must have the same value and the same fraction digits, a datetime must be aware.
    """
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            return path
        for key in [*expected, *(k for k in got if k not in expected)]:
            if key not in expected or key not in got:
                return f"{path}.{key}"
            found = _difference(expected[key], got[key], f"{path}.{key}")
            if found is not None:
                return found
        return None
    if isinstance(expected, list):
        if not isinstance(got, list) or len(got) != len(expected):
            return path
        for index, (want, have) in enumerate(zip(expected, got, strict=True)):
            found = _difference(want, have, f"{path}[{index}]")
            if found is not None:
                return found
        return None
    if type(got) is not type(expected):
        return path
    if isinstance(expected, Decimal):
        same = got == expected and got.as_tuple().exponent == expected.as_tuple().exponent
        return None if same else path
    if isinstance(expected, datetime) and got.tzinfo is None:
        return path
    return None if got == expected else path


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _canonical(value: Any) -> str:
    """Text that is equal exactly when :func:`_difference` finds none (for a fast first test):
    sorted keys, ``true`` apart from ``1``, a Decimal apart from a string or an int."""
    return json.dumps(value, sort_keys=True, default=lambda d: {"\u0000decimal": str(d)})


def _compare_row(label: str, expected: Row, got: Row, problems: list[str]) -> None:
    for column, want in expected.items():
        if column == "_record" and _canonical(want) == _canonical(got[column]):
            continue  # the common case, at the speed of the json module's C encoder
        found = _difference(want, got[column])
        if found is None:
            continue
        if column == "_record":  # a record is long: show where it differs
            problems.append(
                f"{label}: _record{found}: expected {_shown(_at_path(want, found))}, "
                f"got {_shown(_at_path(got[column], found))}"
            )
        else:
            problems.append(
                f"{label}: {column}: expected {_shown(want)}, got {_shown(got[column])}"
            )


_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def _at_path(value: Any, path: str) -> Any:
    """The value at a path of :func:`_difference` (``.items[2].amount``), for the message."""
    for key, index in _STEP.findall(path):
        if key and isinstance(value, dict):
            value = value.get(key, "<missing>")
        elif index and isinstance(value, list) and int(index) < len(value):
            value = value[int(index)]
        else:
            return "<missing>"
    return value


def _read(conn: sa.Connection, table: sa.Table) -> list[Row]:
    """Every row, typed by the table's columns; ``_record`` parsed here from its text."""
    columns = [
        sa.cast(c, sa.Text).label(c.name) if c.name == "_record" else c for c in table.columns
    ]
    names = [c.name for c in table.columns]
    rows = [dict(zip(names, r, strict=True)) for r in conn.execute(sa.select(*columns))]
    for row in rows:
        if row["_record"] is not None:
            row["_record"] = parse(row["_record"])
    return rows


def entity_differences(conn: sa.Connection, entity: str, truth: Truth) -> list[str]:
    """Everything in which the warehouse's tables of ``entity`` differ from ``truth``."""
    spec = catalog.entity(entity)
    table = table_for(entity)
    problems = _unexplained(
        table,
        _declared(table, spec.key_fields, spec.money_fields)
        | {"id", "updated_at", "deleted_at", "_record", *LOAD_METADATA},
    )
    rows = _read(conn, table)
    for record_id, count in Counter(r["id"] for r in rows).items():
        if count > 1:
            problems.append(f"{entity} {record_id}: {count} rows with this id")
    stored = {r["id"]: r for r in rows}
    for record_id, record in truth.live.items():
        row = stored.get(record_id)
        label = f"{entity} {record_id}"
        if row is None:
            problems.append(f"{label}: missing (live in the sandbox)")
            continue
        if row["deleted_at"] is not None:
            problems.append(f"{label}: deleted_at {row['deleted_at']} but live in the sandbox")
            continue
        _compare_row(label, expected_header(spec, record), row, problems)
        _check_load_metadata(label, row, problems)
    hashes = Counter(r["_record_hash"] for r in rows if r["deleted_at"] is None)
    problems += [
        f"{entity}: {count} live rows share _record_hash {value!r} (a hash must tell records apart)"
        for value, count in hashes.items()
        if count > 1
    ]
    for record_id, row in stored.items():
        if row["deleted_at"] is None and record_id not in truth.live:
            why = "deleted in" if record_id in truth.deleted else "unknown to"
            problems.append(f"{entity} {record_id}: live in the warehouse, but {why} the sandbox")
    live_in_both = {i for i, r in stored.items() if r["deleted_at"] is None} & truth.live.keys()
    for child in spec.children:
        problems += _child_differences(conn, child, truth, stored, live_in_both)
    return problems


def _check_load_metadata(label: str, row: Row, problems: list[str]) -> None:
    if not (isinstance(row["_record_hash"], str) and _HASH.fullmatch(row["_record_hash"])):
        problems.append(f"{label}: _record_hash {row['_record_hash']!r} is not 32 hex digits")
    synced = row["_synced_at"]
    if not (isinstance(synced, datetime) and synced.tzinfo is not None):
        problems.append(f"{label}: _synced_at {synced!r} is not an aware datetime")
    if not (isinstance(row["_run_id"], str) and row["_run_id"]):
        problems.append(f"{label}: _run_id {row['_run_id']!r} names no run")


def _child_differences(
    conn: sa.Connection,
    child: ChildSpec,
    truth: Truth,
    headers: Mapping[str, Row],
    live_in_both: set[str],
) -> list[str]:
    table = table_for(child.name)
    problems = _unexplained(
        table,
        _declared(table, child.key_fields, child.money_fields)
        | {"parent_id", "line_key", "line_index", "_record"},
    )
    stored: dict[str, dict[str, Row]] = {}
    for row in _read(conn, table):
        lines = stored.setdefault(row["parent_id"], {})
        if row["line_key"] in lines:
            problems.append(f"{child.name} {row['parent_id']}/{row['line_key']}: duplicate line")
        lines[row["line_key"]] = row
    for parent_id in sorted(stored.keys() - headers.keys()):
        count = len(stored[parent_id])
        problems.append(f"{child.name} {parent_id}: {count} line(s) without a header row")
    # Lines of a deleted parent are left as they were (a soft delete touches the header only);
    # a parent missing or live against the sandbox is reported once, at its header.
    for parent_id in sorted(live_in_both):
        want = expected_lines(child, truth.live[parent_id])
        have = stored.get(parent_id, {})
        for key in sorted(want.keys() - have.keys()):
            problems.append(f"{child.name} {parent_id}/{key}: line missing")
        for key in sorted(have.keys() - want.keys()):
            problems.append(f"{child.name} {parent_id}/{key}: line not in the sandbox's record")
        for key in sorted(want.keys() & have.keys()):
            _compare_row(f"{child.name} {parent_id}/{key}", want[key], have[key], problems)
    return problems


# ----------------------------------------------------------------------------- entry points


@contextmanager
def _connection(target: sa.Engine | sa.Connection | str) -> Iterator[sa.Connection]:
    """A connection to read with: the caller's, or a new one (a URL gets its own engine)."""
    if isinstance(target, sa.Connection):
        yield target
        return
    engine = sa.create_engine(target) if isinstance(target, str) else target
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        if isinstance(target, str):
            engine.dispose()


def assert_warehouse_equals(
    target: sa.Engine | sa.Connection | str, truths: Mapping[str, Truth]
) -> None:
    """Raise AssertionError listing (up to :data:`MAX_SHOWN`) every difference from ``truths``."""
    problems: list[str] = []
    with _connection(target) as conn:
        for entity, truth in truths.items():
            problems += entity_differences(conn, entity, truth)
    if problems:
        shown = "\n  ".join(problems[:MAX_SHOWN])
        more = len(problems) - MAX_SHOWN
        tail = f"\n  ... and {more} more" if more > 0 else ""
        entities = ", ".join(truths)
        count = f"{len(problems)} difference{'s' if len(problems) > 1 else ''}"
        raise AssertionError(
            f"the warehouse differs from the sandbox ({count} in {entities}):\n  {shown}{tail}"
        )


def assert_warehouse_equals_sandbox(
    server: SandboxServer, target: sa.Engine | sa.Connection | str, entities: Iterable[str]
) -> None:
    """0 lost, 0 duplicated, every column of every header and child table equal, deleted
    records never live: the warehouse at ``target`` (engine, connection or URL) against the
    sandbox's store, for ``entities`` (catalog names)."""
    assert_warehouse_equals(target, {e: sandbox_truth(server, e) for e in entities})


def assert_warehouse_equals_records(
    target: sa.Engine | sa.Connection | str, records: Mapping[str, Iterable[Row]]
) -> None:
    """The same comparison against live records obtained elsewhere (the sandbox's
    ``/_sandbox/records/{table}`` route, parsed with :func:`parse`): deleted ids are then
    unknown, and any row not live there must simply not be live in the warehouse."""
    assert_warehouse_equals(
        target, {e: Truth({r["id"]: r for r in rows}) for e, rows in records.items()}
    )
