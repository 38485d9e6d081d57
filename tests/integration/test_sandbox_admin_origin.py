"""The sandbox's admin routes refuse what a web page in the user's browser could send them:
cross-origin requests (403) and bodies that are not JSON (415), over real HTTP."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from rillet_dagster.sandbox.server import SandboxServer
from tests import canary

TOKEN = canary.webhook_token("admin-origin")
HOOK = '{"url": "http://evil.example/hook", "tokens": ["' + TOKEN + '"]}'


def _state(sandbox: SandboxServer) -> dict[str, Any]:
    """Everything the admin routes can change."""
    inner = sandbox.sandbox
    assert inner.dispatcher is not None
    return {
        "faults": inner.faults.faults.to_json(),
        "webhooks": [s.to_json() for s in inner.dispatcher.subscriptions()],
        "requests": dict(inner.requests),
        "cursor_epoch": inner.cursors.epoch,
    }


def _side_effects(base: str) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (
            "POST",
            f"{base}/_sandbox/webhooks",
            {"json": {"url": "http://x.test/", "tokens": [TOKEN]}},
        ),
        ("PUT", f"{base}/_sandbox/faults", {"json": {"error_rate": 1.0}}),
        ("POST", f"{base}/_sandbox/stats/reset", {}),
        ("POST", f"{base}/_sandbox/cursors/expire", {}),
        ("DELETE", f"{base}/_sandbox/webhooks/any", {}),
    ]


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://127.0.0.1:1"},  # same host, another port: another origin
        {"Origin": "https://127.0.0.1"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
    ],
)
def test_cross_origin_admin_requests_are_refused(
    sandbox: SandboxServer, headers: dict[str, str]
) -> None:
    before = _state(sandbox)
    for method, url, extra in _side_effects(sandbox.base_url):
        response = httpx.request(method, url, headers=headers, **extra)
        assert response.status_code == 403, (method, url)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["status"] == 403
    assert _state(sandbox) == before


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None]
)
def test_admin_bodies_must_be_json(sandbox: SandboxServer, content_type: str | None) -> None:
    before = _state(sandbox)
    headers = {"Content-Type": content_type} if content_type else {}
    for method, path, body in [
        ("POST", "/_sandbox/webhooks", HOOK),
        ("PUT", "/_sandbox/faults", '{"error_rate": 1.0}'),
        ("POST", "/_sandbox/stats/reset", "{}"),
    ]:
        response = httpx.request(
            method, sandbox.base_url + path, content=body.encode(), headers=headers
        )
        assert response.status_code == 415, (method, path)
        assert response.headers["content-type"] == "application/problem+json"
    assert _state(sandbox) == before


def test_the_simple_cross_site_form_post_is_refused(sandbox: SandboxServer) -> None:
    """What a page can send without a CORS preflight: text/plain, cross-site, no Origin match."""
    response = httpx.post(
        f"{sandbox.base_url}/_sandbox/webhooks",
        content=HOOK.encode(),
        headers={
            "Content-Type": "text/plain;charset=UTF-8",
            "Origin": "https://attacker.example",
            "Sec-Fetch-Site": "cross-site",
        },
    )
    assert response.status_code == 403
    assert sandbox.sandbox.dispatcher is not None
    assert sandbox.sandbox.dispatcher.subscriptions() == []


def test_same_origin_and_scripted_callers_still_work(
    start_sandbox: Callable[..., SandboxServer],
) -> None:
    server = start_sandbox()
    own = {"Origin": server.base_url, "Sec-Fetch-Site": "same-origin"}
    for headers in ({}, own, {"Sec-Fetch-Site": "none"}):
        admin = f"{server.base_url}/_sandbox"
        assert httpx.put(f"{admin}/faults", json={"error_rate": 0.0}, headers=headers).is_success
        assert httpx.post(f"{admin}/stats/reset", headers=headers).status_code == 204
        assert httpx.post(f"{admin}/cursors/expire", headers=headers).status_code == 204
        created = httpx.post(
            f"{admin}/webhooks",
            json={"url": "http://127.0.0.1:9/", "tokens": [TOKEN]},
            headers={**headers, "Content-Type": "application/json; charset=utf-8"},
        )
        assert created.status_code == 201
        deleted = httpx.delete(f"{admin}/webhooks/{created.json()['id']}", headers=headers)
        assert deleted.status_code == 204
    # Reads have no side effect and stay open (a browser cannot read them cross-origin anyway).
    assert httpx.get(f"{server.base_url}/_sandbox/stats", headers=own).status_code == 200
