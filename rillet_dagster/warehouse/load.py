"""Loading Rillet records into the warehouse: monotonic upserts, soft deletes and watermarks.

Every write here is keyed on the record id and **monotonic**: a stored row is replaced only by a
version with an equal or newer ``updated_at``, and a soft-deleted row only by a version newer than
its tombstone. Rules are checked twice: in Python, to count what happened and to skip work, and
in the ``ON CONFLICT DO UPDATE ... WHERE`` of the statement itself, so that a concurrent writer
can never be overwritten by an older version.

A record's "version time" is its ``updated_at``; for entities without one it is the caller's
``synced_at``, which should therefore be the time the records were read (the request start),
not the time the load finishes.

The monotonic rule protects against out-of-order webhooks, not against Rillet: a pass over
Rillet's list loads ``authoritative=True`` and replaces any row whose content differs, whatever
its stored ``updated_at`` (a webhook body stamped 2099 would otherwise pin the row for good).
"""

from __future__ import annotations

import hashlib
import math
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from itertools import islice
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Boolean,
    Column,
    ColumnElement,
    Engine,
    MetaData,
    String,
    Table,
    Text,
    and_,
    any_,
    cast,
    delete,
    false,
    func,
    insert,
    literal_column,
    not_,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection

if TYPE_CHECKING:
    import pandas as pd

from rillet_dagster import catalog
from rillet_dagster.catalog import ChildSpec, EntitySpec
from rillet_dagster.clock import parse_timestamp
from rillet_dagster.rillet.money import (
    MAX_FRACTION_DIGITS,
    MAX_WHOLE_DIGITS,
    MoneyError,
    bounded,
    is_currency_code,
    shown,
    to_decimal,
)
from rillet_dagster.warehouse import schema
from rillet_dagster.warehouse.schema import (
    WATERMARKS_TABLE,
    FieldColumn,
    FieldKind,
    MoneyColumns,
    write_transaction,
)
from rillet_dagster.warehouse.types import (
    ExactDecimal,
    decimal_text,
    dumps,
    loads,
    sqlite_timestamp,
    to_exact_decimal,
)

# Ids per IN (...) list: under SQLite's 32,766 bound-parameter limit.
_IN_CHUNK = 5000


class RecordSchemaError(ValueError):
    """A record that does not fit the catalog: a required field missing, a value of a wrong type.

    Attributes:
        entity: catalog entity name.
        record_id: the record's ``id`` (``None`` when the id itself is missing or bad).
        field: the offending field path (``items[2].amount.amount``).
    """

    def __init__(self, entity: str, record_id: object, field: str, problem: str) -> None:
        self.entity = entity
        self.record_id = record_id
        self.field = field
        if len(problem) > 300:  # a parser's message may quote a whole value
            problem = problem[:280] + "... (cut)"
        # shown(): the message is logged and stored; a megabyte-long id must not make it so.
        super().__init__(f"{entity} record {shown(record_id)}: field {shown(field, 200)} {problem}")


@dataclass
class UpsertResult:
    """What one :func:`upsert_records` call did, per header record (and child rows written).

    ``duplicates`` counts records dropped because the same id came again later in the same
    batch (the newest is kept); across batches a repeat is applied again under the monotonic
    rule, so the newest still wins, and counts as unchanged, updated or skipped.
    """

    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped_older: int = 0
    child_rows: int = 0
    duplicates: int = 0

    @property
    def written(self) -> int:
        """Header rows inserted or replaced."""
        return self.inserted + self.updated


# ----------------------------------------------------------------------------- connections


@contextmanager
def _atomic(target: Engine | Connection, table: Table) -> Iterator[Connection]:
    """One all-or-nothing unit: its own transaction, or a savepoint inside the caller's."""
    if isinstance(target, Engine):
        with write_transaction(target) as conn:
            _claim_write_lock(conn, table)
            yield conn
    elif target.in_transaction():
        with target.begin_nested():
            _claim_write_lock(target, table)
            yield target
    else:
        with target.begin():
            _claim_write_lock(target, table)
            yield target


def _claim_write_lock(conn: Connection, table: Table) -> None:
    """On SQLite, take the write lock before reading what the write will depend on.

    A caller's plain ``engine.begin()`` is a deferred transaction: reading first and writing
    later would fail with "database is locked" whenever another process wrote in between. A
    write that changes nothing takes the lock (waiting for it under ``busy_timeout``), as
    ``BEGIN IMMEDIATE`` would; it is a no-op when the transaction already holds it.
    """
    if conn.dialect.name == "sqlite":
        key = table.primary_key.columns.values()[0]
        conn.execute(update(table).where(false()).values({key: key}))


def _read_connection(target: Engine | Connection) -> AbstractContextManager[Connection]:
    """A connection to read with: a new one from an engine, or the caller's (left open)."""
    return target.connect() if isinstance(target, Engine) else nullcontext(target)


# ----------------------------------------------------------------------------- table plans


@dataclass(frozen=True)
class _ChildPlan:
    spec: ChildSpec
    table: Table
    fields: tuple[FieldColumn, ...]
    money: tuple[MoneyColumns, ...]


@dataclass(frozen=True)
class _Plan:
    spec: EntitySpec
    table: Table
    fields: tuple[FieldColumn, ...]
    money: tuple[MoneyColumns, ...]
    required: tuple[tuple[str, ...], ...]
    children: tuple[_ChildPlan, ...]


_PLANS: dict[str, _Plan] = {}


def _plan(spec: EntitySpec) -> _Plan:
    # EntitySpec holds a dict, so it is not hashable; its repr identifies it (a spec modified
    # with dataclasses.replace gets its own tables).
    key = repr(spec)
    plan = _PLANS.get(key)
    if plan is None:
        if catalog.ENTITY_BY_NAME.get(spec.name) == spec:
            metadata = schema.METADATA
        else:
            metadata = schema.build_metadata((spec,))
        header = metadata.tables[schema.table_name(spec.name)]
        children = tuple(
            _ChildPlan(
                child,
                metadata.tables[schema.table_name(child.name)],
                schema.field_columns(child.key_fields),
                schema.money_columns(child.money_fields),
            )
            for child in spec.children
        )
        plan = _Plan(
            spec,
            header,
            schema.field_columns(spec.key_fields),
            schema.money_columns(spec.money_fields),
            tuple(tuple(f.split(".")) for f in spec.required_fields),
            children,
        )
        _PLANS[key] = plan
    return plan


def _spec(entity: EntitySpec | str) -> EntitySpec:
    return entity if isinstance(entity, EntitySpec) else catalog.entity(entity)


# ----------------------------------------------------------------------------- extraction

# A plain decimal string within money.bounded() is already its own canonical text (what
# ExactDecimal stores); anything else ("1E+2", "007", 60 digits) goes through Decimal and comes
# out canonical, or is refused. Bounding the repeats costs the fast path nothing.
_PLAIN_DECIMAL = re.compile(
    rf"-?(?:0|[1-9][0-9]{{0,{MAX_WHOLE_DIGITS - 1}}})(?:\.[0-9]{{1,{MAX_FRACTION_DIGITS}}})?"
)
# An int with at most MAX_WHOLE_DIGITS digits: one comparison, no conversion.
_DECIMAL_INT_LIMIT = 10**MAX_WHOLE_DIGITS

# What an INTEGER column holds: PostgreSQL's integer is 32 bits. SQLite's would take 64, but a
# record must load (or be refused) alike on both; payment terms and month counts are small.
_INT_MIN = -(2**31)
_INT_MAX = 2**31 - 1

# Ids name rows and, in the client, URL path segments (GET /invoices/{id}): "." and "..", a "/"
# or a control character there would address another resource. Rillet's ids are UUIDs (36
# characters); 255 admits any plausible id scheme while bounding what becomes a key.
_MAX_ID_LENGTH = 255

_SURROGATE = re.compile("[\ud800-\udfff]")

# Child arrays are serialized once, line by line, and spliced into the parent's JSON text in
# place of this marker; the random part keeps real data from ever matching it.
_MARKER = f"\x00rillet-child-{uuid.uuid4().hex}-"

# Currency codes already checked (at most 26**3 of them).
_CURRENCIES_SEEN: set[str] = set()


def _descend(value: Any, rest: tuple[str, ...]) -> Any:
    for part in rest:
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _decimal_text(value: Any) -> str:
    if type(value) is int and -_DECIMAL_INT_LIMIT < value < _DECIMAL_INT_LIMIT:
        return str(value)
    if type(value) is str and _PLAIN_DECIMAL.fullmatch(value):
        return value
    return decimal_text(to_exact_decimal(value))


def _amount_text(value: Any) -> str:
    if type(value) is str and _PLAIN_DECIMAL.fullmatch(value):
        return value
    return decimal_text(to_decimal(value))


def _text(value: Any) -> str:
    if type(value) is str:
        return value
    if isinstance(value, bool | int | float | Decimal):
        # The column holds the number's text; the record keeps the number.
        return dumps(value)
    raise TypeError(f"is a {type(value).__name__}, not text")


def _date(value: Any) -> str:
    if type(value) is not str:
        raise TypeError(f"is a {type(value).__name__}, not an ISO 8601 date")
    return date.fromisoformat(value).isoformat()


def _timestamp(value: Any) -> datetime:
    if type(value) is not str:
        raise TypeError(f"is a {type(value).__name__}, not an ISO 8601 timestamp")
    return parse_timestamp(value)


def _timestamp_text(value: Any) -> str:
    return sqlite_timestamp(_timestamp(value))


def _boolean(value: Any) -> bool:
    if type(value) is not bool:
        raise TypeError(f"is a {type(value).__name__}, not a boolean")
    return value


def _integer(value: Any) -> int:
    """An INTEGER column's value; the range is checked before any conversion, so that
    ``1e300000000`` never becomes a 300-million-digit int."""
    if isinstance(value, bool) or not isinstance(value, int | Decimal | str):
        raise TypeError(f"is a {type(value).__name__}, not an integer")
    if isinstance(value, int):
        number: int | Decimal = value
    else:
        try:
            number = Decimal(value)
        except ArithmeticError:
            raise ValueError(f"{shown(value)} is not a whole number") from None
        if not number.is_finite() or number != number.to_integral_value():
            raise ValueError(f"{shown(value)} is not a whole number")
    if not _INT_MIN <= number <= _INT_MAX:
        raise ValueError(
            f"{shown(value)} is out of an integer column's range ({_INT_MIN} to {_INT_MAX})"
        )
    return int(number)


class _FieldError(Exception):
    """A field of one record or line that does not fit; the caller adds entity, id and path."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(field, problem)
        self.field = field
        self.problem = problem


class _Entry:
    """One validated record: its header row values and its child rows."""

    __slots__ = ("children", "record_hash", "record_id", "updated_at", "values")

    def __init__(
        self,
        record_id: str,
        updated_at: datetime | None,
        record_hash: str,
        values: tuple[Any, ...],
        children: list[list[tuple[Any, ...]]],
    ) -> None:
        self.record_id = record_id
        self.updated_at = updated_at
        self.record_hash = record_hash
        self.values = values
        self.children = children


# Values are produced in the form the driver stores directly (no SQLAlchemy type processing on
# the hot path): exact decimal text, UTC ISO text, ISO dates. They are the same text forms the
# column types write, so reads through SQLAlchemy see the usual Python types.
#
# Each kind is one statement of the compiled row function below, applied to ``{v}`` (never
# None there); the common case (a value already in its stored form) is a type test, not a call.
_CONVERSIONS: dict[str, str] = {
    FieldKind.TEXT: "if type({v}) is not str: {v} = _text({v})",
    FieldKind.DATE: "{v} = _date({v})",
    FieldKind.TIMESTAMP: "{v} = _timestamp_text({v})",
    FieldKind.BOOLEAN: "{v} = TRUE if _boolean({v}) else FALSE",
    FieldKind.INTEGER: "if type({v}) is not int or not _INT_MIN <= {v} <= _INT_MAX: "
    "{v} = _integer({v})",
    FieldKind.DECIMAL: "{v} = _decimal_text({v})",
}

RowFunction = Callable[[Mapping[str, Any]], tuple[Any, ...]]


def _money(value: Any, where: str) -> tuple[str, str]:
    """The amount text and currency of a money object, the checks the compiled fast path skips.

    Raises:
        _FieldError: naming the money field, or its ``.currency`` or ``.amount``.
    """
    if not isinstance(value, Mapping) or "amount" not in value:
        raise _FieldError(where, "must be a money object {amount, currency}")
    currency = value.get("currency")
    if not (type(currency) is str and currency in _CURRENCIES_SEEN):
        if not is_currency_code(currency):
            raise _FieldError(f"{where}.currency", f"{currency!r} is not an ISO 4217 currency code")
        _CURRENCIES_SEEN.add(currency)
    try:
        return _amount_text(value["amount"]), currency
    except (TypeError, ValueError, ArithmeticError) as error:
        raise _FieldError(f"{where}.amount", str(error)) from None


def _getter(path: tuple[str, ...]) -> str:
    """Source text reading ``path`` from ``src`` (``None`` when any step is missing)."""
    if len(path) == 1:
        return f"src.get({path[0]!r})"
    return f"_descend(src.get({path[0]!r}), {path[1:]!r})"


def _compile_row(
    fields: Sequence[FieldColumn], money: Sequence[MoneyColumns], *, postgres: bool
) -> RowFunction:
    """A function from a record (or line) to its typed and money column values, in order.

    Generated as straight-line source, as ``dataclasses`` does for ``__init__``: the generic
    loop over (path, converter) pairs it replaces cost more than the conversions themselves,
    and this runs once per record and per line. Paths and names come from the catalog and enter
    the source only as ``repr`` literals.

    The returned function raises :class:`_FieldError` naming the field (relative to ``src``).
    """
    body = ["    where = ''", "    try:"]
    names: list[str] = []
    for index, field in enumerate(fields):
        name = f"f{index}"
        names.append(name)
        conversion = _CONVERSIONS[field.kind].format(v=name)
        body += [
            f"        where = {'.'.join(field.path)!r}",
            f"        {name} = {_getter(field.path)}",
            f"        if {name} is not None:",
            f"            {conversion}",
        ]
    for index, column in enumerate(money):
        amount, currency = f"a{index}", f"c{index}"
        names += (amount, currency)
        where = ".".join(column.path)
        # Fast path: a dict with a plain decimal string and a currency already checked.
        body += [
            f"        m = {_getter(column.path)}",
            "        if m is None:",
            f"            {amount} = {currency} = None",
            f"        elif not (type(m) is dict and type({amount} := m.get('amount')) is str",
            f"                and _plain({amount})",
            f"                and type({currency} := m.get('currency')) is str",
            f"                and {currency} in _SEEN):",
            f"            {amount}, {currency} = _money(m, {where!r})",
        ]
    body += [
        f"        return ({''.join(f'{n}, ' for n in names)})",
        "    except (TypeError, ValueError, ArithmeticError) as error:",
        "        raise _FieldError(where, str(error)) from None",
    ]
    source = "def row(src):\n" + "\n".join(body) + "\n"
    namespace: dict[str, Any] = {
        "_text": _text,
        "_date": _date,
        "_timestamp_text": _timestamp_text,
        "_boolean": _boolean,
        "_integer": _integer,
        "_INT_MIN": _INT_MIN,
        "_INT_MAX": _INT_MAX,
        "_decimal_text": _decimal_text,
        "_descend": _descend,
        "_money": _money,
        "_plain": _PLAIN_DECIMAL.fullmatch,
        "_SEEN": _CURRENCIES_SEEN,
        "_FieldError": _FieldError,
        # Booleans as the driver binds them: SQLite has no boolean type, PostgreSQL's COPY does.
        "TRUE": True if postgres else 1,
        "FALSE": False if postgres else 0,
    }
    exec(compile(source, f"<rillet row of {len(names)} columns>", "exec"), namespace)  # noqa: S102
    return namespace["row"]


class _Extractor:
    """Turns records into row values, raising :class:`RecordSchemaError` on what does not fit."""

    def __init__(self, plan: _Plan, *, postgres: bool, run_id: str, synced_at: datetime) -> None:
        self.plan = plan
        self.entity = plan.spec.name
        self.postgres = postgres
        self.run_id = run_id
        self.synced_at = synced_at
        self.synced_text = sqlite_timestamp(synced_at)
        self.header_row = _compile_row(plan.fields, plan.money, postgres=postgres)
        self.child_rows = [
            _compile_row(c.fields, c.money, postgres=postgres) for c in plan.children
        ]
        self.required = [(path[0], path[1:]) for path in plan.required]
        self.markers = [f"{_MARKER}{index}" for index in range(len(plan.children))]
        self.marker_json = [dumps(marker) for marker in self.markers]

    def entry(self, record: Any) -> _Entry:
        if not isinstance(record, Mapping):
            raise RecordSchemaError(self.entity, None, "", f"is a {type(record).__name__}")
        record_id = record.get("id")
        if type(record_id) is not str or not record_id:
            raise RecordSchemaError(self.entity, record_id, "id", "must be a non-empty string")
        if (
            len(record_id) > _MAX_ID_LENGTH
            or not record_id.isprintable()  # control characters, NUL, lone surrogates
            or "/" in record_id
            or record_id in (".", "..")
        ):
            raise RecordSchemaError(
                self.entity,
                record_id,
                "id",
                f"must be at most {_MAX_ID_LENGTH} printable characters, without '/', "
                "and not '.' or '..'",
            )
        for first, rest in self.required:
            value = record.get(first)
            if value is None or (rest and _descend(value, rest) is None):
                path = ".".join((first, *rest))
                raise RecordSchemaError(self.entity, record_id, path, "is required but missing")
        try:
            columns = self.header_row(record)
        except _FieldError as error:
            raise RecordSchemaError(self.entity, record_id, error.field, error.problem) from None
        updated_at = record.get("updated_at")
        updated = None
        if updated_at is not None:
            try:
                updated = _timestamp(updated_at)
            except (TypeError, ValueError) as error:
                raise RecordSchemaError(self.entity, record_id, "updated_at", str(error)) from None
        children, child_texts = self._children(record, record_id)
        text = self._json(record, record_id, child_texts)
        try:
            encoded = text.encode()
        except UnicodeEncodeError:
            # A lone surrogate ("\ud800" in JSON, which json.loads accepts): not Unicode text,
            # so no driver can store it. The record's text holds every value of every column
            # and line, so this one encode (needed for the hash anyway) checks them all.
            raise RecordSchemaError(
                self.entity,
                record_id,
                _find(record, "", _has_surrogate) or "",
                "contains a lone UTF-16 surrogate, which is not Unicode text and cannot be stored",
            ) from None
        # SHA-256 runs in hardware on current CPUs (faster than blake2 here); 128 bits is plenty
        # to tell two versions of one record apart.
        record_hash = hashlib.sha256(encoded).hexdigest()[:32]
        values = (
            record_id,
            *columns,
            None if updated is None else sqlite_timestamp(updated),
            None,  # deleted_at: a version that is written is live
            text,
            record_hash,
            self.synced_text,
            self.run_id,
        )
        return _Entry(record_id, updated, record_hash, values, children)

    def _children(
        self, record: Mapping[str, Any], record_id: str
    ) -> tuple[list[list[tuple[Any, ...]]], list[list[str] | None]]:
        rows_per_child: list[list[tuple[Any, ...]]] = []
        texts_per_child: list[list[str] | None] = []
        for child, row_of in zip(self.plan.children, self.child_rows, strict=True):
            lines = record.get(child.spec.field)
            if lines is None:
                rows_per_child.append([])
                texts_per_child.append(None)
                continue
            if not isinstance(lines, list):
                raise RecordSchemaError(
                    self.entity, record_id, child.spec.field, "must be a list of lines"
                )
            rows, texts = self._lines(child.spec, row_of, lines, record_id)
            rows_per_child.append(rows)
            texts_per_child.append(texts)
        return rows_per_child, texts_per_child

    def _lines(
        self, spec: ChildSpec, row_of: RowFunction, lines: list[Any], record_id: str
    ) -> tuple[list[tuple[Any, ...]], list[str]]:
        """The rows of one child array and each line's JSON text (spliced into the record's)."""
        field, key_field = spec.field, spec.key
        rows: list[tuple[Any, ...]] = []
        texts: list[str] = []
        seen: set[str] = set()
        for index, line in enumerate(lines):
            if not (type(line) is dict or isinstance(line, Mapping)):
                raise RecordSchemaError(
                    self.entity, record_id, f"{field}[{index}]", "is not an object"
                )
            try:
                key = str(index) if key_field is None else _line_key(line, key_field, seen)
                columns = row_of(line)
                line_text = dumps(line)
            except _FieldError as error:
                where = f"{field}[{index}].{error.field}"
                raise RecordSchemaError(self.entity, record_id, where, error.problem) from None
            except (TypeError, ValueError) as error:
                where = _find(line, f"{field}[{index}]", _unwritable) or f"{field}[{index}]"
                raise RecordSchemaError(
                    self.entity, record_id, where, f"is not JSON: {error}"
                ) from None
            except RecursionError as error:
                raise RecordSchemaError(
                    self.entity, record_id, f"{field}[{index}]", f"is not JSON: {error}"
                ) from None
            texts.append(line_text)
            rows.append((record_id, key, index, *columns, line_text))
        return rows, texts

    def _json(
        self, record: Mapping[str, Any], record_id: str, child_texts: list[list[str] | None]
    ) -> str:
        try:
            if any(texts is not None for texts in child_texts):
                shallow = dict(record)
                for child, marker, texts in zip(
                    self.plan.children, self.markers, child_texts, strict=True
                ):
                    if texts is not None:
                        shallow[child.spec.field] = marker
                text = dumps(shallow)
                for marker_json, texts in zip(self.marker_json, child_texts, strict=True):
                    if texts is not None:
                        text = text.replace(marker_json, "[" + ",".join(texts) + "]", 1)
            else:
                text = dumps(record)
        except (TypeError, ValueError) as error:
            where = _find(record, "", _unwritable) or ""
            raise RecordSchemaError(
                self.entity, record_id, where, f"is not JSON: {error}"
            ) from None
        except RecursionError as error:
            raise RecordSchemaError(self.entity, record_id, "", f"is not JSON: {error}") from None
        # PostgreSQL text and jsonb cannot hold U+0000; refuse it by name rather than let the
        # driver fail with a message that does not say which record. The substring test also
        # matches an escaped backslash followed by "u0000", hence the exact search after it.
        if self.postgres and "\\u0000" in text:
            path = _find(record, "", _has_nul)
            if path is not None:
                raise RecordSchemaError(
                    self.entity,
                    record_id,
                    path,
                    "contains a NUL character, which PostgreSQL text and jsonb cannot store",
                )
        return text


def _line_key(line: Mapping[str, Any], key_field: str, seen: set[str]) -> str:
    """The line's key as text, unique within its array (it is part of the primary key).

    Raises:
        _FieldError: the key is missing or repeats an earlier line's.
    """
    raw_key = line.get(key_field)
    if type(raw_key) is str and raw_key:
        key = raw_key
    elif type(raw_key) is int:
        key = str(raw_key)
    else:
        raise _FieldError(key_field, "is missing")
    if key in seen:
        raise _FieldError(key_field, f"repeats {key!r}")
    seen.add(key)
    return key


def _find(value: Any, path: str, bad: Callable[[Any], bool]) -> str | None:
    """The path (``items[1].description``) of the first value or object key ``bad`` flags.

    Only run once a record is known to be refused: it walks the whole record.
    """
    if isinstance(value, Mapping):
        for key, item in value.items():
            here = _join(path, key)
            if bad(key):
                return here
            found = _find(item, here, bad)
            if found is not None:
                return found
        return None
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = _find(item, f"{path}[{index}]", bad)
            if found is not None:
                return found
        return None
    return path if bad(value) else None


def _join(path: str, key: object) -> str:
    # The path goes into error messages and quarantine rows: a key that is not printable text
    # (NUL, a lone surrogate) is written as escapes.
    text = str(key)
    if not text.isprintable():
        text = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    return f"{path}.{text}" if path else text


def _has_nul(value: Any) -> bool:
    return isinstance(value, str) and "\x00" in value


def _has_surrogate(value: Any) -> bool:
    return isinstance(value, str) and _SURROGATE.search(value) is not None


def _unwritable(value: Any) -> bool:
    """What :func:`dumps` refuses: a number out of bounds, NaN or infinity, a non-JSON type."""
    if isinstance(value, Decimal):
        try:
            bounded(value)
        except MoneyError:
            return True
        return False
    if isinstance(value, float):
        return not math.isfinite(value)
    return not (value is None or isinstance(value, str | int))


# ----------------------------------------------------------------------------- statements


def _may_replace(table: Table, new: Any, *, authoritative: bool) -> ColumnElement[bool]:
    """The WHERE of ``ON CONFLICT DO UPDATE`` (``new`` = ``excluded``): the same rules as
    :func:`_verdict`, monotonic or authoritative."""
    stored = table.c
    unchanged = and_(
        stored.deleted_at.is_(None),
        stored.updated_at.is_not_distinct_from(new.updated_at),
        stored._record_hash == new._record_hash,
    )
    if authoritative:
        return and_(
            # Rillet listed the record live when the read started (_synced_at): a tombstone
            # from before that is wrong; one from after may be a deletion since, and stays.
            or_(stored.deleted_at.is_(None), new._synced_at > stored.deleted_at),
            not_(unchanged),
        )
    return and_(
        # Never older than what is stored (no updated_at on either side: replace).
        or_(
            stored.updated_at.is_(None),
            new.updated_at.is_(None),
            new.updated_at >= stored.updated_at,
        ),
        # A tombstone wins over every version not newer than it.
        or_(
            stored.deleted_at.is_(None),
            _version_time(new.updated_at, new._synced_at) > stored.deleted_at,
        ),
        # An identical re-delivery is left alone (its load metadata included).
        not_(unchanged),
    )


def _version_time(updated_at: Any, synced_at: Any) -> Any:
    return func.coalesce(updated_at, synced_at)


def _set_all(table: Table, new: Any) -> dict[str, Any]:
    return {c.name: new[c.name] for c in table.columns if c.name != "id"}


def _sqlite_sql(statement: Any, dialect: Any, table: Table) -> str:
    """Driver SQL of an INSERT taking one ``?`` per column, in the table's column order."""
    names = [c.name for c in table.columns]
    compiled = statement.compile(dialect=dialect, column_keys=names)
    if list(compiled.positiontup or ()) != names:
        raise RuntimeError(f"unexpected parameter order compiling the insert into {table.name}")
    return str(compiled)


def _id_in(conn: Connection, column: Any, ids: Sequence[str]) -> ColumnElement[bool]:
    """``column IN ids``; one array parameter on PostgreSQL (psycopg parses every placeholder)."""
    if conn.dialect.name == "postgresql":
        return column == any_(cast(list(ids), ARRAY(String)))
    return column.in_(ids)


def _chunks(items: Sequence[Any], size: int = _IN_CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def batches(records: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of at most ``size`` items, read lazily."""
    iterator = iter(records)
    while batch := list(islice(iterator, size)):
        yield batch


# ----------------------------------------------------------------------------- upsert


def upsert_records(
    target: Engine | Connection,
    spec: EntitySpec,
    records: Iterable[Mapping[str, Any]],
    *,
    run_id: str,
    synced_at: datetime,
    batch_size: int = 5000,
    authoritative: bool = False,
) -> UpsertResult:
    """Write records (and their line items) monotonically, all or nothing.

    Args:
        target: an engine (one write transaction of its own) or a connection (a savepoint in
            its transaction, so that the watermark can be written in the same transaction).
        spec: the catalog entry the records belong to.
        records: records as the API returns them (amounts as strings or ``Decimal``; a float
            amount is refused). Unknown fields are kept in ``_record``.
        run_id: stored in ``_run_id`` of every row written.
        synced_at: when the records were read (aware); stored in ``_synced_at`` and used as the
            version time of records without ``updated_at``.
        batch_size: records per round trip.
        authoritative: the records are Rillet's current list (a sync pass), not webhook
            bodies: a stored row whose content differs is replaced even if its ``updated_at``
            is newer, and a tombstone older than ``synced_at`` is lifted (Rillet lists the
            record live). A tombstone newer than ``synced_at`` stays: the record may have been
            deleted after the list was read. A newer live row has no such test: a webhook
            applied after the read is undone here, and the next incremental pass, which lists
            it again, restores it; a pin (a body stamped 2099) otherwise never goes.

    Returns:
        Counts of inserted, updated, unchanged and skipped (older) records and child rows.

    Raises:
        RecordSchemaError: a record misses a required field or has a value of the wrong type;
            nothing from this call is written.
    """
    if synced_at.tzinfo is None or synced_at.utcoffset() is None:
        raise ValueError("synced_at must be timezone-aware")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    plan = _plan(spec)
    result = UpsertResult()
    with _atomic(target, plan.table) as conn:
        postgres = conn.dialect.name == "postgresql"
        extractor = _Extractor(
            plan, postgres=postgres, run_id=run_id, synced_at=synced_at.astimezone(UTC)
        )
        writer: _Writer = (
            _PostgresWriter(conn, plan, authoritative)
            if postgres
            else _SQLiteWriter(conn, plan, authoritative)
        )
        for batch in batches(records, batch_size):
            entries = _dedupe(extractor, batch, result)
            stored = _stored(conn, plan.table, list(entries))
            to_write: list[_Entry] = []
            for entry in entries.values():
                verdict = _verdict(
                    entry,
                    stored.get(entry.record_id),
                    extractor.synced_at,
                    authoritative=authoritative,
                )
                if verdict == "unchanged":
                    result.unchanged += 1
                elif verdict == "skip":
                    result.skipped_older += 1
                else:
                    to_write.append(entry)
            if not to_write:
                continue
            inserted, updated = writer.upsert(to_write, stored)
            result.inserted += len(inserted)
            result.updated += len(updated)
            result.skipped_older += len(to_write) - len(inserted) - len(updated)
            result.child_rows += writer.replace_children(entries, inserted, updated)
    return result


def _dedupe(extractor: _Extractor, batch: list[Any], result: UpsertResult) -> dict[str, _Entry]:
    """Validated entries by id; of a repeated id the newest (the later, on a tie) is kept."""
    entries: dict[str, _Entry] = {}
    for record in batch:
        entry = extractor.entry(record)
        previous = entries.get(entry.record_id)
        if previous is not None:
            result.duplicates += 1
            if _older(entry.updated_at, previous.updated_at):
                continue
        entries[entry.record_id] = entry
    return entries


def _stored(conn: Connection, table: Table, ids: list[str]) -> dict[str, tuple[Any, Any, Any]]:
    """``id -> (updated_at, deleted_at, _record_hash)`` of the rows already stored."""
    query = select(table.c.id, table.c.updated_at, table.c.deleted_at, table.c._record_hash)
    stored: dict[str, tuple[Any, Any, Any]] = {}
    for chunk in _chunks(ids):
        for record_id, updated_at, deleted_at, record_hash in conn.execute(
            query.where(_id_in(conn, table.c.id, chunk))
        ):
            stored[record_id] = (updated_at, deleted_at, record_hash)
    return stored


class _Writer(ABC):
    """Writes one batch of validated entries; one subclass per backend."""

    def __init__(self, conn: Connection, plan: _Plan, authoritative: bool) -> None:
        self.conn = conn
        self.plan = plan
        self.authoritative = authoritative

    @abstractmethod
    def upsert(
        self, entries: list[_Entry], stored: Mapping[str, Any]
    ) -> tuple[list[str], list[str]]:
        """Write header rows; the ids really inserted and really updated."""

    @abstractmethod
    def insert_lines(self, index: int, rows: list[tuple[Any, ...]]) -> None:
        """Insert rows of child table ``index`` (no conflicts: the parent's old lines are gone)."""

    def replace_children(
        self, entries: Mapping[str, _Entry], inserted: list[str], updated: list[str]
    ) -> int:
        """Replace the lines of every parent written (as a set); the number of rows written."""
        written = 0
        for index, child in enumerate(self.plan.children):
            for chunk in _chunks(updated):
                self.conn.execute(
                    delete(child.table).where(_id_in(self.conn, child.table.c.parent_id, chunk))
                )
            rows = [row for rid in (*inserted, *updated) for row in entries[rid].children[index]]
            if rows:
                self.insert_lines(index, rows)
                written += len(rows)
        return written


# Compiling the upsert costs ~2 ms: negligible for a bulk load, most of a small webhook batch.
_SQLITE_STATEMENTS: dict[tuple[Table, bool], tuple[str, list[str]]] = {}


def _sqlite_statements(plan: _Plan, dialect: Any, authoritative: bool) -> tuple[str, list[str]]:
    cached = _SQLITE_STATEMENTS.get((plan.table, authoritative))
    if cached is None:
        statement = sqlite.insert(plan.table)
        statement = statement.on_conflict_do_update(
            index_elements=[plan.table.c.id],
            set_=_set_all(plan.table, statement.excluded),
            where=_may_replace(plan.table, statement.excluded, authoritative=authoritative),
        )
        cached = (
            _sqlite_sql(statement, dialect, plan.table),
            [
                _sqlite_sql(sqlite.insert(child.table), dialect, child.table)
                for child in plan.children
            ],
        )
        _SQLITE_STATEMENTS[plan.table, authoritative] = cached
    return cached


class _SQLiteWriter(_Writer):
    """``executemany`` of prepared driver values: sqlite3 binds them in C."""

    def __init__(self, conn: Connection, plan: _Plan, authoritative: bool) -> None:
        super().__init__(conn, plan, authoritative)
        self.upsert_sql, self.line_sql = _sqlite_statements(plan, conn.dialect, authoritative)

    def upsert(
        self, entries: list[_Entry], stored: Mapping[str, Any]
    ) -> tuple[list[str], list[str]]:
        written = self.conn.exec_driver_sql(self.upsert_sql, [e.values for e in entries]).rowcount
        if written != len(entries):
            # Only possible when another writer got in between the read and the write, which
            # the IMMEDIATE transaction (or a stale-snapshot error) rules out: refuse to guess.
            raise RuntimeError(
                f"{self.plan.table.name}: {len(entries)} rows sent, {written} written; "
                "use write_transaction() so that the load holds the write lock"
            )
        inserted = [e.record_id for e in entries if e.record_id not in stored]
        return inserted, [e.record_id for e in entries if e.record_id in stored]

    def insert_lines(self, index: int, rows: list[tuple[Any, ...]]) -> None:
        self.conn.exec_driver_sql(self.line_sql[index], rows)


class _PostgresWriter(_Writer):
    """``COPY`` into a temporary stage, then one set-based ``INSERT ... ON CONFLICT``."""

    def __init__(self, conn: Connection, plan: _Plan, authoritative: bool) -> None:
        super().__init__(conn, plan, authoritative)
        table = plan.table
        preparer = conn.dialect.identifier_preparer
        self.stage = Table(
            f"_rillet_stage_{table.name}",
            MetaData(),
            *(Column(c.name, c.type) for c in table.columns),
        )
        conn.exec_driver_sql(
            f"CREATE TEMPORARY TABLE IF NOT EXISTS {preparer.format_table(self.stage)} "
            f"(LIKE {preparer.format_table(table)} INCLUDING DEFAULTS) ON COMMIT DROP"
        )
        names = [c.name for c in table.columns]
        statement = postgresql.insert(table).from_select(names, select(*self.stage.c))
        self.upsert_statement = statement.on_conflict_do_update(
            index_elements=[table.c.id],
            set_=_set_all(table, statement.excluded),
            where=_may_replace(table, statement.excluded, authoritative=authoritative),
        ).returning(
            table.c.id,
            # xmax = 0 on a freshly inserted tuple: tells an insert from an update.
            literal_column("xmax = 0", Boolean),
        )
        self.stage_name = preparer.format_table(self.stage)
        self.stage_copy = self._copy_sql(self.stage)
        self.direct_copy = self._copy_sql(table)
        self.line_copy = [self._copy_sql(child.table) for child in plan.children]
        _prefer_lz4(conn)

    def _copy_sql(self, table: Table) -> str:
        preparer = self.conn.dialect.identifier_preparer
        columns = ", ".join(preparer.quote(c.name) for c in table.columns)
        return f"COPY {preparer.format_table(table)} ({columns}) FROM STDIN"

    def _copy(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        driver = self.conn.connection.driver_connection
        assert driver is not None
        with driver.cursor() as cursor, cursor.copy(sql) as copy:
            for row in rows:
                copy.write_row(row)

    def upsert(
        self, entries: list[_Entry], stored: Mapping[str, Any]
    ) -> tuple[list[str], list[str]]:
        if not stored and self._copy_new(entries):
            return [e.record_id for e in entries], []
        return self._upsert_staged(entries)

    def _copy_new(self, entries: list[_Entry]) -> bool:
        """COPY rows none of which is stored straight into the table; ``False`` on a conflict.

        Skips the stage and its ``INSERT ... SELECT`` (a second copy of every row) for the
        common case of a first load. Another writer may have inserted one of the ids since
        :func:`_stored` looked: the savepoint undoes the COPY and the staged upsert decides.
        """
        from psycopg.errors import UniqueViolation  # psycopg is needed only on PostgreSQL

        try:
            with self.conn.begin_nested():
                self._copy(self.direct_copy, (e.values for e in entries))
        except UniqueViolation:
            return False
        return True

    def _upsert_staged(self, entries: list[_Entry]) -> tuple[list[str], list[str]]:
        self.conn.exec_driver_sql(f"TRUNCATE {self.stage_name}")
        self._copy(self.stage_copy, (e.values for e in entries))
        inserted: list[str] = []
        updated: list[str] = []
        for record_id, was_insert in self.conn.execute(self.upsert_statement):
            (inserted if was_insert else updated).append(record_id)
        return inserted, updated

    def insert_lines(self, index: int, rows: list[tuple[Any, ...]]) -> None:
        self._copy(self.line_copy[index], rows)


def _prefer_lz4(conn: Connection) -> None:
    """Compress this transaction's large values (``_record``) with lz4 where the server has it.

    PostgreSQL's default, pglz, costs about a third of the server's time on a bulk load of
    2-3 KB records; lz4 is several times faster and reads back transparently (PostgreSQL 14+).
    ``SET LOCAL`` ends with the transaction, leaving the caller's session as it was.
    """
    available = conn.exec_driver_sql(
        "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"
    ).scalar()
    if available:
        conn.exec_driver_sql("SET LOCAL default_toast_compression = lz4")


def _older(candidate: datetime | None, than: datetime | None) -> bool:
    return candidate is not None and than is not None and candidate < than


def _verdict(
    entry: _Entry,
    stored: tuple[Any, Any, Any] | None,
    synced_at: datetime,
    *,
    authoritative: bool,
) -> str:
    """``write``, ``unchanged`` or ``skip``: the same rules as the statement's WHERE clause."""
    if stored is None:
        return "write"
    stored_updated, stored_deleted, stored_hash = stored
    updated_at = entry.updated_at
    if authoritative:
        if stored_deleted is not None:
            return "write" if synced_at > stored_deleted else "skip"
        if stored_updated == updated_at and stored_hash == entry.record_hash:
            return "unchanged"
        return "write"
    if _older(updated_at, stored_updated):
        return "skip"
    if stored_deleted is not None:
        version = updated_at if updated_at is not None else synced_at
        return "write" if version > stored_deleted else "skip"
    if stored_updated == updated_at and stored_hash == entry.record_hash:
        return "unchanged"
    return "write"


# ----------------------------------------------------------------------------- deletes


def soft_delete(
    target: Engine | Connection,
    spec: EntitySpec,
    ids: Iterable[str],
    deleted_at: datetime,
    *,
    run_id: str | None = None,
) -> int:
    """Mark records deleted (a Rillet ``*-deleted`` event); nothing else about them changes.

    The tombstone wins over every later-arriving version that is not newer than ``deleted_at``.
    An id the warehouse has never seen gets a tombstone row (``_record`` NULL) so that a late
    ``created`` event carrying an older version cannot bring it back. A row already deleted
    keeps the later of its two deletion times.

    Returns:
        How many records went from live (or unknown) to deleted.
    """
    if deleted_at.tzinfo is None or deleted_at.utcoffset() is None:
        raise ValueError("deleted_at must be timezone-aware")
    table = _plan(spec).table
    wanted = sorted({str(i) for i in ids})
    changed = 0
    with _atomic(target, table) as conn:
        present: set[str] = set()
        for chunk in _chunks(wanted):
            present.update(conn.scalars(select(table.c.id).where(_id_in(conn, table.c.id, chunk))))
            changed += conn.execute(
                update(table)
                .where(_id_in(conn, table.c.id, chunk), table.c.deleted_at.is_(None))
                .values(deleted_at=deleted_at)
            ).rowcount
            conn.execute(
                update(table)
                .where(_id_in(conn, table.c.id, chunk), table.c.deleted_at < deleted_at)
                .values(deleted_at=deleted_at)
            )
        missing = [record_id for record_id in wanted if record_id not in present]
        if missing:
            now = datetime.now(UTC)
            conn.execute(
                insert(table),
                [
                    {"id": i, "deleted_at": deleted_at, "_synced_at": now, "_run_id": run_id}
                    for i in missing
                ],
            )
            changed += len(missing)
    return changed


def mark_missing_deleted(
    target: Engine | Connection, spec: EntitySpec, seen_ids: Container[str], deleted_at: datetime
) -> int:
    """After a **complete** full-refresh pass, soft-delete the live rows it did not see.

    ``seen_ids`` is only asked ``id in seen_ids``: any container will do, such as a compact view
    of the ids the pass's record stream already keeps. ``deleted_at`` should be the time the
    pass started: a row written by another run after that (``updated_at``, or ``_synced_at``
    without one, later than ``deleted_at``) may be a record created after the pass went by, and
    is left alone.

    Returns:
        How many rows were marked deleted.
    """
    if deleted_at.tzinfo is None or deleted_at.utcoffset() is None:
        raise ValueError("deleted_at must be timezone-aware")
    table = _plan(spec).table
    live = select(table.c.id).where(
        table.c.deleted_at.is_(None),
        _version_time(table.c.updated_at, table.c._synced_at) <= deleted_at,
    )
    with _atomic(target, table) as conn:
        # Streamed in chunks: a table of a million live ids read whole would cost more memory
        # (~200 MB of rows and strings) than the rest of a sync; only the unseen ones are kept.
        gone = [
            record_id
            for chunk in conn.scalars(live.execution_options(yield_per=_IN_CHUNK)).partitions()
            for record_id in chunk
            if record_id not in seen_ids
        ]
        marked = 0
        for chunk in _chunks(gone):
            marked += conn.execute(
                update(table)
                .where(_id_in(conn, table.c.id, chunk), table.c.deleted_at.is_(None))
                .values(deleted_at=deleted_at)
            ).rowcount
    return marked


# ----------------------------------------------------------------------------- watermarks


def _watermarks() -> Table:
    return schema.METADATA.tables[WATERMARKS_TABLE]


def get_watermark(target: Engine | Connection, entity: EntitySpec | str) -> datetime | None:
    """The entity's committed watermark, or ``None`` before its first complete sync."""
    name = _spec(entity).name
    table = _watermarks()
    with _read_connection(target) as conn:
        return conn.scalar(select(table.c.watermark).where(table.c.entity == name))


def set_watermark(
    target: Engine | Connection, entity: EntitySpec | str, value: datetime, run_id: str
) -> datetime:
    """Move the entity's watermark forward to ``value`` (never backwards).

    Given a connection, it is written in that connection's transaction, so that it commits
    together with the rows it describes.

    Returns:
        The watermark now stored (``value`` or the newer one already there).
    """
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("watermark must be timezone-aware")
    name = _spec(entity).name
    table = _watermarks()
    with _atomic(target, table) as conn:
        postgres = conn.dialect.name == "postgresql"
        insert_ = postgresql.insert if postgres else sqlite.insert
        statement = insert_(table).values(
            entity=name, watermark=value, updated_at=datetime.now(UTC), run_id=run_id
        )
        new = statement.excluded
        conn.execute(
            statement.on_conflict_do_update(
                index_elements=[table.c.entity],
                set_={
                    "watermark": new.watermark,
                    "updated_at": new.updated_at,
                    "run_id": new.run_id,
                },
                where=or_(table.c.watermark.is_(None), new.watermark > table.c.watermark),
            )
        )
        stored = conn.scalar(select(table.c.watermark).where(table.c.entity == name))
    assert stored is not None
    return stored


# ----------------------------------------------------------------------------- reading


def _table_of(entity: EntitySpec | str) -> Table:
    if isinstance(entity, EntitySpec):
        return _plan(entity).table
    return schema.table_for(entity)


def read_table(target: Engine | Connection, entity: EntitySpec | str) -> pd.DataFrame:
    """A whole table as a DataFrame, money as ``Decimal`` objects (never float).

    ``entity`` is a catalog entry, or the name of an entity or of a child table (``invoice_item``).
    ``_record`` holds the parsed records (numbers as ``Decimal``). Rows are ordered by key.
    """
    import pandas as pd  # imported here: the code location should not pay for it at load

    table = _table_of(entity)
    # Read as text and parse here, so that numbers become Decimal whatever the engine's setup.
    columns = [cast(c, Text).label(c.name) if c.name == "_record" else c for c in table.columns]
    order = [table.c.parent_id, table.c.line_index] if "parent_id" in table.c else [table.c.id]
    with _read_connection(target) as conn:
        rows = conn.execute(select(*columns).order_by(*order)).all()
    values: dict[str, list[Any]] = {c.name: [] for c in table.columns}
    lists = list(values.values())
    for row in rows:
        for column_values, value in zip(lists, row, strict=True):
            column_values.append(value)
    values["_record"] = [None if text is None else loads(text) for text in values["_record"]]
    exact = {c.name for c in table.columns if isinstance(c.type, ExactDecimal)} | {"_record"}
    # Built column by column: pandas' float coercion (read_sql's default) never sees a Decimal,
    # and an all-NULL money column stays object rather than becoming float64.
    return pd.DataFrame(
        {
            name: pd.Series(column_values, dtype=object if name in exact else None)
            for name, column_values in values.items()
        },
        columns=list(values),
    )


def read_records(
    target: Engine | Connection, entity: EntitySpec | str, *, include_deleted: bool = False
) -> list[dict[str, Any]]:
    """The records as received (``_record``), ordered by id; deleted ones only if asked."""
    table = _table_of(entity)
    if "id" not in table.c:
        raise KeyError(f"{table.name} is a child table; read_records reads entities")
    query = select(cast(table.c._record, Text)).where(table.c._record.is_not(None))
    if not include_deleted:
        query = query.where(table.c.deleted_at.is_(None))
    with _read_connection(target) as conn:
        return [loads(text) for text in conn.scalars(query.order_by(table.c.id))]
