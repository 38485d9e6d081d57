"""Signed webhook delivery for the Rillet sandbox simulator.

Follows ``shared/rillet-api.md`` section 10 and its "Decisions" rows on webhooks:

* signature: base64(HMAC-SHA256(base64-decoded token,
  ``"{timestamp}.{id}.{entity}.{event}." + raw body``)), up to 10 comma-separated signatures
  (one per token, for rotation) in ``X-Rillet-Signature``;
* body: the bare entity object, or the bare id as a JSON string for ``DELETED``; no envelope,
  entity and event travel only in headers (upper-case, as the simulator sends them);
* retries: up to 5 groups of 3 attempts, exponential backoff between groups, 30 s per attempt,
  every duration scaled by one ``time_factor`` so tests run in milliseconds;
* the ``X-Rillet-Id`` and ``X-Rillet-Timestamp`` of a delivery are fixed at emit time and kept
  across retries (the timestamp is the event time), so receivers must dedupe on the id;
* a webhook that keeps failing is disabled; at most 5 webhooks per organization.

Deliveries never block the caller: they wait in a due-time heap served by a few daemon worker
threads, so a receiver in backoff does not hold a worker while it waits.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import itertools
import json
import re
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from rillet_dagster.catalog import WEBHOOK_ENTITY
from rillet_dagster.clock import Clock, isoformat_z

MAX_TOKENS = 10
MIN_TOKEN_BYTES = 16
USER_AGENT = "Rillet-Webhooks-Sandbox"
# The signed string joins header values with dots, so a value holding a dot would make two
# different header sets sign the same bytes; receivers refuse such values with a 400.
_HEADER_VALUE = re.compile(r"[A-Za-z0-9_-]+")
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
# A loopback receiver can be slower than a scaled-down timeout during a test run; a timed-out
# attempt there would be a spurious failure, not a faithful simulation.
_MIN_ATTEMPT_TIMEOUT = 0.5

DeliveryStatus = Literal["pending", "delivered", "failed"]


class WebhookConfigError(ValueError):
    """A webhook subscription that Rillet would not accept; the message says what to fix."""


# ---------------------------------------------------------------------------------------------
# Signing


def _decode_token(token: str) -> bytes:
    if not isinstance(token, str) or not _BASE64.fullmatch(token):
        raise ValueError(
            "webhook token is not standard base64 (only A-Z, a-z, 0-9, '+', '/' and trailing '=' "
            "are allowed); copy the Webhook Token exactly as Rillet shows it"
        )
    core = token.rstrip("=")
    if len(core) % 4 == 1:
        raise ValueError("webhook token is not valid base64: its length is impossible")
    try:
        return base64.b64decode(core + "=" * (-len(core) % 4), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"webhook token is not valid base64: {exc}") from None


def validate_token(token: str) -> None:
    """Raise ``ValueError`` unless ``token`` is standard base64 of at least 16 bytes."""
    key = _decode_token(token)
    if len(key) < MIN_TOKEN_BYTES:
        raise ValueError(
            f"webhook token decodes to {len(key)} bytes; at least {MIN_TOKEN_BYTES} are required "
            "(generate one with generate_token())"
        )


def generate_token() -> str:
    """A fresh webhook token: base64 of 32 random bytes."""
    return base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def sign(
    token_b64: str, *, timestamp: str, event_id: str, entity: str, event: str, body: bytes
) -> str:
    """Base64 HMAC-SHA256 of ``"{timestamp}.{event_id}.{entity}.{event}." + body``.

    The key is the token base64-decoded (padding optional). ``body`` must be the raw bytes
    sent on the wire: re-serialising parsed JSON changes them and breaks the signature.
    """
    key = _decode_token(token_b64)
    message = f"{timestamp}.{event_id}.{entity}.{event}.".encode() + body
    return base64.b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode("ascii")


def signature_header(
    tokens: Sequence[str], *, timestamp: str, event_id: str, entity: str, event: str, body: bytes
) -> str:
    """The ``X-Rillet-Signature`` value: one signature per token, comma-separated."""
    if isinstance(tokens, str):
        # A bare string is a sequence of characters; signing with each letter is never meant.
        raise TypeError("tokens must be a sequence of token strings, not one string")
    if not tokens:
        raise ValueError("at least one webhook token is needed to sign a delivery")
    if len(tokens) > MAX_TOKENS:
        raise ValueError(
            f"{len(tokens)} tokens given; X-Rillet-Signature carries at most {MAX_TOKENS}"
        )
    return ",".join(
        sign(t, timestamp=timestamp, event_id=event_id, entity=entity, event=event, body=body)
        for t in tokens
    )


def encode_body(body: object) -> bytes:
    """The exact bytes a delivery sends and signs for ``body``.

    Non-ASCII text stays raw UTF-8 (as Rillet's JavaScript ``JSON.stringify`` sends it) rather
    than ``\\uXXXX`` escapes, so receivers that verify re-serialised JSON fail here as they
    would against Rillet.
    """
    return json.dumps(body, separators=(",", ":"), default=str, ensure_ascii=False).encode("utf-8")


# ---------------------------------------------------------------------------------------------
# Subscriptions


def _canonical(name: str) -> str:
    return name.strip().upper().replace("-", "_")


@dataclass
class Subscription:
    """One configured webhook (Organization Settings -> Webhooks in Rillet's dashboard).

    ``events`` is ``None`` for every event, otherwise canonical entries ``"INVOICE"`` (all of
    that entity's events) or ``"INVOICE.CREATED"``.
    """

    id: str
    url: str
    tokens: tuple[str, ...] = field(repr=False)
    events: frozenset[str] | None = None
    enabled: bool = True
    consecutive_failures: int = 0

    def wants(self, entity: str, event: str) -> bool:
        if self.events is None:
            return True
        entity_c = _canonical(entity)
        return entity_c in self.events or f"{entity_c}.{_canonical(event)}" in self.events

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "url": self.url,
            "token_count": len(self.tokens),
            "events": None if self.events is None else sorted(self.events),
            "enabled": self.enabled,
            "consecutive_failures": self.consecutive_failures,
        }


def _normalise_events(events: Iterable[str]) -> frozenset[str]:
    if isinstance(events, str):
        raise WebhookConfigError(
            "events must be a list of names such as ['INVOICE', 'CUSTOMER.CREATED'], not one string"
        )
    known = ", ".join(sorted(WEBHOOK_ENTITY))
    out: set[str] = set()
    for raw in events:
        entity_name, _, event_name = _canonical(raw).partition(".")
        spec = WEBHOOK_ENTITY.get(entity_name)
        if spec is None:
            raise WebhookConfigError(
                f"unknown webhook entity in {raw!r}; Rillet sends webhooks for: {known}"
            )
        if not event_name:
            out.add(entity_name)
            continue
        allowed = {e.value for e in spec.webhook_events}
        if event_name not in allowed:
            raise WebhookConfigError(
                f"unknown event in {raw!r}; {entity_name} has the events: "
                f"{', '.join(sorted(allowed))}"
            )
        out.add(f"{entity_name}.{event_name}")
    if not out:
        raise WebhookConfigError(
            "events is empty, so the webhook would never fire; pass None to receive every event"
        )
    return frozenset(out)


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookConfigError(
            f"webhook URL {url!r} must be an absolute http:// or https:// URL with a host"
        )


# ---------------------------------------------------------------------------------------------
# Delivery


@dataclass
class DeliveryRecord:
    """What happened to one delivery (one event to one subscription), for observability."""

    id: str
    subscription_id: str
    url: str
    entity: str
    event: str
    timestamp: str
    attempts: int = 0
    status: DeliveryStatus = "pending"
    last_status_code: int | None = None
    last_error: str | None = None


@dataclass
class _Job:
    record: DeliveryRecord
    headers: dict[str, str]
    body: bytes


class WebhookDispatcher:
    """Fan events out to subscriptions as signed HTTP POSTs, retrying like Rillet.

    Durations are real seconds multiplied by ``time_factor``. Waits between attempts use real
    time so that :meth:`stop` interrupts them at once; timestamps come from ``clock``.
    """

    MAX_RECORDS = 10_000

    def __init__(
        self,
        clock: Clock,
        *,
        time_factor: float = 1.0,
        max_subscriptions: int = 5,
        attempts_per_group: int = 3,
        groups: int = 5,
        attempt_timeout: float = 30.0,
        group_backoff: float = 30.0,
        attempt_spacing: float = 1.0,
        disable_after: int = 3,
        workers: int = 4,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if time_factor < 0:
            raise ValueError("time_factor must be >= 0")
        for name, value in (
            ("max_subscriptions", max_subscriptions),
            ("attempts_per_group", attempts_per_group),
            ("groups", groups),
            ("disable_after", disable_after),
            ("workers", workers),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        for name, seconds in (
            ("attempt_timeout", attempt_timeout),
            ("group_backoff", group_backoff),
            ("attempt_spacing", attempt_spacing),
        ):
            if seconds < 0:
                raise ValueError(f"{name} must be >= 0, got {seconds}")
        self._clock = clock
        self._time_factor = time_factor
        self._max_subscriptions = max_subscriptions
        self._attempts_per_group = attempts_per_group
        self._groups = groups
        self._attempt_timeout = max(attempt_timeout * time_factor, _MIN_ATTEMPT_TIMEOUT)
        self._group_backoff = group_backoff
        self._attempt_spacing = attempt_spacing
        self._disable_after = disable_after
        self._worker_count = workers

        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._subs: dict[str, Subscription] = {}
        self._records: OrderedDict[str, DeliveryRecord] = OrderedDict()
        # (due on the monotonic clock, tie-breaker, job): retries wait here, not in a worker.
        self._heap: list[tuple[float, int, _Job]] = []
        self._seq = itertools.count()
        self._in_flight = 0
        self._threads: list[threading.Thread] = []
        self._stopped = False

        self._client = httpx.Client(transport=transport, follow_redirects=False)
        # Send only the headers Rillet sends (plus Host and Content-Length), not httpx's defaults.
        self._client.headers.clear()

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> None:
        if self._stopped:
            raise RuntimeError("webhook dispatcher is stopped; create a new one")
        if self._threads:
            return
        for i in range(self._worker_count):
            thread = threading.Thread(target=self._worker, name=f"rillet-webhook-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop the workers and close the HTTP client; undelivered events are marked failed."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            threads = list(self._threads)
            while self._heap:
                _, _, job = heapq.heappop(self._heap)
                self._finish_locked(job, "failed", "dispatcher stopped before delivery")
            self._work.notify_all()
        # A worker in the middle of a POST finishes that one attempt, bounded by its timeout.
        deadline = time.monotonic() + self._attempt_timeout + 1.0
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._client.close()

    def __enter__(self) -> WebhookDispatcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- subscriptions --------------------------------------------------------------------------

    def subscribe(
        self, url: str, tokens: Sequence[str], events: Iterable[str] | None = None
    ) -> Subscription:
        """Register a webhook; returns a snapshot of it (later changes show in subscriptions())."""
        _check_url(url)
        if isinstance(tokens, str):
            raise WebhookConfigError("tokens must be a list of token strings, not one string")
        token_tuple = tuple(tokens)
        if not token_tuple:
            raise WebhookConfigError("a webhook needs at least one token to sign its deliveries")
        if len(token_tuple) > MAX_TOKENS:
            raise WebhookConfigError(
                f"{len(token_tuple)} tokens given; a webhook signs with at most {MAX_TOKENS} "
                "(drop retired tokens once receivers have switched)"
            )
        for position, token in enumerate(token_tuple, start=1):
            try:
                validate_token(token)
            except ValueError as exc:
                raise WebhookConfigError(f"token {position}: {exc}") from None
        event_set = None if events is None else _normalise_events(events)
        sub = Subscription(id=str(uuid.uuid4()), url=url, tokens=token_tuple, events=event_set)
        with self._lock:
            if len(self._subs) >= self._max_subscriptions:
                raise WebhookConfigError(
                    f"Rillet allows at most {self._max_subscriptions} webhooks per organization; "
                    "unsubscribe one first"
                )
            self._subs[sub.id] = sub
            return replace(sub)

    def unsubscribe(self, sub_id: str) -> bool:
        with self._lock:
            if self._subs.pop(sub_id, None) is None:
                return False
            self._drop_jobs_locked(sub_id, "webhook removed before delivery")
            return True

    def subscriptions(self) -> list[Subscription]:
        with self._lock:
            return [replace(s) for s in self._subs.values()]

    def set_enabled(self, sub_id: str, enabled: bool) -> None:
        """Toggle a webhook; re-enabling clears its failure count, as a fresh start."""
        with self._lock:
            sub = self._subs.get(sub_id)
            if sub is None:
                raise KeyError(f"no webhook subscription {sub_id!r}")
            if enabled and not sub.enabled:
                sub.consecutive_failures = 0
            sub.enabled = enabled
            if not enabled:
                self._drop_jobs_locked(sub_id, "webhook disabled before delivery")

    # -- emitting -------------------------------------------------------------------------------

    def emit(self, entity: str, event: str, body: object) -> list[str]:
        """Queue one delivery per enabled subscription that wants ``entity``/``event``.

        ``body`` is the full object, or the id string for ``DELETED``. Unknown entity/event
        names are sent as given (receivers must acknowledge them), but they must be header-safe.
        """
        for label, value in (("entity", entity), ("event", event)):
            if not _HEADER_VALUE.fullmatch(value):
                raise ValueError(
                    f"webhook {label} {value!r} may hold only letters, digits, '_' and '-'"
                )
        payload = encode_body(body)
        timestamp = isoformat_z(self._clock.now())
        ids: list[str] = []
        with self._lock:
            if self._stopped:
                raise RuntimeError("webhook dispatcher is stopped; create a new one")
            targets = [s for s in self._subs.values() if s.enabled and s.wants(entity, event)]
            if not targets:
                return ids
            self._start_locked()
            now = time.monotonic()
            for sub in targets:
                delivery_id = str(uuid.uuid4())
                headers = {
                    "Content-Type": "application/json",
                    "X-Rillet-Signature": signature_header(
                        sub.tokens,
                        timestamp=timestamp,
                        event_id=delivery_id,
                        entity=entity,
                        event=event,
                        body=payload,
                    ),
                    "X-Rillet-Timestamp": timestamp,
                    "X-Rillet-Id": delivery_id,
                    "X-Rillet-Entity": entity,
                    "X-Rillet-Event": event,
                    "User-Agent": USER_AGENT,
                }
                record = DeliveryRecord(
                    id=delivery_id,
                    subscription_id=sub.id,
                    url=sub.url,
                    entity=entity,
                    event=event,
                    timestamp=timestamp,
                )
                self._remember_locked(record)
                heapq.heappush(self._heap, (now, next(self._seq), _Job(record, headers, payload)))
                ids.append(delivery_id)
            self._work.notify_all()
        return ids

    # -- observability --------------------------------------------------------------------------

    def deliveries(self) -> list[DeliveryRecord]:
        """Snapshots of the latest deliveries, oldest first."""
        with self._lock:
            return [replace(r) for r in self._records.values()]

    def delivery(self, delivery_id: str) -> DeliveryRecord | None:
        with self._lock:
            record = self._records.get(delivery_id)
            return None if record is None else replace(record)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no delivery is queued, backing off or in flight; False on timeout."""
        with self._lock:
            return self._idle.wait_for(
                lambda: not self._heap and self._in_flight == 0, timeout=timeout
            )

    # -- internals (callers hold self._lock unless the name says otherwise) ---------------------

    def _remember_locked(self, record: DeliveryRecord) -> None:
        self._records[record.id] = record
        while len(self._records) > self.MAX_RECORDS:
            self._records.popitem(last=False)

    def _finish_locked(self, job: _Job, status: DeliveryStatus, error: str | None) -> None:
        job.record.status = status
        if error is not None:
            job.record.last_error = error

    def _notify_if_idle_locked(self) -> None:
        if not self._heap and self._in_flight == 0:
            self._idle.notify_all()

    def _drop_jobs_locked(self, sub_id: str, reason: str) -> None:
        kept = []
        for entry in self._heap:
            if entry[2].record.subscription_id == sub_id:
                self._finish_locked(entry[2], "failed", reason)
            else:
                kept.append(entry)
        if len(kept) != len(self._heap):
            heapq.heapify(kept)
            self._heap = kept
            self._notify_if_idle_locked()

    def _delay_after(self, attempts: int) -> float:
        """Real seconds to wait after the ``attempts``-th failed attempt."""
        if attempts % self._attempts_per_group == 0:
            group_index = attempts // self._attempts_per_group - 1
            return self._group_backoff * 2**group_index * self._time_factor
        return self._attempt_spacing * self._time_factor

    def _worker(self) -> None:
        while True:
            with self._lock:
                job = self._next_job_locked()
                if job is None:
                    return
            status_code, error = self._attempt_unlocked(job)
            with self._lock:
                self._in_flight -= 1
                self._after_attempt_locked(job, status_code, error)
                self._notify_if_idle_locked()

    def _next_job_locked(self) -> _Job | None:
        while not self._stopped:
            if self._heap:
                wait = self._heap[0][0] - time.monotonic()
                if wait <= 0:
                    _, _, job = heapq.heappop(self._heap)
                    self._in_flight += 1
                    return job
                self._work.wait(wait)
            else:
                self._work.wait()
        return None

    def _attempt_unlocked(self, job: _Job) -> tuple[int | None, str | None]:
        try:
            response = self._client.post(
                job.record.url, content=job.body, headers=job.headers, timeout=self._attempt_timeout
            )
        except Exception as exc:
            # Any failure to get a response (refused, reset, timeout, client closed by stop) is
            # one failed attempt, never a crashed worker.
            return None, f"{type(exc).__name__}: {exc}"
        if 200 <= response.status_code < 300:
            return response.status_code, None
        return response.status_code, f"HTTP {response.status_code}"

    def _after_attempt_locked(self, job: _Job, status_code: int | None, error: str | None) -> None:
        record = job.record
        record.attempts += 1
        record.last_status_code = status_code
        record.last_error = error
        sub = self._subs.get(record.subscription_id)
        if error is None:
            record.status = "delivered"
            if sub is not None:
                sub.consecutive_failures = 0
            return
        if sub is None or not sub.enabled:
            # Rillet stops sending to a removed or disabled webhook; that is not the receiver's
            # failure, so it does not count towards disabling.
            reason = "removed" if sub is None else "disabled"
            self._finish_locked(job, "failed", f"{error}; webhook {reason}, no more retries")
            return
        if self._stopped:
            self._finish_locked(job, "failed", f"{error}; dispatcher stopped, no more retries")
            return
        if record.attempts >= self._groups * self._attempts_per_group:
            record.status = "failed"
            sub.consecutive_failures += 1
            if sub.consecutive_failures >= self._disable_after:
                sub.enabled = False
                self._drop_jobs_locked(sub.id, "webhook disabled after repeated failures")
            return
        due = time.monotonic() + self._delay_after(record.attempts)
        heapq.heappush(self._heap, (due, next(self._seq), job))
        self._work.notify()
