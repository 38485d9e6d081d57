"""The generated company: deterministic, multi-currency, balanced, documents posted."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime

import pytest

from rillet_dagster.rillet.money import Money
from rillet_dagster.sandbox.data import World, generate, parse_size
from rillet_dagster.sandbox.store import dumps

NOW = datetime(2026, 11, 28, 12, tzinfo=UTC)


@pytest.fixture(scope="module")
def world() -> World:
    return generate(seed=7, size="tiny", now=NOW)


def test_same_seed_same_company(world: World) -> None:
    again = generate(seed=7, size="tiny", now=NOW)
    for name, collection in world.store.collections.items():
        assert collection.ids() == again.store[name].ids(), name
    other = generate(seed=8, size="tiny", now=NOW)
    assert other.store["invoice"].ids() != world.store["invoice"].ids()


def test_subsidiaries_in_several_currencies_including_one_without_decimals(world: World) -> None:
    currencies = {s["currency"] for s in world.subsidiaries}
    assert len(world.subsidiaries) >= 2
    assert "JPY" in currencies
    assert "USD" in currencies


def test_every_entity_has_records(world: World) -> None:
    empty = [n for n, c in world.store.collections.items() if not len(c)]
    assert empty == ["reporting_journal_entry"]  # served from the journal entries themselves


def test_every_journal_entry_balances_and_money_is_rounded(world: World) -> None:
    for entry in world.store["journal_entry"].all_records():
        debit = sum(Money.parse(i["amount"]).amount for i in entry["items"] if i["side"] == "DEBIT")
        credit = sum(
            Money.parse(i["amount"]).amount for i in entry["items"] if i["side"] == "CREDIT"
        )
        assert debit == credit > 0, entry["id"]
        for item in entry["items"]:
            money = Money.parse(item["amount"])
            assert money.currency == entry["currency"]
            assert money == money.rounded()


def test_documents_post_to_the_ledger(world: World) -> None:
    entries = {e["id"]: e for e in world.store["journal_entry"].all_records()}
    for entity in ("invoice", "invoice_payment", "bill", "bill_payment", "charge", "credit_memo"):
        for record in world.store[entity].all_records():
            assert world.posting_of[record["id"]] in entries, (entity, record["id"])
    invoice = next(world.store["invoice"].all_records())
    entry = entries[world.posting_of[invoice["id"]]]
    receivable = sum(
        Money.parse(i["amount"]).amount for i in entry["items"] if i["account_code"] == "12001"
    )
    assert receivable == Money.parse(invoice["total"]).amount


def test_invoice_totals_add_up(world: World) -> None:
    for invoice in world.store["invoice"].all_records():
        items = invoice["items"]
        subtotal = sum(Money.parse(i["total_amount"]).amount for i in items)
        assert Money.parse(invoice["subtotal"]).amount == subtotal
        net = subtotal - sum(Money.parse(i["total_discount"]).amount for i in items)
        assert Money.parse(invoice["net_amount"]).amount == net
        tax = Money.parse(invoice["taxed_amount"]).amount
        assert Money.parse(invoice["total"]).amount == net + tax
        paid = sum(
            Money.parse(world.store["invoice_payment"].get(p)["amount"]).amount
            for p in world.payments_of.get(invoice["id"], [])
        )
        assert (
            Money.parse(invoice["amount_due"]).amount <= Money.parse(invoice["total"]).amount - paid
        )


def test_history_spans_about_eighteen_months(world: World) -> None:
    dates = [date.fromisoformat(e["date"]) for e in world.store["journal_entry"].all_records()]
    assert min(dates) <= date(2025, 6, 1)
    assert max(dates) <= NOW.date()
    assert (max(dates) - min(dates)).days >= 500


def test_ledger_balances_per_subsidiary(world: World) -> None:
    for index in range(len(world.subsidiaries)):
        debit, credit = world.ledger.sums(
            subsidiary=index, start=None, end=NOW.date(), reporting=False
        )
        assert int(debit.sum()) == int(credit.sum())
    debit, credit = world.ledger.sums(subsidiary=None, start=None, end=NOW.date(), reporting=True)
    assert int(debit.sum()) == int(credit.sum())


def test_bulk_ids_map_back_to_rows(world: World) -> None:
    bulk = world.bulk
    assert bulk is not None
    for row in (0, 1, len(bulk) - 1):
        assert bulk.index_of(bulk.record_id(row)) == row
        parsed = uuid.UUID(bulk.record_id(row))
        assert str(parsed) == bulk.record_id(row) and parsed.version == 4
    assert bulk.index_of("00000000-0000-4000-8000-000000000000") is None
    assert bulk.index_of("not-a-uuid") is None


def test_sizes() -> None:
    assert parse_size("tiny").customers < parse_size("medium").customers
    assert parse_size("customers=3,vendors=2,journal_entries=10").bulk_journal_entries == 10
    with pytest.raises(ValueError, match="tiny"):
        parse_size("enormous")


def test_bulk_json_rendering_equals_serializing_the_record(world: World) -> None:
    bulk = world.bulk
    assert bulk is not None
    for row in range(len(bulk)):
        assert bulk.render_json(row) == dumps(bulk.render(row)), row
