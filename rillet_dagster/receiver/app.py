"""The webhook receiver: ``POST /webhooks/rillet`` verifies, stores durably, then acknowledges.

Per delivery, in this order (the cheap, client-independent checks first):

1. ``Content-Type`` must be JSON (415); a declared ``Content-Length`` above the cap is refused
   at once (413).
2. The five ``X-Rillet-*`` headers are checked strictly (400), see
   :mod:`rillet_dagster.rillet.signatures`.
3. The body is read as a stream and cut off at the cap, whatever ``Content-Length`` claimed
   (413), and within ``body_timeout`` seconds (408), so a slow sender cannot hold a worker.
4. The signature over the raw bytes must match a configured token (401).
5. Timestamp policy: beyond the future skew 400; older than ``max_age`` 400 unless the id is
   already stored (then it is a redelivery: 200).
6. The event is inserted into the queue and committed (SQLite ``synchronous=FULL``) before the
   200. Storage that fails or takes longer than ``storage_timeout`` gives 503, never a 2xx.

A validly signed body that is not JSON of the expected shape is stored as ``poison``, an entity
or event the catalog does not know as ``unknown``: both are acknowledged (Rillet requires 2xx
for unknown events) and kept for inspection. Refusals are RFC 9457 ``application/problem+json``
and store nothing.

Inserts go through one writer task that commits whatever has queued up while the previous
commit ran (group commit): every request still waits for the commit holding its own row, but
one fsync serves many requests, so ``synchronous=FULL`` costs latency, not throughput.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import anyio
from sqlalchemy import Engine, exc, text
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rillet_dagster import catalog
from rillet_dagster.clock import Clock, SystemClock
from rillet_dagster.rillet.signatures import (
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
PROBLEM_TYPE_BASE = "https://rillet-dagster.invalid/problems/"


@dataclass(frozen=True)
class ReceiverConfig:
    """How the receiver runs; ``secrets`` are base64 webhook tokens (never shown in reprs).

    Attributes:
        state_url: SQLAlchemy URL of the state database holding the queue.
        secrets: accepted webhook tokens (several during a rotation).
        max_body_bytes: largest accepted body.
        timestamp_policy: accepted event times.
        body_timeout: seconds a client gets to send the whole body.
        storage_timeout: seconds a request waits for its commit before answering 503.
        busy_timeout: SQLite lock wait, kept below ``storage_timeout``.
        max_batch: most events in one commit.
        clock: the time source for the timestamp policy and ``received_at``.
    """

    state_url: str
    secrets: tuple[str, ...] = field(default=(), repr=False)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    timestamp_policy: TimestampPolicy = field(default_factory=TimestampPolicy)
    body_timeout: float = 10.0
    storage_timeout: float = 8.0
    busy_timeout: float = 5.0
    max_batch: int = 512
    clock: Clock = field(default_factory=SystemClock, repr=False)


class StorageUnavailable(RuntimeError):
    """The queue could not commit in time; the delivery must not be acknowledged."""


class _BodyTooLarge(Exception):
    pass


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


def _problem(status: int, title: str, detail: str, *, close: bool = False) -> Response:
    slug = title.lower().replace(" ", "-")
    body = {"type": PROBLEM_TYPE_BASE + slug, "title": title, "status": status, "detail": detail}
    headers = {"Connection": "close"} if close else None
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


async def _read_body(request: Request, limit: int) -> bytes:
    chunks = bytearray()
    async for chunk in request.stream():
        chunks += chunk
        if len(chunks) > limit:
            raise _BodyTooLarge
    return bytes(chunks)


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
    keys: list[bytes] = []
    for position, token in enumerate(config.secrets, start=1):
        try:
            keys.append(decode_token(token))
        except ValueError as error:
            raise ValueError(f"webhook token {position}: {error}") from None
    # No pre-ping: it costs a round trip per commit; the writer retries a dropped connection.
    state_engine = engine or make_state_engine(
        config.state_url, busy_timeout_seconds=config.busy_timeout, pre_ping=False
    )
    writer = QueueWriter(state_engine, max_batch=config.max_batch)
    counters = _Counters()
    policy = config.timestamp_policy

    def refuse(reason: str, status: int, title: str, detail: str, **kw: Any) -> Response:
        counters.add(f"refused_{reason}")
        logger.info("refused webhook delivery: %s (%d)", reason, status)
        return _problem(status, title, detail, **kw)

    async def receive(request: Request) -> Response:
        if not _is_json(request.headers.get("content-type")):
            return refuse("content_type", 415, "Unsupported Media Type", "send application/json")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_body_bytes:
            return refuse(
                "too_large",
                413,
                "Payload Too Large",
                f"the body may hold at most {config.max_body_bytes} bytes",
                close=True,
            )
        try:
            headers = parse_headers(request.headers.getlist)
        except WebhookHeaderError as error:
            return refuse("header", 400, "Invalid Webhook Header", str(error))
        try:
            with anyio.fail_after(config.body_timeout):
                body = await _read_body(request, config.max_body_bytes)
        except _BodyTooLarge:
            return refuse(
                "too_large",
                413,
                "Payload Too Large",
                f"the body may hold at most {config.max_body_bytes} bytes",
                close=True,
            )
        except TimeoutError:
            return refuse(
                "body_timeout",
                408,
                "Request Timeout",
                f"the body did not arrive within {config.body_timeout:g} s",
                close=True,
            )
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
                {"status": "unavailable", "storage": type(error).__name__}, status_code=503
            )
        return JSONResponse({"status": "ok", "counters": dict(counters.values)})

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
    return app


def timestamp_policy(
    max_future_seconds: float = 300.0, max_age_seconds: float | None = 7 * 86400.0
) -> TimestampPolicy:
    return TimestampPolicy(
        max_future=timedelta(seconds=max_future_seconds),
        max_age=None if max_age_seconds is None else timedelta(seconds=max_age_seconds),
    )
