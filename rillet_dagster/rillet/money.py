"""Money as Rillet sends it: ``{"amount": "<decimal string>", "currency": "<ISO 4217>"}``.

Amounts are :class:`decimal.Decimal` end to end. A float never enters: parsing refuses one, and
numbers that arrive as JSON numbers are read from their text (``json.loads(...,
parse_float=Decimal)``) before they reach here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation, localcontext
from typing import Any

# ISO 4217 minor units for the currencies that do not use 2 (every other code uses 2).
_MINOR_UNITS: dict[str, int] = {
    "BIF": 0, "CLP": 0, "DJF": 0, "GNF": 0, "ISK": 0, "JPY": 0, "KMF": 0, "KRW": 0, "PYG": 0,
    "RWF": 0, "UGX": 0, "UYI": 0, "VND": 0, "VUV": 0, "XAF": 0, "XOF": 0, "XPF": 0,
    "BHD": 3, "IQD": 3, "JOD": 3, "KWD": 3, "LYD": 3, "OMR": 3, "TND": 3, "CLF": 4, "UYW": 4,
}  # fmt: skip


_PLAIN_DECIMAL = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")

# The widest number the project stores or writes out, in digits before and after the point.
# Rillet's widest amounts have 20 whole digits and 10 decimals (test matrix S9); a rate or
# percentage of such amounts at Decimal's default 28-digit precision has at most 20 + 28 = 48
# decimals. 50 each leaves headroom, and bounds the plain text of any number at ~100
# characters: written out in full, ``1e300000000`` (13 bytes) would be 300 MB. It is also far
# inside PostgreSQL NUMERIC (131,072 whole and 16,383 fraction digits) and Python's 4,300-digit
# limit on parsing an integer back from JSON.
MAX_WHOLE_DIGITS = 50
MAX_FRACTION_DIGITS = 50
# Fixed by ISO 4217 (UYW, CLF): the most decimals of any currency.
_MAX_MINOR_UNITS = 4


class MoneyError(ValueError):
    """A money value that is not an exact decimal string with an ISO 4217 currency."""


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error message never grows with input."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}...({len(text)} characters)"


def bounded(value: Decimal) -> Decimal:
    """``value`` if written out it has at most :data:`MAX_WHOLE_DIGITS` whole digits and
    :data:`MAX_FRACTION_DIGITS` decimals; checked from the exponent, without writing it out.

    Raises:
        MoneyError: a number outside those bounds (``1E+5000``, ``1E-5000``), saying why.
    """
    # Only a finite Decimal's exponent is an int; adjusted() is the power of ten of its
    # leading digit (2 for 123.4), so whole digits = adjusted() + 1.
    exponent = value.as_tuple().exponent
    if not isinstance(exponent, int):
        raise MoneyError(f"{shown(value)} is not a finite number")
    if value.adjusted() >= MAX_WHOLE_DIGITS:
        raise MoneyError(
            f"{shown(value)} has {value.adjusted() + 1} digits before the decimal point; "
            f"at most {MAX_WHOLE_DIGITS} are stored"
        )
    if exponent < -MAX_FRACTION_DIGITS:
        raise MoneyError(
            f"{shown(value)} has {-exponent} digits after the decimal point; "
            f"at most {MAX_FRACTION_DIGITS} are stored"
        )
    return value


def minor_units(currency: str) -> int:
    """Decimal places of ``currency`` (USD 2, JPY 0, BHD 3)."""
    return _MINOR_UNITS.get(currency.upper(), 2)


def quantum(currency: str) -> Decimal:
    return Decimal(1).scaleb(-minor_units(currency))


def is_currency_code(code: object) -> bool:
    return isinstance(code, str) and len(code) == 3 and code.isascii() and code.isupper()


def to_decimal(value: object) -> Decimal:
    """An exact Decimal from a decimal string, int or Decimal; never from a float.

    Raises:
        MoneyError: not a number, a float, or a number outside :func:`bounded`.
    """
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise MoneyError(f"amount {shown(value)} is not a finite number")
        return bounded(value)
    if isinstance(value, bool | float):
        raise MoneyError(
            f"amount {value!r} is a {type(value).__name__}; money must be a decimal string"
        )
    if isinstance(value, int):
        return bounded(Decimal(value))
    if isinstance(value, str):
        if not _PLAIN_DECIMAL.fullmatch(value):
            raise MoneyError(f"amount {shown(value)} is not a plain decimal number like '1234.50'")
        try:
            return bounded(Decimal(value))
        except InvalidOperation:
            raise MoneyError(f"amount {shown(value)} is not a decimal number") from None
    raise MoneyError(f"amount {shown(value)} is a {type(value).__name__}, not a decimal string")


def format_amount(amount: Decimal) -> str:
    """Plain decimal text (never scientific notation), keeping every digit given."""
    return format(amount, "f")


@dataclass(frozen=True, slots=True)
class Money:
    """An exact amount in one currency."""

    amount: Decimal
    currency: str

    def __post_init__(self) -> None:
        if not isinstance(self.amount, Decimal):
            raise MoneyError(f"Money.amount must be a Decimal, got {type(self.amount).__name__}")
        # Bounded, so that rounding, scaling and printing it stay exact and small.
        bounded(self.amount)
        if not is_currency_code(self.currency):
            raise MoneyError(f"currency {self.currency!r} is not an ISO 4217 code like 'USD'")

    @classmethod
    def parse(cls, value: Any) -> Money:
        """Parse a Rillet money object; a bad one raises :class:`MoneyError` saying why."""
        if not isinstance(value, dict):
            raise MoneyError(f"money must be an object with amount and currency, got {value!r}")
        if "amount" not in value or "currency" not in value:
            raise MoneyError(f"money object {value!r} needs both 'amount' and 'currency'")
        return cls(to_decimal(value["amount"]), str(value["currency"]))

    @classmethod
    def of_minor(cls, minor: int, currency: str) -> Money:
        """Money from an integer count of the currency's minor units (cents, yen, fils)."""
        return cls(Decimal(minor).scaleb(-minor_units(currency)), currency)

    def rounded(self) -> Money:
        """Rounded to the currency's own decimals (half to even), as Rillet rounds amounts."""
        with _exact():
            rounded = self.amount.quantize(quantum(self.currency), ROUND_HALF_EVEN)
        return Money(rounded, self.currency)

    def to_minor(self) -> int:
        """The amount in minor units; refuses amounts with more decimals than the currency."""
        with _exact():
            scaled = self.amount.scaleb(minor_units(self.currency))
        if scaled != scaled.to_integral_value():
            raise MoneyError(
                f"{self.amount} {self.currency} has more than {minor_units(self.currency)} decimals"
            )
        return int(scaled)

    def to_json(self) -> dict[str, str]:
        return {"amount": format_amount(self.amount), "currency": self.currency}

    def __str__(self) -> str:
        return f"{format_amount(self.amount)} {self.currency}"


def _exact() -> Any:
    """A decimal context precise enough for any bounded amount: quantize and scaleb round to the
    context's precision (28 digits by default), which would change a 30-digit amount."""
    return localcontext(prec=MAX_WHOLE_DIGITS + MAX_FRACTION_DIGITS + _MAX_MINOR_UNITS)


def money_json(minor: int, currency: str) -> dict[str, str]:
    """Rillet's wire form of ``minor`` minor units of ``currency`` (exact, rounded decimals)."""
    digits = minor_units(currency)
    if digits == 0:
        return {"amount": str(minor), "currency": currency}
    sign = "-" if minor < 0 else ""
    whole, frac = divmod(abs(minor), 10**digits)
    return {"amount": f"{sign}{whole}.{frac:0{digits}d}", "currency": currency}
