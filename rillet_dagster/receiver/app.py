"""The webhook receiver: ``POST /webhooks/rillet`` verifies, stores durably, then acknowledges.

Per delivery, in this order (the cheap, client-independent checks first):

1. ``Content-Type`` must be JSON (415); a declared ``Content-Length`` above the cap is refused
   at once (413).
2. The five ``X-Rillet-*`` headers are checked strictly (400), see
   :mod:`rillet_dagster.rillet.signatures`.
3. The body is read as a stream and cut off at the cap, whatever ``Content-Length`` claimed
   (413), and within ``body_timeout`` seconds (408), so a slow sender cannot hold a worker.
   Bodies held in memory across *all* connections share one budget, ``max_buffered_bytes``: a
   request that would exceed it is answered 503 with ``Retry-After`` before its body is read
   (its whole ``Content-Length`` is reserved up front; a chunked body reserves as it arrives).
   Per-request caps alone allow ``limit_concurrency`` x ``max_body_bytes``, gigabytes.
4. The signature over the raw bytes must match a configured token (401).
5. Timestamp policy: beyond the future skew 400; older than ``max_age`` 400 unless the id is
   already stored (then it is a redelivery: 200).
6. The event is inserted into the queue and committed (SQLite ``synchronous=FULL``) before the
   200. Storage that fails or takes longer than ``storage_timeout`` gives 503, never a 2xx.

A validly signed body that is not JSON of the expected shape, or that nests deeper than
:data:`MAX_JSON_DEPTH` (found by a flat scan before anything parses it recursively), is stored as
``poison``, an entity or event the catalog does not know as ``unknown``: both are acknowledged
(Rillet requires 2xx for unknown events) and kept for inspection. Refusals are RFC 9457
``application/problem+json`` and store nothing.

Inserts go through one writer task that commits whatever has queued up while the previous
commit ran (group commit): every request still waits for the commit holding its own row, but
one fsync serves many requests, so ``synchronous=FULL`` costs latency, not throughput.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import anyio
from sqlalchemy import Engine, exc, text
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rillet_dagster import catalog
from rillet_dagster.clock import Clock, SystemClock
from rillet_dagster.rillet.signatures import (
    MIN_TOKEN_BYTES,
    NEW_KEY_COMMAND,
    TimestampPolicy,
    WebhookHeaderError,
    WebhookHeaders,
    decode_token,
    parse_headers,
    verify,
)
from rillet_dagster.warehouse.state import (
    QueuedEvent,
    canonical_name,
    count_duplicate,
    enqueue_many,
    ensure_state_schema,
    make_state_engine,
)

logger = logging.getLogger("rillet_dagster.receiver")

WEBHOOK_PATH = "/webhooks/rillet"
HEALTH_PATH = "/health"
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
# 64 concurrent bodies of the largest size: 1,000 slow senders peak at about 210 MB of RSS
# (BENCHMARKS.md), where the per-request cap alone let them take 1.2 GiB.
DEFAULT_MAX_BUFFERED_BYTES = 64 * 1024 * 1024
BUSY_RETRY_AFTER_SECONDS = 5
PROBLEM_TYPE_BASE = "https://rillet-dagster.invalid/problems/"
# Rillet's records nest a handful of levels. Beyond this a body is poison: json.loads would recurse
# (RecursionError at ~1,000 levels), and the apply side's JSON walkers run inside Dagster's own
# deep stack, so the bound leaves them room under Python's recursion limit.
MAX_JSON_DEPTH = 256

# A JSON string with its escapes; possessive, so a long string is one linear pass.
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_BRACKET_STEP = tuple(1 if b in b"[{" else -1 if b in b"]}" else 0 for b in range(256))


def json_nesting_depth(body: bytes) -> int:
    """How deep arrays and objects nest in ``body``, found without recursion or parsing."""
    structure = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    return max(itertools.accumulate(map(_BRACKET_STEP.__getitem__, structure)), default=0)


@dataclass(frozen=True)
class ReceiverConfig:
    """How the receiver runs; ``secrets`` are base64 webhook tokens (never shown in reprs).

    Attributes:
        state_url: SQLAlchemy URL of the state database holding the queue.
        secrets: accepted webhook tokens (several during a rotation).
        max_body_bytes: largest accepted body.
        max_buffered_bytes: request bodies held in memory across all connections at once
            (at least ``max_body_bytes``); beyond it requests are answered 503.
        timestamp_policy: accepted event times.
        body_timeout: seconds a client gets to send the whole body.
        storage_timeout: seconds a request waits for its commit before answering 503.
        busy_timeout: SQLite lock wait, kept below ``storage_timeout``.
        max_batch: most events in one commit.
        clock: the time source for the timestamp policy and ``received_at``.
    """

    state_url: str = field(repr=False)  # may hold a password
    secrets: tuple[str, ...] = field(default=(), repr=False)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES
    timestamp_policy: TimestampPolicy = field(default_factory=TimestampPolicy)
    body_timeout: float = 10.0
    storage_timeout: float = 8.0
    busy_timeout: float = 5.0
    max_batch: int = 512
    clock: Clock = field(default_factory=SystemClock, repr=False)

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1:
            raise ValueError("max_body_bytes must be at least 1")
        if self.max_buffered_bytes < self.max_body_bytes:
            raise ValueError(
                f"max_buffered_bytes ({self.max_buffered_bytes}) must be at least max_body_bytes "
                f"({self.max_body_bytes}), or a body of the largest size could never be received"
            )


def receiver_keys(tokens: Sequence[str]) -> list[bytes]:
    """The HMAC keys of ``tokens``, each at least :data:`MIN_TOKEN_BYTES` long.

    Raises ``ValueError`` naming the token's position (never its value) and how to get a good one.
    """
    keys = []
    for position, token in enumerate(tokens, start=1):
        try:
            keys.append(decode_token(token, min_bytes=MIN_TOKEN_BYTES))
        except ValueError as error:
            raise ValueError(
                f"webhook token {position}: {error}; copy the whole Webhook Token that Rillet "
                f"shows, or for a sender of your own generate one with: {NEW_KEY_COMMAND}"
            ) from None
    return keys


class StorageUnavailable(RuntimeError):
    """The queue could not commit in time; the delivery must not be acknowledged."""


class _BodyTooLarge(Exception):
    pass


class _OverBudget(Exception):
    pass


class BufferBudget:
    """Bytes of request bodies that all connections together may hold in memory.

    Only touched from the event loop's thread, between awaits, so it needs no lock.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    @contextlib.contextmanager
    def hold(self) -> Iterator[_Hold]:
        """A reservation that is given back however the request ends (errors, disconnects)."""
        held = _Hold(self)
        try:
            yield held
        finally:
            self.used -= held.size


class _Hold:
    def __init__(self, budget: BufferBudget) -> None:
        self._budget = budget
        self.size = 0

    def cover(self, size: int) -> None:
        """Hold ``size`` bytes in all; raises :class:`_OverBudget` if the budget has no room."""
        extra = size - self.size
        if extra <= 0:
            return
        if self._budget.used + extra > self._budget.limit:
            raise _OverBudget
        self._budget.used += extra
        self.size = size


@dataclass
class _Job:
    item: QueuedEvent
    # "enqueue": insert unless present; "duplicate": count a redelivery of a stored id only.
    kind: str
    future: asyncio.Future[bool]


class QueueWriter:
    """The single writer of the queue: batches pending inserts into one transaction each."""

    def __init__(self, engine: Engine, *, max_batch: int = 512) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self._jobs: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task[None] | None = None
        self._schema_ready = False

    async def start(self) -> None:
        self._jobs = asyncio.Queue()
        self._task = asyncio.create_task(self._run(), name="rillet-webhook-queue-writer")
        try:
            await anyio.to_thread.run_sync(self._ensure_schema)
        except exc.SQLAlchemyError as error:
            # The receiver still starts: it answers 503 until storage is back, so Rillet retries.
            logger.warning("webhook queue storage unavailable at start: %s", type(error).__name__)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._engine.dispose()

    async def submit(self, kind: str, item: QueuedEvent, timeout: float) -> bool:
        """Queue one write and wait for its commit; raises :class:`StorageUnavailable`."""
        assert self._jobs is not None, "QueueWriter.start() was not awaited"
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._jobs.put_nowait(_Job(item, kind, future))
        try:
            # shield: a timed-out request leaves its job in the batch; the answer is then 503,
            # and if the row commits after all, Rillet's retry is simply a duplicate.
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            raise StorageUnavailable(f"no commit within {timeout:g} s") from None

    async def _run(self) -> None:
        assert self._jobs is not None
        while True:
            batch = [await self._jobs.get()]
            while len(batch) < self._max_batch and not self._jobs.empty():
                batch.append(self._jobs.get_nowait())
            try:
                results = await anyio.to_thread.run_sync(self._write, batch)
            except Exception as error:
                failure = StorageUnavailable(f"queue storage failed: {type(error).__name__}")
                logger.warning("webhook queue write failed: %s", type(error).__name__)
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(failure)
                continue
            for job, result in zip(batch, results, strict=True):
                if job.future.done():
                    continue
                if isinstance(result, Exception):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    def _ensure_schema(self) -> None:
        with self._engine.begin() as connection:
            ensure_state_schema(connection)
        self._schema_ready = True

    def _write_batch(self, batch: list[_Job]) -> list[bool]:
        if not self._schema_ready:
            self._ensure_schema()
        inserts = [job for job in batch if job.kind == "enqueue"]
        results: dict[int, bool] = {}
        with self._engine.begin() as connection:
            new = enqueue_many(connection, [job.item for job in inserts])
            results.update(zip(map(id, inserts), new, strict=True))
            for job in batch:
                if job.kind == "duplicate":
                    item = job.item
                    results[id(job)] = count_duplicate(connection, item.id, item.received_at)
        return [results[id(job)] for job in batch]

    def _write(self, batch: list[_Job]) -> list[bool | Exception]:
        try:
            try:
                return list(self._write_batch(batch))
            except exc.DBAPIError as error:
                if not error.connection_invalidated:
                    raise
            # A pooled connection the server dropped (restart, idle timeout): the transaction
            # did not commit, so one retry on a fresh connection is safe. Had the commit gone
            # through after all, the retry finds the ids and counts duplicates: still stored.
            return list(self._write_batch(batch))
        except (exc.IntegrityError, exc.DataError):
            if len(batch) == 1:
                raise
        # One row the database refuses must not fail the others that shared its transaction.
        out: list[bool | Exception] = []
        for job in batch:
            try:
                out.extend(self._write_batch([job]))
            except (exc.IntegrityError, exc.DataError) as error:
                out.append(StorageUnavailable(f"queue refused the event: {type(error).__name__}"))
        return out

    def ping(self) -> None:
        with self._engine.connect() as connection:
            connection.execute(text("SELECT 1"))


def _problem(
    status: int, title: str, detail: str, *, close: bool = False, retry_after: int | None = None
) -> Response:
    slug = title.lower().replace(" ", "-")
    body = {"type": PROBLEM_TYPE_BASE + slug, "title": title, "status": status, "detail": detail}
    headers = {"Connection": "close"} if close else {}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return Response(
        json.dumps(body).encode(),
        status_code=status,
        media_type="application/problem+json",
        headers=headers,
    )


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


def classify(headers: WebhookHeaders, body: bytes) -> tuple[str, str | None]:
    """The queue status of a validly signed delivery and, for poison, why."""
    spec = catalog.webhook_entity(headers.entity)
    event = canonical_name(headers.event)
    depth = json_nesting_depth(body)
    if depth > MAX_JSON_DEPTH:
        return "poison", f"body nests {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted"
    try:
        payload = json.loads(body)
    except ValueError as error:  # includes invalid UTF-8 (UnicodeDecodeError)
        return "poison", f"body is not JSON: {type(error).__name__}"
    if spec is None or event not in {e.value for e in spec.webhook_events}:
        return "unknown", None
    if event == catalog.WebhookEvent.DELETED:
        is_id = isinstance(payload, str) and bool(payload)
        # Rillet sends the bare id; an object carrying the id is the same information.
        if is_id or (isinstance(payload, dict) and "id" in payload):
            return "pending", None
        return "poison", "a DELETED body must be the deleted id (a JSON string)"
    if not isinstance(payload, dict) or not isinstance(payload.get("id"), str):
        return "poison", f"a {event} body must be a JSON object with a string id"
    return "pending", None


def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    # The HTTP parser has checked it; ASCII digits only all the same (str.isdigit takes "²").
    if value is None or not (value.isascii() and value.isdigit()):
        return None
    digits = value.lstrip("0")
    # int() refuses more than 4,300 digits (a 500 once, for leading zeros httptools lets through);
    # 19 digits or more exceed any cap.
    return int(digits or "0") if len(digits) <= 18 else 10**18


async def _read_body(request: Request, limit: int, held: _Hold) -> bytes:
    """The body, cut off above ``limit``; every byte kept is covered by ``held`` first."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        held.cover(size)
        chunks.append(chunk)
    # One exact-size copy (none for a single chunk), where a growing bytearray reallocates as it
    # goes and bytes() of it copies once more: less churn, less heap fragmentation left behind.
    return b"".join(chunks)


@dataclass
class _Counters:
    """In-process counters for the health route (the queue itself holds the durable ones)."""

    values: dict[str, int] = field(default_factory=dict)

    def add(self, name: str) -> None:
        self.values[name] = self.values.get(name, 0) + 1


def create_app(config: ReceiverConfig, *, engine: Engine | None = None) -> Starlette:
    """The receiver as an ASGI app; ``engine`` overrides the one built from ``state_url``."""
    if not config.secrets:
        raise ValueError("the webhook receiver needs at least one webhook token")
    keys = receiver_keys(config.secrets)
    # No pre-ping: it costs a round trip per commit; the writer retries a dropped connection.
    state_engine = engine or make_state_engine(
        config.state_url, busy_timeout_seconds=config.busy_timeout, pre_ping=False
    )
    writer = QueueWriter(state_engine, max_batch=config.max_batch)
    counters = _Counters()
    budget = BufferBudget(config.max_buffered_bytes)
    policy = config.timestamp_policy
    too_large = f"the body may hold at most {config.max_body_bytes} bytes"

    def refuse(reason: str, status: int, title: str, detail: str, **kw: Any) -> Response:
        counters.add(f"refused_{reason}")
        logger.info("refused webhook delivery: %s (%d)", reason, status)
        return _problem(status, title, detail, **kw)

    async def receive(request: Request) -> Response:
        if not _is_json(request.headers.get("content-type")):
            return refuse("content_type", 415, "Unsupported Media Type", "send application/json")
        declared = _declared_length(request)
        if declared is not None and declared > config.max_body_bytes:
            return refuse("too_large", 413, "Payload Too Large", too_large, close=True)
        try:
            headers = parse_headers(request.headers.getlist)
        except WebhookHeaderError as error:
            return refuse("header", 400, "Invalid Webhook Header", str(error))
        # Held until the answer: the body stays in memory through verification and the commit.
        with budget.hold() as held:
            try:
                if declared is not None:
                    held.cover(declared)
                with anyio.fail_after(config.body_timeout):
                    body = await _read_body(request, config.max_body_bytes, held)
            except _OverBudget:
                return refuse(
                    "busy",
                    503,
                    "Service Unavailable",
                    "too many deliveries in progress; retry later",
                    close=True,
                    retry_after=BUSY_RETRY_AFTER_SECONDS,
                )
            except _BodyTooLarge:
                return refuse("too_large", 413, "Payload Too Large", too_large, close=True)
            except TimeoutError:
                return refuse(
                    "body_timeout",
                    408,
                    "Request Timeout",
                    f"the body did not arrive within {config.body_timeout:g} s",
                    close=True,
                )
            except ClientDisconnect:
                # Nobody is left to read the answer; the sender's retry is a new request.
                return refuse("disconnected", 400, "Client Disconnected", "the body was cut off")
            return await store(headers, body)

    async def store(headers: WebhookHeaders, body: bytes) -> Response:
        if not verify(headers, body, keys):
            return refuse("signature", 401, "Invalid Signature", "no signature matches")
        now = config.clock.now()
        verdict = policy.check(headers.event_time, now)
        if verdict == "future":
            return refuse(
                "future",
                400,
                "Timestamp In The Future",
                f"X-Rillet-Timestamp is more than {policy.max_future} ahead of this server",
            )
        status, error = classify(headers, body)
        item = QueuedEvent(
            id=headers.event_id.lower(),
            entity=canonical_name(headers.entity),
            event=canonical_name(headers.event),
            received_at=now,
            event_timestamp=headers.event_time,
            body=body,
            status=status,  # type: ignore[arg-type]
            error=error,
        )
        try:
            if verdict == "stale":
                # Too old to accept as new, but a redelivery of an event we hold is harmless.
                if not await writer.submit("duplicate", item, config.storage_timeout):
                    return refuse(
                        "stale",
                        400,
                        "Timestamp Too Old",
                        f"X-Rillet-Timestamp is more than {policy.max_age} old",
                    )
                new = False
            else:
                new = await writer.submit("enqueue", item, config.storage_timeout)
        except StorageUnavailable as failure:
            counters.add("storage_unavailable")
            logger.warning("webhook delivery not stored: %s", failure)
            return _problem(503, "Service Unavailable", "the event could not be stored; retry")
        outcome = status if new else "duplicate"
        counters.add(outcome)
        return JSONResponse({"id": item.id, "status": outcome})

    async def health(_request: Request) -> Response:
        try:
            with anyio.fail_after(config.storage_timeout):
                await anyio.to_thread.run_sync(writer.ping)
        except (TimeoutError, exc.SQLAlchemyError) as error:
            return JSONResponse(
                {
                    "status": "unavailable",
                    "storage": type(error).__name__,
                    "buffered_bytes": budget.used,
                },
                status_code=503,
            )
        return JSONResponse(
            {"status": "ok", "counters": dict(counters.values), "buffered_bytes": budget.used}
        )

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await writer.start()
        try:
            yield
        finally:
            await writer.stop()

    async def http_error(_request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        title = {404: "Not Found", 405: "Method Not Allowed"}.get(error.status_code, "Error")
        return _problem(error.status_code, title, str(error.detail))

    app = Starlette(
        exception_handlers={404: http_error, 405: http_error},
        routes=[
            Route(WEBHOOK_PATH, receive, methods=["POST"]),
            Route(HEALTH_PATH, health, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.counters = counters.values
    app.state.buffer_budget = budget
    return app


def timestamp_policy(
    max_future_seconds: float = 300.0, max_age_seconds: float | None = 7 * 86400.0
) -> TimestampPolicy:
    return TimestampPolicy(
        max_future=timedelta(seconds=max_future_seconds),
        max_age=None if max_age_seconds is None else timedelta(seconds=max_age_seconds),
    )
