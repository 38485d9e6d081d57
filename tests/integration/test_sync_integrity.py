"""Sync integrity (test-matrix rows S1-S4, S11, S13, S15): crashes, expiring cursors, changes
mid-pass, concurrent runs and a database restart never lose or duplicate a row, and the
watermark is never ahead of what the warehouse holds."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pytest
import sqlalchemy as sa

from rillet_dagster import catalog
from rillet_dagster.assets import entities, sync
from rillet_dagster.assets.sync import Window, sync_entity
from rillet_dagster.definitions import build_definitions
from rillet_dagster.rillet.client import RilletClient
from rillet_dagster.sandbox.activity import Activity
from rillet_dagster.sandbox.server import SandboxOptions, SandboxServer, build_sandbox
from rillet_dagster.settings import Settings
from rillet_dagster.warehouse import load
from rillet_dagster.warehouse.load import get_watermark, read_records
from rillet_dagster.warehouse.schema import ensure_schema, make_engine, table_for
from tests.pg import ADMIN_URL, postgres_url
from tests.warehouse_compare import assert_warehouse_equals_sandbox

KEY = "integrity-key-0123456789"
EVERYTHING = Window(start=None, end=None, full=True)
log = logging.getLogger(__name__)


@pytest.fixture
def server() -> Iterator[SandboxServer]:
    """A fresh tiny sandbox per test: these tests change its data."""
    options = SandboxOptions(size="tiny", api_keys=(KEY,), rate_limit=1_000_000)
    started = SandboxServer(build_sandbox(options)).start()
    yield started
    started.stop()


def activity(server: SandboxServer, seed: int = 3) -> Activity:
    """Direct, deterministic changes through the sandbox's own write path."""
    return Activity(server.sandbox.writer, server.sandbox.world, rate_per_second=1.0, seed=seed)


def truth(server: SandboxServer, entity: str) -> dict[str, dict[str, Any]]:
    collection = server.sandbox.world.store[entity]
    with server.sandbox.world.store.lock:
        return {r["id"]: r for r in collection.all_records()}


def warehouse(url: str) -> sa.Engine:
    engine = make_engine(url)
    ensure_schema(engine)
    return engine


def client(server: SandboxServer) -> RilletClient:
    return RilletClient(api_key=KEY, base_url=server.base_url)


def run_sync(
    server: SandboxServer,
    engine: sa.Engine,
    entity: str,
    window: Window = EVERYTHING,
    rillet: RilletClient | None = None,
) -> Any:
    """One pass; with a fresh client (its stats are the pass's) unless one is given."""
    if rillet is not None:
        sync_entity(catalog.entity(entity), rillet, engine, window=window, run_id="test", log=log)
        return rillet.stats
    with client(server) as fresh:
        return run_sync(server, engine, entity, window, fresh)


def assert_matches(server: SandboxServer, engine: sa.Engine, entity: str) -> None:
    """0 lost, 0 duplicated, every column of the header and child tables equal (money as exact
    Decimal), records the sandbox deleted never live (see tests/warehouse_compare.py)."""
    assert_warehouse_equals_sandbox(server, engine, (entity,))


def newest_committed(engine: sa.Engine, entity: str) -> datetime | None:
    table = table_for(entity)
    with engine.connect() as connection:
        return connection.execute(sa.select(sa.func.max(table.c.updated_at))).scalar_one()


def stored_watermark(engine: sa.Engine, entity: str) -> datetime | None:
    with engine.connect() as connection:
        return get_watermark(connection, entity)


def assert_watermark_not_ahead(engine: sa.Engine, entity: str) -> None:
    watermark = stored_watermark(engine, entity)
    if watermark is not None:
        newest = newest_committed(engine, entity)
        assert newest is not None and watermark <= newest, (watermark, newest)


# ----------------------------------------------------------------------------- S1: SIGKILL

_KILLED_SYNC = textwrap.dedent(
    """
    import logging, os, signal, sys
    from rillet_dagster import catalog
    from rillet_dagster.assets import sync
    from rillet_dagster.rillet.client import RilletClient
    from rillet_dagster.warehouse.schema import make_engine

    base_url, key, url, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    fetch, pages = RilletClient.get_page, [0]

    def get_page(self, spec, params):
        pages[0] += 1
        if pages[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return fetch(self, spec, params)

    RilletClient.get_page = get_page
    sync.BATCH_SIZE = 100  # one commit per page: every page boundary is a crash point
    with RilletClient(api_key=key, base_url=base_url) as client:
        sync.sync_entity(
            catalog.entity("journal_entry"), client, make_engine(url),
            window=sync.Window(None, None, True), run_id="killed", log=logging.getLogger(),
        )
    """
)


def test_s1_sigkill_at_every_page_then_a_rerun_loses_and_duplicates_nothing(
    server: SandboxServer, tmp_path: Path
) -> None:
    pages = -(-len(truth(server, "journal_entry")) // 100)
    assert pages >= 5
    engines: dict[int, sa.Engine] = {}
    urls: dict[int, str] = {}
    for kill_at in range(2, pages + 1):  # killed asking for page kill_at: kill_at - 1 committed
        urls[kill_at] = f"sqlite:///{tmp_path}/killed-{kill_at}.db"
        engines[kill_at] = warehouse(urls[kill_at])
        run_sync(server, engines[kill_at], "journal_entry")
    before = {k: stored_watermark(e, "journal_entry") for k, e in engines.items()}
    changes = activity(server)
    for _ in range(5):  # new, corrected and deleted entries since the first pass
        changes.new_journal_entry()
        changes.update_journal_entry()
    changes.delete_journal_entry()
    children = {
        kill_at: subprocess.Popen(
            [sys.executable, "-c", _KILLED_SYNC, server.base_url, KEY, url, str(kill_at)],
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
            stderr=subprocess.PIPE,
        )
        for kill_at, url in urls.items()
    }
    for kill_at, child in children.items():
        _, stderr = child.communicate(timeout=120)
        assert child.returncode == -9, (kill_at, stderr.decode()[-2000:])
    for kill_at, engine in engines.items():
        # The killed pass never completed: the watermark is the first pass's, not ahead.
        assert stored_watermark(engine, "journal_entry") == before[kill_at]
        assert_watermark_not_ahead(engine, "journal_entry")
        stats = run_sync(server, engine, "journal_entry")
        assert stats.requests <= pages + 1
        assert_matches(server, engine, "journal_entry")
        assert stored_watermark(engine, "journal_entry") == newest_committed(
            engine, "journal_entry"
        )
        engine.dispose()


# ----------------------------------------------------------------------------- S2: crash sweep


class Crash(Exception):
    """An injected failure at one numbered point of a sync pass."""


class CrashPoints:
    """Numbers every read, load and watermark step of a pass and fails at the chosen one."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        self.crash_at = -1
        for owner, name in (
            (RilletClient, "get_page"),
            (load, "upsert_records"),
            (load, "set_watermark"),
            (load, "mark_missing_deleted"),
        ):
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name)))

    def _wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self._tick()  # before the step
            result = function(*args, **kwargs)
            self._tick()  # after it (for the loads: inside or right after their transaction)
            return result

        return wrapped

    def _tick(self) -> None:
        self.count += 1
        if self.count == self.crash_at:
            raise Crash(f"crash point {self.count}")


def test_s2_a_crash_at_any_point_never_leaves_the_watermark_ahead_of_the_rows(
    server: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sync, "BATCH_SIZE", 3)  # a commit every 3 records: many crash points
    engine = warehouse(f"sqlite:///{tmp_path}/w.db")
    points = CrashPoints(monkeypatch)
    changes = activity(server, seed=5)
    rng = random.Random(20261128)
    rillet = client(server)  # one client for all passes: only the warehouse state matters here
    since = datetime.now(UTC) - timedelta(minutes=1)
    windows = {True: EVERYTHING, False: Window(start=since, end=None, full=False)}
    points_per_pass = {}
    for full, window in windows.items():
        points.count = 0
        run_sync(server, engine, "customer", window, rillet)
        points_per_pass[full] = points.count
    crashes = 0
    for _ in range(1000):
        if rng.random() < 0.03:  # customers come and change between passes
            changes.new_customer()
        elif rng.random() < 0.3:
            changes.update_customer()
        full = rng.random() < 0.3
        # One number past the last point lets some passes finish, so the watermark moves.
        points.count, points.crash_at = 0, rng.randint(1, points_per_pass[full] + 1)
        try:
            run_sync(server, engine, "customer", windows[full], rillet)
            points_per_pass[full] = points.count
        except Crash:
            crashes += 1
        assert_watermark_not_ahead(engine, "customer")
    assert crashes > 700  # most passes really were cut short
    points.crash_at = -1
    run_sync(server, engine, "customer")
    assert_matches(server, engine, "customer")
    rillet.close()
    engine.dispose()


# ----------------------------------------------------------------------------- S8: deletes


def test_s8_deletes_are_inferred_only_from_a_complete_pass(
    server: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = warehouse(f"sqlite:///{tmp_path}/w.db")
    changes = activity(server, seed=8)
    for _ in range(4):
        changes.new_journal_entry()
    run_sync(server, engine, "journal_entry")
    before = set(truth(server, "journal_entry"))
    changes.delete_journal_entry()
    changes.delete_journal_entry()
    gone = before - set(truth(server, "journal_entry"))
    assert len(gone) == 2
    fetch, pages = RilletClient.get_page, [0]

    def fail_on_page_three(self: RilletClient, spec: Any, params: Any) -> Any:
        pages[0] += 1
        if pages[0] == 3:
            raise Crash("the pass fails half-way")
        return fetch(self, spec, params)

    monkeypatch.setattr(RilletClient, "get_page", fail_on_page_three)
    with pytest.raises(Crash):
        run_sync(server, engine, "journal_entry")
    monkeypatch.setattr(RilletClient, "get_page", fetch)
    table = table_for("journal_entry")

    def marked() -> set[str]:
        with engine.connect() as connection:
            query = sa.select(table.c.id).where(table.c.deleted_at.is_not(None))
            return set(connection.execute(query).scalars())

    assert marked() == set()  # a partial pass proves nothing
    run_sync(server, engine, "journal_entry")
    assert_matches(server, engine, "journal_entry")  # the deleted ones never live
    assert marked() == gone  # exactly the deleted ids
    engine.dispose()


# ----------------------------------------------------------------------------- S3: cursor expiry


@pytest.mark.parametrize("variant", ["silent-restart", "explicit-error"])
def test_s3_cursor_expiring_mid_pass_through_the_asset(
    server: SandboxServer, tmp_path: Path, variant: str, today: date
) -> None:
    faults = {"expire_cursor_after": 4, "cursor_error": int(variant == "explicit-error")}
    assert httpx.put(f"{server.base_url}/_sandbox/faults", json=faults).status_code == 200
    url = f"sqlite:///{tmp_path}/w.db"
    defs = build_definitions(settings_for(server, url, tmp_path, today))
    asset = assets_for(defs, "journal_entries")
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize(
            [asset], resources=defs.resources, instance=instance, tags=all_days(today)
        )
        assert result.success
        metadata = latest_metadata(instance, "journal_entries")
    assert metadata["api_cursor_restarts"] == 1
    pages = -(-len(truth(server, "journal_entry")) // 100)
    assert metadata["api_pages"] == pages + 4  # the 4 pages read before the expiry, again
    engine = make_engine(url)
    assert_matches(server, engine, "journal_entry")
    engine.dispose()


# ----------------------------------------------------------------------------- S4, S11


def test_s4_a_record_changed_during_a_pass_is_caught_by_the_next_run(
    server: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, today: date
) -> None:
    url = f"sqlite:///{tmp_path}/w.db"
    defs = build_definitions(settings_for(server, url, tmp_path, today))
    asset = assets_for(defs, "journal_entries")
    changes = activity(server, seed=9)
    for _ in range(3):
        changes.new_journal_entry()
    fetch = RilletClient.get_page
    changed: list[str] = []

    def get_page_then_change(self: RilletClient, spec: Any, params: Any) -> Any:
        answer = fetch(self, spec, params)
        if not changed:  # after the first page was read: this pass cannot see the changes
            changed.append(changes.update_journal_entry())
            changed.append(changes.new_journal_entry())
        return answer

    partition = today.isoformat()
    with dg.DagsterInstance.ephemeral() as instance:
        everything = dg.materialize(
            [asset], resources=defs.resources, instance=instance, tags=all_days(today)
        )
        assert everything.success
        monkeypatch.setattr(RilletClient, "get_page", get_page_then_change)
        first = dg.materialize(
            [asset], resources=defs.resources, instance=instance, partition_key=partition
        )
        monkeypatch.setattr(RilletClient, "get_page", fetch)
        assert first.success and changed
        engine = make_engine(url)
        assert len(read_records(engine, "journal_entry")) < len(truth(server, "journal_entry"))
        second = dg.materialize(
            [asset], resources=defs.resources, instance=instance, partition_key=partition
        )
        assert second.success
    assert_matches(server, engine, "journal_entry")
    assert_watermark_not_ahead(engine, "journal_entry")
    engine.dispose()


def test_s11_sequential_incremental_reads_and_a_future_window(
    server: SandboxServer, tmp_path: Path, today: date
) -> None:
    engine = warehouse(f"sqlite:///{tmp_path}/w.db")
    run_sync(server, engine, "customer")
    first_max = newest_committed(engine, "customer")
    assert first_max is not None
    changes = activity(server, seed=2)
    changes.update_customer()
    changes.new_customer()
    since = first_max
    with client(server) as rillet:
        stream = rillet.iter_records("customer", updated_since=since)
        second = list(stream)
    floor = since - rillet.lookback
    assert second, "the changed customers were read"
    assert all(datetime.fromisoformat(r["updated_at"]) > floor for r in second)
    stats = run_sync(server, engine, "customer", Window(start=since, end=None, full=False))
    assert stats.records == len(second)
    assert_matches(server, engine, "customer")
    tomorrow = datetime.combine(today + timedelta(days=1), datetime.min.time(), UTC)
    stats = run_sync(server, engine, "customer", Window(start=tomorrow, end=None, full=False))
    assert (stats.records, stats.requests) == (0, 1)
    assert_watermark_not_ahead(engine, "customer")
    engine.dispose()


# ----------------------------------------------------------------------------- S13


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_s13_two_runs_of_the_same_entity_at_once(
    server: SandboxServer, tmp_path: Path, backend: str, today: date
) -> None:
    """Two run processes (as two launched runs are) load the same entity into one warehouse."""
    url = f"sqlite:///{tmp_path}/w.db" if backend == "sqlite" else postgres_url(tmp_path.name)
    env = {
        **os.environ,
        "RILLET_BASE_URL": server.base_url,
        "RILLET_API_KEY": KEY,
        "RILLET_WAREHOUSE_URL": url,
        "RILLET_STATE_URL": f"sqlite:///{tmp_path}/state.db",
        "RILLET_RATE_LIMIT": "1000000/60",
        "RILLET_START_DATE": first_day(today),
    }
    command = [
        str(Path(sys.executable).with_name("dagster")),
        "asset",
        "materialize",
        "-m",
        "rillet_dagster.definitions",
        "--select",
        "rillet/invoices,rillet/invoice_items",
        "--partition-range",
        f"{first_day(today)}...{today.isoformat()}",
    ]
    homes = [tmp_path / f"home{n}" for n in range(2)]  # the runs share the warehouse only
    for home in homes:
        home.mkdir()
    runs = [
        subprocess.Popen(
            command,
            env={**env, "DAGSTER_HOME": str(home)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for home in homes
    ]
    for run in runs:
        _, stderr = run.communicate(timeout=240)
        assert run.returncode == 0, stderr.decode()[-3000:]
    engine = make_engine(url)
    assert_matches(server, engine, "invoice")
    table = table_for("invoice_item")
    with engine.connect() as connection:
        rows = connection.execute(sa.select(sa.func.count()).select_from(table)).scalar()
    assert rows == sum(len(r["items"]) for r in truth(server, "invoice").values())
    engine.dispose()


# ----------------------------------------------------------------------------- S15


@pytest.mark.postgres
def test_s15_postgres_restarted_mid_run_is_retried_and_no_half_batch_shows(
    server: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, today: date
) -> None:
    url = postgres_url(tmp_path.name)
    database = sa.make_url(url).database
    settings = settings_for(server, url, tmp_path, today)
    spec = catalog.entity("journal_entry")
    asset = entities.entity_asset(
        spec,
        entities.daily_partitions(settings),
        retry_policy=dg.RetryPolicy(max_retries=2, delay=0.1),
    )
    defs = build_definitions(settings)
    monkeypatch.setattr(sync, "BATCH_SIZE", 100)
    upsert = load.upsert_records
    calls = [0]
    seen_mid_run: list[int] = []

    def upsert_after_a_restart(connection: Any, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 4:  # three batches committed, then the server drops every connection
            admin = make_engine(ADMIN_URL)
            with admin.connect() as session:
                seen_mid_run.append(count_rows(url, "journal_entry"))
                session.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": database},
                )
            admin.dispose()
        return upsert(connection, *args, **kwargs)

    monkeypatch.setattr(load, "upsert_records", upsert_after_a_restart)
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize(
            [asset],
            resources=defs.resources,
            instance=instance,
            tags=all_days(today),
            raise_on_error=False,
        )
        assert result.success
        restarts = [
            e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_RESTARTED
        ]
    assert len(restarts) == 1
    assert seen_mid_run == [300]  # whole batches only, never part of one
    engine = make_engine(url)
    assert_matches(server, engine, "journal_entry")
    engine.dispose()


def count_rows(url: str, entity: str) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            table = table_for(entity)
            return int(
                connection.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            )
    finally:
        engine.dispose()


# ----------------------------------------------------------------------------- helpers


def first_day(today: date) -> str:
    """The first daily partition: two days before the test's ``today`` (the fixture)."""
    return (today - timedelta(days=2)).isoformat()


def settings_for(
    server: SandboxServer, warehouse_url: str, tmp_path: Path, today: date
) -> Settings:
    os.environ["RILLET_API_KEY"] = KEY
    return Settings.from_env(
        {
            "RILLET_BASE_URL": server.base_url,
            "RILLET_API_KEY": KEY,
            "RILLET_WAREHOUSE_URL": warehouse_url,
            "RILLET_STATE_URL": f"sqlite:///{tmp_path}/state.db",
            "RILLET_RATE_LIMIT": "1000000/60",
            "RILLET_START_DATE": first_day(today),
        }
    )


def assets_for(defs: dg.Definitions, table: str) -> dg.AssetsDefinition:
    key = dg.AssetKey(["rillet", table])
    return next(a for a in defs.assets or [] if key in a.keys)  # type: ignore[union-attr,return-value]


def all_days(today: date) -> dict[str, str]:
    return {
        "dagster/asset_partition_range_start": first_day(today),
        "dagster/asset_partition_range_end": today.isoformat(),
    }


def latest_metadata(instance: dg.DagsterInstance, table: str) -> dict[str, Any]:
    event = instance.get_latest_materialization_event(dg.AssetKey(["rillet", table]))
    assert event is not None and event.asset_materialization is not None
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}
