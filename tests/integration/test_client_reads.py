"""The Rillet client against the sandbox over real HTTP: exact reads, cursors, faults, errors."""

from __future__ import annotations

import math
import socket
from collections.abc import Callable, Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from rillet_dagster import catalog
from rillet_dagster.clock import FakeClock, parse_timestamp
from rillet_dagster.rillet.client import RetryPolicy, RilletClient
from rillet_dagster.rillet.errors import (
    AuthenticationError,
    CursorRestartError,
    InvalidRecordIdError,
    NotFoundError,
    RilletConnectionError,
    ValidationError,
)
from rillet_dagster.rillet.ratelimit import RateBudget
from rillet_dagster.sandbox.faults import Faults
from rillet_dagster.sandbox.server import SandboxServer
from tests import canary
from tests.conftest import API_KEY

LISTS = [e for e in catalog.ENTITIES if not e.single and not e.parent]
FAST_RETRY = RetryPolicy(
    max_attempts=8, base_seconds=0.01, cap_seconds=0.1, rate_limited_seconds=0.01
)


@pytest.fixture
def client(sandbox: SandboxServer, clock: FakeClock) -> Iterator[RilletClient]:
    with RilletClient(
        api_key=API_KEY, base_url=sandbox.base_url, clock=clock, retry=FAST_RETRY, seed=1
    ) as c:
        yield c


def truth(sandbox: SandboxServer, entity: str) -> list[str]:
    source = "journal_entry" if entity == "reporting_journal_entry" else entity
    with sandbox.sandbox.world.store.lock:
        return sandbox.sandbox.world.store[source].ids()


@pytest.mark.parametrize("spec", LISTS, ids=lambda s: s.name)
def test_full_read_is_exact_with_the_minimum_requests(
    client: RilletClient, sandbox: SandboxServer, spec: catalog.EntitySpec
) -> None:
    before = client.stats.requests
    stream = client.iter_records(spec.name)
    ids = [r["id"] for r in stream]
    expected = truth(sandbox, spec.name)
    assert ids == expected
    used = client.stats.requests - before
    assert used == (max(1, math.ceil(len(ids) / 100)) if spec.paginated else 1)
    assert stream.complete and stream.restarts == 0


def test_money_arrives_as_decimal(client: RilletClient) -> None:
    invoice = next(iter(client.iter_records("invoice")))
    assert isinstance(invoice["total"]["amount"], str)
    report = client.report("trial_balance", from_date="2026-01-01", to_date="2026-01-31")
    assert all(isinstance(r["debit_total"]["amount"], str) for r in report["accounts"])


def test_cursor_expiry_mid_read_still_yields_every_record_once(
    client: RilletClient, sandbox: SandboxServer
) -> None:
    stream = client.iter_records("journal_entry")
    seen = [next(stream)["id"] for _ in range(250)]
    assert httpx.post(f"{sandbox.base_url}/_sandbox/cursors/expire").status_code == 204
    seen.extend(r["id"] for r in stream)
    assert seen == truth(sandbox, "journal_entry")
    assert stream.restarts == 1 and stream.duplicates == 300


def test_endless_restarts_stop_with_a_clear_error(
    client: RilletClient, sandbox: SandboxServer
) -> None:
    stream = client.iter_records("journal_entry")

    def read_while_cursors_keep_expiring() -> None:
        for index, _ in enumerate(stream):
            if index % 100 == 99:
                httpx.post(f"{sandbox.base_url}/_sandbox/cursors/expire")

    with pytest.raises(CursorRestartError, match="restarted at page 1"):
        read_while_cursors_keep_expiring()


def test_reads_survive_faults_exactly_once(
    start_sandbox: Callable[..., SandboxServer], clock: FakeClock
) -> None:
    server = start_sandbox(
        faults=Faults(
            error_rate=0.1, drop_rate=0.05, malformed_rate=0.05, latency_max_ms=5, seed=4
        ),
        rate_limit=100_000,
    )
    with RilletClient(
        api_key=API_KEY, base_url=server.base_url, clock=clock, retry=FAST_RETRY, seed=2
    ) as c:
        for name in ("journal_entry", "invoice", "bill", "account"):
            assert [r["id"] for r in c.iter_records(name)] == truth(server, name)
        assert c.stats.retries > 0


def test_incremental_reads_and_watermarks(
    client: RilletClient, sandbox: SandboxServer, clock: FakeClock
) -> None:
    first = client.iter_records("customer")
    everything = list(first)
    watermark = first.watermark
    assert watermark == max(parse_timestamp(c["updated_at"]) for c in everything)
    again = client.iter_records("customer", updated_since=watermark)
    overlap = list(again)
    floor = watermark - client.lookback
    assert {c["id"] for c in overlap} == {
        c["id"] for c in everything if parse_timestamp(c["updated_at"]) > floor
    }
    assert again.watermark == watermark
    clock.advance(30)
    changed = everything[-1]
    body = {"name": changed["name"] + " (edited)"}
    httpx.put(
        f"{sandbox.base_url}/customers/{changed['id']}",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    third = client.iter_records("customer", updated_since=watermark)
    assert changed["id"] in {c["id"] for c in third}
    assert third.watermark > watermark
    before = client.stats.requests
    future = client.iter_records("customer", updated_since=clock.now() + timedelta(days=1))
    assert list(future) == []
    assert client.stats.requests - before == 1
    assert future.watermark == clock.now() + timedelta(days=1)  # never moves backwards


def test_records_without_updated_at_use_the_pass_start_time(
    client: RilletClient, clock: FakeClock
) -> None:
    stream = client.iter_records("bank_transaction")
    list(stream)
    assert stream.watermark == clock.now()


def test_watermark_only_after_a_complete_pass(client: RilletClient) -> None:
    stream = client.iter_records("journal_entry")
    next(stream)
    with pytest.raises(RuntimeError, match="to the end"):
        _ = stream.watermark


def test_wrong_key_fails_once_fast_and_names_the_fix(
    sandbox: SandboxServer, clock: FakeClock
) -> None:
    secret = canary.api_key("wrong")
    with RilletClient(
        api_key=secret, base_url=sandbox.base_url, clock=clock, retry=FAST_RETRY
    ) as c:
        with pytest.raises(AuthenticationError) as caught:
            list(c.iter_records("invoice"))
        assert c.stats.requests == 1 and c.stats.retries == 0
    message = str(caught.value)
    assert "RILLET_API_KEY" in message and "127.0.0.1" in message
    assert secret not in message and secret not in repr(c)


def test_unreachable_base_url_is_a_clear_error(clock: FakeClock) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with RilletClient(api_key=API_KEY, base_url=url, clock=clock, retry=FAST_RETRY) as c:
        with pytest.raises(RilletConnectionError, match="RILLET_BASE_URL"):
            c.get("invoice", "00000000-0000-4000-8000-000000000000")
        assert c.stats.requests == FAST_RETRY.max_attempts


def test_invalid_parameters_are_refused_before_any_request(client: RilletClient) -> None:
    for call in (
        lambda: client.iter_records("invoice", colour="red"),
        lambda: client.iter_records("journal_entry", date__gte="March"),
        lambda: client.iter_records("invoice", subsidiary_id="not-a-uuid"),
        lambda: client.iter_records(
            "product", updated_since=parse_timestamp("2026-01-01T00:00:00Z")
        ),
        lambda: client.report("trial_balance", from_date="2026-01-01"),
        lambda: client.report("balance_sheet", as_of_date="2026-01-01", colour="red"),
    ):
        with pytest.raises(ValueError):  # noqa: PT011 - each message is checked below in one case
            call()
    with pytest.raises(ValueError, match="filters: customer_id, overdue, status, subsidiary_id"):
        client.iter_records("invoice", colour="red")
    with pytest.raises(KeyError, match="catalog knows"):
        client.iter_records("widgets")
    assert client.stats.requests == 0


def test_single_objects_children_and_not_found(
    client: RilletClient, sandbox: SandboxServer
) -> None:
    assert client.get_single("organization")["currency"] == "USD"
    assert client.get_single("book_period")["status"] == "CLOSED"
    bill = next(b for b in client.iter_records("bill", status="PAID"))
    payments = client.children("bill_payment", bill["id"])
    assert payments and all(p["bill_id"] == bill["id"] for p in payments)
    invoice = next(iter(client.iter_records("invoice")))
    assert client.get("invoice", invoice["id"]) == invoice
    with pytest.raises(NotFoundError):
        client.get("invoice", "00000000-0000-4000-8000-000000000000")


def test_validation_error_is_typed_and_not_retried(
    client: RilletClient, sandbox: SandboxServer
) -> None:
    body = {
        "name": "Unbalanced",
        "currency": "USD",
        "date": "2026-11-20",
        "items": [
            {
                "account_code": "62002",
                "side": "DEBIT",
                "amount": {"amount": "10.00", "currency": "USD"},
            },
            {
                "account_code": "21001",
                "side": "CREDIT",
                "amount": {"amount": "9.00", "currency": "USD"},
            },
        ],
    }
    before = client.stats.requests
    with pytest.raises(ValidationError) as caught:
        client.create("journal_entry", body, idempotency_key="je-1")
    assert client.stats.requests - before == 1
    assert caught.value.violations and caught.value.type and caught.value.title
    body["items"][1]["amount"]["amount"] = "10.00"  # type: ignore[index]
    created = client.create("journal_entry", body, idempotency_key="je-1-v2")
    replay = client.create("journal_entry", body, idempotency_key="je-1-v2")
    assert created == replay
    named = [
        e
        for e in sandbox.sandbox.world.store["journal_entry"].all_records()
        if e["name"] == "Unbalanced"
    ]
    assert len(named) == 1
    assert isinstance(Decimal(created["items"][0]["amount"]["amount"]), Decimal)


class DropFirstPostResponse(httpx.BaseTransport):
    """Delivers the first POST to the server, then loses its response (a reset after commit)."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.posts: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.method == "POST":
            self.posts.append(request.headers.get("Idempotency-Key"))
            if len(self.posts) == 1:
                response.read()
                response.close()
                raise httpx.RemoteProtocolError(
                    "connection reset before the response", request=request
                )
        return response


def test_post_whose_response_was_lost_is_retried_with_the_same_key_and_created_once(
    sandbox: SandboxServer, clock: FakeClock
) -> None:
    transport = DropFirstPostResponse()
    body = {"name": "Reset Corp", "emails": [{"email": "ap@reset.example", "type": "MAIN_SENDER"}]}
    with RilletClient(
        api_key=API_KEY,
        base_url=sandbox.base_url,
        clock=clock,
        retry=FAST_RETRY,
        transport=transport,
    ) as c:
        created = c.create("customer", body, idempotency_key="customer-reset-1")
    assert transport.posts == ["customer-reset-1", "customer-reset-1"]
    named = [
        r
        for r in sandbox.sandbox.world.store["customer"].all_records()
        if r["name"] == "Reset Corp"
    ]
    assert [r["id"] for r in named] == [created["id"]]


def test_hostile_ids_never_reach_the_sandbox(client: RilletClient, sandbox: SandboxServer) -> None:
    before = sum(sandbox.sandbox.requests.values())
    for record_id in ("..", ".", "../accounts", "%2e%2e"):
        with pytest.raises(InvalidRecordIdError, match="invoice id"):
            client.get("invoice", record_id)
        with pytest.raises(InvalidRecordIdError, match="bill id"):
            client.children("bill_payment", record_id)
    assert client.stats.requests == 0
    assert sum(sandbox.sandbox.requests.values()) == before


def test_a_huge_retry_after_pauses_the_shared_budget_at_most_the_maximum(
    start_sandbox: Callable[..., SandboxServer], clock: FakeClock, tmp_path: Path
) -> None:
    server = start_sandbox(faults=Faults(force_429=1, retry_after=4294967296))
    budget = RateBudget(f"sqlite:///{tmp_path / 'state.db'}", API_KEY, clock=clock)
    start = clock.time()
    with RilletClient(
        api_key=API_KEY,
        base_url=server.base_url,
        clock=clock,
        budget=budget,
        retry=RetryPolicy(max_attempts=3, base_seconds=1, cap_seconds=1),
        max_retry_after_seconds=120,
    ) as c:
        assert [a["id"] for a in c.list_all("account")] == truth(server, "account")
    # Treated as a bare 429: a 5 s floor plus at most 1 s of jitter, not 136 years.
    assert 5 <= clock.time() - start <= 6
    other = RateBudget(f"sqlite:///{tmp_path / 'state.db'}", API_KEY, clock=clock)
    other.acquire()
    assert other.waited_seconds == 0.0
