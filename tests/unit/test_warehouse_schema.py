"""Warehouse tables come from the catalog alone; column types keep money and time exact."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.dialects import postgresql, sqlite

from rillet_dagster import catalog
from rillet_dagster.warehouse.schema import (
    METADATA,
    WATERMARKS_TABLE,
    build_metadata,
    column_name,
    field_kind,
    table_for,
    table_name,
)
from rillet_dagster.warehouse.types import (
    ExactDecimal,
    UtcDateTime,
    dumps,
    loads,
    sqlite_timestamp,
)

PG = postgresql.dialect()
LITE = sqlite.dialect()
ALL_NAMES = [e.name for e in catalog.ENTITIES] + [
    c.name for e in catalog.ENTITIES for c in e.children
]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("invoice", "invoices"),
        ("journal_entry", "journal_entries"),
        ("subsidiary", "subsidiaries"),
        ("invoice_item", "invoice_items"),
        ("customer_email", "customer_emails"),
        ("book_period", "book_periods"),
        ("tax_rate", "tax_rates"),
        ("bank_account", "bank_accounts"),
        ("field_value", "field_values"),
        ("credit_memo_application", "credit_memo_applications"),
        ("gateway", "gateways"),  # a vowel before the y: plain s
        ("box", "boxes"),
    ],
)
def test_table_names_are_plural_snake_case(name: str, expected: str) -> None:
    assert table_name(name) == expected


def test_every_entity_and_child_has_a_table_and_nothing_else_does() -> None:
    expected = {table_name(n) for n in ALL_NAMES} | {WATERMARKS_TABLE}
    assert set(METADATA.tables) == expected
    for name in ALL_NAMES:
        assert table_for(name).name == table_name(name)


def test_single_object_entities_get_a_header_table() -> None:
    for name in ("organization", "book_period"):
        table = table_for(name)
        assert [c.name for c in table.primary_key] == ["id"]
        assert "_record" in table.c
    assert isinstance(table_for("book_period").c.start.type, sa.Date)
    assert isinstance(table_for("book_period").c.closed_on.type, sa.Date)


def test_header_tables_have_the_contract_columns() -> None:
    for spec in catalog.ENTITIES:
        table = table_for(spec.name)
        assert [c.name for c in table.primary_key] == ["id"]
        for name in ("updated_at", "deleted_at", "_synced_at"):
            assert isinstance(table.c[name].type, UtcDateTime), (spec.name, name)
        assert table.c._run_id.type.__class__ is sa.String
        assert {i.name for i in table.indexes} == {f"ix_{table.name}_updated_at"}
        assert [c.name for i in table.indexes for c in i.columns] == ["updated_at"]
        for field in spec.key_fields:
            assert column_name(field) in table.c, (spec.name, field)
        for field in spec.money_fields:
            assert isinstance(table.c[column_name(field)].type, ExactDecimal)
            currency = table.c[column_name(field) + "_currency"].type
            assert isinstance(currency, sa.String)
            assert currency.length == 3


def test_child_tables_are_keyed_by_parent_and_line() -> None:
    for spec in catalog.ENTITIES:
        for child in spec.children:
            table = table_for(child.name)
            assert [c.name for c in table.primary_key] == ["parent_id", "line_key"]
            assert isinstance(table.c.line_index.type, sa.Integer)
            for field in child.money_fields:
                assert isinstance(table.c[column_name(field)].type, ExactDecimal)
                assert column_name(field) + "_currency" in table.c
            for field in child.key_fields:
                assert column_name(field) in table.c


def test_key_fields_get_typed_columns() -> None:
    invoices = table_for("invoice")
    assert isinstance(invoices.c.invoice_date.type, sa.Date)
    assert isinstance(invoices.c.due_date.type, sa.Date)
    assert isinstance(invoices.c.overdue.type, sa.Boolean)
    assert isinstance(invoices.c.sent_at.type, UtcDateTime)
    assert isinstance(invoices.c.invoice_number.type, sa.Text)
    products = table_for("product")
    assert isinstance(products.c.price_type.type, sa.Text)
    assert isinstance(products.c.price_interval_months.type, sa.Integer)
    assert isinstance(products.c.price_amount.type, ExactDecimal)
    assert isinstance(products.c.price_amount_currency.type, sa.String)
    assert isinstance(products.c.include_in_arr_mrr.type, sa.Boolean)
    assert isinstance(table_for("customer").c.payment_terms.type, sa.Integer)
    assert isinstance(table_for("contract_item").c.quantity.type, ExactDecimal)
    assert isinstance(table_for("tax_rate").c.percentage.type, ExactDecimal)
    assert isinstance(table_for("journal_entry").c.reversal_date.type, sa.Date)
    assert isinstance(table_for("field_value").c.deactivated.type, sa.Boolean)


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("date", "date"),
        ("start", "date"),
        ("closed_on", "date"),
        ("gl_impact_date", "date"),
        ("sent_at", "timestamp"),
        ("overdue", "boolean"),
        ("price.interval_months", "integer"),
        ("quantity", "decimal"),
        ("price.type", "text"),
        ("mask", "text"),  # "0067": digits, but an identifier whose leading zeros matter
    ],
)
def test_field_kind_follows_field_names(path: str, kind: str) -> None:
    assert field_kind(path) == kind


def test_unknown_names_are_rejected_with_the_known_ones_listed() -> None:
    for hostile in ("'; DROP TABLE invoices; --", "invoices", "rillet_watermarks", "", "Invoice"):
        with pytest.raises(KeyError) as caught:
            table_for(hostile)
        message = str(caught.value)
        assert "invoice" in message
        assert "journal_entry" in message


def test_identifiers_outside_snake_case_never_become_sql() -> None:
    invoice = catalog.entity("invoice")
    for bad in ('x"; DROP TABLE invoices; --', "Memo", "a b", "é", "x" * 64):
        with pytest.raises(ValueError, match="identifier"):
            build_metadata([dataclasses.replace(invoice, key_fields=(bad,))])
    with pytest.raises(ValueError, match="identifier"):
        build_metadata([dataclasses.replace(invoice, name="invoice; drop")])


def test_two_fields_mapping_to_one_column_are_refused() -> None:
    invoice = catalog.entity("invoice")
    with pytest.raises(ValueError, match="total_currency"):
        build_metadata([dataclasses.replace(invoice, key_fields=("total.currency",))])


def _compiled(column_type: sa.types.TypeEngine, dialect: sa.Dialect) -> str:
    return column_type.compile(dialect=dialect)


def test_column_types_per_backend() -> None:
    assert _compiled(ExactDecimal(), PG) == "NUMERIC"  # no precision or scale: arbitrary
    assert _compiled(ExactDecimal(), LITE) == "TEXT"  # never SQLite's NUMERIC affinity
    assert _compiled(UtcDateTime(), PG) == "TIMESTAMP WITH TIME ZONE"
    assert _compiled(UtcDateTime(), LITE) == "TEXT"
    assert _compiled(table_for("invoice").c._record.type, PG) == "JSONB"
    assert _compiled(table_for("invoice").c._record.type, LITE) == "JSON"


@pytest.mark.parametrize(
    ("value", "sqlite_text"),
    [
        (Decimal("1500.00"), "1500.00"),
        ("1500.00", "1500.00"),
        (7, "7"),
        (Decimal("-0"), "-0"),
        (Decimal("-0.00"), "-0.00"),
        (Decimal("1E+25"), "10000000000000000000000000"),
        (Decimal("1.0E-10"), "0.00000000010"),
        ("12345678901234567890.0123456789", "12345678901234567890.0123456789"),
    ],
)
def test_exact_decimal_binds_plain_text_on_sqlite(value: object, sqlite_text: str) -> None:
    exact = ExactDecimal()
    assert exact.process_bind_param(value, LITE) == sqlite_text
    assert "E" not in sqlite_text
    bound_pg = exact.process_bind_param(value, PG)
    assert isinstance(bound_pg, Decimal)
    assert bound_pg == Decimal(str(value))
    back = exact.process_result_value(sqlite_text, LITE)
    assert isinstance(back, Decimal)
    assert str(back) == str(Decimal(sqlite_text))


@pytest.mark.parametrize("value", [0.1, 1.0, float("nan"), True])
def test_exact_decimal_refuses_floats_and_bools(value: object) -> None:
    for dialect in (LITE, PG):
        with pytest.raises(TypeError, match="Decimal"):
            ExactDecimal().process_bind_param(value, dialect)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "abc", Decimal("-Infinity")])
def test_exact_decimal_refuses_what_is_not_a_finite_number(value: object) -> None:
    with pytest.raises(ValueError, match=r"finite|not a decimal"):
        ExactDecimal().process_bind_param(value, LITE)


def test_exact_decimal_never_hands_out_a_float_read_from_elsewhere() -> None:
    with pytest.raises(TypeError, match="float"):
        ExactDecimal().process_result_value(1.5, LITE)


def test_utc_datetime_is_fixed_width_utc_text_on_sqlite() -> None:
    kind = UtcDateTime()
    paris = timezone(timedelta(hours=1))
    moment = datetime(2026, 11, 28, 13, 0, 0, 5, tzinfo=paris)
    assert kind.process_bind_param(moment, LITE) == "2026-11-28T12:00:00.000005+00:00"
    assert kind.process_result_value("2026-11-28T12:00:00.000005+00:00", LITE) == moment
    assert kind.process_bind_param(moment, PG).tzinfo == UTC
    with pytest.raises(ValueError, match="naive"):
        kind.process_bind_param(datetime(2026, 1, 1), LITE)
    with pytest.raises(TypeError):
        kind.process_bind_param("2026-01-01", LITE)
    instants = [
        datetime(2026, 1, 1, 0, 0, tzinfo=UTC),
        datetime(2026, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC),
        datetime(2026, 1, 1, 1, 0, tzinfo=paris),  # = 00:00 UTC: ties with the first
        datetime(2025, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ]
    texts = [sqlite_timestamp(i) for i in instants]
    assert sorted(texts) == [sqlite_timestamp(i) for i in sorted(instants)]


def test_dumps_writes_decimals_as_exact_json_numbers() -> None:
    record = {
        "amount": {"amount": "1.10", "currency": "USD"},
        "rate": Decimal("1.08230000000000000001"),
        "nested": [Decimal("-0.00"), {"q": Decimal("12345678901234567890.5")}, 1, 2.5, None],
        "text": 'naïve \x00 "quoted" 日本',
        "flag": True,
    }
    text = dumps(record)
    assert '"rate":1.08230000000000000001' in text
    assert '"q":12345678901234567890.5' in text
    back = loads(text)
    assert back["rate"] == record["rate"]
    assert isinstance(back["rate"], Decimal)
    assert back["nested"][1]["q"] == Decimal("12345678901234567890.5")
    assert back["text"] == record["text"]
    assert back["amount"] == {"amount": "1.10", "currency": "USD"}


def test_dumps_matches_the_standard_encoder_for_plain_records() -> None:
    record = {"id": "x", "items": [{"a": 1, "b": "é"}], "n": None, "f": 0.5, "t": True}
    assert dumps(record) == json.dumps(record, ensure_ascii=False, separators=(",", ":"))


_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(_JSON_VALUES)
def test_dumps_is_byte_for_byte_the_standard_encoder(value: object) -> None:
    # Stored _record_hash values depend on the exact text: the reused C encoder must not move it.
    assert dumps(value) == json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@pytest.mark.parametrize("value", [float("nan"), Decimal("NaN"), {"x": float("inf")}, {1j: 1}])
def test_dumps_refuses_what_json_cannot_hold(value: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        dumps(value)


def test_loads_never_produces_a_float() -> None:
    parsed = loads('{"a": 0.1, "b": [1e400, -0.0], "c": 3}')
    assert parsed["a"] == Decimal("0.1")
    assert all(isinstance(v, Decimal) for v in parsed["b"])
    assert parsed["c"] == 3


@pytest.mark.parametrize(
    "value",
    [
        Decimal("1E+50"),  # 51 digits before the point
        Decimal("1.0E+300000000"),
        Decimal("1E-51"),  # 51 after it
        Decimal("-1.0E-999999999999"),
        10**50,
        "1" + "0" * 50,
    ],
)
def test_numbers_too_wide_to_write_out_are_refused_before_they_are(value: object) -> None:
    """Written out in full, 1.0E+300000000 takes 300 MB: refused from its exponent, at once."""
    with pytest.raises(ValueError, match=r"digits (before|after) the decimal point"):
        ExactDecimal().process_bind_param(value, LITE)
    with pytest.raises(ValueError, match="at most 50"):
        ExactDecimal().process_bind_param(value, PG)
    if isinstance(value, Decimal):
        with pytest.raises(ValueError, match="at most 50"):
            dumps({"x": [value]})


def test_the_widest_numbers_stored_are_written_out_exactly() -> None:
    widest = [Decimal("9" * 50), Decimal("-1E+49"), Decimal("1E-50"), Decimal("0." + "7" * 50)]
    assert loads(dumps(widest)) == widest
    assert ExactDecimal().process_bind_param(Decimal("1E+49"), LITE) == "1" + "0" * 49


def test_loads_reads_an_integer_longer_than_pythons_limit_as_a_decimal() -> None:
    """Such a number (written before the bounds) must not make a whole table unreadable."""
    huge = "-1" + "0" * 5000
    assert loads(f'{{"x": [{huge}, 2]}}') == {"x": [Decimal(huge), 2]}
    assert type(loads(f"[{huge}]")[0]) is Decimal
    with pytest.raises(json.JSONDecodeError):
        loads(f'{{"x": {huge}')
