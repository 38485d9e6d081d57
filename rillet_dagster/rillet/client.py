"""The Rillet client: every API rule in one place, over one ``httpx.Client``.

Every request takes a slot from the shared rate budget first (one budget per API key across all
runs and processes, see :mod:`ratelimit`), is retried with full-jitter exponential backoff when
that is safe (429, 5xx, timeouts, dropped connections; a POST only with an Idempotency-Key), and
turns Rillet's problem responses into typed errors. Lists are read lazily, page by page; money
arrives as exact Decimals (``json.loads(..., parse_float=Decimal)``), never floats.
"""

from __future__ import annotations

import json
import math
import random
import re
import ssl
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Protocol
from urllib.parse import quote

import httpx

from rillet_dagster import catalog
from rillet_dagster.catalog import EntitySpec, FilterOp
from rillet_dagster.clock import Clock, SystemClock
from rillet_dagster.rillet.errors import (
    DEFAULT_MAX_RETRY_AFTER_SECONDS,
    AuthenticationError,
    ConflictError,
    InvalidRecordIdError,
    MalformedResponseError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    RilletAPIError,
    RilletConnectionError,
    RilletError,
    ServerError,
    error_from_response,
)
from rillet_dagster.rillet.pagination import RecordStream
from rillet_dagster.settings import API_KEY_VAR, BASE_URL_VAR, resolve_base_url

try:
    _VERSION = version("rillet-dagster")
except PackageNotFoundError:  # running from a source tree without installation
    _VERSION = "0"

USER_AGENT = f"rillet-dagster/{_VERSION}"
PAGE_SIZE = catalog.MAX_PAGE_SIZE
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_UUID = re.compile(catalog.UUID_PATTERN)


class Budget(Protocol):
    """The shared rate budget (``ratelimit.RateBudget``) as the client uses it."""

    waited_seconds: float

    def slot(self) -> AbstractContextManager[int]: ...

    def pause(self, seconds: float) -> None: ...


@dataclass(frozen=True)
class RetryPolicy:
    """Full-jitter exponential backoff (each delay uniform in [0, min(cap, base * 2**n)])."""

    max_attempts: int = 6
    base_seconds: float = 1.0
    cap_seconds: float = 60.0
    max_total_seconds: float = 600.0
    # A bare 429 says the window is full: every process sharing the key pauses this long, and
    # this one adds its own backoff on top so that they do not all come back at once.
    rate_limited_seconds: float = 5.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.base_seconds < 0 or self.cap_seconds < 0:
            raise ValueError("retry policy needs max_attempts >= 1 and non-negative delays")

    def delay(self, retry: int, rng: random.Random) -> float:
        """The delay before retry number ``retry`` (0-based)."""
        return rng.uniform(0, min(self.cap_seconds, self.base_seconds * 2**retry))


@dataclass
class ClientStats:
    """What one client did, so that assets can report it."""

    requests: int = 0
    pages: int = 0
    records: int = 0
    retries: int = 0
    rate_limited: int = 0
    budget_wait_seconds: float = 0.0
    cursor_restarts: int = 0
    by_status: dict[int, int] = field(default_factory=dict)

    def as_metadata(self) -> dict[str, int | float]:
        return {
            "requests": self.requests,
            "pages": self.pages,
            "records": self.records,
            "retries": self.retries,
            "rate_limited_429s": self.rate_limited,
            "budget_wait_seconds": round(self.budget_wait_seconds, 3),
            "cursor_restarts": self.cursor_restarts,
        }


def format_timestamp(moment: datetime) -> str:
    """``updated.gt`` form: UTC with microseconds and ``Z``."""
    if moment.tzinfo is None:
        raise ValueError(f"timestamp {moment!r} has no timezone; pass an aware UTC datetime")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


class RilletClient:
    """One connection pool to Rillet (or the sandbox) for one API key.

    Args:
        api_key: the bearer key (never logged, never in errors or ``repr``).
        base_url: ``"sandbox"``, ``"production"`` or any http(s) URL (the local simulator).
        api_version: sent as ``X-Rillet-API-Version`` on every request.
        timeout: seconds per request (connect, read, write, pool).
        budget: the shared rate budget; ``None`` only for tests and one-off scripts.
        retry: backoff policy for retriable failures.
        lookback: overlap subtracted from incremental watermarks (records are deduplicated).
        clock: time source for backoff sleeps, watermarks and ``Retry-After`` dates.
        transport: an httpx transport (tests may inject one).
        max_retry_after_seconds: the longest ``Retry-After`` believed (on 429 and 503); a
            longer or malformed one counts as absent. Give the budget the same bound.
        verify: TLS certificate verification, as httpx takes it: ``True`` (the default trust
            store), an ``ssl.SSLContext`` (a private certificate authority) or ``False``
            (development only; the production profile refuses it). Ignored with ``transport``.
    """

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str = "sandbox",
        api_version: int = catalog.DEFAULT_API_VERSION,
        timeout: float = 30.0,
        budget: Budget | None = None,
        retry: RetryPolicy | None = None,
        lookback: timedelta = timedelta(minutes=5),
        clock: Clock | None = None,
        transport: httpx.BaseTransport | None = None,
        seed: int | None = None,
        max_cursor_restarts: int = 3,
        max_retry_after_seconds: float = DEFAULT_MAX_RETRY_AFTER_SECONDS,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        if not api_key or not api_key.strip():
            raise ValueError(
                f"no Rillet API key: set {API_KEY_VAR} (sandbox and production keys differ)"
            )
        if api_version not in catalog.API_VERSIONS:
            raise ValueError(f"api_version {api_version} is not one of {catalog.API_VERSIONS}")
        if timeout <= 0:
            raise ValueError("timeout must be a positive number of seconds")
        if not (math.isfinite(max_retry_after_seconds) and max_retry_after_seconds > 0):
            raise ValueError(
                f"max_retry_after_seconds must be a positive number, got {max_retry_after_seconds}"
            )
        self.base_url = resolve_base_url(base_url)
        self.api_version = api_version
        self.budget = budget
        self.retry = retry or RetryPolicy()
        self.lookback = lookback
        self.clock = clock or SystemClock()
        self.max_cursor_restarts = max_cursor_restarts
        self.max_retry_after_seconds = float(max_retry_after_seconds)
        self.stats = ClientStats()
        self._rng = random.Random(seed)
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            transport=transport,
            verify=verify,
            headers={
                "Authorization": f"Bearer {api_key.strip()}",
                "X-Rillet-API-Version": str(api_version),
                "Accept": "application/json",
                "User-Agent": USER_AGENT,
            },
        )

    def __repr__(self) -> str:
        return f"RilletClient(base_url={self.base_url!r}, api_version={self.api_version})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RilletClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- the request core ----------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        idempotency_key: str | None = None,
    ) -> Any:
        """Send one API call (with budget, retries and typed errors); the parsed JSON body.

        Returns ``None`` for empty (204) responses.
        """
        headers: dict[str, str] = {}
        content: bytes | None = None
        if body is not None:
            content = json.dumps(body, default=_json_default, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        if idempotency_key is not None:
            if method != "POST":
                raise ValueError("Idempotency-Key only applies to POST requests")
            headers["Idempotency-Key"] = idempotency_key
        # A POST without an Idempotency-Key could create twice; everything else is safe to repeat.
        may_retry = method != "POST" or idempotency_key is not None
        started = self.clock.time()
        retries = 0
        while True:
            error, body_or_none = self._attempt(method, path, params, content, headers)
            if error is None:
                return body_or_none
            retriable = may_retry and _is_retriable(error, idempotency_key)
            if not retriable or retries + 1 >= self.retry.max_attempts:
                raise error
            wait = self._retry_wait(error, retries)
            if self.clock.time() + wait - started > self.retry.max_total_seconds:
                raise error
            retries += 1
            self.stats.retries += 1
            self.clock.sleep(wait)

    def _retry_wait(self, error: RilletError, retries: int) -> float:
        """Seconds before the next try; after a 429 the shared budget is paused as well."""
        backoff = self.retry.delay(retries, self._rng)
        retry_after = error.retry_after if isinstance(error, RilletAPIError) else None
        if retry_after is not None:
            # Set only for 429/503 and already bounded when parsed; bounded again here because
            # anyone can build an error with any value.
            retry_after = min(retry_after, self.max_retry_after_seconds)
        if isinstance(error, RateLimitedError):
            pause = retry_after if retry_after is not None else self.retry.rate_limited_seconds
            if self.budget is not None:
                self.budget.pause(pause)
            if retry_after is None:
                # No server value: the floor is shared, the jitter is ours, so that processes
                # released by the same pause do not all retry at the same instant.
                return pause + backoff
        return backoff if retry_after is None else max(backoff, retry_after)

    def _attempt(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None,
        content: bytes | None,
        headers: dict[str, str],
    ) -> tuple[RilletError | None, Any]:
        slot: AbstractContextManager[Any] = self.budget.slot() if self.budget else nullcontext()
        waited_before = self.budget.waited_seconds if self.budget else 0.0
        with slot:
            if self.budget is not None:
                self.stats.budget_wait_seconds += self.budget.waited_seconds - waited_before
            self.stats.requests += 1
            try:
                response = self._http.request(
                    method, path, params=params, content=content, headers=headers
                )
            except httpx.TimeoutException as exc:
                return RilletConnectionError(
                    f"Rillet {method} {path}: no answer from {self.base_url} within the "
                    f"timeout ({type(exc).__name__})"
                ), None
            except httpx.TransportError as exc:
                return RilletConnectionError(
                    f"Rillet {method} {path}: could not talk to {self.base_url} "
                    f"({type(exc).__name__}: {exc}). Check {BASE_URL_VAR} and the network."
                ), None
        status = response.status_code
        self.stats.by_status[status] = self.stats.by_status.get(status, 0) + 1
        if status == 429:
            self.stats.rate_limited += 1
        if not 200 <= status < 300:
            error = error_from_response(
                response,
                method,
                path,
                now=self.clock.now(),
                max_retry_after=self.max_retry_after_seconds,
            )
            return error, None
        if not response.content:
            return None, None
        try:
            return None, json.loads(response.content, parse_float=Decimal)
        except (ValueError, UnicodeDecodeError):
            return MalformedResponseError(
                f"Rillet {method} {path} -> {status} with a body that is not JSON "
                f"({len(response.content)} bytes)"
            ), None

    # ---- reads -----------------------------------------------------------------------------

    def iter_records(
        self,
        entity: str,
        *,
        updated_since: datetime | None = None,
        **filters: str,
    ) -> RecordStream:
        """Lazily yield every record of ``entity`` matching ``filters``, page by page.

        With ``updated_since`` only records updated after it (less the look-back overlap) are
        read; after the stream is exhausted, ``stream.watermark`` is the value to pass next
        time. Records are deduplicated by id within the pass, and a cursor that expired
        mid-pass (Rillet silently restarts at page 1) is detected and skipped past.
        """
        spec = catalog.entity(entity)
        if spec.single or spec.parent:
            raise ValueError(
                f"{entity} is not a list: use get_single() or the per-parent method instead"
            )
        params = self._list_params(spec, filters)
        if updated_since is not None:
            if not spec.updated_gt:
                raise ValueError(f"{entity} does not support updated.gt; read it in full")
            if updated_since.tzinfo is None:
                raise ValueError("updated_since must be a timezone-aware UTC datetime")
            params["updated.gt"] = format_timestamp(updated_since - self.lookback)
            if spec.sort_by:
                params.setdefault("sort_by", "updated")
        return RecordStream(self, spec, params, updated_since)

    def list_all(self, entity: str, **filters: str) -> list[dict[str, Any]]:
        return list(self.iter_records(entity, **filters))

    def _list_params(self, spec: EntitySpec, filters: Mapping[str, str]) -> dict[str, str]:
        """Check filters against the catalog before any request is sent."""
        allowed = {f.param: f for f in spec.filters}
        params: dict[str, str] = {}
        for name, value in filters.items():
            param = name.replace("__", ".")
            if param == "sort_by" and spec.sort_by:
                if value not in {"created", "updated"}:
                    raise ValueError("sort_by must be 'created' or 'updated'")
                params[param] = value
                continue
            if param not in allowed:
                known = ", ".join(sorted(allowed)) or "none"
                raise ValueError(f"{spec.name} has no filter {param!r}; its filters: {known}")
            text = value.isoformat() if isinstance(value, date) else str(value)
            op = allowed[param].op
            if op in {FilterOp.GT, FilterOp.GTE, FilterOp.LT, FilterOp.LTE} and not _DATE.match(
                text
            ):
                raise ValueError(f"{param} must be a date like 2026-01-31, got {text!r}")
            if param.endswith("_id") and not _UUID.fullmatch(text):
                raise ValueError(f"{param} must be a UUID, got {text!r}")
            params[param] = text
        return params

    def get_page(self, spec: EntitySpec, params: Mapping[str, str]) -> tuple[list[Any], str | None]:
        """One page of a list: its records and the next cursor (None on the last page)."""
        body = self.request("GET", spec.path, params=params)
        self.stats.pages += 1
        if not isinstance(body, Mapping):
            raise MalformedResponseError(f"Rillet GET {spec.path} answered {type(body).__name__}")
        key = spec.list_key or ""
        records = body.get(key, body.get("data"))
        if not isinstance(records, list):
            raise MalformedResponseError(
                f"Rillet GET {spec.path}: no {key!r} list in the response (keys: {sorted(body)})"
            )
        pagination = body.get("pagination") or {}
        cursor = pagination.get("next_cursor") if isinstance(pagination, Mapping) else None
        return records, (cursor or None)

    def get(self, entity: str, record_id: str) -> dict[str, Any]:
        spec = catalog.entity(entity)
        if not spec.get_by_id:
            raise ValueError(f"Rillet has no GET {spec.path}/{{id}}; list {entity} instead")
        body = self.request("GET", f"{spec.path}/{_id_segment(spec, record_id)}")
        # Rillet documents bare objects; CARBON still unwraps {"journal_entry": {...}}.
        if isinstance(body, dict) and set(body) == {spec.name}:
            body = body[spec.name]
        return _record(body, spec.path)

    def get_single(self, entity: str) -> dict[str, Any] | None:
        """A single-object endpoint; None where Rillet's 404 means "none yet"."""
        spec = catalog.entity(entity)
        if not spec.single:
            raise ValueError(f"{entity} is a list; use iter_records()")
        try:
            return _record(self.request("GET", spec.path), spec.path)
        except NotFoundError:
            if spec.not_found_means_empty:
                return None
            raise

    def children(self, entity: str, parent_id: str) -> list[dict[str, Any]]:
        """A per-parent list such as ``/bills/{bill_id}/payments`` (not paginated)."""
        spec = catalog.entity(entity)
        if not spec.parent:
            raise ValueError(f"{entity} is not a per-parent list")
        parent = catalog.entity(spec.parent)
        path = spec.path.replace(f"{{{spec.parent}_id}}", _id_segment(parent, parent_id))
        body = self.request("GET", path)
        key = spec.list_key or ""
        records = body.get(key) if isinstance(body, Mapping) else None
        if not isinstance(records, list):
            # Never read as "no children": the caller soft-deletes the children it did not get.
            raise MalformedResponseError(f"Rillet GET {path}: no {key!r} list in the response")
        return [_record(r, path) for r in records]

    def report(self, name: str, **params: str) -> dict[str, Any]:
        spec = catalog.report(name)
        missing = [p for p in spec.required if not params.get(p)]
        if missing:
            raise ValueError(f"report {name} needs {', '.join(missing)}")
        unknown = set(params) - spec.params
        if unknown:
            raise ValueError(f"report {name} takes {sorted(spec.params)}, not {sorted(unknown)}")
        text = {k: v.isoformat() if isinstance(v, date) else str(v) for k, v in params.items()}
        return _record(self.request("GET", spec.path, params=text), spec.path)

    # ---- writes ----------------------------------------------------------------------------

    def create(
        self, entity: str, body: Mapping[str, Any], *, idempotency_key: str, path: str | None = None
    ) -> dict[str, Any]:
        """POST a new record; the key makes retries safe (persist it before calling)."""
        spec = self._writable(entity, "POST")
        return _record(
            self.request(
                "POST", path or spec.path, body=dict(body), idempotency_key=idempotency_key
            ),
            spec.path,
        )

    def update(self, entity: str, record_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """PUT: a full replacement (omitted fields become null; read first, then merge)."""
        spec = self._writable(entity, "PUT")
        path = f"{spec.path}/{_id_segment(spec, record_id)}"
        return _record(self.request("PUT", path, body=dict(body)), path)

    def delete(self, entity: str, record_id: str) -> None:
        spec = self._writable(entity, "DELETE")
        self.request("DELETE", f"{spec.path}/{_id_segment(spec, record_id)}")

    def _writable(self, entity: str, method: str) -> EntitySpec:
        spec = catalog.entity(entity)
        if method not in spec.writes:
            raise ValueError(f"{entity} does not support {method} in this client")
        return spec


def path_segment(value: str) -> str:
    """``value`` as one URL path segment that cannot be read as anything else.

    ``quote(..., safe="")`` leaves dots alone, and httpx (like servers and proxies) removes the
    dot segments ``.`` and ``..``: ``/customers/..`` would be sent as ``GET /``. Such segments
    are sent with their dots percent-encoded instead; an empty one would drop the segment.
    """
    if not value:
        raise ValueError("an empty path segment would address the collection, not a record")
    if value in {".", ".."}:
        return value.replace(".", "%2E")
    return quote(value, safe="")


def _id_segment(spec: EntitySpec, record_id: str) -> str:
    """A record id checked against the catalog's id shape, then encoded for the path."""
    if not spec.is_valid_id(record_id):
        raise InvalidRecordIdError(spec.name, record_id)
    return path_segment(record_id)


def _record(body: Any, path: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise MalformedResponseError(
            f"Rillet {path}: expected an object, got {type(body).__name__}"
        )
    return body


def _json_default(value: object) -> Any:
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, date | datetime):
        return value.isoformat()
    raise TypeError(f"cannot send {type(value).__name__} to Rillet")


def _is_retriable(error: RilletError, idempotency_key: str | None) -> bool:
    if isinstance(error, AuthenticationError | PermissionDeniedError):
        return False
    if isinstance(error, ConflictError):
        return idempotency_key is not None  # the first request with the key is still in flight
    if isinstance(error, RateLimitedError | ServerError):
        return True
    if isinstance(error, RilletAPIError):
        return False
    return isinstance(error, RilletConnectionError | MalformedResponseError)
