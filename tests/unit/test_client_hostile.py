"""Hostile inputs to the client: record ids that would escape their path, Retry-After values that
would stall every process sharing the key (MockTransport and a fake clock: no network, no sleep)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from email.utils import format_datetime
from pathlib import Path

import httpx
import pytest

from rillet_dagster.clock import FakeClock
from rillet_dagster.resources import RilletResource
from rillet_dagster.rillet.client import RilletClient, path_segment
from rillet_dagster.rillet.errors import (
    InvalidRecordIdError,
    MalformedResponseError,
    parse_retry_after,
)
from tests.unit.test_client_retries import KEY, PAGE, POLICY, FakeBudget, Recorder, make_client

UUID = "3f2b8c1e-9d4a-4e6b-8f7c-0a1b2c3d4e5f"
HOSTILE_IDS = [
    "..",
    ".",
    "",
    "../accounts",
    "a/b",
    "%2e%2e",
    f"{UUID}\n",  # a pattern anchored with `$` would accept the trailing newline
    f"{UUID}/..",
    f" {UUID}",
    "x" * 500,
]


def _calls(client: RilletClient, record_id: str) -> list[Callable[[], object]]:
    return [
        lambda: client.get("invoice", record_id),
        lambda: client.update("customer", record_id, {"name": "A"}),
        lambda: client.delete("journal_entry", record_id),
        lambda: client.children("bill_payment", record_id),
    ]


@pytest.mark.parametrize("record_id", HOSTILE_IDS)
def test_bad_ids_are_refused_before_any_request(record_id: str) -> None:
    handler = Recorder(httpx.Response(200, json={"id": UUID}))
    client = make_client(handler, FakeClock())
    for call in _calls(client, record_id):
        with pytest.raises(InvalidRecordIdError) as caught:
            call()
        assert isinstance(caught.value, ValueError)
    assert handler.requests == []


def test_the_error_names_the_entity_and_a_truncated_repr_of_the_id() -> None:
    client = make_client(Recorder(PAGE), FakeClock())
    with pytest.raises(InvalidRecordIdError, match=r"invoice id '\.\.'") as caught:
        client.get("invoice", "..")
    assert caught.value.entity == "invoice" and caught.value.record_id == ".."
    with pytest.raises(InvalidRecordIdError, match="bill id") as long_one:
        client.children("bill_payment", "y" * 10_000)
    assert len(str(long_one.value)) < 300
    with pytest.raises(InvalidRecordIdError, match="invoice id None"):
        client.get("invoice", None)  # type: ignore[arg-type]


def _answer(request: httpx.Request) -> httpx.Response:
    if request.url.path.endswith("/payments"):
        return httpx.Response(200, json={"payments": []})
    return httpx.Response(200, json={"id": UUID})


def test_canonical_uuids_in_either_case_reach_their_own_path() -> None:
    handler = Recorder(_answer)
    client = make_client(handler, FakeClock())
    client.get("invoice", UUID)
    client.get("invoice", UUID.upper())
    client.delete("journal_entry", UUID)
    client.children("bill_payment", UUID)
    assert [r.url.raw_path.decode() for r in handler.requests] == [
        f"/invoices/{UUID}",
        f"/invoices/{UUID.upper()}",
        f"/journal-entries/{UUID}",
        f"/bills/{UUID}/payments",
    ]


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, json={}),
        httpx.Response(200, json={"payments": None}),
        httpx.Response(200, json=[{"id": UUID}]),
        httpx.Response(200, json={"payments": [None]}),
        httpx.Response(200),
    ],
)
def test_a_malformed_children_list_is_an_error_not_an_empty_list(response: httpx.Response) -> None:
    # An empty list would make the bill-payment sync soft-delete every payment of the bill.
    client = make_client(Recorder(response), FakeClock())
    with pytest.raises(MalformedResponseError):
        client.children("bill_payment", UUID)


@pytest.mark.parametrize(
    ("value", "encoded"),
    [("..", "%2E%2E"), (".", "%2E"), ("...", "..."), ("a/b", "a%2Fb"), ("a.b", "a.b")],
)
def test_path_segments_cannot_be_dot_segments(value: str, encoded: str) -> None:
    assert path_segment(value) == encoded
    # httpx normalises literal dot segments away; the encoded form must reach the server as is.
    handler = Recorder(httpx.Response(200, json={}))
    make_client(handler, FakeClock()).request("GET", f"/customers/{path_segment(value)}")
    assert handler.requests[0].url.raw_path.decode() == f"/customers/{encoded}"


def test_an_empty_path_segment_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        path_segment("")


# ---- Retry-After ------------------------------------------------------------------------------

NOW = FakeClock().now()


def _http_date(seconds: float) -> str:
    return format_datetime(NOW + timedelta(seconds=seconds), usegmt=True)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("7", 7.0),
        (" 12 ", 12.0),
        ("0", 0.0),
        ("300", 300.0),
        ("301", None),  # beyond the maximum: malformed, not "wait 300"
        ("4294967296", None),
        ("1e999", None),
        ("inf", None),
        ("nan", None),
        ("-1", None),
        ("", None),
        ("soon", None),
        (None, None),
        (_http_date(30), 30.0),
        (_http_date(301), None),
        (_http_date(-30), None),  # in the past by our clock: cannot be trusted
        ("Fri, 31 Dec 9999 23:59:59 GMT", None),
        ("Mon, 99 Foo 2026 00:00:00 GMT", None),
    ],
)
def test_retry_after_forms_and_bounds(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header, now=NOW, max_seconds=300) == expected


def _limited(value: str) -> httpx.Response:
    return httpx.Response(429, json={"status": 429}, headers={"Retry-After": value})


@pytest.mark.parametrize("value", ["4294967296", "1e999", "-5", "tomorrow", _http_date(10**9)])
def test_an_untrustworthy_retry_after_never_pauses_beyond_the_maximum(value: str) -> None:
    clock = FakeClock()
    budget = FakeBudget()
    client = make_client(Recorder(_limited(value), PAGE), clock, budget=budget)
    assert client.list_all("account") == [{"id": "a1"}]
    # Treated as a bare 429: the floor is shared, this process adds its own jitter on top.
    assert budget.paused == [POLICY.rate_limited_seconds]
    assert POLICY.rate_limited_seconds <= clock.slept[0] <= 300


def test_an_http_date_retry_after_is_honoured_on_429() -> None:
    clock = FakeClock()
    budget = FakeBudget()
    client = make_client(Recorder(_limited(_http_date(20)), PAGE), clock, budget=budget)
    client.list_all("account")
    assert budget.paused == [20.0] and clock.slept[0] >= 20.0


@pytest.mark.parametrize("value", ["12", _http_date(12)])
def test_a_503_retry_after_is_honoured(value: str) -> None:
    clock = FakeClock()
    budget = FakeBudget()
    unavailable = httpx.Response(503, headers={"Retry-After": value})
    client = make_client(Recorder(unavailable, PAGE), clock, budget=budget)
    assert client.list_all("account") == [{"id": "a1"}]
    assert clock.slept[0] >= 12.0
    assert budget.paused == []  # a 503 is not the key's rate window: only this client waits


def test_a_retry_after_on_other_statuses_is_ignored() -> None:
    clock = FakeClock()
    client = make_client(Recorder(httpx.Response(500, headers={"Retry-After": "120"}), PAGE), clock)
    client.list_all("account")
    assert clock.slept[0] <= POLICY.base_seconds


def test_bare_429s_do_not_send_every_process_back_at_the_same_instant() -> None:
    waits = set()
    for seed in range(5):
        clock = FakeClock()
        client = RilletClient(
            api_key=KEY,
            base_url="https://sandbox.api.rillet.com",
            transport=httpx.MockTransport(Recorder(httpx.Response(429), PAGE)),
            clock=clock,
            retry=POLICY,
            seed=seed,
        )
        client.list_all("account")
        assert clock.slept[0] >= POLICY.rate_limited_seconds
        waits.add(clock.slept[0])
    assert len(waits) == 5


def test_the_maximum_is_configurable() -> None:
    clock = FakeClock()
    budget = FakeBudget()
    handler = Recorder(_limited("11"), _limited("10"), PAGE)
    client = make_client(handler, clock, budget=budget, max_retry_after_seconds=10)
    client.list_all("account")
    assert budget.paused == [POLICY.rate_limited_seconds, 10.0]


@pytest.mark.parametrize("maximum", [0, -1, float("inf"), float("nan")])
def test_a_bad_maximum_is_refused(maximum: float) -> None:
    with pytest.raises(ValueError, match="max_retry_after_seconds"):
        RilletClient(api_key=KEY, max_retry_after_seconds=maximum)


def test_a_503_beyond_the_maximum_falls_back_to_backoff() -> None:
    clock = FakeClock()
    handler = Recorder(httpx.Response(503, headers={"Retry-After": "99999"}), PAGE)
    client = make_client(handler, clock)
    client.list_all("account")
    assert clock.slept[0] <= POLICY.base_seconds


def test_the_resource_passes_the_maximum_to_client_and_budget(tmp_path: Path) -> None:
    resource = RilletResource(
        base_url="http://127.0.0.1:9",
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
        max_retry_after_seconds=42.0,
    )
    with resource.client() as client:
        assert client.max_retry_after_seconds == 42.0
        assert client.budget is not None
        assert client.budget.max_pause_seconds == 42.0  # type: ignore[attr-defined]
    with RilletResource(state_url=f"sqlite:///{tmp_path / 'd.db'}").client() as default:
        assert default.max_retry_after_seconds == 300.0
