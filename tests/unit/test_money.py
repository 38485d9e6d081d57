"""Money parses and prints every decimal string exactly (hypothesis)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rillet_dagster.rillet.money import Money, MoneyError, format_amount, minor_units, money_json

decimal_strings = st.builds(
    lambda sign, whole, frac: f"{sign}{whole}" + (f".{frac}" if frac else ""),
    st.sampled_from(["", "-"]),
    st.integers(min_value=0, max_value=10**20).map(str),
    st.text(alphabet="0123456789", max_size=10),
)


@given(decimal_strings, st.sampled_from(["USD", "JPY", "BHD", "EUR"]))
def test_parse_then_print_is_exact(text: str, currency: str) -> None:
    money = Money.parse({"amount": text, "currency": currency})
    assert isinstance(money.amount, Decimal)
    assert format_amount(money.amount) == text
    assert money.to_json() == {"amount": text, "currency": currency}


@given(st.integers(min_value=-(10**18), max_value=10**18), st.sampled_from(["USD", "JPY", "BHD"]))
def test_minor_units_round_trip(minor: int, currency: str) -> None:
    wire = money_json(minor, currency)
    assert Money.parse(wire).to_minor() == minor
    if minor_units(currency) == 0:
        assert "." not in wire["amount"]
    else:
        assert len(wire["amount"].split(".")[1]) == minor_units(currency)


@pytest.mark.parametrize(
    "bad",
    [
        {"amount": 1.5, "currency": "USD"},
        {"amount": "1e3", "currency": "USD"},
        {"amount": "NaN", "currency": "USD"},
        {"amount": " 1.00", "currency": "USD"},
        {"amount": "1_000", "currency": "USD"},
        {"amount": "1.00", "currency": "usd"},
        {"amount": "1.00"},
        "1.00",
        {"amount": True, "currency": "USD"},
    ],
)
def test_bad_money_is_refused_with_a_reason(bad: object) -> None:
    with pytest.raises(MoneyError):
        Money.parse(bad)


def test_minus_zero_and_rounding() -> None:
    assert format_amount(Money.parse({"amount": "-0", "currency": "USD"}).amount) == "-0"
    assert Money(Decimal("10.005"), "USD").rounded().amount == Decimal("10.00")
    assert Money(Decimal("10.015"), "USD").rounded().amount == Decimal("10.02")
    with pytest.raises(MoneyError, match="more than 2 decimals"):
        Money(Decimal("10.005"), "USD").to_minor()


@pytest.mark.parametrize(
    "amount",
    [
        "1" + "0" * 50,
        "0." + "0" * 50 + "1",
        Decimal("1.0E+300000000"),
        Decimal("1E-51"),
        10**60,
        "1.00\n",
    ],
)
def test_amounts_beyond_the_bounds_are_refused_with_a_reason(amount: object) -> None:
    with pytest.raises(MoneyError) as caught:
        Money.parse({"amount": amount, "currency": "USD"})
    assert len(str(caught.value)) < 200  # however long the amount was
    if isinstance(amount, Decimal):
        with pytest.raises(MoneyError, match="at most 50"):
            Money(amount, "USD")


def test_rounding_and_minor_units_stay_exact_beyond_28_digits() -> None:
    """Decimal's default context rounds to 28 digits; S9 amounts have up to 30."""
    amount = Decimal("123456789012345678901234567890.12")
    assert Money(amount, "USD").to_minor() == 12345678901234567890123456789012
    assert Money(amount, "USD").rounded().amount == amount
    widest = Decimal("9" * 50 + ".005")
    assert Money(widest, "USD").rounded().amount == Decimal("9" * 50 + ".00")
