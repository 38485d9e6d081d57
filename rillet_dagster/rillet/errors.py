"""Rillet's RFC 9457 problems as typed exceptions.

Each error carries the problem's ``type``, ``title``, ``status`` and ``detail``, the method and
path of the request, and any ``violations`` (the simulator's name) or ``errors`` (CARBON's), but
never the API key: messages are built only from the response and the request line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

# The longest ``Retry-After`` believed by default: a longer one (or a garbled one) would stall
# every process sharing the key; it is treated as absent and the client backs off on its own.
DEFAULT_MAX_RETRY_AFTER_SECONDS = 300.0
# Statuses whose ``Retry-After`` means "try again later" (RFC 9110 15.6.4, RFC 6585 4).
RETRY_AFTER_STATUSES = frozenset({429, 503})


class RilletError(Exception):
    """Anything that went wrong talking to Rillet."""


class RilletAPIError(RilletError):
    """Rillet answered with an error status."""

    def __init__(
        self,
        *,
        status: int,
        method: str,
        path: str,
        type: str | None = None,
        title: str | None = None,
        detail: str | None = None,
        violations: Sequence[Mapping[str, str]] = (),
        retry_after: float | None = None,
        hint: str | None = None,
    ) -> None:
        self.status = status
        self.method = method
        self.path = path
        self.type = type
        self.title = title
        self.detail = detail
        self.violations = [dict(v) for v in violations]
        self.retry_after = retry_after
        self.hint = hint
        super().__init__(self._message())

    def _message(self) -> str:
        text = f"Rillet {self.method} {self.path} -> {self.status}"
        if self.title:
            text += f" {self.title}"
        if self.detail:
            text += f": {self.detail}"
        if self.violations:
            text += (
                " ["
                + "; ".join(
                    f"{v.get('field', '?')}: {v.get('message', '')}" for v in self.violations
                )
                + "]"
            )
        if self.type:
            text += f" ({self.type})"
        if self.hint:
            text += f". {self.hint}"
        return text


class AuthenticationError(RilletAPIError):
    """401: the key is missing, wrong or revoked (keys never refresh: not retried)."""


class PermissionDeniedError(RilletAPIError):
    """403: the key may not do this."""


class NotFoundError(RilletAPIError):
    """404: no such record, path or (for the last closed period) nothing closed yet."""


class ValidationError(RilletAPIError):
    """400/422: the request was refused; ``violations`` says what to fix."""


class ConflictError(RilletAPIError):
    """409: e.g. an Idempotency-Key whose first request is still in flight."""


class RateLimitedError(RilletAPIError):
    """429: the rolling per-key limit was exceeded."""


class ServerError(RilletAPIError):
    """5xx: Rillet failed; worth retrying."""


class UnexpectedStatusError(RilletAPIError):
    """Any other status."""


class RilletConnectionError(RilletError):
    """Rillet could not be reached, or did not answer in time, after every retry."""


class MalformedResponseError(RilletError):
    """A 2xx whose body is not the JSON Rillet documents (truncated page, missing list key)."""


class CursorRestartError(RilletError):
    """A list kept restarting at page 1 (expired cursors) more often than allowed."""


class InvalidRecordIdError(ValueError):
    """A record id that is not the entity's id shape; refused before any request is sent.

    A ``ValueError`` (the caller passed a bad argument), not a :class:`RilletError`: Rillet was
    never asked. Webhook handling catches it to set the one bad event aside.
    """

    def __init__(self, entity: str, record_id: object) -> None:
        self.entity = entity
        self.record_id = record_id
        shown = repr(record_id)
        if len(shown) > 80:  # ids come from webhook bodies: never echo a megabyte into logs
            shown = shown[:77] + "..."
        super().__init__(
            f"{entity} id {shown} does not have the shape of a Rillet id (the catalog's "
            "id_pattern, a UUID); refused before any request"
        )


_BY_STATUS: dict[int, type[RilletAPIError]] = {
    400: ValidationError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: ValidationError,
    429: RateLimitedError,
}


def _violations(body: Mapping[str, Any]) -> list[dict[str, str]]:
    """Normalise ``violations: [{field, message}]`` and CARBON's ``errors`` (strings or dicts)."""
    found: list[dict[str, str]] = []
    for item in body.get("violations") or []:
        if isinstance(item, Mapping):
            found.append(
                {"field": str(item.get("field", "")), "message": str(item.get("message", ""))}
            )
    for item in body.get("errors") or []:
        if isinstance(item, Mapping):
            where = item.get("pointer") or item.get("field") or item.get("path") or ""
            what = item.get("detail") or item.get("message") or item.get("title") or ""
            found.append({"field": str(where), "message": str(what)})
        else:
            found.append({"field": "", "message": str(item)})
    return found


def parse_retry_after(
    value: str | None,
    *,
    now: datetime,
    max_seconds: float = DEFAULT_MAX_RETRY_AFTER_SECONDS,
) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP-date.

    An HTTP-date is measured from ``now`` (the client's clock). Anything the client cannot
    trust (unparsable, negative, non-finite, a date already past, or beyond ``max_seconds``)
    is ``None``, exactly as if the header were absent: clamping it instead would make every
    garbled value a maximal pause.
    """
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        seconds = _seconds_until(text, now)
    if seconds is None or not math.isfinite(seconds) or not 0 <= seconds <= max_seconds:
        return None
    return seconds


def _seconds_until(http_date: str, now: datetime) -> float | None:
    try:
        moment = parsedate_to_datetime(http_date)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:  # "-0000": HTTP-dates are always GMT
        moment = moment.replace(tzinfo=UTC)
    return (moment - now).total_seconds()


def error_from_response(
    response: httpx.Response,
    method: str,
    path: str,
    *,
    now: datetime | None = None,
    max_retry_after: float = DEFAULT_MAX_RETRY_AFTER_SECONDS,
) -> RilletAPIError:
    """The typed error for a non-2xx response, whatever its body (problem, HTML, empty, junk).

    ``retry_after`` is set only for 429 and 503, from a trustworthy ``Retry-After`` (see
    :func:`parse_retry_after`; ``now`` is the caller's clock for HTTP-dates).
    """
    status = response.status_code
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else UnexpectedStatusError)
    body: Any = None
    try:
        body = json.loads(response.content) if response.content else None
    except (ValueError, UnicodeDecodeError):
        body = None
    fields: dict[str, Any] = {}
    if isinstance(body, Mapping):
        fields = {
            "type": body.get("type") if isinstance(body.get("type"), str) else None,
            "title": body.get("title") if isinstance(body.get("title"), str) else None,
            "detail": str(body.get("detail") or body.get("message") or "") or None,
            "violations": _violations(body),
        }
    else:
        text = response.text.strip()
        if text:
            snippet = " ".join(text.split())[:200]
            fields["detail"] = f"non-JSON error body: {snippet}"
    hint = None
    if status == 401:
        hint = (
            f"Check RILLET_API_KEY: {response.request.url.host} refused the key "
            "(sandbox and production keys differ)"
        )
    retry_after = None
    if status in RETRY_AFTER_STATUSES:
        retry_after = parse_retry_after(
            response.headers.get("retry-after"),
            now=now or datetime.now(UTC),
            max_seconds=max_retry_after,
        )
    return cls(
        status=status,
        method=method,
        path=path,
        retry_after=retry_after,
        hint=hint,
        **fields,
    )
