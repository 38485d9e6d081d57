"""The simulator's rate limit: N requests per rolling W seconds per API key, counted at arrival.

It also keeps every arrival time, so that tests and benchmarks can ask the most arrivals that
ever fell into one rolling window: the measure a client's shared budget must keep at or below
the limit.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from rillet_dagster.clock import Clock


@dataclass
class KeyStats:
    arrivals: list[float] = field(default_factory=list)  # every arrival, admitted or not
    admitted: deque[float] = field(default_factory=deque)  # admitted inside the current window
    accepted: int = 0
    rejected: int = 0


class RollingWindowLimiter:
    def __init__(self, clock: Clock, requests: int = 60, window_seconds: float = 60.0) -> None:
        if requests < 1 or window_seconds <= 0:
            raise ValueError("a rate limit needs at least 1 request per a positive window")
        self.clock = clock
        self.requests = requests
        self.window = window_seconds
        self._keys: dict[str, KeyStats] = {}
        self._lock = threading.Lock()

    def admit(self, key: str) -> bool:
        """Count an arrival; False when the key already had ``requests`` in the last window."""
        now = self.clock.time()
        with self._lock:
            stats = self._keys.setdefault(key, KeyStats())
            stats.arrivals.append(now)
            while stats.admitted and stats.admitted[0] <= now - self.window:
                stats.admitted.popleft()
            if len(stats.admitted) >= self.requests:
                stats.rejected += 1
                return False
            stats.admitted.append(now)
            stats.accepted += 1
            return True

    def max_in_window(self, key: str) -> int:
        """The most arrivals of ``key`` inside any rolling window (admitted or refused)."""
        with self._lock:
            times = list(self._keys.get(key, KeyStats()).arrivals)
        best, start = 0, 0
        for end, moment in enumerate(times):
            while times[start] <= moment - self.window:
                start += 1
            best = max(best, end - start + 1)
        return best

    def stats(self) -> dict[str, dict[str, int]]:
        with self._lock:
            keys = {k: (v.accepted, v.rejected) for k, v in self._keys.items()}
        return {
            key: {
                "accepted": accepted,
                "rejected": rejected,
                "max_in_window": self.max_in_window(key),
            }
            for key, (accepted, rejected) in keys.items()
        }

    def reset(self) -> None:
        with self._lock:
            self._keys.clear()
