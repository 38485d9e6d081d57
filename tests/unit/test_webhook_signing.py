"""Webhook signing and subscription rules (shared/rillet-api.md section 10.3 and Decisions).

Expected signatures come from an independent inline implementation of the reference rule, so a
mistake in ``sign`` cannot hide behind the same mistake in the test.
"""

from __future__ import annotations

import base64
import hmac
import json

import pytest

from rillet_dagster.clock import FakeClock
from rillet_dagster.sandbox.webhooks import (
    Subscription,
    WebhookConfigError,
    WebhookDispatcher,
    encode_body,
    generate_token,
    sign,
    signature_header,
    validate_token,
)

# 35 ASCII bytes: "rillet-sandbox-key-0123456789abcdef"
TOKEN = "cmlsbGV0LXNhbmRib3gta2V5LTAxMjM0NTY3ODlhYmNkZWY="
TIMESTAMP = "2026-11-28T12:00:00.123Z"
EVENT_ID = "3f2c8a4e-1b7d-4c55-9e0a-6d1f2b3c4d5e"
BODY = b'{"id":"inv_1","total":{"amount":"1234.50","currency":"USD"}}'
# Computed once with `openssl dgst -sha256 -mac HMAC` over the same message, a third party.
OPENSSL_SIGNATURE = "l3NLmXCR1WDe4VSalisMQStaDcqDgzH2+z0H2yZElmk="


def reference_signature(
    token: str, timestamp: str, event_id: str, entity: str, event: str, body: bytes
) -> str:
    """Section 10.3: base64(HMAC-SHA256(b64decode(token), "ts.id.entity.event." + body))."""
    key = base64.b64decode(token + "=" * (-len(token) % 4))
    message = timestamp.encode() + b"." + event_id.encode() + b"."
    message += entity.encode() + b"." + event.encode() + b"." + body
    return base64.b64encode(hmac.digest(key, message, "sha256")).decode()


def test_fixed_vector_matches_reference_and_openssl() -> None:
    expected = reference_signature(TOKEN, TIMESTAMP, EVENT_ID, "INVOICE", "CREATED", BODY)
    got = sign(
        TOKEN, timestamp=TIMESTAMP, event_id=EVENT_ID, entity="INVOICE", event="CREATED", body=BODY
    )
    assert got == expected == OPENSSL_SIGNATURE


def test_padding_is_optional() -> None:
    unpadded = TOKEN.rstrip("=")
    assert unpadded != TOKEN
    got = sign(
        unpadded,
        timestamp=TIMESTAMP,
        event_id=EVENT_ID,
        entity="INVOICE",
        event="CREATED",
        body=BODY,
    )
    assert got == OPENSSL_SIGNATURE


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("timestamp", "2026-11-28T12:00:00.124Z"),
        ("event_id", "3f2c8a4e-1b7d-4c55-9e0a-6d1f2b3c4d5f"),
        ("entity", "CUSTOMER"),
        ("event", "UPDATED"),
    ],
)
def test_every_header_value_is_signed(field: str, value: str) -> None:
    kwargs = {
        "timestamp": TIMESTAMP,
        "event_id": EVENT_ID,
        "entity": "INVOICE",
        "event": "CREATED",
        "body": BODY,
    }
    kwargs[field] = value
    assert sign(TOKEN, **kwargs) != OPENSSL_SIGNATURE  # type: ignore[arg-type]


def test_header_with_two_tokens_holds_both_signatures() -> None:
    second = generate_token()
    header = signature_header(
        [TOKEN, second],
        timestamp=TIMESTAMP,
        event_id=EVENT_ID,
        entity="INVOICE",
        event="DELETED",
        body=b'"inv_1"',
    )
    parts = header.split(",")
    assert " " not in header
    assert parts == [
        reference_signature(TOKEN, TIMESTAMP, EVENT_ID, "INVOICE", "DELETED", b'"inv_1"'),
        reference_signature(second, TIMESTAMP, EVENT_ID, "INVOICE", "DELETED", b'"inv_1"'),
    ]


def test_eleven_tokens_refused_ten_accepted() -> None:
    tokens = [generate_token() for _ in range(11)]
    kwargs = {
        "timestamp": TIMESTAMP,
        "event_id": EVENT_ID,
        "entity": "INVOICE",
        "event": "CREATED",
        "body": BODY,
    }
    with pytest.raises(ValueError, match="at most 10"):
        signature_header(tokens, **kwargs)  # type: ignore[arg-type]
    assert len(signature_header(tokens[:10], **kwargs).split(",")) == 10  # type: ignore[arg-type]


def test_zero_tokens_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        signature_header(
            [], timestamp=TIMESTAMP, event_id=EVENT_ID, entity="INVOICE", event="CREATED", body=b""
        )


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("not base64!", "not standard base64"),
        ("abc-def_ghijklmnopqrstuvwxyz012345", "not standard base64"),  # URL-safe alphabet
        (" " + TOKEN, "not standard base64"),
        ("QUJDREVGR0hJSktMTU5PUA", None),  # 16 bytes, unpadded: valid
        ("QUJDREVGR0hJSktMTU5P", "at least 16"),  # 15 bytes
        ("", "at least 16"),
        ("QUJDR", "impossible"),
    ],
)
def test_validate_token(token: str, message: str | None) -> None:
    if message is None:
        validate_token(token)
        return
    with pytest.raises(ValueError, match=message):
        validate_token(token)


def test_generated_tokens_are_valid_and_distinct() -> None:
    first, second = generate_token(), generate_token()
    validate_token(first)
    assert len(base64.b64decode(first)) == 32
    assert first != second


def test_non_ascii_body_signed_exactly_as_sent() -> None:
    body = {"id": "cus_1", "name": "Café Zürich ÄÖÜ 東京", "note": None}
    sent = encode_body(body)
    # Raw UTF-8, compact separators: what Rillet's JSON.stringify puts on the wire.
    assert sent == '{"id":"cus_1","name":"Café Zürich ÄÖÜ 東京","note":null}'.encode()
    assert json.loads(sent) == body
    signed = sign(
        TOKEN, timestamp=TIMESTAMP, event_id=EVENT_ID, entity="CUSTOMER", event="UPDATED", body=sent
    )
    assert signed == reference_signature(TOKEN, TIMESTAMP, EVENT_ID, "CUSTOMER", "UPDATED", sent)
    # The same object serialised another way (ASCII escapes) is different bytes, so a receiver
    # that re-serialises parsed JSON instead of verifying raw bytes must fail.
    escaped = json.dumps(body, separators=(",", ":")).encode()
    assert escaped != sent
    assert signed != reference_signature(TOKEN, TIMESTAMP, EVENT_ID, "CUSTOMER", "UPDATED", escaped)


def test_delete_body_is_bare_json_string() -> None:
    assert encode_body("3f2c8a4e-1b7d-4c55-9e0a-6d1f2b3c4d5e") == (
        b'"3f2c8a4e-1b7d-4c55-9e0a-6d1f2b3c4d5e"'
    )


# --- subscription rules (no HTTP: subscribing starts no workers) -----------------------------


def test_subscription_wants_and_to_json_hides_tokens() -> None:
    secret = generate_token()
    sub = Subscription(
        id="s1",
        url="https://example.test/hook",
        tokens=(secret, TOKEN),
        events=frozenset({"INVOICE", "CUSTOMER.CREATED"}),
    )
    assert sub.wants("INVOICE", "PAYMENT_UPDATED")
    assert sub.wants("CUSTOMER", "CREATED")
    assert sub.wants("customer", "created")
    assert not sub.wants("CUSTOMER", "DELETED")
    assert not sub.wants("BILL", "CREATED")
    assert Subscription(id="s2", url="http://x", tokens=(TOKEN,)).wants("ANYTHING", "NEW")
    as_json = sub.to_json()
    assert as_json["token_count"] == 2
    rendered = json.dumps(as_json) + repr(sub)
    assert secret not in rendered
    assert TOKEN not in rendered


def test_subscribe_validation_messages() -> None:
    with WebhookDispatcher(FakeClock()) as dispatcher:
        url = "https://example.test/hook"
        with pytest.raises(WebhookConfigError, match="http:// or https://"):
            dispatcher.subscribe("ftp://example.test/hook", [TOKEN])
        with pytest.raises(WebhookConfigError, match="http:// or https://"):
            dispatcher.subscribe("example.test/hook", [TOKEN])
        with pytest.raises(WebhookConfigError, match="at least one token"):
            dispatcher.subscribe(url, [])
        with pytest.raises(WebhookConfigError, match="at most 10"):
            dispatcher.subscribe(url, [generate_token() for _ in range(11)])
        with pytest.raises(WebhookConfigError, match=r"token 2: .*at least 16"):
            dispatcher.subscribe(url, [TOKEN, "QUJD"])
        with pytest.raises(WebhookConfigError, match="unknown webhook entity in 'CHARGE'"):
            dispatcher.subscribe(url, [TOKEN], events=["CHARGE"])
        with pytest.raises(WebhookConfigError, match="BILL has the events: CREATED, DELETED"):
            dispatcher.subscribe(url, [TOKEN], events=["BILL.PAYMENT_UPDATED"])
        with pytest.raises(WebhookConfigError, match="pass None"):
            dispatcher.subscribe(url, [TOKEN], events=[])
        assert dispatcher.subscriptions() == []
        sub = dispatcher.subscribe(url, [TOKEN], events=["invoice", "credit-memo.payment-updated"])
        assert sub.events == frozenset({"INVOICE", "CREDIT_MEMO.PAYMENT_UPDATED"})
        assert sub.enabled
        assert sub.consecutive_failures == 0
        assert dispatcher.unsubscribe(sub.id) is True
        assert dispatcher.unsubscribe(sub.id) is False


def test_emit_without_subscribers_and_bad_header_values() -> None:
    with WebhookDispatcher(FakeClock()) as dispatcher:
        assert dispatcher.emit("INVOICE", "CREATED", {"id": "inv_1"}) == []
        with pytest.raises(ValueError, match="only letters"):
            dispatcher.emit("INVOICE.X", "CREATED", {"id": "inv_1"})
        with pytest.raises(ValueError, match="only letters"):
            dispatcher.emit("INVOICE", "", {"id": "inv_1"})
    with pytest.raises(RuntimeError, match="stopped"):
        dispatcher.emit("INVOICE", "CREATED", {"id": "inv_1"})
    dispatcher.stop()  # idempotent
