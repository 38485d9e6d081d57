"""Webhook signature verification (test-matrix 7.1 W2, W4-W8, W10, W17 at function level).

Expected signatures come from :func:`reference_signature`, written here from rillet-api.md 10.3,
never from the code under test.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import hashlib
import hmac
import inspect
import random
import string
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rillet_dagster.rillet import signatures
from rillet_dagster.rillet.signatures import (
    MAX_SIGNATURES,
    MIN_TOKEN_BYTES,
    TimestampPolicy,
    WebhookHeaderError,
    decode_token,
    parse_headers,
    parse_timestamp,
    verify,
)
from rillet_dagster.sandbox.webhooks import encode_body, signature_header
from rillet_dagster.settings import Settings, SettingsError, parse_webhook_secrets
from tests import canary

TOKEN = canary.webhook_token("signatures")
OTHER = canary.webhook_token("signatures-other")
TIMESTAMP = "2026-11-28T12:00:00.789Z"
EVENT_ID = "6f1c8a52-1e0b-4c41-9d5e-3b7f2a9c0d11"
BODY = b'{"id":"inv_1","total":{"amount":"10.00","currency":"EUR"},"memo":"caf\xc3\xa9"}'


def reference_signature(token: str, timestamp: str, event_id: str, entity: str, event: str,
                        body: bytes) -> str:  # fmt: skip
    """rillet-api.md 10.3: base64(HMAC-SHA256(b64decode(token), "ts.id.entity.event." + body))."""
    key = base64.b64decode(token + "=" * (-len(token) % 4))
    message = f"{timestamp}.{event_id}.{entity}.{event}.".encode() + body
    return base64.b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode()


def headers_for(
    signature: str,
    *,
    timestamp: str = TIMESTAMP,
    event_id: str = EVENT_ID,
    entity: str = "INVOICE",
    event: str = "CREATED",
) -> dict[str, list[str]]:
    return {
        "x-rillet-signature": [signature],
        "x-rillet-timestamp": [timestamp],
        "x-rillet-id": [event_id],
        "x-rillet-entity": [entity],
        "x-rillet-event": [event],
    }


def getter(values: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    return lambda name: values.get(name, [])


def check(header_values: dict[str, list[str]], body: bytes = BODY, tokens=(TOKEN,)) -> bool:  # type: ignore[no-untyped-def]
    parsed = parse_headers(getter(header_values))
    return verify(parsed, body, [decode_token(t) for t in tokens])


def good_signature(token: str = TOKEN, body: bytes = BODY, **fields: str) -> str:
    values = {
        "timestamp": TIMESTAMP,
        "event_id": EVENT_ID,
        "entity": "INVOICE",
        "event": "CREATED",
        **fields,
    }
    return reference_signature(token, body=body, **values)


def test_reference_vector_verifies() -> None:
    assert check(headers_for(good_signature()))


def test_what_the_sandbox_sends_verifies() -> None:
    body = encode_body({"id": "inv_1", "name": "Zoë"})
    header = signature_header(
        [TOKEN, OTHER], timestamp=TIMESTAMP, event_id=EVENT_ID, entity="CREDIT_MEMO",
        event="PAYMENT_UPDATED", body=body,
    )  # fmt: skip
    values = headers_for(header, entity="CREDIT_MEMO", event="PAYMENT_UPDATED")
    assert check(values, body)
    assert check(values, body, tokens=(OTHER,))


@pytest.mark.parametrize(("entity", "event"), [("invoice", "payment-updated"), ("Invoice", "x")])
def test_lower_case_dashed_names_are_well_formed(entity: str, event: str) -> None:
    sig = good_signature(entity=entity, event=event)
    assert check(headers_for(sig, entity=entity, event=event))


def test_one_flipped_body_byte_fails() -> None:  # W2
    body = bytearray(BODY)
    for position in (0, len(body) // 2, len(body) - 1):
        flipped = bytearray(body)
        flipped[position] ^= 0x01
        assert not check(headers_for(good_signature()), bytes(flipped))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("timestamp", "2026-11-28T12:00:00.788Z"),
        ("event_id", str(uuid.UUID(int=1))),
        ("entity", "BILL"),
        ("event", "UPDATED"),
    ],
)
def test_each_signed_header_altered_fails(field: str, value: str) -> None:  # W2
    assert not check(headers_for(good_signature(), **{field: value}))


def test_valid_at_position_1_and_10_and_among_garbage() -> None:  # W4
    good = good_signature()
    wrong = good_signature(token=OTHER)
    assert check(headers_for(",".join([good] + [wrong] * 9)))
    assert check(headers_for(",".join([wrong] * 9 + [good])))
    assert check(headers_for(f"garbage,,{'A' * 44},v1={good},{good}, {wrong}"))
    assert check(headers_for(f",,{good},,"))
    assert not check(headers_for(",".join([wrong] * 10)))
    assert not check(headers_for(",,,"))


def test_eleven_signatures_are_refused_even_with_a_valid_one() -> None:  # W4
    good = good_signature()
    with pytest.raises(WebhookHeaderError, match="11 signatures"):
        check(headers_for(",".join([good] * (MAX_SIGNATURES + 1))))
    with pytest.raises(WebhookHeaderError):
        check(headers_for(good + "," * MAX_SIGNATURES))


def test_rotation_any_configured_token() -> None:  # W5
    old, new = good_signature(token=OTHER), good_signature(token=TOKEN)
    both = (OTHER, TOKEN)
    assert check(headers_for(old), tokens=both)
    assert check(headers_for(new), tokens=both)
    assert check(headers_for(f"{new},{old}"), tokens=both)
    assert not check(headers_for(old), tokens=(TOKEN,))


def _mac() -> bytes:
    return base64.b64decode(good_signature())


def _body_whose_signature_has(chars: str) -> tuple[bytes, str]:
    for n in range(10_000):
        body = b'{"id":"inv_%d"}' % n
        sig = good_signature(body=body)
        if any(c in sig for c in chars):
            return body, sig
    raise AssertionError("no such body found")


def test_encodings_only_standard_base64() -> None:  # W6
    sig = good_signature()
    assert check(headers_for(sig.rstrip("=")))  # padding optional
    assert not check(headers_for(_mac().hex()))
    assert not check(headers_for(sig[:20] + " " + sig[20:]))
    assert not check(headers_for(sig[:20] + "\t" + sig[20:]))
    assert not check(headers_for(sig + "=="))
    assert not check(headers_for(sig[:-2] + "é="))
    assert not check(headers_for(sig.lower()))
    body, special = _body_whose_signature_has("+/")
    urlsafe = special.replace("+", "-").replace("/", "_")
    assert check(headers_for(special), body)
    assert not check(headers_for(urlsafe), body)
    # A non-canonical last character decodes to the same bytes with a lenient decoder.
    last = special.rstrip("=")[-1]
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/"
    sloppy = special.rstrip("=")[:-1] + alphabet[alphabet.index(last) + 1]
    assert not check(headers_for(sloppy), body)


def test_megabyte_header_is_refused_cheaply() -> None:  # W6
    with pytest.raises(WebhookHeaderError, match="too long"):
        check(headers_for("A" * 1_000_000))


def test_field_shift_is_a_format_error_although_the_signature_would_verify() -> None:  # W7
    sig = good_signature()
    shifted = {"timestamp": "2026-11-28T12:00:00", "event_id": "789Z." + EVENT_ID}
    assert (
        reference_signature(TOKEN, body=BODY, entity="INVOICE", event="CREATED", **shifted) == sig
    )
    with pytest.raises(WebhookHeaderError):
        check(headers_for(sig, **shifted))
    # Dots moved between entity and event: the same signed bytes, refused by format.
    a = reference_signature(TOKEN, TIMESTAMP, EVENT_ID, "CREDIT", "MEMO.CREATED", BODY)
    b = reference_signature(TOKEN, TIMESTAMP, EVENT_ID, "CREDIT.MEMO", "CREATED", BODY)
    assert a == b
    for entity, event in (("CREDIT", "MEMO.CREATED"), ("CREDIT.MEMO", "CREATED")):
        with pytest.raises(WebhookHeaderError):
            check(headers_for(a, entity=entity, event=event))


def test_reserialised_body_fails() -> None:  # W8
    assert not check(headers_for(good_signature()), BODY.replace(b":", b": "))


@pytest.mark.parametrize(
    ("name", "values"),
    [
        ("x-rillet-id", []),
        ("x-rillet-id", [""]),
        ("x-rillet-id", [EVENT_ID, EVENT_ID]),
        ("x-rillet-id", ["not-a-uuid"]),
        ("x-rillet-id", [EVENT_ID + " "]),
        ("x-rillet-id", ["{" + EVENT_ID + "}"]),
        ("x-rillet-id", [EVENT_ID.replace("-", "")]),
        ("x-rillet-entity", ["IN VOICE"]),
        ("x-rillet-entity", ["I" * 65]),
        ("x-rillet-event", ["CRÉATED"]),
        ("x-rillet-signature", []),
        ("x-rillet-timestamp", ["1764331200"]),
        ("x-rillet-timestamp", ["2026-11-28 12:00:00Z"]),
        ("x-rillet-timestamp", ["2026-11-28T12:00:00"]),
        ("x-rillet-timestamp", ["2026-11-28T12:00:00z"]),
        ("x-rillet-timestamp", ["2026-13-28T12:00:00Z"]),
        ("x-rillet-timestamp", ["2026-11-28T12:00:00.1234567890Z"]),
        ("x-rillet-timestamp", ["2026-11-28T12:00:00+24:00"]),
        ("x-rillet-timestamp", ["\uff12026-11-28T12:00:00Z"]),  # full-width digit
    ],
)
def test_malformed_headers(name: str, values: list[str]) -> None:  # W3
    header_values = headers_for(good_signature())
    header_values[name] = values
    with pytest.raises(WebhookHeaderError) as raised:
        parse_headers(getter(header_values))
    assert raised.value.header == name
    for value in values:
        if value:
            assert value not in str(raised.value)


def test_timestamps_parse_strictly() -> None:
    assert parse_timestamp("2026-11-28T12:00:00Z") == datetime(2026, 11, 28, 12, tzinfo=UTC)
    assert parse_timestamp("2026-11-28T13:30:00.5+01:30") == datetime(
        2026, 11, 28, 12, 0, 0, 500_000, tzinfo=UTC
    )
    assert parse_timestamp("2026-11-28T12:00:00.123456789Z").microsecond == 123_456


def test_timestamp_policy_default() -> None:  # W10
    now = datetime(2026, 11, 28, 12, tzinfo=UTC)
    policy = TimestampPolicy()
    assert policy.check(now - timedelta(minutes=10), now) is None
    assert policy.check(now - timedelta(hours=6), now) is None
    assert policy.check(now + timedelta(minutes=4), now) is None
    assert policy.check(now + timedelta(minutes=10), now) == "future"
    assert policy.check(now - timedelta(days=8), now) == "stale"
    relaxed = TimestampPolicy(max_future=timedelta(minutes=15), max_age=None)
    assert relaxed.check(now + timedelta(minutes=10), now) is None
    assert relaxed.check(now - timedelta(days=365), now) is None


def test_compare_digest_is_the_comparison(monkeypatch: pytest.MonkeyPatch) -> None:  # W17
    calls: list[tuple[object, object]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(signatures.hmac, "compare_digest", spy)
    wrong = good_signature(token=OTHER)
    assert check(headers_for(f"{wrong},{good_signature()}"), tokens=(OTHER, TOKEN))
    # Every (token, candidate) pair, compared as bytes, even after the match.
    assert len(calls) == 4
    assert all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in calls)
    assert (_mac(), _mac()) in calls


def test_no_equality_operator_on_macs() -> None:  # W17 "lint"
    tree = ast.parse(inspect.getsource(signatures))
    functions = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    for name in ("verify", "compute_mac", "parse_signature_header"):
        for node in ast.walk(functions[name]):
            if isinstance(node, ast.Compare):
                assert not any(isinstance(op, ast.Eq | ast.NotEq | ast.Is) for op in node.ops), (
                    f"{name} compares with == / != / is; MACs must go through compare_digest"
                )


def _random_text(rng: random.Random) -> str:
    pool = string.printable + "éü\u200b,.=+/-_" + "A" * 20
    return "".join(rng.choice(pool) for _ in range(rng.randint(0, 60)))


def test_ten_thousand_random_header_sets_never_crash() -> None:  # W6
    rng = random.Random(7)
    good = good_signature()
    names = list(headers_for(good))
    for _ in range(10_000):
        values = headers_for(good)
        for name in rng.sample(names, rng.randint(1, 5)):
            choice = rng.random()
            if choice < 0.1:
                values[name] = []
            elif choice < 0.2:
                values[name] = [values[name][0], _random_text(rng)]
            elif choice < 0.6:
                values[name] = [_random_text(rng)]
            else:
                text = values[name][0]
                cut = rng.randint(0, len(text))
                values[name] = [text[:cut] + _random_text(rng)[:3] + text[cut + 1 :]]
        with contextlib.suppress(WebhookHeaderError):
            check(values)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    signature=st.text(max_size=200),
    timestamp=st.text(max_size=40),
    event_id=st.text(max_size=40),
    entity=st.text(max_size=70),
    body=st.binary(max_size=64),
)
def test_hypothesis_headers_never_crash(
    signature: str, timestamp: str, event_id: str, entity: str, body: bytes
) -> None:  # W6
    values = headers_for(signature, timestamp=timestamp, event_id=event_id, entity=entity)
    with contextlib.suppress(WebhookHeaderError):
        assert not check(values, body)


def test_token_errors_never_echo_the_token() -> None:
    secret = "c2VjcmV0LXRva2VuLXZhbHVl!"
    with pytest.raises(ValueError, match="base64") as raised:
        decode_token(secret)
    assert secret not in str(raised.value)
    with pytest.raises(SettingsError) as settings_error:
        parse_webhook_secrets(f"{TOKEN},{secret}")
    assert "token 2" in str(settings_error.value)
    assert secret not in str(settings_error.value)
    assert TOKEN not in str(settings_error.value)
    loaded = Settings.from_env({"RILLET_WEBHOOK_SECRETS": f"{TOKEN}, {OTHER}"})
    assert loaded.webhook_secrets == (TOKEN, OTHER)
    assert loaded.webhook_secret_count == 2
    assert TOKEN not in repr(loaded)


@pytest.mark.parametrize(
    "value",
    [
        "0001-01-01T00:00:00+01:00",  # before year 1 once in UTC (it overflowed: a 500)
        "9999-12-31T23:59:59-01:00",  # after year 9999 once in UTC
        "0001-01-01T00:00:00Z",  # exists, but not in every time zone the database may use
        "9999-12-31T23:59:59Z",
        "0000-01-01T00:00:00Z",
        "10000-01-01T00:00:00Z",
        "99999999999999999999-01-01T00:00:00Z",
        "2026-11-28T12:00:00+23:60",
        "2026-11-28T12:00:00\u00b2Z",  # superscript two: a digit to str.isdigit
        "\u0662\u0660\u0662\u0666-11-28T12:00:00Z",  # Arabic-Indic digits
        "2026-11-28T12:00:00.1\u00e9Z",
        "2026-11-28T12:00:00Z\u00ff",
    ],
)
def test_timestamps_the_receiver_cannot_use_are_header_errors(value: str) -> None:  # W10, X7
    header_values = headers_for(good_signature(timestamp=value), timestamp=value)
    with pytest.raises(WebhookHeaderError) as raised:
        parse_headers(getter(header_values))
    assert raised.value.header == "x-rillet-timestamp"


def test_timestamp_range_edges() -> None:
    assert parse_timestamp("0001-01-02T00:00:00Z") == datetime(1, 1, 2, tzinfo=UTC)
    assert parse_timestamp("9999-12-30T23:59:59.999999Z").year == 9999
    for outside in ("0001-01-01T23:59:59.999Z", "9999-12-31T00:00:00Z"):
        with pytest.raises(ValueError, match="out of range"):
            parse_timestamp(outside)


@settings(max_examples=2000, deadline=None)
@given(
    year=st.integers(0, 9999),
    month=st.integers(0, 13),
    day=st.integers(0, 32),
    hour=st.integers(0, 24),
    second=st.integers(0, 60),
    sign=st.sampled_from("+-"),
    offset_hours=st.integers(0, 24),
    offset_minutes=st.integers(0, 60),
)
def test_any_well_formed_timestamp_parses_or_is_a_value_error(
    year: int, month: int, day: int, hour: int, second: int, sign: str, offset_hours: int,
    offset_minutes: int,
) -> None:  # fmt: skip
    text = (
        f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:59:{second:02d}"
        f"{sign}{offset_hours:02d}:{offset_minutes:02d}"
    )
    try:
        moment = parse_timestamp(text)
    except ValueError:
        return
    # What is accepted survives the policy's arithmetic and any UTC offset a database may use.
    now = datetime(2026, 11, 28, 12, tzinfo=UTC)
    TimestampPolicy().check(moment, now)
    for hours in (-23, 23):
        moment.astimezone(timezone(timedelta(hours=hours, minutes=59 if hours > 0 else -59)))


def test_receiver_tokens_need_sixteen_bytes() -> None:
    for length in range(1, MIN_TOKEN_BYTES):
        short = base64.b64encode(b"k" * length).decode()
        decode_token(short)  # well-formed, so a signer may still use it ...
        with pytest.raises(ValueError, match=f"decodes to {length} bytes") as raised:
            decode_token(short, min_bytes=MIN_TOKEN_BYTES)  # ... but a receiver refuses it
        assert short not in str(raised.value)
    exact = base64.b64encode(b"k" * MIN_TOKEN_BYTES).decode()
    assert decode_token(exact, min_bytes=MIN_TOKEN_BYTES) == b"k" * MIN_TOKEN_BYTES


def test_the_code_location_refuses_short_webhook_tokens_too() -> None:
    """Issue 13, finding 9: the settings refuse what the receiver refuses, naming the fix."""
    short = base64.b64encode(b"six by").decode()
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"RILLET_WEBHOOK_SECRETS": f"{TOKEN},{short}"})
    message = str(raised.value)
    assert "token 2" in message and "at least 16" in message and "token_bytes(32)" in message
    assert short not in message
