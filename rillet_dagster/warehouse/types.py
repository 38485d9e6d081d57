"""Column types that keep money exact and time unambiguous on SQLite and PostgreSQL.

* :class:`ExactDecimal`: ``NUMERIC`` (no precision or scale, so arbitrary and exact) on PostgreSQL;
  on SQLite the canonical plain decimal text, because SQLite's own ``NUMERIC`` affinity turns
  ``"12345678901234567890.12"`` into a 64-bit float.
* :class:`UtcDateTime`: ``TIMESTAMP WITH TIME ZONE`` on PostgreSQL; fixed-width ISO-8601 UTC text
  with microseconds on SQLite, so that comparing the text compares the instants.
* :data:`RECORD_JSON`: the full record as received (``JSONB`` on PostgreSQL).

JSON text is written by :func:`dumps` and read by :func:`loads`: a ``Decimal`` inside a record (a
JSON number parsed with ``parse_float=Decimal``) is written as its exact digits and read back as a
``Decimal``, never through a float.

Every Decimal written out (a column value or a number in JSON) is first checked by
:func:`~rillet_dagster.rillet.money.bounded`: its plain text is at most ~100 characters, so
memory follows the input's bytes, never a number's magnitude (``1e300000000`` is 13 bytes).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from sqlalchemy import JSON, DateTime, Dialect, Text
from sqlalchemy.dialects.postgresql import JSONB, NUMERIC
from sqlalchemy.types import TypeDecorator, TypeEngine

from rillet_dagster.rillet.money import bounded, shown


def to_exact_decimal(value: object) -> Decimal:
    """A finite ``Decimal`` from a Decimal, int or decimal string; a float (or bool) is refused.

    Raises:
        TypeError: a float, bool or non-number.
        ValueError: not a finite number, or outside :func:`~rillet_dagster.rillet.money.bounded`.
    """
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, bool | float):
        raise TypeError(
            f"{value!r} is a {type(value).__name__}; money and quantities must be Decimal, int or "
            "a decimal string (parse JSON with parse_float=Decimal)"
        )
    elif isinstance(value, int | str):
        try:
            result = Decimal(value)
        except InvalidOperation:
            raise ValueError(f"{shown(value)} is not a decimal number") from None
    else:
        raise TypeError(f"{shown(value)} is a {type(value).__name__}, not a decimal number")
    if not result.is_finite():
        raise ValueError(f"{shown(value)} is not a finite decimal number")
    return bounded(result)


def decimal_text(value: Decimal) -> str:
    """Plain decimal text: never scientific notation, every digit (and trailing zero) kept."""
    return format(value, "f")


class ExactDecimal(TypeDecorator[Decimal]):
    """An exact decimal of any size and scale, read back as ``Decimal``."""

    impl = Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(NUMERIC(asdecimal=True))
        return dialect.type_descriptor(Text())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Decimal | str | None:
        if value is None:
            return None
        exact = to_exact_decimal(value)
        if dialect.name == "postgresql":
            return exact
        return decimal_text(exact)

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        if isinstance(value, float):
            # Only a column created outside this schema (REAL or NUMERIC affinity) can do this,
            # and its digits are already gone: say so rather than hand out a rounded amount.
            raise TypeError(f"column holds the float {value!r}; it was not stored exactly")
        return value if isinstance(value, Decimal) else Decimal(str(value))


def sqlite_timestamp(value: datetime) -> str:
    """The SQLite text form of an aware datetime (what :class:`UtcDateTime` stores).

    Always ``YYYY-MM-DDTHH:MM:SS.ffffff+00:00``: fixed width and in UTC, so that SQLite's text
    comparison orders instants correctly.
    """
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"datetime {value!r} is naive; give it a timezone (UTC)")
    return value.astimezone(UTC).isoformat(timespec="microseconds")


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware instant, always returned in UTC; naive datetimes are refused."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(Text())
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: Any, dialect: Dialect) -> datetime | str | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"{value!r} is a {type(value).__name__}, not a datetime")
        if dialect.name == "sqlite":
            return sqlite_timestamp(value)
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"datetime {value!r} is naive; give it a timezone (UTC)")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


RECORD_JSON: TypeEngine[Any] = JSON(none_as_null=True).with_variant(
    JSONB(none_as_null=True), "postgresql"
)


class _NeedsExactEncoder(Exception):
    """Raised inside the fast C encoder when a value (a Decimal) needs the exact encoder."""


def _refuse(value: object) -> None:
    raise _NeedsExactEncoder


def _make_fast_dumps() -> Callable[[Any], str]:
    """Compact JSON text from the C encoder, which refuses (via ``_refuse``) a Decimal.

    ``JSONEncoder.encode`` builds a new C encoder on every call, a fixed cost of about a quarter
    of encoding a whole line item; here it is built once. Records parsed from JSON cannot be
    circular; a structure that is fails with RecursionError instead of a neat message.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # a Python without the json C accelerator
        return json.JSONEncoder(
            ensure_ascii=False,
            separators=(",", ":"),
            allow_nan=False,
            check_circular=False,
            default=_refuse,
        ).encode
    # (markers, default, encoder, indent, key_sep, item_sep, sort_keys, skipkeys, allow_nan)
    encode = make(
        None, _refuse, json.encoder.c_encode_basestring, None, ":", ",", False, False, False
    )

    def fast_dumps(value: Any) -> str:
        return "".join(encode(value, 0))

    return fast_dumps


_fast_dumps = _make_fast_dumps()


def _key_text(key: object) -> str:
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, bool | int | float):
        return json.dumps(key)
    raise TypeError(f"JSON object keys must be strings, not {type(key).__name__}: {key!r}")


def _exact_parts(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(json.dumps(value, ensure_ascii=False))
    elif isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"{value!r} cannot be written as JSON")
        out.append(decimal_text(bounded(value)))
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} cannot be written as JSON")
        out.append(float.__repr__(value))
    elif value is None or isinstance(value, bool | int):
        out.append(json.dumps(value))
    elif isinstance(value, dict):
        out.append("{")
        for index, (key, item) in enumerate(value.items()):
            if index:
                out.append(",")
            out.append(json.dumps(_key_text(key), ensure_ascii=False))
            out.append(":")
            _exact_parts(item, out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for index, item in enumerate(value):
            if index:
                out.append(",")
            _exact_parts(item, out)
        out.append("]")
    else:
        raise TypeError(f"{type(value).__name__} {value!r} is not JSON serializable")


def dumps(value: Any) -> str:
    """Compact JSON text; a ``Decimal`` becomes a JSON number with exactly its digits.

    The C encoder handles the usual record (amounts are strings in the API) and bails out on the
    first Decimal; only then does the slower exact encoder run.

    Raises:
        ValueError: a Decimal outside :func:`~rillet_dagster.rillet.money.bounded` (written in
            full it could take gigabytes; PostgreSQL's jsonb could not hold it, and Python could
            not read its digits back), or a NaN or infinity.
        TypeError: a value that is not JSON.
    """
    try:
        return _fast_dumps(value)
    except _NeedsExactEncoder:
        parts: list[str] = []
        _exact_parts(value, parts)
        return "".join(parts)


def _long_integer(text: str) -> int | Decimal:
    try:
        return int(text)
    except ValueError:  # over Python's 4,300-digit limit on parsing an int
        return Decimal(text)


def loads(text: str | bytes | bytearray) -> Any:
    """Parse JSON text; non-integer numbers become ``Decimal`` (never ``float``).

    An integer too long for Python's int parser (over 4,300 digits: only a row written before
    numbers were bounded holds one) becomes an exact ``Decimal`` rather than failing, so that one
    such row cannot make a whole table unreadable. The retry costs nothing on the usual path.
    """
    try:
        return json.loads(text, parse_float=Decimal)
    except json.JSONDecodeError:
        raise
    except ValueError:
        return json.loads(text, parse_float=Decimal, parse_int=_long_integer)
