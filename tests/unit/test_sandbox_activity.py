"""Activity mode makes valid changes that keep the books balanced and fire webhook events."""

from __future__ import annotations

from collections import Counter

from rillet_dagster.clock import FakeClock
from rillet_dagster.sandbox.activity import Activity
from rillet_dagster.sandbox.data import generate
from rillet_dagster.sandbox.writes import Writer


def test_activity_changes_are_valid_balanced_and_notified() -> None:
    clock = FakeClock()
    world = generate(seed=7, size="tiny", now=clock.now())
    events: Counter[tuple[str, str]] = Counter()
    world.store.add_listener(lambda entity, event, body: events.update([(entity, event)]))
    activity = Activity(Writer(world, clock), world, rate_per_second=5, clock=clock, seed=3)
    for _ in range(300):
        clock.advance(1)
        activity.step()  # a WriteError would fail the test: every generated change is valid
    assert activity.changes == 300
    kinds = {entity for entity, _ in events}
    assert {"customer", "invoice", "journal_entry", "invoice_payment"} <= kinds
    assert events[("journal_entry", "DELETED")] > 0
    assert events[("invoice", "PAYMENT_UPDATED")] > 0
    for index in range(len(world.subsidiaries)):
        debit, credit = world.ledger.sums(
            subsidiary=index, start=None, end=clock.now().date(), reporting=False
        )
        assert int(debit.sum()) == int(credit.sum())
