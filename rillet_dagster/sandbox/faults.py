"""Faults the simulator can inject, all off by default.

Set at start-up (``--faults error_rate=0.1,latency=20-500``) or at run time through the
sandbox-only admin route ``PUT /_sandbox/faults``. Decisions use a seeded RNG, so a faulty run
can be replayed.
"""

from __future__ import annotations

import random
import threading
from dataclasses import asdict, dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class Faults:
    error_rate: float = 0.0  # share of requests answered 500/502/503
    latency_min_ms: float = 0.0  # inbound delay before a request is counted and served
    latency_max_ms: float = 0.0
    drop_rate: float = 0.0  # share of responses cut off mid-body (connection dropped)
    malformed_rate: float = 0.0  # share of list pages answered with truncated JSON
    force_429: int = 0  # the next N requests get 429 whatever the budget
    retry_after: float | None = None  # seconds to put in Retry-After on 429s (None = bare)
    # One-shot: after N more list requests that carry a cursor, every cursor expires at once
    # (the 2 h TTL passing mid-pass, at a chosen page).
    expire_cursor_after: int = 0
    # 1: answer an expired or unknown cursor with a 400 problem (type .../cursor-expired)
    # instead of Rillet's documented silent restart at page 1, for clients that must cope
    # with either.
    cursor_error: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("error_rate", "drop_rate", "malformed_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"fault {name}={value} must be between 0 and 1")
        if self.latency_min_ms < 0 or self.latency_max_ms < self.latency_min_ms:
            raise ValueError("fault latency must be MIN-MAX milliseconds with 0 <= MIN <= MAX")
        if self.force_429 < 0:
            raise ValueError("fault force_429 must be a count >= 0")
        if self.expire_cursor_after < 0:
            raise ValueError("fault expire_cursor_after must be a count >= 0")
        if self.cursor_error not in (0, 1):
            raise ValueError("fault cursor_error must be 0 (silent restart) or 1 (400 problem)")
        if self.retry_after is not None and self.retry_after < 0:
            raise ValueError("fault retry_after must be seconds >= 0")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_NUMBERS = {f.name for f in fields(Faults)}
_COUNTS = {"force_429", "expire_cursor_after", "cursor_error", "seed"}


def parse_faults(text: str) -> Faults:
    """``error_rate=0.1,latency=20-500,drop_rate=0.05,force_429=1,retry_after=7``.

    Also ``expire_cursor_after=36`` (expire every cursor at the 37th page of a pass) and
    ``cursor_error=1`` (expired cursors answer 400 instead of restarting silently).
    """
    values: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, raw = part.partition("=")
        name = name.strip()
        try:
            if name == "latency":
                low, _, high = raw.partition("-")
                values["latency_min_ms"] = float(low)
                values["latency_max_ms"] = float(high or low)
            elif name in _COUNTS:
                values[name] = int(raw)
            elif name in _NUMBERS:
                values[name] = float(raw)
            else:
                raise KeyError(name)
        except KeyError:
            known = ", ".join(
                sorted((_NUMBERS - {"latency_min_ms", "latency_max_ms"}) | {"latency"})
            )
            raise ValueError(f"unknown fault {name!r}; known faults: {known}") from None
        except ValueError:
            raise ValueError(f"fault {part!r} needs a number (latency takes MIN-MAX ms)") from None
    return Faults(**values)


def faults_from_json(current: Faults, body: dict[str, Any]) -> Faults:
    unknown = set(body) - _NUMBERS
    if unknown:
        raise ValueError(f"unknown faults {sorted(unknown)}; known: {sorted(_NUMBERS)}")
    return replace(current, **body)


class FaultInjector:
    """The current faults plus the seeded decisions made from them (thread-safe)."""

    def __init__(self, faults: Faults | None = None) -> None:
        self._lock = threading.Lock()
        self.set(faults or Faults())

    def set(self, faults: Faults) -> None:
        with self._lock:
            self.faults = faults
            self._rng = random.Random(faults.seed)

    def latency_seconds(self) -> float:
        with self._lock:
            low, high = self.faults.latency_min_ms, self.faults.latency_max_ms
            return self._rng.uniform(low, high) / 1000 if high > 0 else 0.0

    def take_forced_429(self) -> bool:
        with self._lock:
            if self.faults.force_429 <= 0:
                return False
            self.faults = replace(self.faults, force_429=self.faults.force_429 - 1)
            return True

    def cursor_presented(self) -> bool:
        """Count a list request carrying a cursor; True when all cursors must expire now."""
        with self._lock:
            if self.faults.expire_cursor_after <= 0:
                return False
            remaining = self.faults.expire_cursor_after - 1
            self.faults = replace(self.faults, expire_cursor_after=remaining)
            return remaining == 0

    def _roll(self, rate: float) -> bool:
        with self._lock:
            return rate > 0 and self._rng.random() < rate

    def server_error(self) -> int | None:
        if not self._roll(self.faults.error_rate):
            return None
        with self._lock:
            return self._rng.choice((500, 502, 503))

    def drop(self) -> bool:
        return self._roll(self.faults.drop_rate)

    def malformed(self) -> bool:
        return self._roll(self.faults.malformed_rate)
