"""Idempotency-Key handling as the reference's Decisions table models Rillet.

POST only; the first successful response is replayed for 24 hours (whatever the new body, as
Rillet does: clients derive keys from the operation, not the payload); a failed request stores
nothing, so a corrected retry with the same key proceeds; a request whose key is still being
processed gets 409.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from rillet_dagster.clock import Clock

REPLAY_SECONDS = 24 * 3600


@dataclass(frozen=True)
class StoredResponse:
    status: int
    body: bytes
    media_type: str
    stored_at: float


class InFlight(Exception):
    """The first request with this key has not finished yet."""


class IdempotencyStore:
    def __init__(self, clock: Clock, replay_seconds: float = REPLAY_SECONDS) -> None:
        self.clock = clock
        self.replay_seconds = replay_seconds
        self._done: dict[tuple[str, str], StoredResponse] = {}
        self._in_flight: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def begin(self, api_key: str, key: str) -> StoredResponse | None:
        """The response to replay, or None after marking the key in flight; InFlight if busy."""
        slot = (api_key, key)
        now = self.clock.time()
        with self._lock:
            stored = self._done.get(slot)
            if stored is not None and now - stored.stored_at < self.replay_seconds:
                return stored
            self._done.pop(slot, None)
            if slot in self._in_flight:
                raise InFlight(key)
            self._in_flight.add(slot)
            return None

    def finish(self, api_key: str, key: str, status: int, body: bytes, media_type: str) -> None:
        """Store a successful response for replay; anything else frees the key unstored."""
        slot = (api_key, key)
        with self._lock:
            self._in_flight.discard(slot)
            if 200 <= status < 300:
                self._done[slot] = StoredResponse(status, body, media_type, self.clock.time())

    def abandon(self, api_key: str, key: str) -> None:
        with self._lock:
            self._in_flight.discard((api_key, key))
