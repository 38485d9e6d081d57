"""Entity assets materialized with Dagster's own APIs against the sandbox, read back exactly."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pytest
import sqlalchemy as sa

from rillet_dagster import catalog
from rillet_dagster.definitions import build_definitions
from rillet_dagster.rillet.client import RilletClient
from rillet_dagster.sandbox.server import SandboxOptions, SandboxServer, build_sandbox
from rillet_dagster.settings import Settings
from rillet_dagster.warehouse.load import read_records
from rillet_dagster.warehouse.schema import make_engine, table_for, table_name
from tests import canary
from tests.pg import postgres_url
from tests.warehouse_compare import assert_warehouse_equals_sandbox

KEY = canary.api_key("assets")


def start_of(today: date) -> str:
    """A few daily partitions keep Dagster's per-partition bookkeeping quick; the first
    partition still takes everything updated before it, so the whole sandbox is read."""
    return (today - timedelta(days=3)).isoformat()


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxServer]:
    options = SandboxOptions(size="tiny", api_keys=(KEY,), rate_limit=1_000_000)
    server = SandboxServer(build_sandbox(options)).start()
    yield server
    server.stop()


def settings_for(
    server: SandboxServer, warehouse_url: str, state_url: str, today: date
) -> Settings:
    env = {
        "RILLET_BASE_URL": server.base_url,
        "RILLET_API_KEY": KEY,
        "RILLET_WAREHOUSE_URL": warehouse_url,
        "RILLET_STATE_URL": state_url,
        "RILLET_RATE_LIMIT": "1000000/60",
        "RILLET_START_DATE": start_of(today),
    }
    os.environ.update({"RILLET_API_KEY": KEY})
    return Settings.from_env(env)


def entity_assets(defs: dg.Definitions) -> list[dg.AssetsDefinition]:
    """The entity assets (keys ``rillet/<table>``), without reports and models."""
    return [
        a
        for a in defs.assets or []
        if all(len(k.path) == 2 and k.path[0] == "rillet" for k in a.keys)  # type: ignore[union-attr]
    ]


def materialize_everything(defs: dg.Definitions, instance: dg.DagsterInstance) -> None:
    assets = entity_assets(defs)
    unpartitioned = [a for a in assets if a.partitions_def is None]  # type: ignore[union-attr]
    partitioned = [a for a in assets if a.partitions_def is not None]  # type: ignore[union-attr]
    assert dg.materialize(unpartitioned, resources=defs.resources, instance=instance).success
    keys = partitioned[0].partitions_def.get_partition_keys()  # type: ignore[union-attr]
    result = dg.materialize(
        partitioned,
        resources=defs.resources,
        instance=instance,
        tags={
            "dagster/asset_partition_range_start": keys[0],
            "dagster/asset_partition_range_end": keys[-1],
        },
    )
    assert result.success


def truth(server: SandboxServer, entity: str) -> list[dict[str, Any]]:
    store = server.sandbox.world.store
    with store.lock:
        if entity in store.singletons:
            single = store.singletons[entity]
            return [single] if single else []
        source = "journal_entry" if entity == "reporting_journal_entry" else entity
        return list(store[source].all_records())


def check_warehouse_matches(server: SandboxServer, warehouse_url: str) -> None:
    """Every catalog entity (singletons and the reporting view included): 0 lost, 0 duplicated,
    every column of every header and child table equal (see tests/warehouse_compare.py)."""
    assert_warehouse_equals_sandbox(server, warehouse_url, [spec.name for spec in catalog.ENTITIES])


def test_definitions_load_and_snapshot(today: date) -> None:
    defs = build_definitions(Settings.from_env({"RILLET_START_DATE": start_of(today)}))
    dg.Definitions.validate_loadable(defs)
    snapshot = {}
    for assets_def in entity_assets(defs):
        for key in assets_def.keys:  # type: ignore[union-attr]
            snapshot["/".join(key.path)] = (
                assets_def.group_names_by_key[key],  # type: ignore[union-attr]
                type(assets_def.partitions_def).__name__ if assets_def.partitions_def else None,  # type: ignore[union-attr]
            )
    assert snapshot["rillet/invoices"] == ("rillet_entities", "DailyPartitionsDefinition")
    assert snapshot["rillet/invoice_items"] == ("rillet_entities", "DailyPartitionsDefinition")
    assert snapshot["rillet/bill_payments"] == ("rillet_entities", "DailyPartitionsDefinition")
    assert snapshot["rillet/products"] == ("rillet_entities", None)
    assert snapshot["rillet/reporting_journal_entries"][0] == "rillet_reports"
    expected_tables = {table_name(e.name) for e in catalog.ENTITIES} | {
        table_name(c.name) for e in catalog.ENTITIES for c in e.children
    }
    assert {k.removeprefix("rillet/") for k in snapshot} == expected_tables
    # No pool: the shared rate budget protects Rillet, and a killed run holds no slot.
    for assets_def in entity_assets(defs):
        assert assets_def.op.pool is None
    assert defs.resolve_job_def("sync_all") is not None


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_materializing_every_entity_loads_exactly_the_sandbox(
    sandbox: SandboxServer, tmp_path: Path, backend: str, today: date
) -> None:
    warehouse_url = (
        f"sqlite:///{tmp_path}/warehouse.db" if backend == "sqlite" else postgres_url(tmp_path.name)
    )
    state_url = f"sqlite:///{tmp_path}/state.db"
    defs = build_definitions(settings_for(sandbox, warehouse_url, state_url, today))
    with dg.DagsterInstance.ephemeral() as instance:
        materialize_everything(defs, instance)
        check_warehouse_matches(sandbox, warehouse_url)
        # A rerun changes nothing.
        materialize_everything(defs, instance)
        check_warehouse_matches(sandbox, warehouse_url)
        events = instance.fetch_materializations(
            dg.AssetKey(["rillet", "invoices"]), limit=1
        ).records
        metadata = events[0].asset_materialization.metadata  # type: ignore[union-attr]
        assert metadata["rows_inserted"].value == 0 and metadata["rows_updated"].value == 0


def test_missing_api_key_for_a_real_host_fails_at_resource_setup(
    tmp_path: Path, today: date
) -> None:
    settings = Settings.from_env(
        {
            "RILLET_BASE_URL": "production",
            "RILLET_START_DATE": start_of(today),
            "RILLET_WAREHOUSE_URL": f"sqlite:///{tmp_path}/w.db",
            "RILLET_STATE_URL": f"sqlite:///{tmp_path}/s.db",
        }
    )
    defs = build_definitions(settings)
    products = next(a for a in defs.assets or [] if dg.AssetKey(["rillet", "products"]) in a.keys)  # type: ignore[union-attr]
    with (
        dg.DagsterInstance.ephemeral() as instance,
        pytest.raises(dg.DagsterInvariantViolationError, match="RILLET_API_KEY"),
    ):
        dg.materialize([products], resources=defs.resources, instance=instance)


def test_unreachable_warehouse_fails_clearly_and_records_nothing(
    sandbox: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, today: date
) -> None:
    secret = canary.password("unreachable")
    url = f"postgresql+psycopg://nobody:{secret}@127.0.0.1:1/none"
    # A URL with a password reaches the resource as EnvVar("RILLET_WAREHOUSE_URL").
    monkeypatch.setenv("RILLET_WAREHOUSE_URL", url)
    defs = build_definitions(settings_for(sandbox, url, f"sqlite:///{tmp_path}/state.db", today))
    products = next(a for a in defs.assets or [] if dg.AssetKey(["rillet", "products"]) in a.keys)  # type: ignore[union-attr]
    with dg.DagsterInstance.ephemeral() as instance:
        with pytest.raises(
            dg.DagsterInvariantViolationError, match="RILLET_WAREHOUSE_URL"
        ) as caught:
            dg.materialize([products], resources=defs.resources, instance=instance)
        assert secret not in str(caught.value)
        assert (
            instance.get_latest_materialization_event(dg.AssetKey(["rillet", "products"])) is None
        )


@pytest.mark.parametrize(
    "command",
    [["dagster", "definitions", "validate", "-w", "workspace.yaml"], ["dg", "check", "defs"]],
    ids=["dagster-definitions-validate", "dg-check-defs"],
)
def test_dagster_command_line_accepts_the_code_location(command: list[str], tmp_path: Path) -> None:
    executable = Path(sys.executable).with_name(command[0])
    result = subprocess.run(
        [str(executable), *command[1:]],
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "DAGSTER_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_90_day_invoice_backfill_costs_one_pass(
    sandbox: SandboxServer, tmp_path: Path, today: date
) -> None:
    urls = (f"sqlite:///{tmp_path}/w.db", f"sqlite:///{tmp_path}/s.db")
    settings = settings_for(sandbox, *urls, today)
    settings = dataclasses.replace(settings, start_date=today - timedelta(days=120))
    defs = build_definitions(settings)
    invoices = next(a for a in defs.assets or [] if dg.AssetKey(["rillet", "invoices"]) in a.keys)  # type: ignore[union-attr]
    first, last = (today - timedelta(days=90)).isoformat(), today.isoformat()
    stats_url = f"{sandbox.base_url}/_sandbox/stats"
    httpx.post(f"{stats_url}/reset")
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize(
            [invoices],
            resources=defs.resources,
            instance=instance,
            tags={
                "dagster/asset_partition_range_start": first,
                "dagster/asset_partition_range_end": last,
            },
        )
        assert result.success
    backfill = httpx.get(stats_url).json()["requests"].get("GET /invoices", 0)
    httpx.post(f"{stats_url}/reset")
    since = datetime.combine(today - timedelta(days=90), datetime.min.time(), UTC)
    with RilletClient(api_key=KEY, base_url=sandbox.base_url) as client:
        records = list(client.iter_records("invoice", updated_since=since))
    single = httpx.get(stats_url).json()["requests"].get("GET /invoices", 0)
    assert records and backfill == single == max(1, -(-len(records) // 100))


def test_a_record_deleted_in_rillet_is_soft_deleted_by_the_next_full_sync(
    sandbox: SandboxServer, tmp_path: Path, today: date
) -> None:
    warehouse_url = f"sqlite:///{tmp_path}/w.db"
    defs = build_definitions(
        settings_for(sandbox, warehouse_url, f"sqlite:///{tmp_path}/s.db", today)
    )
    entries = next(
        a for a in defs.assets or [] if dg.AssetKey(["rillet", "journal_entries"]) in a.keys
    )  # type: ignore[union-attr]
    keys = entries.partitions_def.get_partition_keys()  # type: ignore[union-attr]
    tags = {
        "dagster/asset_partition_range_start": keys[0],
        "dagster/asset_partition_range_end": keys[-1],
    }
    world = sandbox.sandbox.world
    victim = world.bulk.record_id(7)  # type: ignore[union-attr]  # a manual entry, deletable
    with dg.DagsterInstance.ephemeral() as instance:
        assert dg.materialize(
            [entries], resources=defs.resources, instance=instance, tags=tags
        ).success
        response = httpx.delete(
            f"{sandbox.base_url}/journal-entries/{victim}",
            headers={"Authorization": f"Bearer {KEY}"},
        )
        assert response.status_code == 204
        assert dg.materialize(
            [entries], resources=defs.resources, instance=instance, tags=tags
        ).success
        latest = instance.get_latest_materialization_event(
            dg.AssetKey(["rillet", "journal_entries"])
        )
        assert latest.asset_materialization.metadata["rows_soft_deleted"].value == 1  # type: ignore[union-attr]
    engine = make_engine(warehouse_url)
    with engine.connect() as connection:
        table = table_for("journal_entry")
        deleted_at = connection.execute(
            sa.select(table.c.deleted_at).where(table.c.id == victim)
        ).scalar_one()
    engine.dispose()
    assert deleted_at is not None
    assert victim not in {
        r["id"] for r in read_records(make_engine(warehouse_url), "journal_entry")
    }


def test_sync_all_from_the_command_line(
    sandbox: SandboxServer, tmp_path: Path, today: date
) -> None:
    warehouse_url = f"sqlite:///{tmp_path}/w.db"
    env = {
        **os.environ,
        "RILLET_BASE_URL": sandbox.base_url,
        "RILLET_API_KEY": KEY,
        "RILLET_WAREHOUSE_URL": warehouse_url,
        "RILLET_STATE_URL": f"sqlite:///{tmp_path}/s.db",
        "RILLET_RATE_LIMIT": "1000000/60",
        "RILLET_START_DATE": start_of(today),
        "DAGSTER_HOME": str(tmp_path),
    }
    tags = {
        "dagster/asset_partition_range_start": start_of(today),
        "dagster/asset_partition_range_end": today.isoformat(),
    }
    command = [
        "job",
        "execute",
        "-m",
        "rillet_dagster.definitions",
        "-j",
        "sync_all",
        "--tags",
        json.dumps(tags),
    ]
    result = subprocess.run(
        [str(Path(sys.executable).with_name("dagster")), *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    check_warehouse_matches(sandbox, warehouse_url)


@pytest.mark.parametrize("warehouse", ["sqlite", "postgresql"])
def test_the_api_key_and_database_passwords_never_leak(
    sandbox: SandboxServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    warehouse: str,
    today: date,
) -> None:
    """X1: a canary key, DEBUG logging everywhere (httpx and httpcore included); on PostgreSQL
    a canary password in the warehouse URL too (trust authentication ignores it). Read back
    here from the run's own records; ``tests/canary.py`` watches every test the same way."""
    key = canary.api_key("x1")
    password = canary.password("x1")
    sandbox.sandbox.config.api_keys = frozenset({*sandbox.sandbox.config.api_keys, key})
    warehouse_url = f"sqlite:///{tmp_path}/w.db"
    if warehouse == "postgresql":
        plain = sa.engine.make_url(postgres_url("x1_canary"))
        warehouse_url = plain.set(password=password).render_as_string(hide_password=False)
    env = {
        "RILLET_BASE_URL": sandbox.base_url,
        "RILLET_API_KEY": key,
        "RILLET_WAREHOUSE_URL": warehouse_url,
        "RILLET_STATE_URL": f"sqlite:///{tmp_path}/s.db",
        "RILLET_RATE_LIMIT": "1000000/60",
        "RILLET_START_DATE": start_of(today),
    }
    # Resources read secrets through EnvVar, that is from the process environment.
    monkeypatch.setenv("RILLET_API_KEY", key)
    monkeypatch.setenv("RILLET_WAREHOUSE_URL", warehouse_url)
    secrets = [key, password]
    defs = build_definitions(Settings.from_env(env))
    chosen = [
        a
        for a in defs.assets or []
        if {dg.AssetKey(["rillet", "products"]), dg.AssetKey(["rillet", "invoices"])} & set(a.keys)  # type: ignore[union-attr]
    ]
    caplog.set_level("DEBUG")
    with dg.DagsterInstance.ephemeral() as instance:
        for assets_def in chosen:
            tags = {}
            if assets_def.partitions_def is not None:  # type: ignore[union-attr]
                tags = {
                    "dagster/asset_partition_range_start": start_of(today),
                    "dagster/asset_partition_range_end": today.isoformat(),
                }
            result = dg.materialize(
                [assets_def], resources=defs.resources, instance=instance, tags=tags
            )
            assert result.success
            run = instance.get_run_by_id(result.run_id)
            shown = json.dumps(run.run_config, default=str)  # type: ignore[union-attr]
            logs = "".join(str(entry) for entry in instance.all_logs(result.run_id))
            for secret in secrets:
                assert secret not in shown and secret not in logs
        resources = defs.resources or {}
        repr_text = repr(resources) + "".join(repr(r) for r in resources.values())
        for secret in secrets:
            assert secret not in repr_text
    for secret in secrets:
        assert secret not in caplog.text
    assert "invoice" in caplog.text.lower()  # the logs were really captured
    if warehouse == "postgresql":
        assert isinstance(resources["warehouse"].url, dg.EnvVar)
        engine = make_engine(warehouse_url)  # the password-bearing URL was the one used
        assert len(read_records(engine, "invoice")) == len(truth(sandbox, "invoice"))
        engine.dispose()
