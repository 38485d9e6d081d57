"""Authentication, versions, the rolling rate limit and injected faults, over real HTTP."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from rillet_dagster.clock import FakeClock
from rillet_dagster.sandbox.faults import Faults
from rillet_dagster.sandbox.server import SandboxServer
from tests import canary
from tests.conftest import API_KEY, HEADERS

OTHER_KEY = canary.api_key("other")
WRONG_KEY = canary.api_key("wrong")


def test_missing_or_wrong_key_is_a_401_problem(sandbox: SandboxServer) -> None:
    for headers in (
        {},
        {"Authorization": f"Bearer {WRONG_KEY}"},
        {"Authorization": f"Basic {API_KEY}"},
    ):
        response = httpx.get(f"{sandbox.base_url}/invoices", headers=headers)
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["type"] == "https://rillet.io/unauthorized"
        assert problem["status"] == 401
        assert WRONG_KEY not in response.text


@pytest.mark.parametrize("version", ["1", "2", "3", "4", None])
def test_versions_one_to_four_and_none_are_served(
    sandbox: SandboxServer, version: str | None
) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if version:
        headers["X-Rillet-API-Version"] = version
    response = httpx.get(f"{sandbox.base_url}/accounts", headers=headers)
    assert response.status_code == 200
    assert "accounts" in response.json()


@pytest.mark.parametrize("version", ["5", "0", "v4", "", "4.0"])
def test_other_versions_are_refused(sandbox: SandboxServer, version: str) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}", "X-Rillet-API-Version": version}
    response = httpx.get(f"{sandbox.base_url}/accounts", headers=headers)
    assert response.status_code == 400
    assert "X-Rillet-API-Version" in response.json()["detail"]


def test_61st_request_in_a_rolling_minute_gets_a_bare_429(
    api: httpx.Client, clock: FakeClock
) -> None:
    for i in range(60):
        assert api.get("/accounts").status_code == 200, i
        clock.advance(0.5)  # 60 requests spread over the first 30 s of the window
    refused = api.get("/accounts")
    assert refused.status_code == 429
    assert "retry-after" not in refused.headers
    assert "x-ratelimit-limit" not in refused.headers
    assert refused.json()["status"] == 429
    clock.advance(30)  # now exactly 60 s after the first request (t=0): its slot frees
    assert api.get("/accounts").status_code == 200
    assert api.get("/accounts").status_code == 429  # the second request's slot frees 0.5 s later
    clock.advance(0.5)
    assert api.get("/accounts").status_code == 200


def test_rate_limit_is_per_key_and_configurable(
    start_sandbox: Callable[..., SandboxServer], clock: FakeClock
) -> None:
    server = start_sandbox(api_keys=(API_KEY, OTHER_KEY), rate_limit=3,
                           rate_window_seconds=2.0)  # fmt: skip
    url = f"{server.base_url}/accounts"
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    assert [httpx.get(url, headers=HEADERS).status_code for _ in range(4)] == [200, 200, 200, 429]
    assert httpx.get(url, headers=other).status_code == 200
    clock.advance(2.0)
    assert httpx.get(url, headers=HEADERS).status_code == 200
    stats = httpx.get(f"{server.base_url}/_sandbox/stats").json()
    mine = stats["keys"][f"{API_KEY[:4]}..."]
    assert mine == {"accepted": 4, "rejected": 1, "max_in_window": 4}
    assert API_KEY not in json.dumps(stats)


def test_forced_429_with_retry_after_flag(start_sandbox: Callable[..., SandboxServer]) -> None:
    server = start_sandbox(faults=Faults(force_429=1, retry_after=7))
    url = f"{server.base_url}/accounts"
    refused = httpx.get(url, headers=HEADERS)
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "7"
    assert httpx.get(url, headers=HEADERS).status_code == 200


def test_faults_are_settable_at_run_time(sandbox: SandboxServer) -> None:
    admin = f"{sandbox.base_url}/_sandbox/faults"
    assert httpx.put(admin, json={"error_rate": 1.0}).json()["error_rate"] == 1.0
    response = httpx.get(f"{sandbox.base_url}/accounts", headers=HEADERS)
    assert response.status_code in {500, 502, 503}
    assert response.headers["content-type"] == "application/problem+json"
    assert httpx.put(admin, json={"nonsense": 1}).status_code == 400
    httpx.put(admin, json={"error_rate": 0.0})
    assert httpx.get(f"{sandbox.base_url}/accounts", headers=HEADERS).status_code == 200


def test_dropped_connection_and_malformed_page(start_sandbox: Callable[..., SandboxServer]) -> None:
    server = start_sandbox(faults=Faults(drop_rate=1.0))
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(f"{server.base_url}/invoices", headers=HEADERS)
    httpx.put(f"{server.base_url}/_sandbox/faults", json={"drop_rate": 0.0, "malformed_rate": 1.0})
    response = httpx.get(f"{server.base_url}/invoices", headers=HEADERS)
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        response.json()


def test_error_rate_is_roughly_the_configured_share(
    start_sandbox: Callable[..., SandboxServer],
) -> None:
    server = start_sandbox(faults=Faults(error_rate=0.3, seed=1), rate_limit=1000)
    with httpx.Client(base_url=server.base_url, headers=HEADERS) as client:
        statuses = [client.get("/tax-rates").status_code for _ in range(200)]
    errors = sum(s >= 500 for s in statuses)
    assert 35 <= errors <= 85
    assert set(statuses) <= {200, 500, 502, 503}


def test_health_needs_no_key(sandbox: SandboxServer) -> None:
    assert httpx.get(f"{sandbox.base_url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{sandbox.base_url}/api-key", headers=HEADERS).json()["valid"] is True
