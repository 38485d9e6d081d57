"""RFC 9457 problem responses, shaped the way Rillet answers errors."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.responses import Response

PROBLEM_BASE = "https://rillet.io/"
_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_SLUGS = {
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    409: "conflict",
    429: "rate-limited",
    500: "internal-error",
    503: "unavailable",
}


def problem(
    status: int,
    detail: str,
    *,
    slug: str | None = None,
    title: str | None = None,
    violations: Sequence[Mapping[str, str]] | None = None,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Response:
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + (slug or _SLUGS.get(status, "bad-request")),
        "title": title or _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    if violations:
        body["violations"] = [dict(v) for v in violations]
    if extra:
        body.update(extra)
    return Response(
        json.dumps(body, separators=(",", ":")),
        status_code=status,
        media_type="application/problem+json",
        headers=dict(headers or {}),
    )


def invalid_parameter(param: str, message: str) -> Response:
    """A 400 that names the query parameter to fix."""
    return problem(
        400,
        f"Invalid query parameter '{param}': {message}",
        slug="invalid-parameter",
        violations=[{"field": param, "message": message}],
    )
