"""Activity mode: a steady stream of creates, updates and deletes, so a demo shows changes flow.

Every change goes through the same :class:`~rillet_dagster.sandbox.writes.Writer` as API writes,
so it reaches lists, reports and webhook subscribers exactly as a real write would.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from rillet_dagster.clock import Clock, SystemClock
from rillet_dagster.rillet.money import Money, minor_units
from rillet_dagster.sandbox.data import World
from rillet_dagster.sandbox.writes import WriteError, Writer

log = logging.getLogger(__name__)

_LIST_PRICE_FACTOR = {"USD": Decimal(1), "GBP": Decimal("0.8"), "JPY": Decimal(150)}


class Activity:
    """Makes about ``rate_per_second`` changes per second on a background thread."""

    def __init__(
        self,
        writer: Writer,
        world: World,
        *,
        rate_per_second: float,
        clock: Clock | None = None,
        seed: int = 11,
    ) -> None:
        if rate_per_second <= 0:
            raise ValueError("activity needs a positive rate of changes per second")
        self.writer = writer
        self.world = world
        self.rate = rate_per_second
        self.clock = clock or SystemClock()
        self.rng = random.Random(seed)
        self.changes = 0
        self._manual_entries: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._actions: list[tuple[float, Callable[[], str]]] = [
            (0.10, self.new_customer),
            (0.15, self.update_customer),
            (0.25, self.new_invoice),
            (0.20, self.pay_invoice),
            (0.15, self.new_journal_entry),
            (0.10, self.update_journal_entry),
            (0.05, self.delete_journal_entry),
        ]

    # ---- the loop --------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sandbox-activity", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.rng.expovariate(self.rate)):
            try:
                log.info("sandbox activity: %s", self.step())
            except WriteError as error:  # a bug in a generated payload; keep the demo going
                log.warning(
                    "sandbox activity change refused: %s %s", error.detail, error.violations
                )

    def step(self) -> str:
        """Make one random change; returns what it did."""
        weights = [weight for weight, _ in self._actions]
        _, action = self.rng.choices(self._actions, weights=weights)[0]
        self.changes += 1
        return action()

    # ---- helpers ---------------------------------------------------------------------------

    def _today(self) -> str:
        return self.clock.now().date().isoformat()

    def _live(self, entity: str) -> list[dict[str, Any]]:
        with self.world.store.lock:
            collection = self.world.store[entity]
            seqs = list(collection.live_seqs())[:500]  # the newest are plenty to pick from
            return [collection.record(s) for s in seqs]

    def _money(self, usd: Decimal, currency: str) -> dict[str, str]:
        amount = usd * _LIST_PRICE_FACTOR.get(currency, Decimal(1))
        return Money(amount, currency).rounded().to_json()

    # ---- changes ---------------------------------------------------------------------------

    def new_customer(self) -> str:
        number = self.rng.randint(1000, 9999)
        customer = self.writer.create_customer(
            body={
                "name": f"Live Demo Customer {number}",
                "emails": [{"email": f"billing{number}@demo.example", "type": "MAIN_SENDER"}],
                "payment_terms": 30,
            }
        )
        return f"created customer {customer['name']}"

    def update_customer(self) -> str:
        customer = self.rng.choice(self._live("customer"))
        body = {k: v for k, v in customer.items() if k not in {"id", "updated_at"}}
        body["payment_terms"] = self.rng.choice((15, 30, 45, 60))
        self.writer.replace_customer(id=customer["id"], body=body)
        return f"changed payment terms of {customer['name']}"

    def new_invoice(self) -> str:
        customer = self.rng.choice(self._live("customer"))
        subsidiary = self.rng.choice(self.world.subsidiaries)
        products = [p for p in self._live("product") if p["price"]["type"] == "FIXED_RECURRING"]
        items = []
        for product in self.rng.sample(products, k=min(2, len(products))):
            usd = Money.parse(product["price"]["amount"]).amount
            items.append(
                {
                    "product_id": product["id"],
                    "description": product["name"],
                    "quantity": self.rng.randint(1, 20),
                    "price": {"amount_per_unit": self._money(usd, subsidiary["currency"])},
                }
            )
        invoice = self.writer.create_invoice(
            body={
                "customer_id": customer["id"],
                "subsidiary_id": subsidiary["id"],
                "invoice_date": self._today(),
                "items": items,
            }
        )
        return f"issued invoice {invoice['invoice_number']}"

    def pay_invoice(self) -> str:
        open_invoices = [
            i for i in self._live("invoice") if Money.parse(i["amount_due"]).amount > 0
        ]
        if not open_invoices:
            return self.new_invoice()
        invoice = self.rng.choice(open_invoices)
        self.writer.create_invoice_payment(
            invoice_id=invoice["id"],
            body={"amount": invoice["amount_due"], "date": self._today(), "account_code": "11001"},
        )
        return f"received payment for {invoice['invoice_number']}"

    def new_journal_entry(self) -> str:
        subsidiary = self.rng.choice(self.world.subsidiaries)
        currency = subsidiary["currency"]
        amount = self._money(Decimal(self.rng.randint(50, 5000)), currency)
        entry = self.writer.create_journal_entry(
            body={
                "name": "Office supplies (live demo)",
                "currency": currency,
                "date": self._today(),
                "subsidiary_id": subsidiary["id"],
                "items": [
                    {"account_code": "62002", "side": "DEBIT", "amount": amount},
                    {"account_code": "11001", "side": "CREDIT", "amount": amount},
                ],
            }
        )
        self._manual_entries.append(entry["id"])
        return f"posted journal entry {entry['id']}"

    def update_journal_entry(self) -> str:
        if not self._manual_entries:
            return self.new_journal_entry()
        entry_id = self.rng.choice(self._manual_entries)
        with self.world.store.lock:
            entry = self.world.store["journal_entry"].get(entry_id)
        if entry is None:
            self._manual_entries.remove(entry_id)
            return self.new_journal_entry()
        currency = entry["currency"]
        step = Decimal(1).scaleb(-minor_units(currency))
        amount = Money.parse(entry["items"][0]["amount"]).amount + step * self.rng.randint(1, 99)
        money = Money(amount, currency).to_json()
        self.writer.replace_journal_entry(
            id=entry_id,
            body={
                "name": entry["name"],
                "currency": currency,
                "date": entry["date"],
                "items": [
                    {"account_code": "62002", "side": "DEBIT", "amount": money},
                    {"account_code": "11001", "side": "CREDIT", "amount": money},
                ],
            },
        )
        return f"corrected journal entry {entry_id}"

    def delete_journal_entry(self) -> str:
        if not self._manual_entries:
            return self.new_journal_entry()
        entry_id = self._manual_entries.pop(self.rng.randrange(len(self._manual_entries)))
        self.writer.delete_journal_entry(id=entry_id)
        return f"deleted journal entry {entry_id}"
