"""API writes against a generated organization, in process (no HTTP).

Every refused request must leave the world exactly as it was: each collection's version and
size, every subsidiary's ledger sums, the document-to-entry links and the notification stream.
Every accepted one must keep each subsidiary's trial balance balanced and move it by exactly the
lines of the journal entry the document owns.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rillet_dagster.clock import FakeClock
from rillet_dagster.rillet.money import money_json
from rillet_dagster.sandbox.chart import CHART
from rillet_dagster.sandbox.data import World, generate
from rillet_dagster.sandbox.writes import WRITE_ROUTES, WriteError, Writer

Json = dict[str, Any]

GENERATED_AT = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
WRITE_TIME = datetime(2026, 11, 29, 9, 30, 1, 123456, tzinfo=UTC)
STAMP = "2026-11-29T09:30:01.123Z"
FAR = date(2100, 1, 1)
US, UK, JP = 0, 1, 2  # the generator's subsidiaries: USD, GBP, JPY


def usd(amount: str) -> dict[str, str]:
    return {"amount": amount, "currency": "USD"}


@dataclass
class Env:
    world: World
    writer: Writer
    clock: FakeClock
    events: list[tuple[str, str, Any]] = field(default_factory=list)

    def sub(self, index: int) -> Json:
        return self.world.subsidiaries[index]

    def customer(self, country: str = "US") -> Json:
        found = [
            c
            for c in self.world.store["customer"].all_records()
            if c["address"]["country"] == country
        ]
        return found[-1]

    def product(self, index: int = 0) -> Json:
        return list(self.world.store["product"].all_records())[::-1][index]

    def invoice_body(self, customer_id: str, amount: str = "1000.00", **extra: Any) -> Json:
        return {
            "customer_id": customer_id,
            "invoice_date": "2026-11-10",
            "items": [
                {
                    "product_id": self.product()["id"],
                    "description": "Platform",
                    "quantity": 1,
                    "price": {"amount_per_unit": usd(amount)},
                }
            ],
            **extra,
        }

    def new_invoice(self, amount: str = "1000.00", customer: Json | None = None) -> Json:
        customer = customer or self.customer()
        return self.writer.create_invoice(self.invoice_body(customer["id"], amount))

    def memo_body(self, customer_id: str, amount: str = "100.00", **extra: Any) -> Json:
        return {
            "customer_id": customer_id,
            "credit_memo_date": "2026-11-12",
            "items": [
                {
                    "description": "Service credit",
                    "price": {
                        "product_id": self.product()["id"],
                        "quantity": 1,
                        "amount_per_unit": usd(amount),
                    },
                }
            ],
            **extra,
        }


@pytest.fixture
def env() -> Env:
    world = generate(seed=7, size="tiny", now=GENERATED_AT)
    clock = FakeClock(WRITE_TIME)
    found = Env(world, Writer(world, clock), clock)
    world.store.add_listener(lambda entity, event, body: found.events.append((entity, event, body)))
    return found


# ---- helpers -----------------------------------------------------------------------------------


def ledger_sums(world: World, subsidiary: int) -> dict[str, tuple[int, int]]:
    """Per account code: (debits, credits) in the subsidiary's own minor units, all time."""
    debit, credit = world.ledger.sums(subsidiary=subsidiary, start=None, end=FAR, reporting=False)
    return {
        account.code: (int(debit[i]), int(credit[i]))
        for i, account in enumerate(world.ledger.accounts)
        if debit[i] or credit[i]
    }


def movement(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
) -> dict[str, tuple[int, int]]:
    moved = {}
    for code in before.keys() | after.keys():
        d0, c0 = before.get(code, (0, 0))
        d1, c1 = after.get(code, (0, 0))
        if (d1 - d0, c1 - c0) != (0, 0):
            moved[code] = (d1 - d0, c1 - c0)
    return moved


def assert_balanced(world: World) -> None:
    for index in range(len(world.subsidiaries)):
        sums = ledger_sums(world, index)
        assert sum(d for d, _ in sums.values()) == sum(c for _, c in sums.values())
    debit, credit = world.ledger.sums(subsidiary=None, start=None, end=FAR, reporting=True)
    assert int(debit.sum()) == int(credit.sum())


def entry_movement(entry: Json) -> dict[str, tuple[int, int]]:
    """What one journal entry adds to the ledger, per account code."""
    moved: dict[str, tuple[int, int]] = {}
    digits = {"USD": 2, "GBP": 2, "JPY": 0}[entry["currency"]]
    for item in entry["items"]:
        minor = int(Decimal(item["amount"]["amount"]).scaleb(digits))
        d, c = moved.get(item["account_code"], (0, 0))
        moved[item["account_code"]] = (d + minor, c) if item["side"] == "DEBIT" else (d, c + minor)
    return moved


def snapshot(env: Env) -> Json:
    world = env.world
    return {
        "collections": {
            name: (collection.version, len(collection))
            for name, collection in world.store.collections.items()
        },
        "ledger": [ledger_sums(world, i) for i in range(len(world.subsidiaries))],
        "posting_of": dict(world.posting_of),
        "payments_of": {k: list(v) for k, v in world.payments_of.items() if v},
        "events": len(env.events),
        # Ids come from the world's seeded generator: a refusal must not consume any.
        "rng": world.rng.getstate(),
    }


def refused(env: Env, call: Callable[[], Any], status: int = 400) -> WriteError:
    """Run a write that must fail, and prove it changed nothing."""
    before = snapshot(env)
    with pytest.raises(WriteError) as caught:
        call()
    assert caught.value.status == status
    assert snapshot(env) == before
    assert caught.value.violations, "every refusal names the field to fix"
    return caught.value


def fields_of(error: WriteError) -> set[str]:
    return {v["field"] for v in error.violations}


def message_for(error: WriteError, field_name: str) -> str:
    return " | ".join(v["message"] for v in error.violations if v["field"] == field_name)


def events_since(env: Env, start: int) -> list[tuple[str, str]]:
    return [(entity, event) for entity, event, _ in env.events[start:]]


def subsidiary_index(env: Env, subsidiary_id: str) -> int:
    return env.world.ledger.subsidiary_index[subsidiary_id]


def paid_invoice(env: Env) -> Json:
    """A generated invoice with a SUCCESSFUL payment."""
    for invoice in env.world.store["invoice"].all_records():
        if env.world.payments_of.get(invoice["id"]):
            return invoice
    raise AssertionError("the generated world has paid invoices")


# ---- routes ------------------------------------------------------------------------------------


def test_every_route_names_a_writer_method_taking_its_path_parameters() -> None:
    for (method, template), name in WRITE_ROUTES.items():
        function = getattr(Writer, name)
        params = list(inspect.signature(function).parameters)[1:]
        expected = re.findall(r"{(\w+)}", template)
        if method in ("POST", "PUT"):
            expected.append("body")
        assert params == expected, (method, template, name)
        assert method in ("POST", "PUT", "DELETE")


# ---- customers ---------------------------------------------------------------------------------


def test_create_customer_has_the_generated_shape_and_notifies(env: Env) -> None:
    start = len(env.events)
    record = env.writer.create_customer(
        {
            "name": "  Initrode Labs  ",
            "emails": [{"email": "ap@initrode.example", "type": "MAIN_SENDER"}],
            "address": {
                "line1": "1 Main St",
                "city": "Austin",
                "state": "TX",
                "zip_code": "78701",
                "country": "US",
            },
            "payment_terms": 15,
            "unknown_field": "ignored",
        }
    )
    assert record.keys() == env.customer().keys()
    assert record["name"] == "Initrode Labs"
    assert record["updated_at"] == STAMP
    assert record["address"]["line2"] is None
    assert record["payment_terms"] == 15
    assert "unknown_field" not in record
    assert record["id"] in env.world.store["customer"].ids()
    assert env.events[start:] == [("customer", "CREATED", record)]


@pytest.mark.parametrize(
    ("body", "field_name"),
    [
        ({}, "name"),
        ({"name": "   "}, "name"),
        ({"name": 5}, "name"),
        ({"name": "A", "emails": [{"email": "nobody", "type": "CC"}]}, "emails[0].email"),
        ({"name": "A", "emails": [{"email": "a@b.c", "type": "TO"}]}, "emails[0].type"),
        ({"name": "A", "emails": ["a@b.c"]}, "emails[0]"),
        (
            {
                "name": "A",
                "address": {"line1": "1", "state": "TX", "zip_code": "1", "country": "US"},
            },
            "address.city",
        ),
        (
            {
                "name": "A",
                "address": {
                    "line1": "1",
                    "city": "X",
                    "state": "TX",
                    "zip_code": "1",
                    "country": "usa",
                },
            },
            "address.country",
        ),
        ({"name": "A", "shipping_address": {"line1": "1"}}, "shipping_address.country"),
        ({"name": "A", "payment_terms": 400}, "payment_terms"),
        ({"name": "A", "payment_terms": "30"}, "payment_terms"),
        ({"name": "A", "payment_terms": True}, "payment_terms"),
        ({"name": "A", "external_references": [{"type": "crm"}]}, "external_references[0].id"),
        ({"name": "A", "send_payment_reminders": "yes"}, "send_payment_reminders"),
        (
            {"name": "A", "fields": [{"field_id": "nope", "field_value_id": "x"}]},
            "fields[0].field_id",
        ),
        ("not an object", ""),
    ],
)
def test_create_customer_validation(env: Env, body: Any, field_name: str) -> None:
    error = refused(env, lambda: env.writer.create_customer(body))
    assert error.title == "Validation failed"
    assert field_name in fields_of(error)


def test_customer_validation_lists_every_problem_at_once(env: Env) -> None:
    error = refused(
        env,
        lambda: env.writer.create_customer(
            {
                "emails": [{"email": "x", "type": "CC"}],
                "address": {"line1": "1"},
                "payment_terms": -1,
            }
        ),
    )
    assert {
        "name",
        "emails[0].email",
        "address.city",
        "address.state",
        "address.zip_code",
        "address.country",
        "payment_terms",
    } <= fields_of(error)
    assert "all-or-nothing" in message_for(error, "address.city")


def test_replace_customer_is_a_full_replacement(env: Env) -> None:
    customer = env.customer()
    assert customer["emails"]
    assert customer["address"]
    start = len(env.events)
    record = env.writer.replace_customer(customer["id"], {"name": "Renamed Co"})
    assert record["id"] == customer["id"]
    assert record["name"] == "Renamed Co"
    assert record["address"] is None
    assert record["emails"] == []
    assert record["fields"] == []
    assert record["payment_terms"] is None
    assert record["send_invoices_automatically"] is False
    assert record["updated_at"] == STAMP
    assert env.world.store["customer"].get(customer["id"]) == record
    assert env.events[start:] == [("customer", "UPDATED", record)]


def test_replace_customer_refuses_bad_bodies_and_unknown_ids(env: Env) -> None:
    customer = env.customer()
    error = refused(env, lambda: env.writer.replace_customer(customer["id"], {"name": ""}))
    assert fields_of(error) == {"name"}
    error = refused(env, lambda: env.writer.replace_customer("nope", {"name": "A"}), status=404)
    assert fields_of(error) == {"id"}


def test_delete_customer(env: Env) -> None:
    with_invoices = env.customer()
    error = refused(env, lambda: env.writer.delete_customer(with_invoices["id"]))
    assert "invoice" in error.detail
    fresh = env.writer.create_customer({"name": "Short-lived"})
    start = len(env.events)
    assert env.writer.delete_customer(fresh["id"]) is None
    assert env.world.store["customer"].get(fresh["id"]) is None
    assert fresh["id"] not in env.world.store["customer"].ids()
    assert env.events[start:] == [("customer", "DELETED", fresh["id"])]
    refused(env, lambda: env.writer.delete_customer(fresh["id"]), status=404)


# ---- invoices ----------------------------------------------------------------------------------


def test_create_invoice_matches_the_generated_shape_and_posts(env: Env) -> None:
    customer = env.customer()
    generated = next(env.world.store["invoice"].all_records())
    before = ledger_sums(env.world, US)
    start = len(env.events)
    body = env.invoice_body(customer["id"], "100.50")
    body["items"][0]["quantity"] = 3
    body["items"][0]["tax_amount"] = usd("21.86")
    body["memo"] = " thanks "
    invoice = env.writer.create_invoice(body)

    assert invoice.keys() == generated.keys()
    assert invoice["items"][0].keys() == generated["items"][0].keys()
    assert invoice["invoice_number"] == "INV-API-00001"
    assert invoice["subsidiary_id"] == env.sub(US)["id"]
    assert invoice["subtotal"] == usd("301.50")
    assert invoice["taxed_amount"] == usd("21.86")
    assert invoice["total"] == usd("323.36")
    assert invoice["amount_due"] == usd("323.36")
    assert invoice["status"] == "UNPAID"
    assert invoice["memo"] == "thanks"
    assert invoice["payment_terms"] == customer["payment_terms"]
    assert date.fromisoformat(invoice["due_date"]) == date(2026, 11, 10) + timedelta(
        days=customer["payment_terms"]
    )
    assert invoice["items"][0]["gross_rate"] == {"amount": "100.5", "currency": "USD"}
    assert invoice["items"][0]["revenue"]["account_code"] == env.product()["account_code"]
    assert invoice["updated_at"] == STAMP
    assert invoice["sent_at"] is None
    assert invoice["id"] in env.world.store["invoice"].ids()

    entry_id = env.world.posting_of[invoice["id"]]
    entry = env.world.store["journal_entry"].get(entry_id)
    assert entry is not None
    assert entry["related_entity"] == {"id": customer["id"], "type": "CUSTOMER"}
    assert entry["date"] == "2026-11-10"
    assert movement(before, ledger_sums(env.world, US)) == {
        "12001": (32336, 0),
        "40001": (0, 30150),
        "22001": (0, 2186),
    }
    assert_balanced(env.world)
    assert env.events[start:] == [
        ("invoice", "CREATED", invoice),
        ("journal_entry", "CREATED", entry),
    ]
    second = env.new_invoice()
    assert second["invoice_number"] == "INV-API-00002"


def test_create_invoice_accepts_oas_price_nesting_and_fractional_unit_prices(env: Env) -> None:
    usage = env.product(3)
    invoice = env.writer.create_invoice(
        {
            "customer_id": env.customer()["id"],
            "invoice_date": "2026-11-10",
            "items": [
                {
                    "price": {
                        "product_id": usage["id"],
                        "quantity": 1234,
                        "amount_per_unit": usd("0.0025"),
                    }
                }
            ],
        }
    )
    # 1234 x 0.0025 = 3.085, rounded half-even to the cent.
    assert invoice["items"][0]["total_amount"] == usd("3.08")
    assert invoice["items"][0]["gross_rate"] == usd("0.0025")
    assert invoice["items"][0]["description"] == usage["name"]
    assert invoice["items"][0]["quantity"] == 1234


def test_create_ar_only_invoice(env: Env) -> None:
    customer = env.customer("GB")
    body = {
        "scope": "AR_ONLY",
        "customer_id": customer["id"],
        "subsidiary_id": env.sub(UK)["id"],
        "invoice_date": "2026-11-03",
        "invoice_number": "EXT-77",
        "items": [
            {
                "product_id": env.product()["id"],
                "description": "Imported line",
                "quantity": 3,
                "total_amount": {"amount": "100.00", "currency": "GBP"},
                "revenue": {
                    "period": {"start": "2026-11-01", "end": "2027-10-31"},
                    "pattern": "EVEN_PERIOD",
                    "account_code": "40002",
                },
            }
        ],
    }
    before = ledger_sums(env.world, UK)
    invoice = env.writer.create_invoice(body)
    assert invoice["invoice_number"] == "EXT-77"
    assert invoice["due_date"] == "2026-11-03"
    assert invoice["total"] == {"amount": "100.00", "currency": "GBP"}
    assert invoice["items"][0]["gross_rate"] == {"amount": "33.3333333333", "currency": "GBP"}
    assert invoice["items"][0]["revenue"] == {
        "period": {"start": "2026-11-01", "end": "2027-10-31"},
        "pattern": "EVEN_PERIOD",
        "account_code": "40002",
    }
    assert movement(before, ledger_sums(env.world, UK)) == {
        "12001": (10000, 0),
        "40002": (0, 10000),
    }
    del body["invoice_number"]
    error = refused(env, lambda: env.writer.create_invoice(body))
    assert fields_of(error) == {"invoice_number"}


def _item(env: Env, **changes: Any) -> Json:
    item = {
        "product_id": env.product()["id"],
        "description": "Line",
        "quantity": 1,
        "price": {"amount_per_unit": usd("10.00")},
    }
    item.update(changes)
    return item


@pytest.mark.parametrize(
    ("change", "field_name", "message"),
    [
        (lambda e, b: b.update(customer_id="nope"), "customer_id", "no customer"),
        (lambda e, b: b.pop("customer_id"), "customer_id", "must not be null"),
        (lambda e, b: b.update(invoice_date="2026-11-1"), "invoice_date", "YYYY-MM-DD"),
        (lambda e, b: b.update(invoice_date="2026-02-30"), "invoice_date", "calendar date"),
        (lambda e, b: b.update(due_date="2026-11-01"), "due_date", "before invoice_date"),
        (lambda e, b: b.update(items=[]), "items", "must not be empty"),
        (lambda e, b: b.update(subsidiary_id="nope"), "subsidiary_id", "no subsidiary"),
        (lambda e, b: b.update(subsidiary_id=" "), "subsidiary_id", "blank"),
        (lambda e, b: b.update(scope="PARTIAL"), "scope", "must be one of"),
        (
            lambda e, b: b.update(items=[_item(e, product_id="nope")]),
            "items[0].product_id",
            "no product",
        ),
        (
            lambda e, b: b.update(items=[_item(e, quantity=0)]),
            "items[0].quantity",
            "greater than 0",
        ),
        (lambda e, b: b.update(items=[_item(e, quantity="2")]), "items[0].quantity", "JSON number"),
        (
            lambda e, b: b.update(
                items=[_item(e, price={"amount_per_unit": {"amount": 10, "currency": "USD"}})]
            ),
            "items[0].price.amount_per_unit.amount",
            "decimal string",
        ),
        (
            lambda e, b: b.update(items=[_item(e, price={"amount_per_unit": "10.00"})]),
            "items[0].price.amount_per_unit",
            "must be an object like",
        ),
        (
            lambda e, b: b.update(
                items=[_item(e, price={"amount_per_unit": {"amount": "1", "currency": "GBP"}})]
            ),
            "items[0].price.amount_per_unit.currency",
            "currency GBP does not match the subsidiary's currency USD",
        ),
        (
            lambda e, b: b.update(items=[_item(e, tax_amount=usd("10.005"))]),
            "items[0].tax_amount.amount",
            "amount 10.005 has more decimals than USD allows (2)",
        ),
        (
            lambda e, b: b.update(items=[_item(e, tax_amount=usd("-1.00"))]),
            "items[0].tax_amount.amount",
            "must not be negative",
        ),
        (
            lambda e, b: b.update(items=[_item(e, revenue={"account_code": "11001"})]),
            "items[0].revenue.account_code",
            "INCOME",
        ),
        (
            lambda e, b: b.update(
                items=[_item(e, revenue={"period": {"start": "2026-12-01", "end": "2026-11-01"}})]
            ),
            "items[0].revenue.period.end",
            "before start",
        ),
        (
            lambda e, b: b.update(
                scope="FULL", items=[_item(e, price=None, total_amount=usd("5.00"))]
            ),
            "items[0].price",
            "FULL",
        ),
        (
            lambda e, b: b.update(items=[_item(e, price={"amount_per_unit": usd("0.00")})]),
            "items",
            "must be more than 0",
        ),
        (
            lambda e, b: b.update(invoice_number=paid_invoice(e)["invoice_number"]),
            "invoice_number",
            "already used",
        ),
    ],
)
def test_create_invoice_validation(
    env: Env, change: Callable[[Env, Json], Any], field_name: str, message: str
) -> None:
    body = env.invoice_body(env.customer()["id"])
    change(env, body)
    error = refused(env, lambda: env.writer.create_invoice(body))
    assert field_name in fields_of(error), error.violations
    assert message in message_for(error, field_name)


def test_invoice_validation_collects_every_violation(env: Env) -> None:
    body = {
        "customer_id": "nope",
        "invoice_date": "2026/11/15",
        "items": [
            {
                "product_id": "nope",
                "quantity": -1,
                "price": {"amount_per_unit": {"amount": 100.5, "currency": "GBP"}},
            }
        ],
    }
    error = refused(env, lambda: env.writer.create_invoice(body))
    assert fields_of(error) == {
        "customer_id",
        "invoice_date",
        "items[0].product_id",
        "items[0].quantity",
        "items[0].price.amount_per_unit.amount",
        "items[0].price.amount_per_unit.currency",
    }
    assert error.detail.count(";") == 5


def test_jpy_amounts_have_no_decimals(env: Env) -> None:
    body = env.invoice_body(env.customer("JP")["id"], subsidiary_id=env.sub(JP)["id"])
    # A unit price may be finer than the currency; the line total is rounded half-even.
    body["items"][0]["price"] = {"amount_per_unit": {"amount": "1000.5", "currency": "JPY"}}
    body["items"][0]["quantity"] = 3
    invoice = env.writer.create_invoice(body)
    assert invoice["total"] == {"amount": "3002", "currency": "JPY"}
    body["items"][0]["quantity"] = 1
    body["items"][0].pop("price")
    body.update(scope="AR_ONLY", invoice_number="JP-1")
    body["items"][0]["total_amount"] = {"amount": "1000.5", "currency": "JPY"}
    error = refused(env, lambda: env.writer.create_invoice(body))
    assert message_for(error, "items[0].total_amount.amount") == (
        "amount 1000.5 has more decimals than JPY allows (0)"
    )
    body["items"][0]["total_amount"] = {"amount": "1000", "currency": "JPY"}
    before = ledger_sums(env.world, JP)
    invoice = env.writer.create_invoice(body)
    assert movement(before, ledger_sums(env.world, JP)) == {
        "12001": (1000, 0),
        "40001": (0, 1000),
    }
    assert invoice["total"] == {"amount": "1000", "currency": "JPY"}


def test_replace_invoice(env: Env) -> None:
    invoice = env.new_invoice("1000.00")
    entry_id = env.world.posting_of[invoice["id"]]
    before = ledger_sums(env.world, US)
    env.clock.advance(60)
    start = len(env.events)
    body = env.invoice_body(invoice["customer_id"], "1200.00", invoice_number="INV-API-00001")
    replaced = env.writer.replace_invoice(invoice["id"], body)
    assert replaced["id"] == invoice["id"]
    assert replaced["invoice_number"] == "INV-API-00001"
    assert replaced["total"] == usd("1200.00")
    assert replaced["updated_at"] == "2026-11-29T09:31:01.123Z"
    assert env.world.posting_of[invoice["id"]] == entry_id
    entry = env.world.store["journal_entry"].get(entry_id)
    assert entry is not None
    assert entry["items"][0]["amount"] == usd("1200.00")
    assert movement(before, ledger_sums(env.world, US)) == {
        "12001": (20000, 0),
        "40001": (0, 20000),
    }
    assert_balanced(env.world)
    assert env.events[start:] == [
        ("invoice", "UPDATED", replaced),
        ("journal_entry", "UPDATED", entry),
    ]
    refused(env, lambda: env.writer.replace_invoice("nope", body), status=404)
    error = refused(env, lambda: env.writer.replace_invoice(invoice["id"], {"items": []}))
    assert {"customer_id", "invoice_date", "items"} <= fields_of(error)


def test_replace_invoice_keeps_payments_and_refuses_a_total_below_them(env: Env) -> None:
    invoice = env.new_invoice("1000.00")
    env.writer.create_invoice_payment(
        invoice["id"], {"amount": usd("600.00"), "date": "2026-11-20", "account_code": "11001"}
    )
    body = env.invoice_body(invoice["customer_id"], "500.00", invoice_number="INV-API-00001")
    error = refused(env, lambda: env.writer.replace_invoice(invoice["id"], body))
    assert "600.00 already paid" in message_for(error, "items")
    other = env.customer("GB")
    moved = env.invoice_body(other["id"], "900.00", invoice_number="INV-API-00001")
    error = refused(env, lambda: env.writer.replace_invoice(invoice["id"], moved))
    assert "customer_id" in fields_of(error)
    body = env.invoice_body(invoice["customer_id"], "800.00", invoice_number="INV-API-00001")
    replaced = env.writer.replace_invoice(invoice["id"], body)
    assert replaced["amount_due"] == usd("200.00")
    assert replaced["status"] == "PARTIALLY_PAID"
    assert len(env.world.payments_of[invoice["id"]]) == 1


def test_delete_invoice(env: Env) -> None:
    before = ledger_sums(env.world, US)
    invoice = env.new_invoice("750.00")
    entry_id = env.world.posting_of[invoice["id"]]
    start = len(env.events)
    assert env.writer.delete_invoice(invoice["id"]) is None
    assert env.world.store["invoice"].get(invoice["id"]) is None
    assert env.world.store["journal_entry"].get(entry_id) is None
    assert invoice["id"] not in env.world.posting_of
    assert ledger_sums(env.world, US) == before
    assert env.events[start:] == [
        ("invoice", "DELETED", invoice["id"]),
        ("journal_entry", "DELETED", entry_id),
    ]
    refused(env, lambda: env.writer.delete_invoice(invoice["id"]), status=404)


def test_delete_invoice_refuses_paid_and_credited_invoices(env: Env) -> None:
    error = refused(env, lambda: env.writer.delete_invoice(paid_invoice(env)["id"]))
    assert "payment" in error.detail
    invoice = env.new_invoice("300.00")
    memo = env.writer.create_credit_memo(env.memo_body(invoice["customer_id"], "50.00"))
    env.writer.apply_credit_memo(
        memo["id"],
        {
            "applications": [
                {
                    "invoice_id": invoice["id"],
                    "amount": usd("50.00"),
                    "application_date": "2026-11-12",
                }
            ]
        },
    )
    error = refused(env, lambda: env.writer.delete_invoice(invoice["id"]))
    assert memo["credit_memo_number"] in error.detail


# ---- invoice payments --------------------------------------------------------------------------


def _pay(amount: str = "400.00", **changes: Any) -> Json:
    return {"amount": usd(amount), "date": "2026-11-20", "account_code": "11001", **changes}


def test_create_invoice_payment(env: Env) -> None:
    invoice = env.new_invoice("1000.00")
    before = ledger_sums(env.world, US)
    env.clock.advance(5)
    start = len(env.events)
    payment = env.writer.create_invoice_payment(invoice["id"], _pay("400.00"))
    assert payment == {
        "id": payment["id"],
        "invoice_id": invoice["id"],
        "status": "UNCLEARED",
        "amount": usd("400.00"),
        "date": "2026-11-20",
        "account_code": "11001",
        "updated_at": "2026-11-29T09:30:06.123Z",
    }
    generated = next(env.world.store["invoice_payment"].all_records())
    assert generated["id"] == payment["id"]
    assert (
        payment.keys()
        == next(
            p
            for p in env.world.store["invoice_payment"].all_records()
            if p["status"] == "SUCCESSFUL"
        ).keys()
    )
    assert env.world.payments_of[invoice["id"]] == [payment["id"]]
    updated = env.world.store["invoice"].get(invoice["id"])
    assert updated is not None
    assert updated["amount_due"] == usd("600.00")
    assert updated["status"] == "PARTIALLY_PAID"
    assert updated["updated_at"] == "2026-11-29T09:30:06.123Z"
    assert movement(before, ledger_sums(env.world, US)) == {
        "11001": (40000, 0),
        "12001": (0, 40000),
    }
    assert_balanced(env.world)
    entry = env.world.store["journal_entry"].get(env.world.posting_of[payment["id"]])
    assert env.events[start:] == [
        ("invoice_payment", "CREATED", payment),
        ("journal_entry", "CREATED", entry),
        ("invoice", "PAYMENT_UPDATED", updated),
    ]
    env.writer.create_invoice_payment(invoice["id"], _pay("600.00", account_code="11002"))
    settled = env.world.store["invoice"].get(invoice["id"])
    assert settled is not None
    assert settled["status"] == "PAID"
    assert settled["amount_due"] == usd("0.00")


@pytest.mark.parametrize(
    ("body", "field_name", "message"),
    [
        (
            {"amount": usd("10.00"), "payment_date": "2026-11-20", "account_code": "11001"},
            "date",
            "date must not be null",
        ),
        (_pay("1000.01"), "amount", "more than the 1000.00 USD due"),
        (_pay("0.00"), "amount.amount", "greater than 0"),
        (_pay("10.005"), "amount.amount", "amount 10.005 has more decimals than USD allows (2)"),
        (
            {**_pay(), "amount": {"amount": 10, "currency": "USD"}},
            "amount.amount",
            "decimal string",
        ),
        (
            {**_pay(), "amount": {"amount": "10.00", "currency": "GBP"}},
            "amount.currency",
            "currency GBP does not match the invoice's currency USD",
        ),
        (_pay(account_code="12001"), "account_code", "Cash or Bank"),
        (_pay(account_code="40001"), "account_code", "Cash or Bank"),
        (_pay(account_code="99999"), "account_code", "no account"),
        (_pay(date="20-11-2026"), "date", "YYYY-MM-DD"),
        ({}, "amount", "must not be null"),
    ],
)
def test_create_invoice_payment_validation(
    env: Env, body: Json, field_name: str, message: str
) -> None:
    invoice = env.new_invoice("1000.00")
    error = refused(env, lambda: env.writer.create_invoice_payment(invoice["id"], body))
    assert message in message_for(error, field_name), error.violations


def test_overpayment_counts_payments_and_credits_already_received(env: Env) -> None:
    invoice = env.new_invoice("1000.00")
    env.writer.create_invoice_payment(invoice["id"], _pay("700.00"))
    memo = env.writer.create_credit_memo(env.memo_body(invoice["customer_id"], "200.00"))
    env.writer.apply_credit_memo(
        memo["id"],
        {
            "applications": [
                {
                    "invoice_id": invoice["id"],
                    "amount": usd("200.00"),
                    "application_date": "2026-11-21",
                }
            ]
        },
    )
    error = refused(env, lambda: env.writer.create_invoice_payment(invoice["id"], _pay("100.01")))
    assert "100.00 USD due" in message_for(error, "amount")
    env.writer.create_invoice_payment(invoice["id"], _pay("100.00"))
    settled = env.world.store["invoice"].get(invoice["id"])
    assert settled is not None
    assert (settled["status"], settled["amount_due"]) == ("PAID", usd("0.00"))


def test_invoice_payment_unknown_invoice(env: Env) -> None:
    error = refused(env, lambda: env.writer.create_invoice_payment("nope", _pay()), status=404)
    assert fields_of(error) == {"invoice_id"}


def test_replace_invoice_payment(env: Env) -> None:
    invoice = env.new_invoice("1000.00")
    payment = env.writer.create_invoice_payment(invoice["id"], _pay("400.00"))
    entry_id = env.world.posting_of[payment["id"]]
    before = ledger_sums(env.world, US)
    start = len(env.events)
    replaced = env.writer.replace_invoice_payment(
        invoice["id"], payment["id"], _pay("1000.00", account_code="11002", date="2026-11-22")
    )
    assert replaced["id"] == payment["id"]
    assert replaced["amount"] == usd("1000.00")
    assert replaced["status"] == "UNCLEARED"
    assert env.world.posting_of[payment["id"]] == entry_id
    assert movement(before, ledger_sums(env.world, US)) == {
        "11001": (-40000, 0),
        "11002": (100000, 0),
        "12001": (0, 60000),
    }
    assert_balanced(env.world)
    updated = env.world.store["invoice"].get(invoice["id"])
    assert updated is not None
    assert updated["status"] == "PAID"
    assert events_since(env, start) == [
        ("invoice_payment", "UPDATED"),
        ("journal_entry", "UPDATED"),
        ("invoice", "PAYMENT_UPDATED"),
    ]
    error = refused(
        env,
        lambda: env.writer.replace_invoice_payment(invoice["id"], payment["id"], _pay("1000.01")),
    )
    assert "more than the 1000.00 USD due" in message_for(error, "amount")


def test_only_uncleared_payments_can_change(env: Env) -> None:
    invoice = paid_invoice(env)
    payment_id = env.world.payments_of[invoice["id"]][0]
    for call in (
        lambda: env.writer.replace_invoice_payment(invoice["id"], payment_id, _pay("1.00")),
        lambda: env.writer.delete_invoice_payment(invoice["id"], payment_id),
    ):
        error = refused(env, call)
        assert "only UNCLEARED payments can be changed" in error.detail


def test_payment_path_ids_must_match(env: Env) -> None:
    invoice = env.new_invoice("1000.00")
    other = env.new_invoice("500.00")
    payment = env.writer.create_invoice_payment(invoice["id"], _pay("100.00"))
    refused(env, lambda: env.writer.delete_invoice_payment(other["id"], payment["id"]), 404)
    refused(env, lambda: env.writer.delete_invoice_payment(invoice["id"], "nope"), 404)
    refused(env, lambda: env.writer.delete_invoice_payment("nope", payment["id"]), 404)
    refused(
        env, lambda: env.writer.replace_invoice_payment(other["id"], payment["id"], _pay()), 404
    )


def test_delete_invoice_payment(env: Env) -> None:
    invoice = env.new_invoice("1000.00")
    before = ledger_sums(env.world, US)
    payment = env.writer.create_invoice_payment(invoice["id"], _pay("400.00"))
    entry_id = env.world.posting_of[payment["id"]]
    refused(env, lambda: env.writer.delete_invoice(invoice["id"]))
    start = len(env.events)
    assert env.writer.delete_invoice_payment(invoice["id"], payment["id"]) is None
    assert env.world.store["invoice_payment"].get(payment["id"]) is None
    assert env.world.store["journal_entry"].get(entry_id) is None
    assert payment["id"] not in env.world.posting_of
    assert env.world.payments_of[invoice["id"]] == []
    assert ledger_sums(env.world, US) == before
    restored = env.world.store["invoice"].get(invoice["id"])
    assert restored is not None
    assert restored["amount_due"] == usd("1000.00")
    assert restored["status"] == "UNPAID"
    assert env.events[start:] == [
        ("invoice_payment", "DELETED", payment["id"]),
        ("journal_entry", "DELETED", entry_id),
        ("invoice", "PAYMENT_UPDATED", restored),
    ]
    env.writer.delete_invoice(invoice["id"])
    assert env.world.store["invoice"].get(invoice["id"]) is None


# ---- credit memos ------------------------------------------------------------------------------


def test_create_credit_memo(env: Env) -> None:
    customer = env.customer()
    generated = next(env.world.store["credit_memo"].all_records())
    before = ledger_sums(env.world, US)
    start = len(env.events)
    body = env.memo_body(customer["id"], "50.00")
    body["items"][0]["price"]["quantity"] = 2
    body["items"][0]["tax_rate"] = {"percentage": "7.25"}
    memo = env.writer.create_credit_memo(body)
    assert memo.keys() == generated.keys()
    assert memo["items"][0].keys() == generated["items"][0].keys()
    assert memo["credit_memo_number"] == "CM-API-00001"
    assert memo["status"] == "UNAPPLIED"
    assert memo["net_amount"] == usd("100.00")
    assert memo["taxed_amount"] == usd("7.25")
    assert memo["total"] == usd("107.25")
    assert memo["remaining_amount"] == usd("107.25")
    assert memo["applied_amount"] == usd("0.00")
    assert memo["applications"] == []
    assert memo["address"] == customer["address"]
    assert memo["updated_at"] == STAMP
    assert memo["id"] in env.world.store["credit_memo"].ids()
    assert movement(before, ledger_sums(env.world, US)) == {
        "40001": (10000, 0),
        "22001": (725, 0),
        "12001": (0, 10725),
    }
    assert_balanced(env.world)
    entry = env.world.store["journal_entry"].get(env.world.posting_of[memo["id"]])
    assert env.events[start:] == [
        ("credit_memo", "CREATED", memo),
        ("journal_entry", "CREATED", entry),
    ]
    body["items"][0]["tax_rate"] = {"percentage": 20}
    assert env.writer.create_credit_memo(body)["taxed_amount"] == usd("20.00")


def _memo_item(env: Env, **price_changes: Any) -> Json:
    price = {"product_id": env.product()["id"], "quantity": 1, "amount_per_unit": usd("10.00")}
    price.update(price_changes)
    return {"description": "Credit", "price": price}


@pytest.mark.parametrize(
    ("change", "field_name", "message"),
    [
        (lambda e, b: b.pop("credit_memo_date"), "credit_memo_date", "must not be null"),
        (lambda e, b: b.update(customer_id="nope"), "customer_id", "no customer"),
        (lambda e, b: b.update(items=[]), "items", "must not be empty"),
        (
            lambda e, b: b.update(items=[{"price": _memo_item(e)["price"]}]),
            "items[0].description",
            "must not be null",
        ),
        (lambda e, b: b.update(items=[{"description": "x"}]), "items[0].price", "must not be null"),
        (
            lambda e, b: b.update(items=[{"description": "x", "price": {}}]),
            "items[0].price.amount_per_unit",
            "must not be null",
        ),
        (
            lambda e, b: b.update(items=[_memo_item(e, product_id="nope")]),
            "items[0].price.product_id",
            "no product",
        ),
        (
            lambda e, b: b.update(items=[_memo_item(e, quantity=-2)]),
            "items[0].price.quantity",
            "greater than 0",
        ),
        (
            lambda e, b: b.update(
                items=[_memo_item(e, amount_per_unit={"amount": "5", "currency": "JPY"})]
            ),
            "items[0].price.amount_per_unit.currency",
            "currency JPY does not match the subsidiary's currency USD",
        ),
        (
            lambda e, b: b.update(items=[{**_memo_item(e), "tax_rate": {"percentage": "lots"}}]),
            "items[0].tax_rate.percentage",
            "must be a number",
        ),
        (
            lambda e, b: b.update(items=[{**_memo_item(e), "tax_rate": {"percentage": 101}}]),
            "items[0].tax_rate.percentage",
            "between 0 and 100",
        ),
    ],
)
def test_create_credit_memo_validation(
    env: Env, change: Callable[[Env, Json], Any], field_name: str, message: str
) -> None:
    body = env.memo_body(env.customer()["id"])
    change(env, body)
    error = refused(env, lambda: env.writer.create_credit_memo(body))
    assert message in message_for(error, field_name), error.violations


def _applications(*entries: tuple[str, str]) -> Json:
    return {
        "applications": [
            {"invoice_id": invoice_id, "amount": usd(amount), "application_date": "2026-11-15"}
            for invoice_id, amount in entries
        ]
    }


def test_credit_memo_applications_are_a_full_reconcile(env: Env) -> None:
    customer = env.customer()
    first = env.new_invoice("300.00", customer)
    second = env.new_invoice("500.00", customer)
    memo = env.writer.create_credit_memo(env.memo_body(customer["id"], "400.00"))
    ledger_before = [ledger_sums(env.world, i) for i in range(3)]
    start = len(env.events)

    applied = env.writer.apply_credit_memo(
        memo["id"], _applications((first["id"], "300.00"), (second["id"], "50.00"))
    )
    assert applied["status"] == "PARTIALLY_APPLIED"
    assert applied["applied_amount"] == usd("350.00")
    assert applied["remaining_amount"] == usd("50.00")
    assert applied["updated_at"] == STAMP
    assert [a["invoice_number"] for a in applied["applications"]] == [
        first["invoice_number"],
        second["invoice_number"],
    ]
    assert all(a["credit_memo_id"] == memo["id"] for a in applied["applications"])
    first_now = env.world.store["invoice"].get(first["id"])
    second_now = env.world.store["invoice"].get(second["id"])
    assert first_now is not None
    assert second_now is not None
    assert (first_now["status"], first_now["amount_due"]) == ("CREDITED", usd("0.00"))
    assert (second_now["status"], second_now["amount_due"]) == (
        "PARTIALLY_CREDITED",
        usd("450.00"),
    )
    assert sorted(events_since(env, start)) == [
        ("credit_memo", "PAYMENT_UPDATED"),
        ("invoice", "UPDATED"),
        ("invoice", "UPDATED"),
    ]
    assert env.events[-1] == ("credit_memo", "PAYMENT_UPDATED", applied)
    # Applications move no money in the ledger: the memo already credited receivables.
    assert [ledger_sums(env.world, i) for i in range(3)] == ledger_before

    kept_id = applied["applications"][1]["id"]
    start = len(env.events)
    env.clock.advance(1)
    reconciled = env.writer.apply_credit_memo(memo["id"], _applications((second["id"], "50.00")))
    assert [a["invoice_id"] for a in reconciled["applications"]] == [second["id"]]
    assert reconciled["applications"][0]["id"] == kept_id
    assert reconciled["applied_amount"] == usd("50.00")
    first_now = env.world.store["invoice"].get(first["id"])
    assert first_now is not None
    assert (first_now["status"], first_now["amount_due"]) == ("UNPAID", usd("300.00"))
    # Only the invoice whose credit changed is touched.
    assert [(e, ev, b["id"]) for e, ev, b in env.events[start:]] == [
        ("invoice", "UPDATED", first["id"]),
        ("credit_memo", "PAYMENT_UPDATED", memo["id"]),
    ]

    everything = env.writer.apply_credit_memo(
        memo["id"], _applications((second["id"], "100.00"), (first["id"], "300.00"))
    )
    assert everything["status"] == "APPLIED"
    assert everything["remaining_amount"] == usd("0.00")

    env.writer.delete_credit_memo_applications(memo["id"])
    emptied = env.world.store["credit_memo"].get(memo["id"])
    assert emptied is not None
    assert emptied["applications"] == []
    assert emptied["status"] == "UNAPPLIED"
    for invoice in (first, second):
        restored = env.world.store["invoice"].get(invoice["id"])
        assert restored is not None
        assert restored["amount_due"] == invoice["total"]


def test_credit_memo_application_rules(env: Env) -> None:
    customer = env.customer()
    invoice = env.new_invoice("300.00", customer)
    stranger = env.new_invoice("300.00", env.customer("GB"))
    memo = env.writer.create_credit_memo(env.memo_body(customer["id"], "400.00"))
    env.writer.apply_credit_memo(memo["id"], _applications((invoice["id"], "200.00")))
    pounds = env.writer.create_invoice(
        {
            **env.invoice_body(customer["id"]),
            "subsidiary_id": env.sub(UK)["id"],
            "items": [
                {
                    "product_id": env.product()["id"],
                    "quantity": 1,
                    "price": {"amount_per_unit": {"amount": "10.00", "currency": "GBP"}},
                }
            ],
        }
    )

    def apply(*entries: tuple[str, str]) -> Callable[[], Any]:
        return lambda: env.writer.apply_credit_memo(memo["id"], _applications(*entries))

    error = refused(env, apply((stranger["id"], "10.00")))
    assert "another customer" in message_for(error, "applications[0].invoice_id")
    error = refused(env, apply((pounds["id"], "10.00")))
    assert "is in GBP" in message_for(error, "applications[0].invoice_id")
    error = refused(env, apply(("nope", "10.00")))
    assert "no invoice" in message_for(error, "applications[0].invoice_id")
    # 100.00 still due, plus the 200.00 this memo already applied: 300.00 is the ceiling.
    error = refused(env, apply((invoice["id"], "300.01")))
    assert "more than the 300.00 USD open" in message_for(error, "applications")
    error = refused(env, apply((invoice["id"], "200.00"), (invoice["id"], "100.01")))
    assert "applications" in fields_of(error)
    error = refused(env, apply((invoice["id"], "0.00")))
    assert "greater than 0" in message_for(error, "applications[0].amount.amount")
    error = refused(env, lambda: env.writer.apply_credit_memo(memo["id"], {}))
    assert fields_of(error) == {"applications"}
    refused(env, lambda: env.writer.apply_credit_memo("nope", _applications()), status=404)
    result = env.writer.apply_credit_memo(memo["id"], _applications((invoice["id"], "300.00")))
    assert result["applied_amount"] == usd("300.00")

    big = env.new_invoice("5000.00", customer)
    error = refused(env, apply((big["id"], "400.01")))
    assert "more than credit memo" in message_for(error, "applications")


def test_replace_credit_memo(env: Env) -> None:
    customer = env.customer()
    invoice = env.new_invoice("300.00", customer)
    memo = env.writer.create_credit_memo(env.memo_body(customer["id"], "100.00"))
    env.writer.apply_credit_memo(memo["id"], _applications((invoice["id"], "80.00")))
    before = ledger_sums(env.world, US)
    error = refused(
        env,
        lambda: env.writer.replace_credit_memo(memo["id"], env.memo_body(customer["id"], "79.99")),
    )
    assert "80.00 already applied" in message_for(error, "items")
    start = len(env.events)
    body = env.memo_body(customer["id"], "90.00", credit_memo_number=memo["credit_memo_number"])
    replaced = env.writer.replace_credit_memo(memo["id"], body)
    assert replaced["total"] == usd("90.00")
    assert replaced["applied_amount"] == usd("80.00")
    assert replaced["remaining_amount"] == usd("10.00")
    assert replaced["status"] == "PARTIALLY_APPLIED"
    assert len(replaced["applications"]) == 1
    assert movement(before, ledger_sums(env.world, US)) == {
        "40001": (-1000, 0),
        "12001": (0, -1000),
    }
    assert events_since(env, start) == [("credit_memo", "UPDATED"), ("journal_entry", "UPDATED")]
    refused(env, lambda: env.writer.replace_credit_memo("nope", body), status=404)


def test_delete_credit_memo(env: Env) -> None:
    customer = env.customer()
    invoice = env.new_invoice("300.00", customer)
    before = ledger_sums(env.world, US)
    memo = env.writer.create_credit_memo(env.memo_body(customer["id"], "100.00"))
    entry_id = env.world.posting_of[memo["id"]]
    env.writer.apply_credit_memo(memo["id"], _applications((invoice["id"], "80.00")))
    error = refused(env, lambda: env.writer.delete_credit_memo(memo["id"]))
    assert invoice["invoice_number"] in error.detail
    env.writer.apply_credit_memo(memo["id"], _applications())
    start = len(env.events)
    assert env.writer.delete_credit_memo(memo["id"]) is None
    assert env.world.store["credit_memo"].get(memo["id"]) is None
    assert env.world.store["journal_entry"].get(entry_id) is None
    assert ledger_sums(env.world, US) == before
    assert env.events[start:] == [
        ("credit_memo", "DELETED", memo["id"]),
        ("journal_entry", "DELETED", entry_id),
    ]
    refused(env, lambda: env.writer.delete_credit_memo(memo["id"]), status=404)


# ---- journal entries ---------------------------------------------------------------------------


def _entry_body(lines: list[tuple[str, str, str]], currency: str = "USD", **extra: Any) -> Json:
    return {
        "name": "Manual accrual",
        "currency": currency,
        "date": "2026-11-15",
        "items": [
            {
                "amount": {"amount": amount, "currency": currency},
                "account_code": code,
                "side": side,
                "description": f"{side.lower()} line",
            }
            for code, side, amount in lines
        ],
        **extra,
    }


BALANCED = [("62002", "DEBIT", "150.00"), ("21001", "CREDIT", "150.00")]


def test_create_journal_entry(env: Env) -> None:
    generated = env.world.store["journal_entry"].get(env.world.posting_of[paid_invoice(env)["id"]])
    assert generated is not None
    customer = env.customer()
    before = ledger_sums(env.world, US)
    start = len(env.events)
    entry = env.writer.create_journal_entry(
        _entry_body(
            [
                ("62002", "DEBIT", "100.00"),
                ("62003", "DEBIT", "50.00"),
                ("21001", "CREDIT", "150.00"),
            ],
            related_entity={"id": customer["id"], "type": "CUSTOMER"},
            reversal_date="2026-12-01",
        )
    )
    assert entry.keys() == generated.keys()
    assert entry["items"][0].keys() == generated["items"][0].keys()
    assert entry["subsidiary_id"] == env.sub(US)["id"]
    assert entry["related_entity"] == {"id": customer["id"], "type": "CUSTOMER"}
    assert entry["reversal_date"] == "2026-12-01"
    assert entry["updated_at"] == STAMP
    assert [i["account_id"] for i in entry["items"]] == [
        env.world.accounts_by_code[code]["id"] for code in ("62002", "62003", "21001")
    ]
    assert entry["items"][2]["original_transaction_amount"] == usd("150.00")
    assert entry["id"] in env.world.store["journal_entry"].ids()
    assert entry["id"] not in env.world.posting_of.values()
    assert movement(before, ledger_sums(env.world, US)) == entry_movement(entry)
    assert_balanced(env.world)
    assert env.events[start:] == [("journal_entry", "CREATED", entry)]


def test_journal_entry_in_another_subsidiary(env: Env) -> None:
    before = ledger_sums(env.world, JP)
    entry = env.writer.create_journal_entry(
        _entry_body(
            [("62002", "DEBIT", "15000"), ("21001", "CREDIT", "15000")],
            currency="JPY",
            subsidiary_id=env.sub(JP)["id"],
        )
    )
    assert movement(before, ledger_sums(env.world, JP)) == {
        "62002": (15000, 0),
        "21001": (0, 15000),
    }
    assert entry["items"][0]["amount"] == {"amount": "15000", "currency": "JPY"}
    assert_balanced(env.world)


@pytest.mark.parametrize(
    ("body", "field_name", "message"),
    [
        (
            _entry_body([("62002", "DEBIT", "150.00"), ("21001", "CREDIT", "140.00")]),
            "items",
            "debits 150.00 must equal credits 140.00",
        ),
        (
            _entry_body(BALANCED, currency="GBP"),
            "currency",
            "currency GBP does not match the subsidiary's currency USD",
        ),
        (_entry_body(BALANCED[:1]), "items", "at least 2 lines"),
        (_entry_body([]), "items", "at least 2 lines"),
        (
            _entry_body([("99999", "DEBIT", "1.00"), ("21001", "CREDIT", "1.00")]),
            "items[0].account_code",
            "no account",
        ),
        (
            _entry_body([("62002", "LEFT", "1.00"), ("21001", "CREDIT", "1.00")]),
            "items[0].side",
            "DEBIT, CREDIT",
        ),
        (
            _entry_body([("62002", "DEBIT", "0.00"), ("21001", "CREDIT", "0.00")]),
            "items[0].amount.amount",
            "greater than 0",
        ),
        (
            _entry_body([("62002", "DEBIT", "1.001"), ("21001", "CREDIT", "1.001")]),
            "items[0].amount.amount",
            "amount 1.001 has more decimals than USD allows (2)",
        ),
        (
            _entry_body([("62002", "DEBIT", "1e3"), ("21001", "CREDIT", "1000")]),
            "items[0].amount.amount",
            "not a decimal number",
        ),
        (
            _entry_body([("62002", "DEBIT", "99999999999999.00"), ("21001", "CREDIT", "1")]),
            "items[0].amount.amount",
            "too large",
        ),
        ({**_entry_body(BALANCED), "name": " "}, "name", "must not be blank"),
        ({**_entry_body(BALANCED), "currency": "usd"}, "currency", "ISO 4217"),
        ({**_entry_body(BALANCED), "date": "15/11/2026"}, "date", "YYYY-MM-DD"),
        (
            _entry_body(BALANCED, reversal_date="2026-11-01"),
            "reversal_date",
            "before date",
        ),
        (_entry_body(BALANCED, subsidiary_id="nope"), "subsidiary_id", "no subsidiary"),
        (
            _entry_body(BALANCED, related_entity={"id": "nope", "type": "VENDOR"}),
            "related_entity.id",
            "no vendor",
        ),
        (
            _entry_body(BALANCED, related_entity={"id": "x", "type": "EMPLOYEE"}),
            "related_entity.type",
            "must be one of",
        ),
        (
            _entry_body(BALANCED, exchange_rate={"base": "USD", "target": "EUR", "rate": 1.1}),
            "exchange_rate.rate",
            "positive decimal string",
        ),
    ],
)
def test_create_journal_entry_validation(
    env: Env, body: Json, field_name: str, message: str
) -> None:
    error = refused(env, lambda: env.writer.create_journal_entry(body))
    assert message in message_for(error, field_name), error.violations


def test_journal_entry_item_currency_must_match_the_entry(env: Env) -> None:
    body = _entry_body(BALANCED)
    body["items"][1]["amount"] = {"amount": "150.00", "currency": "GBP"}
    error = refused(env, lambda: env.writer.create_journal_entry(body))
    assert "does not match the entry's currency USD" in message_for(
        error, "items[1].amount.currency"
    )


def test_replace_journal_entry_keeps_subsidiary_and_related_entity(env: Env) -> None:
    vendor = next(env.world.store["vendor"].all_records())
    entry = env.writer.create_journal_entry(
        _entry_body(BALANCED, related_entity={"id": vendor["id"], "type": "VENDOR"})
    )
    before = ledger_sums(env.world, US)
    start = len(env.events)
    replacement = _entry_body(
        [("61002", "DEBIT", "200.00"), ("21001", "CREDIT", "200.00")],
        subsidiary_id=env.sub(UK)["id"],
        related_entity=None,
    )
    replaced = env.writer.replace_journal_entry(entry["id"], replacement)
    assert replaced["id"] == entry["id"]
    assert replaced["subsidiary_id"] == env.sub(US)["id"]
    assert replaced["related_entity"] == {"id": vendor["id"], "type": "VENDOR"}
    assert movement(before, ledger_sums(env.world, US)) == {
        "62002": (-15000, 0),
        "61002": (20000, 0),
        "21001": (0, 5000),
    }
    assert_balanced(env.world)
    assert env.events[start:] == [("journal_entry", "UPDATED", replaced)]
    error = refused(
        env,
        lambda: env.writer.replace_journal_entry(entry["id"], _entry_body(BALANCED, "GBP")),
    )
    assert "currency GBP does not match the subsidiary's currency USD" in message_for(
        error, "currency"
    )
    refused(env, lambda: env.writer.replace_journal_entry("nope", replacement), status=404)


def test_delete_journal_entry(env: Env) -> None:
    before = ledger_sums(env.world, US)
    entry = env.writer.create_journal_entry(_entry_body(BALANCED))
    start = len(env.events)
    assert env.writer.delete_journal_entry(entry["id"]) is None
    assert env.world.store["journal_entry"].get(entry["id"]) is None
    assert ledger_sums(env.world, US) == before
    assert env.events[start:] == [("journal_entry", "DELETED", entry["id"])]
    refused(env, lambda: env.writer.delete_journal_entry(entry["id"]), status=404)


def test_document_entries_are_changed_through_their_document(env: Env) -> None:
    invoice = paid_invoice(env)
    entry_id = env.world.posting_of[invoice["id"]]
    for call in (
        lambda: env.writer.replace_journal_entry(entry_id, _entry_body(BALANCED)),
        lambda: env.writer.delete_journal_entry(entry_id),
    ):
        error = refused(env, call)
        assert invoice["invoice_number"] in error.detail
        assert f"/invoices/{invoice['id']}" in error.detail
    payment_id = env.world.payments_of[invoice["id"]][0]
    error = refused(env, lambda: env.writer.delete_journal_entry(env.world.posting_of[payment_id]))
    assert f"/invoices/{invoice['id']}/payments/{payment_id}" in error.detail
    bill = next(env.world.store["bill"].all_records())
    error = refused(env, lambda: env.writer.delete_journal_entry(env.world.posting_of[bill["id"]]))
    assert bill["expense_number"] in error.detail


def test_bulk_entries_are_ordinary_manual_entries(env: Env) -> None:
    bulk = env.world.bulk
    assert bulk is not None
    entry_id = bulk.record_id(0)
    original = env.world.store["journal_entry"].get(entry_id)
    assert original is not None
    sub = subsidiary_index(env, original["subsidiary_id"])
    currency = original["currency"]
    before = ledger_sums(env.world, sub)
    amount = "1234.00" if currency != "JPY" else "1234"
    replaced = env.writer.replace_journal_entry(
        entry_id,
        _entry_body([("62002", "DEBIT", amount), ("21001", "CREDIT", amount)], currency=currency),
    )
    stored = env.world.store["journal_entry"].get(entry_id)
    assert stored == replaced
    expected = entry_movement(replaced)
    for code, (d, c) in entry_movement(original).items():
        d0, c0 = expected.get(code, (0, 0))
        expected[code] = (d0 - d, c0 - c)
    assert movement(before, ledger_sums(env.world, sub)) == {
        k: v for k, v in expected.items() if v != (0, 0)
    }
    assert_balanced(env.world)

    other_id = bulk.record_id(1)
    other = env.world.store["journal_entry"].get(other_id)
    assert other is not None
    other_sub = subsidiary_index(env, other["subsidiary_id"])
    before = ledger_sums(env.world, other_sub)
    env.writer.delete_journal_entry(other_id)
    assert env.world.store["journal_entry"].get(other_id) is None
    removed = {code: (-d, -c) for code, (d, c) in entry_movement(other).items()}
    assert movement(before, ledger_sums(env.world, other_sub)) == removed
    # The rewritten bulk entry can itself be deleted; its generated lines stay retired.
    before = ledger_sums(env.world, sub)
    env.writer.delete_journal_entry(entry_id)
    removed = {code: (-d, -c) for code, (d, c) in entry_movement(replaced).items()}
    assert movement(before, ledger_sums(env.world, sub)) == removed
    assert_balanced(env.world)


# ---- properties --------------------------------------------------------------------------------

CODES = [a.code for a in CHART]


@st.composite
def balanced_lines(draw: st.DrawFn) -> list[tuple[str, str, int]]:
    debits = draw(st.lists(st.integers(1, 10**10), min_size=1, max_size=4))
    total = sum(debits)
    count = draw(st.integers(1, min(4, total)))
    cuts: list[int] = []
    if count > 1:
        cuts = sorted(
            draw(st.sets(st.integers(1, total - 1), min_size=count - 1, max_size=count - 1))
        )
    credits = [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]
    lines = [(draw(st.sampled_from(CODES)), "DEBIT", m) for m in debits]
    lines += [(draw(st.sampled_from(CODES)), "CREDIT", m) for m in credits]
    return draw(st.permutations(lines))


def _minor_body(lines: list[tuple[str, str, int]], subsidiary: Json) -> Json:
    currency = subsidiary["currency"]
    return _entry_body(
        [(code, side, money_json(m, currency)["amount"]) for code, side, m in lines],
        currency=currency,
        subsidiary_id=subsidiary["id"],
    )


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(lines=balanced_lines(), which=st.sampled_from([US, UK, JP]))
def test_random_balanced_entries_always_post(
    env: Env, lines: list[tuple[str, str, int]], which: int
) -> None:
    subsidiary = env.sub(which)
    before = ledger_sums(env.world, which)
    entry = env.writer.create_journal_entry(_minor_body(lines, subsidiary))
    posted = entry_movement(entry)
    assert sum(d for d, _ in posted.values()) == sum(c for _, c in posted.values())
    assert sorted((i["account_code"], i["side"]) for i in entry["items"]) == sorted(
        (code, side) for code, side, _ in lines
    )
    assert movement(before, ledger_sums(env.world, which)) == posted
    assert env.world.store["journal_entry"].get(entry["id"]) == entry
    assert_balanced(env.world)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lines=balanced_lines(),
    which=st.sampled_from([US, UK, JP]),
    pick=st.integers(0, 7),
    delta=st.integers(1, 10**6),
)
def test_random_unbalanced_entries_are_refused(
    env: Env, lines: list[tuple[str, str, int]], which: int, pick: int, delta: int
) -> None:
    index = pick % len(lines)
    code, side, minor = lines[index]
    lines = [*lines[:index], (code, side, minor + delta), *lines[index + 1 :]]
    subsidiary = env.sub(which)
    error = refused(env, lambda: env.writer.create_journal_entry(_minor_body(lines, subsidiary)))
    currency = subsidiary["currency"]
    debits = sum(m for _, s, m in lines if s == "DEBIT")
    credits = sum(m for _, s, m in lines if s == "CREDIT")
    assert message_for(error, "items") == (
        f"debits {money_json(debits, currency)['amount']} must equal credits "
        f"{money_json(credits, currency)['amount']}"
    )
