"""Rillet webhook signatures: strict header parsing and HMAC verification (pure functions).

The rule (``shared/rillet-api.md`` section 10.3 and its "Decisions" rows)::

    key       = base64-decode(webhook token)
    message   = f"{X-Rillet-Timestamp}.{X-Rillet-Id}.{X-Rillet-Entity}.{X-Rillet-Event}." + raw body
    signature = standard base64(HMAC-SHA256(key, message)), padding optional

``X-Rillet-Signature`` holds up to 10 comma-separated signatures (one per token while Rillet
rotates); a delivery is authentic if any of them matches any configured token, so that adding the
new token before retiring the old one gives rotation without downtime.

Header formats are checked *before* the signature. The signed string joins header values with
dots, so values that may hold a dot are ambiguous: moving ``.789Z`` from the timestamp into the id
signs the very same bytes. Hence: id a canonical UUID, entity and event only ``[A-Za-z0-9_-]``,
timestamp strict RFC 3339 -- and anything else is a :class:`WebhookHeaderError` (HTTP 400).

Every MAC comparison goes through :func:`hmac.compare_digest` on bytes; nothing here compares a
MAC with ``==`` (a test enforces both).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

SIGNATURE_HEADER = "x-rillet-signature"
TIMESTAMP_HEADER = "x-rillet-timestamp"
ID_HEADER = "x-rillet-id"
ENTITY_HEADER = "x-rillet-entity"
EVENT_HEADER = "x-rillet-event"
HEADERS = (SIGNATURE_HEADER, TIMESTAMP_HEADER, ID_HEADER, ENTITY_HEADER, EVENT_HEADER)

MAX_SIGNATURES = 10
# What a receiver demands of a token: an HMAC key of a few bytes can be guessed offline from one
# captured delivery; 16 bytes (128 bits) cannot.
MIN_TOKEN_BYTES = 16
# How to make a token for a sender of one's own (told whenever a token is refused).
NEW_KEY_COMMAND = (
    'python -c "import secrets,base64;print(base64.b64encode(secrets.token_bytes(32)).decode())"'
)
MAX_NAME_LENGTH = 64
# 10 signatures of 44 characters plus separators and some optional whitespace; anything longer is
# refused before it is split, so a 1 MB header costs one length check.
MAX_SIGNATURE_HEADER_LENGTH = 1024

# Explicit ASCII classes everywhere: ``\d`` would also match Arabic-Indic and other digits.
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_NAME = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_NAME_LENGTH}}}")
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]{1,9}))?(Z|[+-][0-9]{2}:[0-9]{2})"
)
# A SHA-256 MAC is 32 bytes: 43 base64 characters (the last one carries 2 zero bits, hence its
# restricted alphabet) and one optional '='. Only this canonical standard-base64 form is accepted;
# hex, URL-safe or whitespace-broken variants never match.
_SIGNATURE = re.compile(r"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=?")
_TOKEN = re.compile(r"[A-Za-z0-9+/]+={0,2}")
# Accepted event times stay a day inside datetime's range, so that neither the conversion to UTC
# nor a later one to any zone (a PostgreSQL session's, say) can overflow.
EARLIEST_TIMESTAMP = datetime.min.replace(tzinfo=UTC) + timedelta(days=1)
LATEST_TIMESTAMP = datetime.max.replace(tzinfo=UTC) - timedelta(days=1)


class WebhookHeaderError(ValueError):
    """A missing, repeated or malformed ``X-Rillet-*`` header (HTTP 400, nothing stored).

    The message names the header and the rule; it never repeats the header's value.
    """

    def __init__(self, header: str, problem: str) -> None:
        super().__init__(f"{header}: {problem}")
        self.header = header
        self.problem = problem


@dataclass(frozen=True)
class WebhookHeaders:
    """The five ``X-Rillet-*`` headers of one delivery, checked for format.

    ``timestamp``, ``event_id``, ``entity`` and ``event`` are the header values exactly as sent
    (they are part of the signed message); ``signatures`` holds the decoded 32-byte MACs of the
    well-formed candidates (others can never match and are dropped).
    """

    signatures: tuple[bytes, ...]
    timestamp: str
    event_time: datetime
    event_id: str
    entity: str
    event: str


def decode_token(token: str, *, min_bytes: int = 1) -> bytes:
    """The HMAC key of a webhook token: standard base64, padding optional.

    A receiver passes ``min_bytes=MIN_TOKEN_BYTES``; signing tools take any non-empty key.
    Raises ``ValueError`` with a message that never contains the token.
    """
    text = token.strip()
    if not _TOKEN.fullmatch(text):
        raise ValueError("not standard base64 (only A-Z, a-z, 0-9, '+', '/' and trailing '=')")
    core = text.rstrip("=")
    if len(core) % 4 == 1:
        raise ValueError("not valid base64 (impossible length)")
    try:
        key = base64.b64decode(core + "=" * (-len(core) % 4), validate=True)
    except binascii.Error:
        raise ValueError("not valid base64") from None
    if not key:
        raise ValueError("decodes to an empty key")
    if len(key) < min_bytes:
        raise ValueError(f"decodes to {len(key)} bytes; at least {min_bytes} are required")
    return key


def signed_prefix(timestamp: str, event_id: str, entity: str, event: str) -> bytes:
    """What Rillet signs before the body."""
    return f"{timestamp}.{event_id}.{entity}.{event}.".encode()


def signed_message(timestamp: str, event_id: str, entity: str, event: str, body: bytes) -> bytes:
    """The bytes Rillet signs; ``body`` is the raw request body, never re-serialised JSON."""
    return signed_prefix(timestamp, event_id, entity, event) + body


def compute_mac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def parse_timestamp(value: str) -> datetime:
    """A strict RFC 3339 timestamp (``T`` and ``Z`` upper-case, up to 9 fraction digits), in UTC.

    Raises ``ValueError`` for anything else, including impossible dates and instants outside
    :data:`EARLIEST_TIMESTAMP` .. :data:`LATEST_TIMESTAMP`.
    """
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise ValueError("not an RFC 3339 timestamp YYYY-MM-DDTHH:MM:SS[.fff](Z|+hh:mm)")
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    fraction = (match.group(7) or "").ljust(6, "0")[:6]
    zone = match.group(8)
    offset = timedelta(0)
    if zone != "Z":
        hours, minutes = int(zone[1:3]), int(zone[4:6])
        if hours > 23 or minutes > 59:
            raise ValueError("impossible UTC offset")
        offset = timedelta(hours=hours, minutes=minutes) * (1 if zone[0] == "+" else -1)
    moment = datetime(year, month, day, hour, minute, second, int(fraction), tzinfo=UTC)
    out_of_range = "out of range (years 0001 to 9999, less a day at either end)"
    try:
        moment -= offset
    except OverflowError:  # 0001-01-01T00:00:00+01:00 lies before year 1 in UTC
        raise ValueError(out_of_range) from None
    if not EARLIEST_TIMESTAMP <= moment <= LATEST_TIMESTAMP:
        raise ValueError(out_of_range)
    return moment


def parse_signature_header(value: str) -> tuple[bytes, ...]:
    """The decoded MACs among at most :data:`MAX_SIGNATURES` comma-separated candidates.

    Empty and malformed entries count towards the limit but are dropped (they cannot match).
    Raises :class:`WebhookHeaderError` for an over-long header or more than 10 entries.
    """
    if len(value) > MAX_SIGNATURE_HEADER_LENGTH:
        raise WebhookHeaderError(SIGNATURE_HEADER, "too long")
    entries = value.split(",")
    if len(entries) > MAX_SIGNATURES:
        raise WebhookHeaderError(
            SIGNATURE_HEADER, f"{len(entries)} signatures; at most {MAX_SIGNATURES} are allowed"
        )
    macs = []
    for entry in entries:
        # Whitespace around an entry is HTTP list syntax; whitespace inside one is malformed.
        candidate = entry.strip(" \t")
        if _SIGNATURE.fullmatch(candidate):
            macs.append(base64.b64decode(candidate.rstrip("=") + "="))
    return tuple(macs)


def parse_headers(getlist: Callable[[str], Sequence[str]]) -> WebhookHeaders:
    """Check the five headers strictly; ``getlist(name)`` returns every value sent for ``name``.

    Raises :class:`WebhookHeaderError` when a header is missing, empty, repeated or malformed.
    """
    values: dict[str, str] = {}
    for name in HEADERS:
        found = list(getlist(name))
        if not found:
            raise WebhookHeaderError(name, "missing")
        if len(found) > 1:
            raise WebhookHeaderError(name, "sent more than once")
        if not found[0]:
            raise WebhookHeaderError(name, "empty")
        values[name] = found[0]
    if not _UUID.fullmatch(values[ID_HEADER]):
        raise WebhookHeaderError(ID_HEADER, "not a canonical UUID")
    for name in (ENTITY_HEADER, EVENT_HEADER):
        if not _NAME.fullmatch(values[name]):
            raise WebhookHeaderError(
                name, f"only letters, digits, '_' and '-' (1 to {MAX_NAME_LENGTH}) are allowed"
            )
    try:
        event_time = parse_timestamp(values[TIMESTAMP_HEADER])
    except ValueError as error:
        raise WebhookHeaderError(TIMESTAMP_HEADER, str(error)) from None
    signatures = parse_signature_header(values[SIGNATURE_HEADER])
    return WebhookHeaders(
        signatures=signatures,
        timestamp=values[TIMESTAMP_HEADER],
        event_time=event_time,
        event_id=values[ID_HEADER],
        entity=values[ENTITY_HEADER],
        event=values[EVENT_HEADER],
    )


def verify(headers: WebhookHeaders, body: bytes, keys: Sequence[bytes]) -> bool:
    """True if any signature in ``headers`` is the MAC of ``body`` under any of ``keys``.

    Every (key, candidate) pair is compared, with :func:`hmac.compare_digest`, even after a
    match, so the time taken does not depend on which pair matched.
    """
    prefix = signed_prefix(headers.timestamp, headers.event_id, headers.entity, headers.event)
    matched = False
    for key in keys:
        # Fed in two parts: prefix + body would copy a body of up to a megabyte per key.
        mac = hmac.new(key, prefix, hashlib.sha256)
        mac.update(body)
        expected = mac.digest()
        for candidate in headers.signatures:
            matched |= hmac.compare_digest(expected, candidate)
    return matched


def sign(token: str, *, timestamp: str, event_id: str, entity: str, event: str, body: bytes) -> str:
    """The base64 signature Rillet would send for these values (for simulators and tools)."""
    mac = compute_mac(decode_token(token), signed_message(timestamp, event_id, entity, event, body))
    return base64.b64encode(mac).decode("ascii")


@dataclass(frozen=True)
class TimestampPolicy:
    """Which event times are accepted (``rillet-api.md`` Decisions, "webhook timestamp").

    The timestamp is the event time and Rillet's retries keep it, so a short past window would
    refuse Rillet's own late retries. Replay protection is the dedupe on ``X-Rillet-Id``, which the
    queue keeps at least ``max_age`` long; a timestamp too far in the future is refused.

    Attributes:
        max_future: accepted clock skew into the future.
        max_age: oldest accepted event time; ``None`` accepts any age.
    """

    max_future: timedelta = timedelta(minutes=5)
    max_age: timedelta | None = timedelta(days=7)

    def check(self, event_time: datetime, now: datetime) -> str | None:
        """``None`` if accepted, else ``"future"`` or ``"stale"``."""
        if event_time - now > self.max_future:
            return "future"
        if self.max_age is not None and now - event_time > self.max_age:
            return "stale"
        return None
