"""Sync integrity (test-matrix rows S1-S4, S11, S13, S15): crashes, expiring cursors, changes
mid-pass, concurrent runs and a database restart never lose or duplicate a row, and the
watermark is never ahead of what the warehouse holds."""

from __future__ import annotations

import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import psycopg
import pytest
import sqlalchemy as sa

from rillet_dagster import catalog
from rillet_dagster.assets import entities, sync
from rillet_dagster.assets.sync import Window, sync_entity
from rillet_dagster.definitions import build_definitions
from rillet_dagster.rillet.client import RilletClient
from rillet_dagster.rillet.money import minor_units
from rillet_dagster.sandbox.activity import Activity
from rillet_dagster.sandbox.server import SandboxOptions, SandboxServer, build_sandbox
from rillet_dagster.settings import Settings
from rillet_dagster.warehouse import load
from rillet_dagster.warehouse.load import get_watermark, read_records
from rillet_dagster.warehouse.schema import WATERMARKS_TABLE, ensure_schema, make_engine, table_for
from tests import canary
from tests.crash_inject import Job, KillServer, Outcome, Point
from tests.pg import postgres_url
from tests.pg_cluster import PrivateCluster, private_postgres_fixture  # noqa: F401
from tests.warehouse_compare import (
    Truth,
    assert_warehouse_equals,
    assert_warehouse_equals_sandbox,
    sandbox_truth,
)

KEY = canary.api_key("integrity")
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

# Pages killed in the first load; the re-sync kills the others. A page is killed once per
# backend (at a point drawn with a seeded RNG), not at each of its points: a kill costs about
# 1.5 s with its rerun and checks.
S1_FIRST_LOAD_PAGES = 5
JOURNAL_TABLES = ("journal_entry", "journal_entry_item")


@pytest.fixture(scope="module")
def kill_server() -> Iterator[KillServer]:
    with KillServer() as started:
        yield started


class Warehouses:
    """Throwaway warehouses of one backend: empty ones and copies of others. On PostgreSQL each
    is a schema of one database (its URL sets the search path): creating and dropping a
    database costs about a second and a checkpoint of the shared server."""

    def __init__(self, backend: str, tmp_path: Path) -> None:
        self.backend, self.tmp_path = backend, tmp_path
        self.database = postgres_url(tmp_path.name) if backend == "postgresql" else ""

    def url(self, name: str) -> str:
        if self.backend == "sqlite":
            return f"sqlite:///{self.tmp_path}/{name}.db"
        url = sa.make_url(self.database).update_query_dict({"options": f"-csearch_path={name}"})
        return url.render_as_string(hide_password=False)

    def empty(self, name: str) -> str:
        if self.backend == "postgresql":
            with self._admin() as admin:
                admin.execute(sa.text(f'CREATE SCHEMA "{name}"'))
        warehouse(self.url(name)).dispose()
        return self.url(name)

    def copy(self, source: str, name: str) -> str:
        """A copy of the warehouse at ``source``: on SQLite all of it, on PostgreSQL the tables
        a journal-entry pass uses (with their indexes and rows), not the 35 others."""
        url = self.url(name)
        if self.backend == "sqlite":
            with (
                sqlite3.connect(sa.make_url(source).database or "") as origin,
                sqlite3.connect(sa.make_url(url).database or "") as target,
            ):
                origin.backup(target)
            return url
        origin = _schema(source)
        with self._admin() as admin:
            admin.execute(sa.text(f'CREATE SCHEMA "{name}"'))
            for table in (*(table_for(t).name for t in JOURNAL_TABLES), WATERMARKS_TABLE):
                new, old = f'"{name}"."{table}"', f'"{origin}"."{table}"'
                admin.execute(sa.text(f"CREATE TABLE {new} (LIKE {old} INCLUDING ALL)"))
                admin.execute(sa.text(f"INSERT INTO {new} SELECT * FROM {old}"))  # noqa: S608
        return url

    def drop(self, url: str) -> None:
        """Remove a SQLite warehouse no longer needed: the suite scans the files a test leaves
        (the test's PostgreSQL database goes as a whole when a later session recreates it)."""
        if self.backend == "sqlite":
            for suffix in ("", "-wal", "-shm"):
                Path(f"{sa.make_url(url).database}{suffix}").unlink(missing_ok=True)

    @contextmanager
    def _admin(self) -> Iterator[sa.Connection]:
        engine = sa.create_engine(self.database)
        try:
            with engine.begin() as connection:
                yield connection
        finally:
            engine.dispose()


def _schema(url: str) -> str:
    return str(sa.make_url(url).query["options"]).removeprefix("-csearch_path=")


def change_journal_entries(server: SandboxServer, seed: int) -> None:
    """New, corrected and deleted entries, the corrections spread over every page: each
    corrected entry gets new amounts (money columns) and new lines (child rows replaced)."""
    world, writer = server.sandbox.world, server.sandbox.writer
    posted = set(world.posting_of.values())  # entries a document posts cannot be changed
    with world.store.lock:
        records = list(world.store["journal_entry"].all_records())
    rng = random.Random(seed)
    changeable = [r for r in records if r["id"] not in posted]
    for page in range(0, len(records), 100):
        on_page = [r for r in records[page : page + 100] if r["id"] not in posted]
        for entry in rng.sample(on_page, min(2, len(on_page))):
            step = Decimal(1).scaleb(-minor_units(entry["currency"])) * rng.randint(1, 99)
            items = [
                {k: item[k] for k in ("account_code", "side", "amount", "description")}
                for item in entry["items"]
            ]
            for side in ("DEBIT", "CREDIT"):  # the same step on both sides keeps it balanced
                item = next(i for i in items if i["side"] == side)
                amount = Decimal(item["amount"]["amount"]) + step
                item["amount"] = {"amount": str(amount), "currency": entry["currency"]}
            writer.replace_journal_entry(
                id=entry["id"],
                body={
                    "name": f"{entry['name']} (corrected)",
                    "currency": entry["currency"],
                    "date": entry["date"],
                    "items": items,
                },
            )
            changeable.remove(entry)
    for entry in rng.sample(changeable, 2):
        writer.delete_journal_entry(id=entry["id"])
    changes = activity(server, seed=seed)
    for _ in range(3):
        changes.new_journal_entry()


HEADER_WRITES = ("INSERT journal_entries", "COPY journal_entries")


def kill_points(points: tuple[Point, ...], pages: list[int], rng: random.Random) -> list[Point]:
    """In the transaction of each of ``pages`` (numbered from 0), one point drawn among those
    after its header rows were written: its child-table writes (their lines not yet written,
    or deleted and not yet replaced) and its commit (every row written, none committed); then
    the commits of the deletions and of the watermark."""
    commits = [p for p in points if p.what == "commit"]
    loads = [p.txn for p in commits if any(t.startswith("record:") for t in p.open)]
    chosen = []
    for page in sorted(pages):
        written = next(p.index for p in points if p.txn == loads[page] and p.what in HEADER_WRITES)
        chosen.append(
            rng.choice(
                [
                    p
                    for p in points
                    if p.txn == loads[page]
                    and p.index > written
                    and (p.what == "commit" or p.what.endswith("journal_entry_items"))
                ]
            )
        )
    return chosen + commits[-2:]


Snapshot = tuple[dict[str, tuple[Any, ...]], dict[tuple[str, str], tuple[Any, ...]]]


def snapshot(url: str) -> Snapshot:
    """Every header row (by id) and line (by parent and key) of the journal entries, every
    column but when and by which run a row was written (and of ``deleted_at`` only whether
    it is set): two warehouses that hold the same data compare equal."""
    header, lines = (table_for(t) for t in JOURNAL_TABLES)
    left_out = {"_synced_at", "_run_id", "deleted_at"}

    def kept(table: sa.Table) -> list[Any]:
        # The record as the database's text of it: parsing 2,800 JSON values per look costs.
        return [
            sa.cast(c, sa.Text).label(c.name) if c.name == "_record" else c
            for c in table.columns
            if c.name not in left_out
        ]

    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            headers = {
                row.id: (*row[:-1], row.deleted_at is not None)
                for row in connection.execute(sa.select(*kept(header), header.c.deleted_at))
            }
            columns = kept(lines)
            items = {
                (row.parent_id, row.line_key): tuple(row)
                for row in connection.execute(sa.select(*columns))
            }
    finally:
        engine.dispose()
    return headers, items


def expected_after_kill(before: Snapshot, whole: Snapshot, outcome: Outcome) -> Snapshot:
    """The warehouse after a killed pass: as before it, except the records of the committed
    transactions, as the whole pass wrote them (the sandbox does not change during a pass),
    and the soft deletes if their transaction committed."""
    committed = outcome.committed_records()
    deleted = {i for i, r in whole[0].items() if r[-1]} - {i for i, r in before[0].items() if r[-1]}
    replaced = committed | (deleted if "deletions" in outcome.committed else set())
    headers = {i: r for i, r in before[0].items() if i not in replaced}
    headers |= {i: r for i, r in whole[0].items() if i in replaced}
    items = {k: r for k, r in before[1].items() if k[0] not in committed}
    items |= {k: r for k, r in whole[1].items() if k[0] in committed}
    return headers, items


def assert_same(label: str, got: Snapshot, expected: Snapshot) -> None:
    for table, have, want in zip(("header", "line"), got, expected, strict=True):
        wrong = sorted(k for k in have.keys() | want.keys() if have.get(k) != want.get(k))
        assert not wrong, (
            f"{label}: {len(wrong)} {table} rows differ, e.g. {wrong[0]}: "
            f"{have.get(wrong[0])} instead of {want.get(wrong[0])}"
        )


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_s1_sigkill_inside_the_write_transactions_then_a_rerun_loses_and_duplicates_nothing(
    server: SandboxServer, tmp_path: Path, backend: str, kill_server: KillServer
) -> None:
    """Passes SIGKILLed inside their write transactions (pages' child-table writes and
    commits, the deletions' and the watermark's commits), on a first load and on a re-sync
    where rows of every page changed: the killed transaction left nothing, committed ones are
    whole, the watermark did not move, and a rerun catches up exactly."""
    pages = -(-len(truth(server, "journal_entry")) // 100)
    assert pages >= 5
    warehouses = Warehouses(backend, tmp_path)
    rng = random.Random(20261201)
    order = rng.sample(range(pages), pages)
    empty = warehouses.empty("empty")
    loaded = warehouses.copy(empty, "loaded")
    first = sandbox_truth(server, "journal_entry")
    sweep = order[:S1_FIRST_LOAD_PAGES]
    kill_sweep(server, kill_server, warehouses, empty, loaded, first, pages, sweep, rng)
    change_journal_entries(server, seed=17)
    second = sandbox_truth(server, "journal_entry")
    changed = {i for i, r in second.live.items() if first.live.get(i) != r}
    assert len(changed) >= 2 * pages and len(second.deleted) == 2
    assert -(-len(second.live) // 100) == pages
    sweep = order[S1_FIRST_LOAD_PAGES:]
    kill_sweep(server, kill_server, warehouses, loaded, None, second, pages, sweep, rng)


def kill_sweep(
    server: SandboxServer,
    kill_server: KillServer,
    warehouses: Warehouses,
    start: str,
    whole: str | None,
    after: Truth,
    pages: int,
    killed_pages: list[int],
    rng: random.Random,
) -> None:
    """Passes from the warehouse ``start`` while the sandbox holds ``after``: a whole one first
    (into ``whole``, else a copy of ``start``), numbering the points where one can be killed;
    then one killed at each chosen point, each into its own copy of ``start``."""
    engine = make_engine(start)
    watermark = stored_watermark(engine, "journal_entry")
    engine.dispose()
    before = snapshot(start)
    prefix = "re" if whole is None else ""  # names apart from the first sweep's
    whole = whole or warehouses.copy(start, "whole")
    [dry] = kill_server.run([sweep_job(server, whole, "whole", warehouses)])
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert_warehouse_equals(whole, {"journal_entry": after})
    reference = snapshot(whole)
    # Transactions that load pages (one each), then the deletions' and the watermark's.
    commits = [p for p in dry.points if p.what == "commit"]
    assert [c.open for c in commits[-2:]] == [("deletions",), ("watermark",)]
    assert dry.committed_records() == set(after.live)  # every live record, once loaded
    points = kill_points(dry.points, killed_pages, rng)
    urls = {p.index: warehouses.copy(start, f"{prefix}k{p.index}") for p in points}
    jobs = [
        sweep_job(server, urls[p.index], f"{prefix}k{p.index}", warehouses, p.index) for p in points
    ]
    for point, outcome in zip(points, kill_server.run(jobs), strict=True):
        label = f"killed before point {point.index} ({point.what}, transaction {point.txn})"
        assert outcome.returncode == -signal.SIGKILL, (label, outcome.stderr[-3000:])
        assert outcome.killed_at == point, label  # on the whole pass's path
        url = urls[point.index]
        # The killed transaction left nothing: its records' rows and lines are as before.
        killed = outcome.uncommitted_records()
        assert killed or point.open in (("deletions",), ("watermark",)), label
        now = snapshot(url)
        assert {i: now[0].get(i) for i in killed} == {i: before[0].get(i) for i in killed}, label
        assert {k: r for k, r in now[1].items() if k[0] in killed} == {
            k: r for k, r in before[1].items() if k[0] in killed
        }, label
        # Every committed transaction is whole (headers with their lines), nothing else moved.
        assert_same(label, now, expected_after_kill(before, reference, outcome))
        assert now[0].keys() <= {parent for parent, _ in now[1]}, f"{label}: a header, no lines"
        engine = make_engine(url)
        # The watermark moves only when a whole pass ends, and is never ahead of the rows.
        assert stored_watermark(engine, "journal_entry") == watermark, label
        assert_watermark_not_ahead(engine, "journal_entry")
        stats = run_sync(server, engine, "journal_entry")
        assert stats.requests <= pages + 1, label
        assert_matches(server, engine, "journal_entry")
        assert stored_watermark(engine, "journal_entry") == newest_committed(
            engine, "journal_entry"
        )
        engine.dispose()
        warehouses.drop(url)


def sweep_job(
    server: SandboxServer, url: str, name: str, warehouses: Warehouses, kill_at: int = 0
) -> Job:
    journal = warehouses.tmp_path / f"journal-{name}.json"
    return Job(server.base_url, KEY, url, "journal_entry", 100, kill_at, str(journal))


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


class RestartMidBatch:
    """Stops the private PostgreSQL (``immediate``: as a crash) while the sync writes batch
    ``batch``, after its header rows, at the COPY of their lines, and starts it again after
    ``down_for`` seconds; right after the restart, before any retry may connect, it looks at
    the warehouse from a connection of its own."""

    def __init__(
        self, cluster: PrivateCluster, url: str, truth: Truth, batch: int, down_for: float
    ) -> None:
        self.cluster, self.url, self.truth = cluster, url, truth
        self.batch, self.down_for = batch, down_for
        self.batches: list[list[str]] = []  # the ids of each batch the sync began to write
        self.inside: tuple[int, int] | None = None  # rows and lines its transaction saw
        self.seen: set[str] | None = None  # the ids a separate connection saw after the restart
        self.watermark: datetime | None = None  # and the watermark
        self.error: BaseException | None = None
        self.stopped = threading.Event()
        self.gate = threading.Lock()
        self.thread = threading.Thread(target=self._restart, name="pg-restart")

    @contextmanager
    def installed(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        upsert = load.upsert_records

        def upsert_records(target: Any, spec: Any, records: Any, **kwargs: Any) -> Any:
            records = list(records)
            self.batches.append([r["id"] for r in records])
            return upsert(target, spec, records, **kwargs)

        monkeypatch.setattr(load, "upsert_records", upsert_records)
        # The loader COPYs lines through psycopg, past SQLAlchemy's statement events.
        copy = psycopg.Cursor.copy

        @contextmanager
        def copy_lines(cursor: Any, statement: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
            self._before_copy(cursor, str(statement))
            with copy(cursor, statement, *args, **kwargs) as writer:
                yield writer

        monkeypatch.setattr(psycopg.Cursor, "copy", copy_lines)
        sa.event.listen(sa.Engine, "do_connect", self._gate)
        try:
            yield
        finally:
            sa.event.remove(sa.Engine, "do_connect", self._gate)
            if self.thread.is_alive():
                self.thread.join(timeout=120)

    def _before_copy(self, cursor: Any, statement: str) -> None:
        """At the COPY of the batch's lines (its header rows written): stop the server."""
        header, lines = table_for("journal_entry").name, table_for("journal_entry_item").name
        if self.thread.ident is None and len(self.batches) == self.batch and lines in statement:
            with cursor.connection.cursor() as probe:
                probe.execute(
                    f"SELECT (SELECT count(*) FROM {header}), (SELECT count(*) FROM {lines})"  # noqa: S608
                )
                self.inside = probe.fetchone()
            self.thread.start()
            assert self.stopped.wait(timeout=60), "PostgreSQL did not stop"
            # The COPY now meets a server that is gone.

    def _gate(self, *_: Any) -> None:
        """Connections (but the look's) wait while the server restarts and is looked at."""
        if self.stopped.is_set() and threading.current_thread() is not self.thread:
            with self.gate:
                pass

    def _restart(self) -> None:
        try:
            try:
                self.cluster.stop("immediate")
            finally:
                self.stopped.set()
            time.sleep(self.down_for)  # retries meanwhile find no server
            with self.gate:
                self.cluster.start()
                self._look()
        except BaseException as error:  # reported by the test, not lost in this thread
            self.error = error

    def _look(self) -> None:
        """Whole batches only: exactly the records of the batches committed before the crash,
        every column and line of each, and nothing of the batch cut short."""
        committed = {i for ids in self.batches[: self.batch - 1] for i in ids}
        engine = make_engine(self.url)
        try:
            with engine.connect() as connection:
                table = table_for("journal_entry")
                self.seen = set(connection.execute(sa.select(table.c.id)).scalars())
                self.watermark = get_watermark(connection, "journal_entry")
                wanted = Truth({i: self.truth.live[i] for i in committed})
                assert_warehouse_equals(connection, {"journal_entry": wanted})
        finally:
            engine.dispose()


@pytest.mark.postgres
def test_s15_postgres_restarted_mid_batch_is_retried_and_no_half_batch_shows(
    server: SandboxServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    today: date,
    private_postgres: PrivateCluster,
) -> None:
    """A real stop (``-m immediate``) and start of PostgreSQL while a batch is half written."""
    url = private_postgres.create_database("warehouse")
    settings = settings_for(server, url, tmp_path, today)
    spec = catalog.entity("journal_entry")
    asset = entities.entity_asset(
        spec,
        entities.daily_partitions(settings),
        retry_policy=dg.RetryPolicy(max_retries=6, delay=0.2),
    )
    defs = build_definitions(settings)
    monkeypatch.setattr(sync, "BATCH_SIZE", 100)
    truth = sandbox_truth(server, "journal_entry")
    crash = RestartMidBatch(private_postgres, url, truth, batch=4, down_for=0.5)
    with crash.installed(monkeypatch), dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize(
            [asset],
            resources=defs.resources,
            instance=instance,
            tags=all_days(today),
            raise_on_error=False,
        )
    if crash.error is not None:
        raise crash.error
    # The crash hit an open transaction: the 4th batch's header rows written, no line of them.
    lines_of = {i: len(truth.live[i]["items"]) for i in truth.live}
    first_three = [i for ids in crash.batches[:3] for i in ids]
    assert crash.inside == (400, sum(lines_of[i] for i in first_three))
    assert crash.seen == set(first_three)  # after the restart, before any retry connected
    assert crash.watermark is None  # a first load: no watermark before the pass ends
    assert result.success
    retried = [
        e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY
    ]
    assert retried, "the step failed and was retried"
    first_error = retried[0].step_retry_data.error
    assert first_error is not None and "OperationalError" in _error_chain(first_error)
    restarts = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_RESTARTED]
    assert len(restarts) == len(retried)
    engine = make_engine(url)
    assert_matches(server, engine, "journal_entry")
    assert stored_watermark(engine, "journal_entry") == newest_committed(engine, "journal_entry")
    engine.dispose()


def _error_chain(error: Any) -> str:
    """Every class name and message of a Dagster error and its causes."""
    parts = []
    while error is not None:
        parts.append(f"{error.cls_name}: {error.message}")
        error = error.cause
    return "\n".join(parts)


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
