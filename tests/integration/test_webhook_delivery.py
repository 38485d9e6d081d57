"""Webhook delivery over real HTTP on loopback (shared/rillet-api.md section 10, Decisions).

A small Starlette app served by uvicorn in a background thread records every raw request, so
these tests see exactly the bytes and headers a receiver would.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from rillet_dagster.clock import FakeClock, isoformat_z
from rillet_dagster.sandbox.webhooks import WebhookConfigError, WebhookDispatcher
from tests import canary

TIME_FACTOR = 0.0005
UUID_V4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
_TOKENS = itertools.count()


def canary_token() -> str:
    """A token of its own for each subscription: a canary, like every secret of the suite."""
    return canary.webhook_token(f"delivery-{next(_TOKENS)}")


RILLET_HEADERS = (
    "x-rillet-signature",
    "x-rillet-timestamp",
    "x-rillet-id",
    "x-rillet-entity",
    "x-rillet-event",
)


def reference_signature(token: str, headers: dict[str, str], body: bytes) -> str:
    """Section 10.3, written independently of the code under test."""
    key = base64.b64decode(token + "=" * (-len(token) % 4))
    prefix = ".".join(
        headers[h]
        for h in ("x-rillet-timestamp", "x-rillet-id", "x-rillet-entity", "x-rillet-event")
    )
    digest = hmac.new(key, prefix.encode() + b"." + body, hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def signature_verifies(token: str, headers: dict[str, str], body: bytes) -> bool:
    expected = reference_signature(token, headers, body)
    return any(
        hmac.compare_digest(expected, candidate)
        for candidate in headers["x-rillet-signature"].split(",")
    )


@dataclass
class Captured:
    headers: dict[str, str]
    header_names: list[str]
    body: bytes
    received: float


@dataclass
class Capture:
    """Records requests per route name and answers with that route's planned status."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: dict[str, list[Captured]] = field(default_factory=dict)
    plans: dict[str, Callable[[int], int]] = field(default_factory=dict)
    arrived: threading.Event = field(default_factory=threading.Event)  # set on every request

    async def endpoint(self, request: Request) -> Response:
        name = request.path_params["name"]
        body = await request.body()
        captured = Captured(
            headers={k.lower(): v for k, v in request.headers.items()},
            header_names=[k.lower() for k in request.headers],
            body=body,
            received=time.monotonic(),
        )
        with self.lock:
            seen = self.requests.setdefault(name, [])
            seen.append(captured)
            plan = self.plans.get(name, lambda n: 200)
            status = plan(len(seen))
        self.arrived.set()
        return Response(b"ignored by Rillet", status_code=status)


@dataclass
class Receiver:
    base_url: str
    capture: Capture

    def route(self, plan: Callable[[int], int] = lambda n: 200) -> tuple[str, str]:
        """A fresh route answering ``plan(n)`` to its n-th request; returns (url, name)."""
        name = uuid.uuid4().hex
        with self.capture.lock:
            self.capture.plans[name] = plan
        return f"{self.base_url}/{name}", name

    def requests(self, name: str) -> list[Captured]:
        with self.capture.lock:
            return list(self.capture.requests.get(name, []))


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    capture = Capture()
    app = Starlette(routes=[Route("/{name}", capture.endpoint, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="webhook-receiver", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive(), "uvicorn exited before starting"
        assert time.monotonic() < deadline, "uvicorn did not start within 10 s"
        thread.join(0.01)  # waits, and notices a server thread that died
    port = server.servers[0].sockets[0].getsockname()[1]
    yield Receiver(f"http://127.0.0.1:{port}", capture)
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def dispatcher(clock: FakeClock) -> Iterator[WebhookDispatcher]:
    with WebhookDispatcher(clock, time_factor=TIME_FACTOR) as d:
        yield d


def test_delivery_headers_body_and_signature(
    receiver: Receiver, dispatcher: WebhookDispatcher, clock: FakeClock
) -> None:
    url, name = receiver.route()
    tokens = [canary_token(), canary_token()]
    sub = dispatcher.subscribe(url, tokens)
    invoice = {
        "id": "inv_1",
        "customer": "Café Zürich",
        "total": {"amount": "1234.50", "currency": "EUR"},
        "items": [{"id": "li_1", "quantity": 2}],
    }
    emitted_at = isoformat_z(clock.now())

    ids = dispatcher.emit("INVOICE", "CREATED", invoice)

    assert dispatcher.wait_idle(5)
    [request] = receiver.requests(name)
    assert len(ids) == 1
    assert UUID_V4.fullmatch(ids[0])
    headers = request.headers
    assert set(request.header_names) == {
        "host",
        "content-length",
        "content-type",
        "user-agent",
        *RILLET_HEADERS,
    }
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == "Rillet-Webhooks-Sandbox"
    assert headers["x-rillet-id"] == ids[0]
    assert headers["x-rillet-timestamp"] == emitted_at
    assert headers["x-rillet-entity"] == "INVOICE"
    assert headers["x-rillet-event"] == "CREATED"
    expected_body = json.dumps(invoice, separators=(",", ":"), ensure_ascii=False).encode()
    assert request.body == expected_body
    assert json.loads(request.body) == invoice
    assert len(headers["x-rillet-signature"].split(",")) == 2
    for token in tokens:
        assert signature_verifies(token, headers, request.body)
    assert not signature_verifies(canary_token(), headers, request.body)

    [record] = dispatcher.deliveries()
    assert record.id == ids[0]
    assert record.subscription_id == sub.id
    assert record.url == url
    assert (record.entity, record.event, record.timestamp) == ("INVOICE", "CREATED", emitted_at)
    assert (record.status, record.attempts, record.last_status_code) == ("delivered", 1, 200)
    assert record.last_error is None


def test_delete_delivers_bare_json_string(
    receiver: Receiver, dispatcher: WebhookDispatcher
) -> None:
    url, name = receiver.route()
    token = canary_token()
    dispatcher.subscribe(url, [token])
    deleted_id = str(uuid.uuid4())

    dispatcher.emit("CUSTOMER", "DELETED", deleted_id)

    assert dispatcher.wait_idle(5)
    [request] = receiver.requests(name)
    assert request.body == f'"{deleted_id}"'.encode()
    assert json.loads(request.body) == deleted_id
    assert request.headers["x-rillet-event"] == "DELETED"
    assert signature_verifies(token, request.headers, request.body)


def test_retries_until_success_keep_id_timestamp_and_signature(
    receiver: Receiver, dispatcher: WebhookDispatcher, clock: FakeClock
) -> None:
    def first_four_fail(n: int) -> int:
        # Time moves on between attempts; the delivery must still carry its event time.
        clock.advance(60)
        return 500 if n <= 4 else 204

    url, name = receiver.route(first_four_fail)
    token = canary_token()
    sub = dispatcher.subscribe(url, [token])
    emitted_at = isoformat_z(clock.now())

    [delivery_id] = dispatcher.emit("INVOICE", "PAYMENT_UPDATED", {"id": "inv_2"})

    assert dispatcher.wait_idle(5)
    requests = receiver.requests(name)
    assert len(requests) == 5
    assert {r.headers["x-rillet-id"] for r in requests} == {delivery_id}
    assert {r.headers["x-rillet-timestamp"] for r in requests} == {emitted_at}
    assert len({r.headers["x-rillet-signature"] for r in requests}) == 1
    assert all(signature_verifies(token, r.headers, r.body) for r in requests)
    # Attempt 4 opens the second group, so it waited the first group backoff (30 s scaled).
    assert requests[3].received - requests[2].received >= 30 * TIME_FACTOR
    record = dispatcher.delivery(delivery_id)
    assert record is not None
    assert (record.status, record.attempts, record.last_status_code) == ("delivered", 5, 204)
    assert record.last_error is None
    [after] = dispatcher.subscriptions()
    assert after.id == sub.id
    assert after.enabled
    assert after.consecutive_failures == 0


def test_always_failing_receiver_exhausts_retries_then_is_disabled(
    receiver: Receiver, dispatcher: WebhookDispatcher
) -> None:
    failing_url, failing = receiver.route(lambda n: 503)
    healthy_url, healthy = receiver.route()
    bad = dispatcher.subscribe(failing_url, [canary_token()])
    good = dispatcher.subscribe(healthy_url, [canary_token()])

    for round_no in range(1, 4):
        ids = dispatcher.emit("BILL", "UPDATED", {"id": f"bill_{round_no}"})
        assert len(ids) == 2
        assert dispatcher.wait_idle(10)
        failed = dispatcher.delivery(ids[0])
        assert failed is not None
        assert failed.subscription_id == bad.id
        assert (failed.status, failed.attempts, failed.last_status_code) == ("failed", 15, 503)
        assert failed.last_error == "HTTP 503"
        state = {s.id: s for s in dispatcher.subscriptions()}
        assert state[bad.id].consecutive_failures == round_no
        assert state[bad.id].enabled is (round_no < 3)
        assert state[good.id].enabled

    assert len(receiver.requests(failing)) == 3 * 5 * 3
    assert len(receiver.requests(healthy)) == 3
    # Backoff between groups doubles: 30, 60, 120, 240 s (scaled) after attempts 3, 6, 9, 12.
    times = [r.received for r in receiver.requests(failing)[:15]]
    for group_index, after_attempt in enumerate((3, 6, 9, 12)):
        gap = times[after_attempt] - times[after_attempt - 1]
        assert gap >= 30 * 2**group_index * TIME_FACTOR

    ids = dispatcher.emit("BILL", "UPDATED", {"id": "bill_4"})
    assert len(ids) == 1
    assert dispatcher.wait_idle(5)
    assert dispatcher.delivery(ids[0]).subscription_id == good.id  # type: ignore[union-attr]
    assert len(receiver.requests(failing)) == 45


def test_success_resets_the_failure_count(receiver: Receiver, clock: FakeClock) -> None:
    healthy = threading.Event()
    url, name = receiver.route(lambda n: 200 if healthy.is_set() else 500)
    with WebhookDispatcher(
        clock, time_factor=TIME_FACTOR, groups=1, attempts_per_group=2, disable_after=3
    ) as dispatcher:
        sub = dispatcher.subscribe(url, [canary_token()])

        def emit_and_count() -> int:
            dispatcher.emit("VENDOR", "CREATED", {"id": "v"})
            assert dispatcher.wait_idle(5)
            [state] = dispatcher.subscriptions()
            assert state.id == sub.id
            assert state.enabled
            return state.consecutive_failures

        assert emit_and_count() == 1
        assert emit_and_count() == 2
        healthy.set()
        assert emit_and_count() == 0
        healthy.clear()
        assert emit_and_count() == 1
        assert len(receiver.requests(name)) == 2 + 2 + 1 + 2


def test_sixth_subscription_refused(receiver: Receiver, dispatcher: WebhookDispatcher) -> None:
    subs = [dispatcher.subscribe(receiver.route()[0], [canary_token()]) for _ in range(5)]
    with pytest.raises(WebhookConfigError, match="at most 5 webhooks per organization"):
        dispatcher.subscribe(receiver.route()[0], [canary_token()])
    assert len(dispatcher.subscriptions()) == 5
    assert dispatcher.unsubscribe(subs[0].id)
    dispatcher.subscribe(receiver.route()[0], [canary_token()])
    assert len(dispatcher.subscriptions()) == 5


def test_event_filters_and_disabled_subscriptions(
    receiver: Receiver, dispatcher: WebhookDispatcher
) -> None:
    routes = {key: receiver.route() for key in ("all", "invoice_created", "customer", "off")}
    dispatcher.subscribe(routes["all"][0], [canary_token()])
    dispatcher.subscribe(routes["invoice_created"][0], [canary_token()], ["INVOICE.CREATED"])
    dispatcher.subscribe(routes["customer"][0], [canary_token()], ["CUSTOMER"])
    off = dispatcher.subscribe(routes["off"][0], [canary_token()])
    dispatcher.set_enabled(off.id, False)

    emitted = [
        ("INVOICE", "CREATED", {"id": "inv_1"}),
        ("INVOICE", "UPDATED", {"id": "inv_1"}),
        ("CUSTOMER", "DELETED", "cus_1"),
        ("BILL", "CREATED", {"id": "bill_1"}),
    ]
    counts = [len(dispatcher.emit(entity, event, body)) for entity, event, body in emitted]
    assert counts == [2, 1, 2, 1]
    assert dispatcher.wait_idle(5)

    def received(key: str) -> set[tuple[str, str]]:
        return {
            (r.headers["x-rillet-entity"], r.headers["x-rillet-event"])
            for r in receiver.requests(routes[key][1])
        }

    assert received("all") == {(e, v) for e, v, _ in emitted}
    assert received("invoice_created") == {("INVOICE", "CREATED")}
    assert received("customer") == {("CUSTOMER", "DELETED")}
    assert received("off") == set()
    assert all(r.status == "delivered" for r in dispatcher.deliveries())


def test_unreachable_receiver_records_the_transport_error(
    clock: FakeClock,
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with WebhookDispatcher(
        clock, time_factor=TIME_FACTOR, groups=1, attempts_per_group=2
    ) as dispatcher:
        dispatcher.subscribe(f"http://127.0.0.1:{closed_port}/hook", [canary_token()])
        [delivery_id] = dispatcher.emit("CONTRACT", "UPDATED", {"id": "c_1"})
        assert dispatcher.wait_idle(5)
        record = dispatcher.delivery(delivery_id)
    assert record is not None
    assert (record.status, record.attempts, record.last_status_code) == ("failed", 2, None)
    assert record.last_error is not None
    assert record.last_error.startswith("ConnectError")


def test_stop_interrupts_a_backoff_promptly(receiver: Receiver, clock: FakeClock) -> None:
    url, name = receiver.route(lambda n: 500)
    # Real Rillet timings: after the first failed attempt the next one is 30 s away.
    dispatcher = WebhookDispatcher(clock, attempts_per_group=1, attempt_timeout=5.0)
    dispatcher.subscribe(url, [canary_token()])
    [delivery_id] = dispatcher.emit("JOURNAL_ENTRY", "CREATED", {"id": "je_1"})
    deadline = time.monotonic() + 5
    while not receiver.requests(name):
        assert time.monotonic() < deadline, "first attempt never arrived"
        receiver.capture.arrived.wait(0.05)
    assert not dispatcher.wait_idle(0.05)

    started = time.monotonic()
    dispatcher.stop()
    assert time.monotonic() - started < 2
    dispatcher.stop()

    assert dispatcher.wait_idle(0)
    record = dispatcher.delivery(delivery_id)
    assert record is not None
    assert record.status == "failed"
    assert record.attempts == 1
    assert len(receiver.requests(name)) == 1
