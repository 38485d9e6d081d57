"""Opaque, signed pagination cursors that expire after two hours.

A cursor carries the pass's query and keyset position, so later pages need only ``cursor`` (as
FT's client sends) while repeating the filters also works (as CARBON's does). An expired,
forged or foreign cursor is not an error: Rillet silently starts a new pass at page 1.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

CURSOR_TTL_SECONDS = 2 * 3600


@dataclass(frozen=True)
class CursorState:
    entity: str
    position: int
    query: list[Any]
    issued_at: float
    epoch: int


class CursorCodec:
    def __init__(self, secret: bytes, ttl_seconds: float = CURSOR_TTL_SECONDS) -> None:
        self._secret = secret
        self.ttl_seconds = ttl_seconds
        self.epoch = 0  # bumped by the "expire all cursors now" fault

    def encode(self, state: CursorState) -> str:
        payload = json.dumps(
            [state.entity, state.position, state.query, state.issued_at, state.epoch],
            separators=(",", ":"),
        ).encode()
        mac = hmac.new(self._secret, payload, hashlib.sha256).digest()[:12]
        return base64.urlsafe_b64encode(mac + payload).decode().rstrip("=")

    def decode(self, token: str, *, entity: str, now: float) -> CursorState | None:
        """The cursor's state, or None when it is unknown, foreign, stale or expired."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (ValueError, TypeError):
            return None
        mac, payload = raw[:12], raw[12:]
        expected = hmac.new(self._secret, payload, hashlib.sha256).digest()[:12]
        if not hmac.compare_digest(mac, expected):
            return None
        try:
            name, position, query, issued_at, epoch = json.loads(payload)
        except (ValueError, TypeError):
            return None
        if name != entity or epoch != self.epoch or now - issued_at >= self.ttl_seconds:
            return None
        return CursorState(name, position, query, issued_at, epoch)

    def expire_all(self) -> None:
        self.epoch += 1
