"""One Rillet rate budget per API key, shared by every thread, run and process of a deployment.

Why not pyrate-limiter: it stamps an item when a request is *sent* (``try_acquire``) and has no
hook for the response, so it cannot log a request at its response time or count requests still in
flight. Rillet counts requests when they *arrive*; with latency jitter, N requests sent in one
window can arrive inside a later window together with that window's own sends, so any limiter
that logs send times (or a token bucket, which allows up to 2N - 1 per window) gets 429s.

The rule used here: a request holds a slot while in flight and is logged at its response time.
At time t a new request is admitted iff

    (slots whose response time > t - W) + (slots in flight) < N - margin, and the key is not paused.

Why this never overruns Rillet's window: take any server window (a - W, a] and, among the requests
arriving in it, the one admitted last, at t <= a. Every other one was admitted earlier and arrived
after a - W, so at t it was either still in flight or had its response (which follows its
arrival) logged after a - W >= t - W: all of them were counted, so there are fewer than N others.
This assumes the processes sharing a key read clocks that agree (one host, or NTP-synced hosts).

A slot whose process died before releasing it counts as if its response came at its start plus
``request_timeout`` and is forgotten W seconds after that, so a crash costs capacity for a while but
never leaks it. ``request_timeout`` must therefore be at least the HTTP client's total timeout.

A 429 pauses the key for every process, for at most ``max_pause_seconds``: the bound is applied
both where a pause is stored and where it is read (a longer one already stored is cut down and
written back), so one untrustworthy ``Retry-After`` cannot stall a deployment for years.

State lives in SQLite (one host) or PostgreSQL (several hosts). Admissions for a key are
serialized: on PostgreSQL by ``SELECT ... FOR UPDATE`` on the key's row, on SQLite by making every
transaction ``BEGIN IMMEDIATE`` (one writer at a time, readers unaffected thanks to WAL).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlalchemy import (
    Column,
    Connection,
    Double,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    and_,
    create_engine,
    delete,
    event,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.sql.elements import ColumnElement

from rillet_dagster.clock import Clock, SystemClock
from rillet_dagster.rillet.errors import DEFAULT_MAX_RETRY_AFTER_SECONDS

log = logging.getLogger(__name__)

SQLITE_BUSY_SECONDS = 30.0
# The longest pause one 429 may impose on every process using a key (the client's default
# maximum ``Retry-After``): a larger request, or a larger stored value, is cut down to it.
DEFAULT_MAX_PAUSE_SECONDS = DEFAULT_MAX_RETRY_AFTER_SECONDS
PG_CONNECT_TIMEOUT_SECONDS = 10

_metadata = MetaData()

slots_table = Table(
    "rillet_rate_slots",
    _metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key_hash", String(64), nullable=False),
    Column("started_at", Double, nullable=False),
    # Each slot carries its own deadline so that processes configured with different
    # request timeouts still agree on when an abandoned slot stops counting.
    Column("timeout_at", Double, nullable=False),
    Column("finished_at", Double, nullable=True),
    Index("ix_rillet_rate_slots_key_hash", "key_hash"),
)

keys_table = Table(
    "rillet_rate_keys",
    _metadata,
    Column("key_hash", String(64), primary_key=True),
    Column("paused_until", Double, nullable=False, default=0.0),
)


class RateBudgetTimeout(RuntimeError):
    """``acquire`` waited longer than ``max_wait_seconds`` for a slot."""


class RateBudgetStateError(RuntimeError):
    """The state database cannot be used; the message names it without credentials."""


@dataclass
class _EngineEntry:
    engine: Engine
    pid: int
    schema_ready: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


_ENGINES: dict[str, _EngineEntry] = {}
_ENGINES_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    # A thread of the parent may have held the lock at fork time; the child starts clean, and
    # pooled connections belong to the parent, so the child must not close (or use) them.
    global _ENGINES_LOCK
    _ENGINES_LOCK = threading.Lock()
    for entry in _ENGINES.values():
        entry.engine.dispose(close=False)
        entry.pid = os.getpid()
        entry.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def safe_url(url: str | URL) -> str:
    """The URL with any password masked, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


def _parse_state_url(state_url: str) -> URL:
    try:
        url = make_url(state_url)
    except ArgumentError:
        # Not echoed: a malformed URL may still hold a password we cannot locate to mask.
        raise ValueError(
            "the rate-budget state_url is not a database URL; use sqlite:////path/to/state.db "
            "or postgresql+psycopg://user@host:5432/db"
        ) from None
    backend = url.get_backend_name()
    if backend == "postgresql":
        if url.get_driver_name() != "psycopg":
            url = url.set(drivername="postgresql+psycopg")  # psycopg 3 is the driver we ship
    elif backend == "sqlite":
        if url.database in (None, "", ":memory:") or (url.database or "").startswith(
            "file::memory"
        ):
            raise ValueError(
                f"rate-budget state {safe_url(url)} is an in-memory SQLite database, which no "
                "other process can see; use a file (sqlite:////path/to/state.db)"
            )
    else:
        raise ValueError(
            f"rate-budget state {safe_url(url)} uses {backend!r}; only SQLite (one host) and "
            "PostgreSQL (several hosts) are supported"
        )
    return url


def _create_engine(url: URL) -> Engine:
    if url.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_SECONDS})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection: object, record: ConnectionPoolEntry) -> None:
            # pysqlite's own BEGIN is deferred; we emit BEGIN IMMEDIATE ourselves (below) so that
            # the admission check and the insert happen under SQLite's single write lock.
            dbapi_connection.isolation_level = None  # type: ignore[attr-defined]
            cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
            cursor.execute("PRAGMA journal_mode = WAL")
            # A power cut may lose the last few slots (at worst one 429 and a pause later);
            # not worth an fsync on every request.
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection: Connection) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(
        url,
        pool_pre_ping=True,
        connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_SECONDS},
    )


def _engine_entry(url: URL, cache_key: str) -> _EngineEntry:
    with _ENGINES_LOCK:
        entry = _ENGINES.get(cache_key)
        if entry is None:
            entry = _EngineEntry(_create_engine(url), os.getpid())
            _ENGINES[cache_key] = entry
        elif entry.pid != os.getpid():
            entry.engine.dispose(close=False)
            entry.pid = os.getpid()
        return entry


def _create_schema(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        # Concurrent CREATE TABLEs race on the catalog; one creator at a time per database.
        connection.execute(text("SELECT pg_advisory_xact_lock(hashtext('rillet_rate_budget'))"))
    _metadata.create_all(connection, checkfirst=True)


class RateBudget:
    """N requests per rolling W seconds for one API key, admitted by the arrival rule above."""

    def __init__(
        self,
        state_url: str,
        api_key: str,
        *,
        requests: int = 60,
        window_seconds: float = 60.0,
        margin: int = 0,
        request_timeout: float = 30.0,
        clock: Clock | None = None,
        poll_seconds: float = 0.05,
        max_wait_seconds: float = 3600.0,
        max_pause_seconds: float = DEFAULT_MAX_PAUSE_SECONDS,
    ) -> None:
        if not api_key:
            raise ValueError("api_key is empty; the rate budget is kept per Rillet API key")
        if requests < 1:
            raise ValueError(f"requests must be >= 1 per window, got {requests}")
        if not 0 <= margin < requests:
            raise ValueError(
                f"margin must be >= 0 and below requests ({requests}), got {margin}: the budget "
                "admits requests - margin per window"
            )
        if not window_seconds > 0:
            raise ValueError(f"window_seconds must be > 0, got {window_seconds}")
        if not request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0 seconds, got {request_timeout}")
        if not poll_seconds > 0:
            raise ValueError(f"poll_seconds must be > 0, got {poll_seconds}")
        if not max_wait_seconds >= 0:
            raise ValueError(f"max_wait_seconds must be >= 0, got {max_wait_seconds}")
        if not (math.isfinite(max_pause_seconds) and max_pause_seconds > 0):
            raise ValueError(f"max_pause_seconds must be finite and > 0, got {max_pause_seconds}")
        self.requests = requests
        self.window_seconds = float(window_seconds)
        self.margin = margin
        self.request_timeout = float(request_timeout)
        self.poll_seconds = float(poll_seconds)
        self.max_wait_seconds = float(max_wait_seconds)
        self.max_pause_seconds = float(max_pause_seconds)
        self.clock: Clock = clock or SystemClock()
        self.key_hash = hashlib.sha256(api_key.encode("utf-8")).hexdigest()
        self.waited_seconds = 0.0
        self._waited_lock = threading.Lock()
        url = _parse_state_url(state_url)
        self.state = safe_url(url)
        self._entry = _engine_entry(url, state_url)
        self._ensure_schema()

    def __repr__(self) -> str:
        return (
            f"RateBudget(key_hash={self.key_hash[:12]}..., {self.requests - self.margin}/"
            f"{self.requests} per {self.window_seconds:g}s, state={self.state})"
        )

    @property
    def limit(self) -> int:
        """Slots that may count at once: ``requests - margin``."""
        return self.requests - self.margin

    # ---- public API ----------------------------------------------------------------------

    def acquire(self) -> int:
        """Block (on the clock) until a request may be sent; the slot id to ``release``."""
        started = self.clock.time()
        deadline = started + self.max_wait_seconds
        waited = False
        while True:
            slot, wake_at, now = self._try_admit()
            if slot is not None:
                if waited:
                    with self._waited_lock:
                        self.waited_seconds += now - started
                return slot
            waited = True
            current = self.clock.time()
            if current >= deadline:
                with self._waited_lock:
                    self.waited_seconds += current - started
                raise RateBudgetTimeout(
                    f"waited {current - started:.1f}s (max_wait_seconds={self.max_wait_seconds:g})"
                    f" for the Rillet rate budget of {self.limit} requests per "
                    f"{self.window_seconds:g}s (requests={self.requests}, margin={self.margin}) "
                    f"for key sha256 {self.key_hash[:12]}...; check for other processes or "
                    f"deployments using the same API key, a pause after 429s, and slots held by "
                    f"requests that never finish (state {self.state})"
                )
            delay = max(wake_at - current, self.poll_seconds)
            self.clock.sleep(min(delay, deadline - current))

    def release(self, slot: int) -> None:
        """Log the response time of ``slot``; it keeps counting for one window after it."""
        with self._transaction() as connection:
            result = connection.execute(
                update(slots_table)
                .where(
                    slots_table.c.id == slot,
                    slots_table.c.key_hash == self.key_hash,
                    slots_table.c.finished_at.is_(None),
                )
                .values(finished_at=self.clock.time())
            )
        if result.rowcount == 0:
            log.warning(
                "rate-budget slot %s was already forgotten: its request outlived "
                "request_timeout (%gs) plus one window; raise request_timeout to at least the HTTP "
                "timeout",
                slot,
                self.request_timeout,
            )

    @contextmanager
    def slot(self) -> Iterator[int]:
        """Hold a slot around one request; it is released even when the request raises."""
        slot = self.acquire()
        try:
            yield slot
        finally:
            self.release(slot)

    def pause(self, seconds: float) -> None:
        """Stop every process from sending with this key for ``seconds`` (after a 429).

        At most ``max_pause_seconds``: one bad ``Retry-After`` must not stall the deployment.
        """
        if math.isnan(seconds) or seconds <= 0:
            return
        seconds = min(seconds, self.max_pause_seconds)
        with self._transaction() as connection:
            paused_until = self._lock_key(connection, self.clock.time())
            until = self.clock.time() + seconds
            if until > paused_until:
                connection.execute(
                    update(keys_table)
                    .where(keys_table.c.key_hash == self.key_hash)
                    .values(paused_until=until)
                )
        log.warning("Rillet rate budget paused for %gs for every process using this key", seconds)

    def in_window(self) -> int:
        """Slots counted right now: in flight, or answered less than one window ago."""
        now = self.clock.time()
        horizon = now - self.window_seconds
        with self._transaction() as connection:
            return int(
                connection.scalar(
                    select(func.count())
                    .select_from(slots_table)
                    .where(slots_table.c.key_hash == self.key_hash, ~self._expired(horizon))
                )
                or 0
            )

    # ---- internals -----------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        try:
            with self._entry.engine.begin() as connection:
                yield connection
        except SQLAlchemyError as exc:
            origin = getattr(exc, "orig", None) or exc
            detail = str(origin).strip().splitlines()[0] if str(origin).strip() else ""
            raise RateBudgetStateError(
                f"rate-budget state database {self.state} failed: "
                f"{type(origin).__name__}: {detail}; check that it is reachable and writable"
            ) from exc

    def _ensure_schema(self) -> None:
        entry = self._entry
        with entry.lock:
            if entry.schema_ready:
                return
            with self._transaction() as connection:
                _create_schema(connection)
            entry.schema_ready = True

    def _expired(self, horizon: float) -> ColumnElement[bool]:
        """Slots that can no longer count: answered, or abandoned, at or before ``horizon``."""
        return or_(
            and_(slots_table.c.finished_at.is_not(None), slots_table.c.finished_at <= horizon),
            and_(slots_table.c.finished_at.is_(None), slots_table.c.timeout_at <= horizon),
        )

    def _lock_key(self, connection: Connection, now: float) -> float:
        """Take the key's lock (row lock on PostgreSQL) and return its ``paused_until``.

        A stored pause ending after ``now + max_pause_seconds`` (written by an older version, or
        by a process with a larger maximum) is cut to that and written back, so that the end
        stays put instead of sliding forward with every read.
        """
        query = (
            select(keys_table.c.paused_until)
            .where(keys_table.c.key_hash == self.key_hash)
            .with_for_update()
        )
        paused_until = connection.scalar(query)
        if paused_until is None:
            dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
            connection.execute(
                dialect.insert(keys_table)
                .values(key_hash=self.key_hash, paused_until=0.0)
                .on_conflict_do_nothing(index_elements=["key_hash"])
            )
            paused_until = connection.scalar(query)
        paused_until = float(paused_until or 0.0)
        latest = now + self.max_pause_seconds
        if not paused_until <= latest:  # NaN included
            paused_until = latest
            connection.execute(
                update(keys_table)
                .where(keys_table.c.key_hash == self.key_hash)
                .values(paused_until=paused_until)
            )
        return paused_until

    def _try_admit(self) -> tuple[int | None, float, float]:
        """One locked attempt: ``(slot, _, now)`` when admitted, else ``(None, wake_at, now)``.

        ``wake_at`` is the earliest moment admission could become possible: the pause end, and
        the time enough counted slots leave the window. A slot answered at f leaves at f + W; an
        abandoned one at its timeout + W; one still in flight at the earliest now + W (it cannot
        be answered before now), so waiting for it never needs polling.
        """
        window = self.window_seconds
        with self._transaction() as connection:
            # The clamp uses a time read before the lock: at worst slightly stricter.
            paused_until = self._lock_key(connection, self.clock.time())
            now = self.clock.time()  # read under the lock: admissions are ordered in time
            horizon = now - window
            connection.execute(
                delete(slots_table).where(
                    slots_table.c.key_hash == self.key_hash, self._expired(horizon)
                )
            )
            rows = connection.execute(
                select(slots_table.c.timeout_at, slots_table.c.finished_at).where(
                    slots_table.c.key_hash == self.key_hash
                )
            ).all()
            if len(rows) < self.limit and paused_until <= now:
                result = connection.execute(
                    slots_table.insert().values(
                        key_hash=self.key_hash,
                        started_at=now,
                        timeout_at=now + self.request_timeout,
                        finished_at=None,
                    )
                )
                return int(result.inserted_primary_key[0]), now, now
        wake_at = max(now, paused_until)
        excess = len(rows) - self.limit + 1
        if excess > 0:
            leaves = sorted(
                finished + window
                if finished is not None
                else (timeout_at + window if timeout_at <= now else now + window)
                for timeout_at, finished in rows
            )
            wake_at = max(wake_at, leaves[excess - 1])
        return None, wake_at, now
