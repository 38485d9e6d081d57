"""The sandbox's read surface over real HTTP: envelopes, pagination, cursors, filters, by-id."""

from __future__ import annotations

import math
from datetime import timedelta

import httpx
import pytest

from rillet_dagster import catalog
from rillet_dagster.clock import FakeClock, isoformat_z, parse_timestamp
from rillet_dagster.sandbox.server import SandboxServer

PAGINATED = [e for e in catalog.ENTITIES if e.paginated]
UNPAGINATED = [e for e in catalog.ENTITIES if not e.paginated and not e.single and not e.parent]


def read_all(api: httpx.Client, spec: catalog.EntitySpec, **params: str) -> tuple[list[dict], int]:
    """Follow next_cursor to the end; the records and the number of requests it took."""
    records, requests, cursor = [], 0, None
    while True:
        query = {**params, "limit": "100"} | ({"cursor": cursor} if cursor else {})
        response = api.get(spec.path, params=query)
        requests += 1
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {spec.list_key, "pagination"}
        records.extend(body[spec.list_key])
        cursor = body["pagination"].get("next_cursor")
        if not cursor:
            return records, requests


def truth(sandbox: SandboxServer, entity: str) -> list[str]:
    """The store's own ids, newest first (ground truth read in-process)."""
    with sandbox.sandbox.world.store.lock:
        return sandbox.sandbox.world.store[entity].ids()


def test_invoices_envelope_matches_rillet(api: httpx.Client) -> None:
    body = api.get("/invoices", params={"limit": "2"}).json()
    assert set(body) == {"invoices", "pagination"}
    assert len(body["invoices"]) == 2
    assert isinstance(body["pagination"]["next_cursor"], str)
    invoice = body["invoices"][0]
    assert {"id", "invoice_number", "items", "total", "amount_due", "updated_at"} <= set(invoice)
    assert set(invoice["total"]) == {"amount", "currency"}
    assert isinstance(invoice["total"]["amount"], str)


@pytest.mark.parametrize("spec", PAGINATED, ids=lambda s: s.name)
def test_paging_returns_every_record_once_newest_first(
    api: httpx.Client, sandbox: SandboxServer, spec: catalog.EntitySpec
) -> None:
    records, requests = read_all(api, spec)
    ids = [r["id"] for r in records]
    source = "journal_entry" if spec.name == "reporting_journal_entry" else spec.name
    expected = truth(sandbox, source)
    assert ids == expected  # each exactly once, in the store's newest-first creation order
    assert len(set(ids)) == len(ids)
    assert requests == max(1, math.ceil(len(ids) / 100))


@pytest.mark.parametrize("spec", UNPAGINATED, ids=lambda s: s.name)
def test_unpaginated_lists_have_no_pagination(
    api: httpx.Client, sandbox: SandboxServer, spec: catalog.EntitySpec
) -> None:
    body = api.get(spec.path).json()
    assert set(body) == {spec.list_key}
    assert sorted(r["id"] for r in body[spec.list_key]) == sorted(truth(sandbox, spec.name))


def test_bank_accounts_and_invoice_payments_use_their_surprising_keys(api: httpx.Client) -> None:
    assert "accounts" in api.get("/bank-accounts").json()
    assert "payments" in api.get("/invoice-payments").json()


def test_default_limit_is_25_and_bad_limits_name_the_parameter(api: httpx.Client) -> None:
    assert len(api.get("/journal-entries").json()["journal_entries"]) == 25
    for bad in ("0", "101", "abc", "-1", "2.5"):
        response = api.get("/journal-entries", params={"limit": bad})
        assert response.status_code == 400
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["status"] == 400
        assert "'limit'" in problem["detail"]
        assert problem["violations"][0]["field"] == "limit"


def test_cursor_expires_after_two_hours_and_silently_restarts(
    api: httpx.Client, clock: FakeClock
) -> None:
    first = api.get("/journal-entries", params={"limit": "10"}).json()
    cursor = first["pagination"]["next_cursor"]
    second = api.get("/journal-entries", params={"limit": "10", "cursor": cursor}).json()
    assert second["journal_entries"][0]["id"] != first["journal_entries"][0]["id"]
    clock.advance(2 * 3600 - 1)
    still_valid = api.get("/journal-entries", params={"limit": "10", "cursor": cursor}).json()
    assert still_valid["journal_entries"] == second["journal_entries"]
    clock.advance(1)
    restarted = api.get("/journal-entries", params={"limit": "10", "cursor": cursor})
    assert restarted.status_code == 200
    assert restarted.json()["journal_entries"] == first["journal_entries"]


def test_unknown_cursor_and_expire_all_restart_at_page_one(
    api: httpx.Client, sandbox: SandboxServer
) -> None:
    first = api.get("/invoices", params={"limit": "5"}).json()
    garbage = api.get("/invoices", params={"limit": "5", "cursor": "not-a-cursor"}).json()
    assert garbage["invoices"] == first["invoices"]
    cursor = first["pagination"]["next_cursor"]
    assert httpx.post(f"{sandbox.base_url}/_sandbox/cursors/expire").status_code == 204
    again = api.get("/invoices", params={"limit": "5", "cursor": cursor}).json()
    assert again["invoices"] == first["invoices"]


def test_cursor_carries_the_query_so_later_pages_need_only_the_cursor(
    api: httpx.Client, sandbox: SandboxServer
) -> None:
    subsidiary = sandbox.sandbox.world.subsidiaries[0]["id"]
    everything, _ = read_all(api, catalog.entity("journal_entry"), subsidiary_id=subsidiary)
    first = api.get("/journal-entries", params={"subsidiary_id": subsidiary, "limit": "100"})
    cursor = first.json()["pagination"]["next_cursor"]
    rest = api.get("/journal-entries", params={"cursor": cursor, "limit": "100"}).json()
    assert all(je["subsidiary_id"] == subsidiary for je in rest["journal_entries"])
    assert rest["journal_entries"] == everything[100:200]


def test_updated_gt_is_strict(api: httpx.Client) -> None:
    invoices, _ = read_all(api, catalog.entity("invoice"))
    pivot = sorted(invoices, key=lambda r: r["updated_at"])[len(invoices) // 2]
    newer, _ = read_all(api, catalog.entity("invoice"), **{"updated.gt": pivot["updated_at"]})
    stamp = parse_timestamp(pivot["updated_at"])
    expected = {r["id"] for r in invoices if parse_timestamp(r["updated_at"]) > stamp}
    assert {r["id"] for r in newer} == expected
    assert pivot["id"] not in expected


def test_sort_by_updated_is_newest_update_first(api: httpx.Client) -> None:
    records, _ = read_all(api, catalog.entity("customer"), sort_by="updated")
    stamps = [parse_timestamp(r["updated_at"]) for r in records]
    assert stamps == sorted(stamps, reverse=True)
    bad = api.get("/customers", params={"sort_by": "name"})
    assert bad.status_code == 400
    assert "sort_by" in bad.json()["detail"]


def test_record_updated_mid_pass_jumps_ahead_of_an_updated_order_pass(
    api: httpx.Client, sandbox: SandboxServer, clock: FakeClock
) -> None:
    first = api.get("/customers", params={"sort_by": "updated", "limit": "3"}).json()
    assert first["pagination"]["next_cursor"]
    later_pages, _ = read_all(api, catalog.entity("customer"), sort_by="updated")
    oldest = later_pages[-1]
    clock.advance(60)
    body = {"name": oldest["name"] + " (renamed)"}
    assert api.put(f"/customers/{oldest['id']}", json=body).status_code == 200
    cursor = first["pagination"]["next_cursor"]
    rest = []
    while cursor:
        page = api.get("/customers", params={"cursor": cursor, "limit": "100"}).json()
        rest.extend(page["customers"])
        cursor = page["pagination"].get("next_cursor")
    assert oldest["id"] not in {c["id"] for c in rest}  # keyset: it moved ahead of the pass
    newest = api.get("/customers", params={"sort_by": "updated", "limit": "1"}).json()
    assert newest["customers"][0]["id"] == oldest["id"]


def test_date_and_subsidiary_filters(api: httpx.Client, sandbox: SandboxServer) -> None:
    subsidiary = sandbox.sandbox.world.subsidiaries[1]["id"]
    params = {"subsidiary_id": subsidiary, "date.gte": "2026-03-01", "date.lte": "2026-03-31"}
    entries, _ = read_all(api, catalog.entity("journal_entry"), **params)
    assert entries
    assert all(e["subsidiary_id"] == subsidiary for e in entries)
    assert all("2026-03-01" <= e["date"] <= "2026-03-31" for e in entries)
    everything, _ = read_all(api, catalog.entity("journal_entry"))
    expected = [
        e["id"]
        for e in everything
        if e["subsidiary_id"] == subsidiary and "2026-03-01" <= e["date"] <= "2026-03-31"
    ]
    assert [e["id"] for e in entries] == expected
    bad = api.get("/journal-entries", params={"date.gte": "March"})
    assert bad.status_code == 400
    assert "date.gte" in bad.json()["detail"]
    bad = api.get("/journal-entries", params={"subsidiary_id": "nope"})
    assert bad.status_code == 400
    assert "subsidiary_id" in bad.json()["detail"]


def test_get_by_id_is_bare_and_unknown_ids_and_paths_are_404_problems(api: httpx.Client) -> None:
    invoice = api.get("/invoices", params={"limit": "1"}).json()["invoices"][0]
    single = api.get(f"/invoices/{invoice['id']}")
    assert single.status_code == 200
    assert single.json() == invoice
    missing = api.get("/invoices/00000000-0000-4000-8000-000000000000")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert missing.json()["type"].startswith("https://rillet.io/")
    assert api.get("/no-such-collection").status_code == 404


def test_payments_per_invoice_and_per_bill(api: httpx.Client, sandbox: SandboxServer) -> None:
    world = sandbox.sandbox.world
    invoice_id = next(
        i
        for i, p in world.payments_of.items()
        if p and api.get(f"/invoices/{i}").status_code == 200
    )
    body = api.get(f"/invoices/{invoice_id}/payments").json()
    assert set(body) == {"payments"}
    assert body["payments"][0]["invoice_id"] == invoice_id
    bill = api.get("/bills", params={"status": "PAID", "limit": "1"}).json()["bills"][0]
    payments = api.get(f"/bills/{bill['id']}/payments").json()["payments"]
    assert payments
    assert all(p["bill_id"] == bill["id"] for p in payments)
    assert "updated_at" not in payments[0]
    assert api.get("/bill-payments").status_code == 404  # no org-wide feed, as in Rillet


def test_bulk_journal_entries_are_served_like_any_other(
    api: httpx.Client, sandbox: SandboxServer
) -> None:
    bulk = sandbox.sandbox.world.bulk
    assert bulk is not None
    assert len(bulk) > 0
    entry_id = bulk.record_id(3)
    entry = api.get(f"/journal-entries/{entry_id}").json()
    assert entry["id"] == entry_id
    assert len(entry["items"]) == 2


def test_single_object_endpoints(api: httpx.Client) -> None:
    organization = api.get("/organizations/self").json()
    assert {"id", "currency", "timezone", "trade_name"} <= set(organization)
    period = api.get("/books/periods/last-closed").json()
    assert period["status"] == "CLOSED"
    assert period["start"] < period["end"]


def test_record_timestamps_are_utc_with_z(api: httpx.Client, clock: FakeClock) -> None:
    invoices = api.get("/invoices", params={"limit": "100"}).json()["invoices"]
    for invoice in invoices:
        assert invoice["updated_at"].endswith("Z")
        assert parse_timestamp(invoice["updated_at"]) <= clock.now()
    assert isoformat_z(clock.now() - timedelta(seconds=1)) < isoformat_z(clock.now())
