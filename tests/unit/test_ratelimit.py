"""The shared rate budget on a fake clock: SQLite always, PostgreSQL too (always in CI)."""

from __future__ import annotations

import gc
import hashlib
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, delete, select, update

from bench.ratelimit_bench import POSTGRES_URL
from rillet_dagster.clock import FakeClock
from rillet_dagster.rillet.ratelimit import (
    RateBudget,
    RateBudgetStateError,
    RateBudgetTimeout,
    keys_table,
    slots_table,
)
from tests import canary
from tests.pg import require_postgres

SECRET = canary.api_key("ratelimit")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        require_postgres()
        return POSTGRES_URL
    return f"sqlite:///{tmp_path / 'rate-state.db'}"


@pytest.fixture
def new_key(state_url: str) -> Iterator[Callable[[], str]]:
    """Unique keys (PostgreSQL is shared between tests and runs); their rows go afterwards."""
    keys: list[str] = []

    def make() -> str:
        keys.append(f"{SECRET}-{uuid.uuid4().hex}")
        return keys[-1]

    yield make
    hashes = [hashlib.sha256(key.encode()).hexdigest() for key in keys]
    engine = create_engine(state_url)
    with engine.begin() as connection:
        connection.execute(delete(slots_table).where(slots_table.c.key_hash.in_(hashes)))
        connection.execute(delete(keys_table).where(keys_table.c.key_hash.in_(hashes)))
    engine.dispose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_budget(
    state_url: str, new_key: Callable[[], str], clock: FakeClock
) -> Callable[..., RateBudget]:
    """Budgets on one fake clock; the same key unless ``api_key`` is given."""
    key = new_key()

    def make(**options: Any) -> RateBudget:
        return RateBudget(state_url, options.pop("api_key", key), clock=clock, **options)

    return make


def elapsed(clock: FakeClock, start: float) -> float:
    return clock.time() - start


def test_the_61st_request_waits_for_the_first_response_plus_the_window(
    make_budget: Callable[..., RateBudget], clock: FakeClock
) -> None:
    budget = make_budget()
    start = clock.time()
    for _ in range(60):
        budget.release(budget.acquire())
    assert budget.in_window() == 60
    assert budget.waited_seconds == 0.0

    budget.acquire()

    assert elapsed(clock, start) == 60.0
    assert budget.waited_seconds == 60.0
    assert budget.in_window() == 1  # the first 60 left the window; only the new slot counts


def test_in_flight_slots_count_until_one_window_after_their_response(
    make_budget: Callable[..., RateBudget], clock: FakeClock
) -> None:
    budget = make_budget()
    start = clock.time()
    held = [budget.acquire() for _ in range(60)]
    # In flight for as long as we like: the slots still count, so another caller times out.
    impatient = make_budget(max_wait_seconds=5)
    with pytest.raises(RateBudgetTimeout):
        impatient.acquire()
    assert elapsed(clock, start) == 5.0
    assert impatient.waited_seconds == 5.0

    for slot in held:
        budget.release(slot)
    budget.acquire()

    assert elapsed(clock, start) == 65.0


def test_a_slot_never_released_counts_until_its_timeout_plus_the_window(
    make_budget: Callable[..., RateBudget], clock: FakeClock, state_url: str
) -> None:
    start = clock.time()
    killed = make_budget(requests=1, request_timeout=30)
    killed.acquire()
    del killed  # the process died mid-request: nobody will ever release its slot
    gc.collect()
    survivor = make_budget(requests=1, request_timeout=30)

    survivor.acquire()

    assert elapsed(clock, start) == 90.0
    assert survivor.waited_seconds == 90.0
    engine = create_engine(state_url)
    with engine.connect() as connection:
        rows = connection.execute(
            select(slots_table.c.started_at).where(slots_table.c.key_hash == survivor.key_hash)
        ).all()
    engine.dispose()
    assert rows == [(start + 90.0,)]  # the abandoned slot's row is gone, not leaked


def test_a_slot_released_by_an_exception_still_counts_from_its_response(
    make_budget: Callable[..., RateBudget], clock: FakeClock
) -> None:
    budget = make_budget(requests=1, request_timeout=30)
    start = clock.time()

    def request_that_fails() -> None:
        with budget.slot():
            clock.advance(2)
            raise ConnectionError("the request failed after reaching Rillet")

    with pytest.raises(ConnectionError):
        request_that_fails()
    budget.acquire()
    # Released at t=2, so free at 62; an unreleased slot would have waited for 30 + 60.
    assert elapsed(clock, start) == 62.0


def test_pause_stops_every_instance_on_the_key_and_no_other_key(
    make_budget: Callable[..., RateBudget],
    clock: FakeClock,
    new_key: Callable[[], str],
) -> None:
    first, second = make_budget(), make_budget()
    other_key = make_budget(api_key=new_key())
    start = clock.time()

    first.pause(7)
    other_key.acquire()
    assert elapsed(clock, start) == 0.0
    second.acquire()
    assert elapsed(clock, start) == 7.0
    assert second.waited_seconds == 7.0
    first.acquire()
    assert first.waited_seconds == 0.0


def test_a_shorter_pause_does_not_cut_a_longer_one(
    make_budget: Callable[..., RateBudget], clock: FakeClock
) -> None:
    budget = make_budget()
    start = clock.time()
    budget.pause(30)
    budget.pause(7)
    budget.acquire()
    assert elapsed(clock, start) == 30.0


@pytest.mark.parametrize("seconds", [4294967296.0, 1e300, float("inf")])
def test_a_pause_never_outlasts_the_maximum(
    make_budget: Callable[..., RateBudget], clock: FakeClock, state_url: str, seconds: float
) -> None:
    budget = make_budget(max_pause_seconds=300)
    start = clock.time()
    budget.pause(seconds)
    assert _stored_pause(state_url, budget.key_hash) == start + 300.0  # bounded when stored
    other_process = make_budget(max_pause_seconds=300)
    other_process.acquire()
    assert elapsed(clock, start) == 300.0


def _stored_pause(state_url: str, key_hash: str) -> float:
    engine = create_engine(state_url)
    with engine.connect() as connection:
        stored = connection.scalar(
            select(keys_table.c.paused_until).where(keys_table.c.key_hash == key_hash)
        )
    engine.dispose()
    return float(stored)


def test_a_nan_pause_is_ignored(make_budget: Callable[..., RateBudget], clock: FakeClock) -> None:
    budget = make_budget()
    start = clock.time()
    budget.pause(float("nan"))
    budget.acquire()
    assert elapsed(clock, start) == 0.0


@pytest.mark.parametrize("stored", [1e12, float("inf")])
def test_a_stored_pause_beyond_the_maximum_is_clamped_once_and_for_all(
    make_budget: Callable[..., RateBudget], clock: FakeClock, state_url: str, stored: float
) -> None:
    budget = make_budget(max_pause_seconds=300)
    start = clock.time()
    budget.pause(1)  # creates the key's row
    engine = create_engine(state_url)
    with engine.begin() as connection:  # what an older version stored after a huge Retry-After
        connection.execute(
            update(keys_table)
            .where(keys_table.c.key_hash == budget.key_hash)
            .values(paused_until=start + stored)
        )
    engine.dispose()
    impatient = make_budget(max_pause_seconds=300, max_wait_seconds=100)
    with pytest.raises(RateBudgetTimeout):
        impatient.acquire()
    # Clamped to (first read + 300) and stored: later reads do not push the end further out.
    budget.acquire()
    assert elapsed(clock, start) == 300.0
    assert _stored_pause(state_url, budget.key_hash) == start + 300.0


def test_margin_keeps_slots_in_reserve(
    make_budget: Callable[..., RateBudget], clock: FakeClock
) -> None:
    budget = make_budget(requests=5, margin=2)
    start = clock.time()
    for _ in range(3):
        budget.release(budget.acquire())
    assert elapsed(clock, start) == 0.0
    budget.acquire()
    assert elapsed(clock, start) == 60.0


def test_concurrent_threads_never_take_more_than_the_limit(
    make_budget: Callable[..., RateBudget], clock: FakeClock
) -> None:
    budget = make_budget(requests=20, max_wait_seconds=0)
    admitted: list[int] = []
    refused: list[RateBudgetTimeout] = []
    lock = threading.Lock()

    def take() -> None:
        try:
            slot = budget.acquire()
        except RateBudgetTimeout as exc:
            with lock:
                refused.append(exc)
        else:
            with lock:
                admitted.append(slot)

    threads = [threading.Thread(target=take) for _ in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(set(admitted)) == 20
    assert len(refused) == 10
    assert budget.in_window() == 20


def test_the_key_is_never_stored_shown_or_reported(
    make_budget: Callable[..., RateBudget],
    new_key: Callable[[], str],
    state_url: str,
    tmp_path: Path,
) -> None:
    key = new_key()
    budget = make_budget(api_key=key, requests=1, max_wait_seconds=0)
    budget.pause(1)
    with pytest.raises(RateBudgetTimeout) as caught:
        budget.acquire()

    assert key not in repr(budget)
    assert key not in str(caught.value)
    assert "1 requests per 60s" in str(caught.value)
    assert "same API key" in str(caught.value)
    assert key not in vars(budget).values()
    stored = _stored_text(state_url, tmp_path)
    assert budget.key_hash in stored
    assert SECRET not in stored


def _stored_text(state_url: str, tmp_path: Path) -> str:
    if state_url.startswith("sqlite"):
        files = [p for p in tmp_path.iterdir() if p.name.startswith("rate-state.db")]
        return b"".join(p.read_bytes() for p in files).decode("latin-1")
    engine = create_engine(state_url)
    with engine.connect() as connection:
        rows = [
            *connection.execute(select(slots_table)).all(),
            *connection.execute(select(keys_table)).all(),
        ]
    engine.dispose()
    return repr(rows)


def test_budgets_on_one_url_share_one_engine(make_budget: Callable[..., RateBudget]) -> None:
    assert make_budget()._entry.engine is make_budget()._entry.engine


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_uses_its_own_connections(
    make_budget: Callable[..., RateBudget], clock: FakeClock
) -> None:
    parent = make_budget(requests=3)
    parent.release(parent.acquire())  # the pool now holds a connection the child must not use
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        try:
            child = make_budget(requests=3)
            child.release(child.acquire())
            os._exit(0 if child.in_window() == 2 else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    parent.release(parent.acquire())
    assert parent.in_window() == 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"requests": 0}, "requests must be >= 1"),
        ({"margin": -1}, "margin must be >= 0"),
        ({"requests": 5, "margin": 5}, "below requests"),
        ({"window_seconds": 0}, "window_seconds must be > 0"),
        ({"window_seconds": -1.0}, "window_seconds must be > 0"),
        ({"request_timeout": 0}, "request_timeout must be > 0"),
        ({"poll_seconds": 0}, "poll_seconds must be > 0"),
        ({"max_wait_seconds": -1}, "max_wait_seconds must be >= 0"),
        ({"max_pause_seconds": 0}, "max_pause_seconds must be"),
        ({"max_pause_seconds": float("inf")}, "max_pause_seconds must be"),
        ({"max_pause_seconds": float("nan")}, "max_pause_seconds must be"),
    ],
)
def test_invalid_limits_are_refused(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        RateBudget(f"sqlite:///{tmp_path / 'state.db'}", SECRET, **options)
    assert SECRET not in str(caught.value)


def test_an_empty_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="api_key is empty"):
        RateBudget(f"sqlite:///{tmp_path / 'state.db'}", "")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite://", "in-memory SQLite"),
        ("sqlite:///:memory:", "in-memory SQLite"),
        ("mysql://user:hunter2@db/rillet", "only SQLite"),
        ("not a url hunter2", "not a database URL"),
    ],
)
def test_unusable_state_urls_are_refused_without_their_password(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        RateBudget(url, SECRET)
    assert "hunter2" not in str(caught.value)
    assert SECRET not in str(caught.value)


def test_an_unreachable_state_database_is_named_without_its_password() -> None:
    url = "postgresql+psycopg://rillet:hunter2@127.0.0.1:1/state"
    with pytest.raises(RateBudgetStateError) as caught:
        RateBudget(url, SECRET)
    text = str(caught.value)
    assert "postgresql+psycopg://rillet:***@127.0.0.1:1/state" in text
    assert "hunter2" not in text
    assert SECRET not in text


def test_a_state_file_in_a_missing_directory_is_named(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'missing' / 'state.db'}"
    with pytest.raises(RateBudgetStateError, match=r"missing/state\.db"):
        RateBudget(url, SECRET)
