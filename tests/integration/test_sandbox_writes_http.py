"""Writes over real HTTP: reflected in lists and reports, idempotency keys, validation, webhooks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
from collections.abc import Callable, Iterator
from decimal import Decimal

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from rillet_dagster.clock import FakeClock
from rillet_dagster.rillet.money import Money
from rillet_dagster.sandbox.faults import Faults
from rillet_dagster.sandbox.server import SandboxServer
from tests import canary
from tests.conftest import HEADERS

TOKEN = canary.webhook_token("sandbox-writes")


def journal_entry(
    sandbox: SandboxServer, amount: str = "125.50", credit: str | None = None
) -> dict:
    subsidiary = sandbox.sandbox.world.subsidiaries[0]
    return {
        "name": "Accrued audit fees",
        "currency": subsidiary["currency"],
        "date": "2026-11-20",
        "subsidiary_id": subsidiary["id"],
        "items": [
            {"account_code": "62002", "side": "DEBIT",
             "amount": {"amount": amount, "currency": "USD"}},
            {"account_code": "21001", "side": "CREDIT",
             "amount": {"amount": credit or amount, "currency": "USD"}},
        ],
    }  # fmt: skip


def trial_row(api: httpx.Client, subsidiary_id: str, code: str) -> Decimal:
    report = api.get(
        "/reports/trial-balance",
        params={"from_date": "2026-11-01", "to_date": "2026-11-30", "subsidiary_id": subsidiary_id},
    ).json()
    for row in report["accounts"]:
        if row["code"] == code:
            return Money.parse(row["debit_total"]).amount
    return Decimal(0)


def test_journal_entry_write_shows_in_lists_and_reports(
    api: httpx.Client, sandbox: SandboxServer, clock: FakeClock
) -> None:
    subsidiary_id = sandbox.sandbox.world.subsidiaries[0]["id"]
    before = trial_row(api, subsidiary_id, "62002")
    clock.advance(5)
    created = api.post("/journal-entries", json=journal_entry(sandbox))
    assert created.status_code == 200, created.text
    entry = created.json()
    assert entry["updated_at"] == clock.now().strftime("%Y-%m-%dT%H:%M:%S.000Z")
    newest = api.get("/journal-entries", params={"limit": "1"}).json()["journal_entries"][0]
    assert newest == entry
    assert trial_row(api, subsidiary_id, "62002") == before + Decimal("125.50")
    changed = api.put(f"/journal-entries/{entry['id']}", json=journal_entry(sandbox, "200.00"))
    assert changed.status_code == 200
    assert trial_row(api, subsidiary_id, "62002") == before + Decimal("200.00")
    assert api.delete(f"/journal-entries/{entry['id']}").status_code == 204
    assert api.get(f"/journal-entries/{entry['id']}").status_code == 404
    assert trial_row(api, subsidiary_id, "62002") == before


def test_unbalanced_entry_is_refused_with_violations(
    api: httpx.Client, sandbox: SandboxServer
) -> None:
    count = len(sandbox.sandbox.world.store["journal_entry"])
    response = api.post("/journal-entries", json=journal_entry(sandbox, "100.00", "99.99"))
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["violations"]
    assert all({"field", "message"} <= set(v) for v in problem["violations"])
    assert len(sandbox.sandbox.world.store["journal_entry"]) == count


def test_bad_bodies(api: httpx.Client) -> None:
    raw = api.post(
        "/journal-entries", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert raw.status_code == 400
    text = api.post("/journal-entries", content=b"name=x", headers={"Content-Type": "text/plain"})
    assert text.status_code == 415


def test_idempotency_key_replays_the_first_response(
    api: httpx.Client, sandbox: SandboxServer
) -> None:
    headers = {"Idempotency-Key": "op-42"}
    first = api.post("/journal-entries", json=journal_entry(sandbox), headers=headers)
    second = api.post("/journal-entries", json=journal_entry(sandbox, "999.00"), headers=headers)
    assert first.status_code == second.status_code == 200
    assert second.json() == first.json()
    assert second.headers["idempotent-replayed"] == "true"
    created = [e for e in sandbox.sandbox.world.store["journal_entry"].all_records()
               if e["name"] == "Accrued audit fees"]  # fmt: skip
    assert len(created) == 1


def test_idempotency_replay_lasts_24_hours(
    api: httpx.Client, sandbox: SandboxServer, clock: FakeClock
) -> None:
    headers = {"Idempotency-Key": "op-day"}
    first = api.post("/journal-entries", json=journal_entry(sandbox), headers=headers).json()
    clock.advance(24 * 3600 - 1)
    assert (
        api.post("/journal-entries", json=journal_entry(sandbox), headers=headers).json() == first
    )
    clock.advance(1)
    again = api.post("/journal-entries", json=journal_entry(sandbox), headers=headers).json()
    assert again["id"] != first["id"]


def test_validation_failure_is_not_stored_under_the_key(
    api: httpx.Client, sandbox: SandboxServer
) -> None:
    headers = {"Idempotency-Key": "op-fix"}
    bad = api.post("/journal-entries", json=journal_entry(sandbox, "1.00", "2.00"), headers=headers)
    assert bad.status_code == 400
    good = api.post("/journal-entries", json=journal_entry(sandbox), headers=headers)
    assert good.status_code == 200
    assert "idempotent-replayed" not in good.headers


def test_key_in_flight_gets_409(start_sandbox: Callable[..., SandboxServer]) -> None:
    server = start_sandbox(faults=Faults(latency_min_ms=300, latency_max_ms=300))
    body = journal_entry(server)
    headers = {**HEADERS, "Idempotency-Key": "op-race"}
    results: list[httpx.Response] = []

    def post() -> None:
        results.append(httpx.post(f"{server.base_url}/journal-entries", json=body, headers=headers))

    # Both arrive together after the same inbound delay; the first to reach the handler holds
    # the key for another 300 ms of write time, so the other finds it in flight.
    threads = [threading.Thread(target=post) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200, 409]
    replay = httpx.post(f"{server.base_url}/journal-entries", json=body, headers=headers)
    assert replay.json() == next(r for r in results if r.status_code == 200).json()


def test_idempotency_key_is_ignored_on_put(api: httpx.Client, sandbox: SandboxServer) -> None:
    entry = api.post("/journal-entries", json=journal_entry(sandbox)).json()
    headers = {"Idempotency-Key": "put-key"}
    first = api.put(
        f"/journal-entries/{entry['id']}", json=journal_entry(sandbox, "10.00"), headers=headers
    )
    second = api.put(
        f"/journal-entries/{entry['id']}", json=journal_entry(sandbox, "20.00"), headers=headers
    )
    assert first.json()["items"][0]["amount"]["amount"] == "10.00"
    assert second.json()["items"][0]["amount"]["amount"] == "20.00"


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    received: list[tuple[dict[str, str], bytes]] = []

    async def capture(request: Request) -> Response:
        received.append((dict(request.headers), await request.body()))
        return Response(status_code=204)

    app = Starlette(routes=[Route("/hook", capture, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        thread.join(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/hook", received
    server.should_exit = True
    thread.join(5)


def verify(headers: dict[str, str], body: bytes, token: str) -> bool:
    """The reference's rule, written independently of the sandbox's signer (section 10.3)."""
    message = (
        ".".join(
            headers[h]
            for h in ("x-rillet-timestamp", "x-rillet-id", "x-rillet-entity", "x-rillet-event")
        ).encode()
        + b"."
        + body
    )
    expected = base64.b64encode(hmac.new(base64.b64decode(token), message, hashlib.sha256).digest())
    return any(
        hmac.compare_digest(expected, s.strip().encode())
        for s in headers["x-rillet-signature"].split(",")
    )


def test_writes_deliver_signed_webhooks(
    api: httpx.Client, sandbox: SandboxServer, receiver: tuple[str, list]
) -> None:
    url, received = receiver
    other = canary.webhook_token("sandbox-writes-other")
    admin = httpx.post(
        f"{sandbox.base_url}/_sandbox/webhooks", json={"url": url, "tokens": [TOKEN, other]}
    )
    assert admin.status_code == 201
    assert TOKEN not in admin.text
    entry = api.post("/journal-entries", json=journal_entry(sandbox)).json()
    api.delete(f"/journal-entries/{entry['id']}")
    assert sandbox.sandbox.dispatcher is not None
    assert sandbox.sandbox.dispatcher.wait_idle(10)
    # Several delivery workers: the two events may arrive in either order, as Rillet's may.
    events = sorted((h["x-rillet-entity"], h["x-rillet-event"]) for h, _ in received)
    assert events == [("JOURNAL_ENTRY", "CREATED"), ("JOURNAL_ENTRY", "DELETED")]
    by_event = {h["x-rillet-event"]: (h, body) for h, body in received}
    for headers, body in received:
        assert verify(headers, body, TOKEN)
        assert verify(headers, body, other)
        assert len(headers["x-rillet-signature"].split(",")) == 2
    created_headers, created_body = by_event["CREATED"]
    assert json.loads(created_body) == entry  # the bare object, no envelope
    assert json.loads(by_event["DELETED"][1]) == entry["id"]  # deletes carry the bare id
    tampered = dict(created_headers, **{"x-rillet-event": "UPDATED"})
    assert not verify(tampered, created_body, TOKEN)


def test_at_most_five_webhooks(sandbox: SandboxServer) -> None:
    admin = f"{sandbox.base_url}/_sandbox/webhooks"
    for i in range(5):
        assert (
            httpx.post(
                admin, json={"url": f"http://127.0.0.1:9/{i}", "tokens": [TOKEN]}
            ).status_code
            == 201
        )
    sixth = httpx.post(admin, json={"url": "http://127.0.0.1:9/6", "tokens": [TOKEN]})
    assert sixth.status_code == 400
    assert "5" in sixth.json()["detail"]
