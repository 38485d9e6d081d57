"""Client retry and error rules with httpx.MockTransport and a fake clock (no network, no sleep)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal

import httpx
import pytest

from rillet_dagster.clock import FakeClock
from rillet_dagster.rillet.client import RetryPolicy, RilletClient
from rillet_dagster.rillet.errors import (
    AuthenticationError,
    ConflictError,
    MalformedResponseError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    ServerError,
    UnexpectedStatusError,
    ValidationError,
)
from tests import canary

KEY = canary.api_key("retries")
POLICY = RetryPolicy(max_attempts=6, base_seconds=1.0, cap_seconds=8.0, max_total_seconds=600)


class Recorder:
    """A MockTransport handler that answers from a script and records every request."""

    def __init__(
        self, *responses: httpx.Response | Callable[[httpx.Request], httpx.Response]
    ) -> None:
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]
        return answer(request) if callable(answer) else answer


def make_client(handler: Recorder, clock: FakeClock, **kwargs: object) -> RilletClient:
    return RilletClient(
        api_key=KEY,
        base_url="https://sandbox.api.rillet.com",
        transport=httpx.MockTransport(handler),
        clock=clock,
        retry=kwargs.pop("retry", POLICY),  # type: ignore[arg-type]
        seed=5,
        **kwargs,  # type: ignore[arg-type]
    )


def problem(status: int, **extra: object) -> httpx.Response:
    body = {"type": f"https://rillet.io/{status}", "title": "T", "status": status, "detail": "D"}
    return httpx.Response(
        status, json=body | extra, headers={"content-type": "application/problem+json"}
    )


PAGE = httpx.Response(200, json={"accounts": [{"id": "a1"}]})


def test_five_503s_then_success_with_full_jitter_delays() -> None:
    clock = FakeClock()
    handler = Recorder(*[problem(503)] * 5, PAGE)
    client = make_client(handler, clock)
    assert client.list_all("account") == [{"id": "a1"}]
    assert len(handler.requests) == 6 and client.stats.retries == 5
    assert len(clock.slept) == 5  # one sleep before each retry, none after the success
    for attempt, delay in enumerate(clock.slept):
        assert 0 <= delay <= min(POLICY.cap_seconds, POLICY.base_seconds * 2**attempt)


def sleeps_of(seed: int, *responses: httpx.Response) -> list[float]:
    """What one client, seeded ``seed``, slept (on its fake clock) before ``responses``."""
    clock = FakeClock()
    client = RilletClient(
        api_key=KEY,
        base_url="https://sandbox.api.rillet.com",
        transport=httpx.MockTransport(Recorder(*responses, PAGE)),
        clock=clock,
        retry=POLICY,
        seed=seed,
    )
    assert client.list_all("account") == [{"id": "a1"}]
    return clock.slept


def test_retry_delays_are_full_jitter_within_the_exponential_bound_and_the_cap() -> None:
    """Over many clients, the delay before retry n is spread over all of [0, min(cap, base*2^n)]
    (not a fixed wait, not the bound, not stuck at the base), so that clients failed by the same
    outage come back at different times."""
    runs = [sleeps_of(seed, *[problem(503)] * 5) for seed in range(200)]
    assert all(len(slept) == 5 for slept in runs)
    for retry in range(5):
        bound = min(POLICY.cap_seconds, POLICY.base_seconds * 2**retry)
        delays = [slept[retry] for slept in runs]
        assert all(0 <= d <= bound for d in delays), retry
        assert min(delays) < 0.1 * bound and max(delays) > 0.9 * bound, retry
        assert 0.3 < sum(d < bound / 2 for d in delays) / len(delays) < 0.7, retry


def test_a_bare_429_waits_the_shared_floor_plus_a_jitter_of_its_own() -> None:
    waits = [sleeps_of(seed, httpx.Response(429))[0] for seed in range(50)]
    floor, spread = POLICY.rate_limited_seconds, POLICY.base_seconds
    assert all(floor <= w <= floor + spread for w in waits)
    assert max(waits) - min(waits) > spread / 2  # clients released together retry apart


def test_attempts_are_bounded() -> None:
    clock = FakeClock()
    handler = Recorder(problem(500))
    client = make_client(handler, clock)
    with pytest.raises(ServerError):
        client.list_all("account")
    assert len(handler.requests) == POLICY.max_attempts


def test_total_retry_time_is_bounded() -> None:
    clock = FakeClock()
    handler = Recorder(problem(503))
    policy = RetryPolicy(max_attempts=100, base_seconds=10, cap_seconds=10, max_total_seconds=30)
    client = make_client(handler, clock, retry=policy)
    with pytest.raises(ServerError):
        client.list_all("account")
    assert sum(clock.slept) <= 30


@pytest.mark.parametrize(
    ("status", "error"), [(401, AuthenticationError), (403, PermissionDeniedError)]
)
def test_auth_errors_fail_fast_without_key_material(status: int, error: type[Exception]) -> None:
    handler = Recorder(problem(status))
    client = make_client(handler, FakeClock())
    with pytest.raises(error) as caught:
        client.list_all("account")
    assert len(handler.requests) == 1
    assert (
        KEY not in str(caught.value) and KEY not in repr(caught.value) and KEY not in repr(client)
    )


@pytest.mark.parametrize(
    ("response", "error"),
    [
        (problem(400, type="https://rillet.io/something-new"), ValidationError),
        (httpx.Response(502, text="<html><body>Bad gateway</body></html>"), ServerError),
        (httpx.Response(500, content=b""), ServerError),
        (httpx.Response(404, json={"message": "nope"}), NotFoundError),
        (httpx.Response(418, json=["not", "a", "problem"]), UnexpectedStatusError),
        (
            httpx.Response(
                422,
                json={"errors": ["amount must be positive", {"pointer": "/date", "detail": "bad"}]},
            ),
            ValidationError,
        ),
    ],
)
def test_every_error_body_becomes_a_typed_exception(
    response: httpx.Response, error: type[Exception]
) -> None:
    handler = Recorder(response)
    client = make_client(handler, FakeClock(), retry=RetryPolicy(max_attempts=1))
    with pytest.raises(error) as caught:
        client.list_all("account")
    assert "GET /accounts" in str(caught.value)


def test_carbon_style_errors_become_violations() -> None:
    body = {"errors": ["amount must be positive", {"pointer": "/date", "detail": "bad date"}]}
    handler = Recorder(httpx.Response(422, json=body))
    client = make_client(handler, FakeClock())
    with pytest.raises(ValidationError) as caught:
        client.list_all("account")
    assert caught.value.violations == [
        {"field": "", "message": "amount must be positive"},
        {"field": "/date", "message": "bad date"},
    ]


def test_truncated_page_is_retried_and_applied_once() -> None:
    good = {"journal_entries": [{"id": "e1"}, {"id": "e2"}], "pagination": {}}
    text = json.dumps(good).encode()
    handler = Recorder(
        httpx.Response(200, content=text[: len(text) // 2]), httpx.Response(200, content=text)
    )
    client = make_client(handler, FakeClock())
    assert [r["id"] for r in client.iter_records("journal_entry")] == ["e1", "e2"]
    assert client.stats.retries == 1


def test_missing_list_key_is_malformed_but_data_is_accepted() -> None:
    client = make_client(Recorder(httpx.Response(200, json={"data": [{"id": "x"}]})), FakeClock())
    assert client.list_all("account") == [{"id": "x"}]
    broken = make_client(
        Recorder(httpx.Response(200, json={"items": []})),
        FakeClock(),
        retry=RetryPolicy(max_attempts=1),
    )
    with pytest.raises(MalformedResponseError, match="no 'accounts' list"):
        broken.list_all("account")


def test_numeric_json_amounts_become_decimals_never_floats() -> None:
    raw = b'{"accounts":[{"id":"a","balance":{"amount":1234.5678901234567890,"currency":"USD"}}]}'
    client = make_client(Recorder(httpx.Response(200, content=raw)), FakeClock())
    amount = client.list_all("account")[0]["balance"]["amount"]
    assert isinstance(amount, Decimal) and amount == Decimal("1234.5678901234567890")


class FakeBudget:
    def __init__(self) -> None:
        self.waited_seconds = 0.0
        self.paused: list[float] = []
        self.slots = 0

    @contextmanager
    def slot(self) -> Iterator[int]:
        self.slots += 1
        yield self.slots

    def pause(self, seconds: float) -> None:
        self.paused.append(seconds)


def test_429_with_retry_after_pauses_the_shared_budget() -> None:
    clock = FakeClock()
    budget = FakeBudget()
    limited = httpx.Response(429, json={"status": 429}, headers={"Retry-After": "7"})
    client = make_client(Recorder(limited, PAGE), clock, budget=budget)
    assert client.list_all("account") == [{"id": "a1"}]
    assert budget.paused and budget.paused[0] >= 7 and clock.slept[0] >= 7
    assert client.stats.rate_limited == 1 and budget.slots == 2


def test_bare_429_waits_at_least_the_configured_floor() -> None:
    clock = FakeClock()
    budget = FakeBudget()
    client = make_client(Recorder(httpx.Response(429), PAGE), clock, budget=budget)
    client.list_all("account")
    assert budget.paused[0] >= POLICY.rate_limited_seconds


def test_post_without_key_is_never_retried_with_key_it_is() -> None:
    clock = FakeClock()
    created = httpx.Response(200, json={"id": "c1", "name": "A"})
    handler = Recorder(problem(503), created)
    client = make_client(handler, clock)
    with pytest.raises(TypeError):
        client.create("customer", {"name": "A"})  # type: ignore[call-arg]
    with pytest.raises(ServerError):
        client.request("POST", "/customers", body={"name": "A"})
    assert len(handler.requests) == 1
    handler2 = Recorder(problem(503), problem(409), created)
    client2 = make_client(handler2, clock)
    assert client2.create("customer", {"name": "A"}, idempotency_key="k1")["id"] == "c1"
    assert [r.headers["Idempotency-Key"] for r in handler2.requests] == ["k1"] * 3


def test_409_without_idempotency_key_is_not_retried() -> None:
    client = make_client(Recorder(problem(409)), FakeClock())
    with pytest.raises(ConflictError):
        client.update("customer", "3f2b8c1e-9d4a-4e6b-8f7c-0a1b2c3d4e5f", {"name": "A"})


def test_429_is_a_typed_error_when_retries_run_out() -> None:
    client = make_client(
        Recorder(httpx.Response(429)),
        FakeClock(),
        retry=RetryPolicy(max_attempts=2, rate_limited_seconds=0),
    )
    with pytest.raises(RateLimitedError):
        client.list_all("account")


def test_request_headers() -> None:
    handler = Recorder(PAGE)
    client = make_client(handler, FakeClock(), api_version=3)
    client.list_all("account")
    sent = handler.requests[0].headers
    assert sent["Authorization"] == f"Bearer {KEY}"
    assert sent["X-Rillet-API-Version"] == "3"
    assert sent["User-Agent"].startswith("rillet-dagster/")
    assert "limit" not in str(handler.requests[0].url)  # /accounts is not paginated


def test_constructor_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="RILLET_API_KEY"):
        RilletClient(api_key="  ")
    with pytest.raises(ValueError, match="api_version"):
        RilletClient(api_key="k", api_version=7)
    with pytest.raises(ValueError, match="RILLET_BASE_URL"):
        RilletClient(api_key="k", base_url="ftp://example")
    assert RilletClient(api_key="k", base_url="production").base_url == "https://api.rillet.com"
