"""Checks on simulator data: all pass; a corrupted warehouse amount is named with its difference.

One synced warehouse for the module: entities synced from the sandbox, subsidiary partitions
added by the sensor that reads the warehouse, the month-end pack launched the way the
period-close sensor asks for it, then the daily trial balance and the models with their checks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa

from rillet_dagster import catalog
from rillet_dagster.assets import checks, models
from rillet_dagster.assets.reports import (
    CONSOLIDATED,
    MONTHLY_REPORTS,
    SUBSIDIARY_PARTITIONS_NAME,
    partition_key,
    report_asset_key,
    report_period,
)
from rillet_dagster.automation.report_schedules import DAILY_TRIAL_BALANCE_JOB
from rillet_dagster.definitions import build_definitions
from rillet_dagster.sandbox.server import SandboxOptions, SandboxServer, build_sandbox
from rillet_dagster.settings import Settings
from rillet_dagster.warehouse import reports as store
from rillet_dagster.warehouse.schema import make_engine, table_for
from tests import canary
from tests.pg import postgres_url

KEY = canary.api_key("checks")


@dataclass
class Synced:
    server: SandboxServer
    defs: dg.Definitions
    instance: dg.DagsterInstance
    engine: sa.Engine
    subsidiaries: list[str]
    closed_month: str
    evaluations: list[dg.AssetCheckEvaluation]
    yesterday: date  # the daily trial balance's day: the last complete day when synced


def entity_assets(defs: dg.Definitions) -> list[dg.AssetsDefinition]:
    return [
        a
        for a in defs.assets or []
        if all(len(k.path) == 2 and k.path[0] == "rillet" for k in a.keys)  # type: ignore[union-attr]
    ]


def sync_entities(defs: dg.Definitions, instance: dg.DagsterInstance) -> None:
    assets = entity_assets(defs)
    full = [a for a in assets if a.partitions_def is None]
    daily = [a for a in assets if a.partitions_def is not None]
    assert dg.materialize(full, resources=defs.resources, instance=instance).success
    keys = daily[0].partitions_def.get_partition_keys()  # type: ignore[union-attr]
    tags = {
        "dagster/asset_partition_range_start": keys[0],
        "dagster/asset_partition_range_end": keys[-1],
    }
    assert dg.materialize(daily, resources=defs.resources, instance=instance, tags=tags).success


def tick(defs: dg.Definitions, instance: dg.DagsterInstance, name: str) -> Any:
    sensor = defs.resolve_sensor_def(name)
    with dg.build_sensor_context(
        instance=instance,
        instance_ref=instance.get_ref(),
        definitions=defs,
        resources=defs.resources,
    ) as context:
        return sensor.evaluate_tick(context)


def run_job(synced: Synced, job: str, key: str) -> dg.ExecuteInProcessResult:
    result = synced.defs.resolve_job_def(job).execute_in_process(
        instance=synced.instance, partition_key=key, raise_on_error=True
    )
    synced.evaluations.extend(result.get_asset_check_evaluations())
    return result


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def synced(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Synced]:
    tmp = tmp_path_factory.mktemp("checks")
    # Read here, not at import: the module's data and its daily partitions share this one day.
    today = datetime.now(UTC).date()
    yesterday = today - timedelta(days=1)
    warehouse_url = (
        f"sqlite:///{tmp}/warehouse.db"
        if request.param == "sqlite"
        else postgres_url(f"checks_{tmp.name}")
    )
    options = SandboxOptions(size="tiny", api_keys=(KEY,), rate_limit=1_000_000)
    server = SandboxServer(build_sandbox(options)).start()
    os.environ["RILLET_API_KEY"] = KEY
    settings = Settings.from_env(
        {
            "RILLET_BASE_URL": server.base_url,
            "RILLET_API_KEY": KEY,
            "RILLET_WAREHOUSE_URL": warehouse_url,
            "RILLET_STATE_URL": f"sqlite:///{tmp}/state.db",
            "RILLET_RATE_LIMIT": "1000000/60",
            "RILLET_START_DATE": (today - timedelta(days=3)).isoformat(),
        }
    )
    defs = build_definitions(settings)
    with dg.instance_for_test() as instance:
        sync_entities(defs, instance)
        added = tick(defs, instance, "rillet_subsidiary_partitions")
        instance.add_dynamic_partitions(
            SUBSIDIARY_PARTITIONS_NAME,
            [k for r in added.dynamic_partitions_requests for k in r.partition_keys],  # type: ignore[union-attr]
        )
        subsidiaries = sorted(instance.get_dynamic_partitions(SUBSIDIARY_PARTITIONS_NAME))
        engine = make_engine(warehouse_url)
        synced = Synced(server, defs, instance, engine, subsidiaries, "", [], yesterday)
        # The month-end pack, exactly as the period-close sensor requests it.
        close = tick(defs, instance, "rillet_period_close")
        synced.closed_month = close.cursor or ""
        for request in close.run_requests or []:
            run_job(synced, request.job_name or "", request.partition_key or "")
        for subsidiary in subsidiaries:
            run_job(
                synced, DAILY_TRIAL_BALANCE_JOB, partition_key(yesterday.isoformat(), subsidiary)
            )
        result = dg.materialize(
            [
                *models.MODEL_ASSETS,
                *(
                    c
                    for c in defs.asset_checks or []
                    if all(k.asset_key.path[0] == "ledger" for k in c.check_keys)  # type: ignore[union-attr]
                ),
            ],  # type: ignore[union-attr]
            resources=defs.resources,
            instance=instance,
        )
        assert result.success
        synced.evaluations.extend(result.get_asset_check_evaluations())
        yield synced
        engine.dispose()
    server.stop()


def test_subsidiary_partitions_follow_the_warehouse(synced: Synced) -> None:
    truth = {s.id for s in synced.server.sandbox.world.ledger.subsidiaries}
    assert set(synced.subsidiaries) == truth | {CONSOLIDATED}
    again = tick(synced.defs, synced.instance, "rillet_subsidiary_partitions")
    assert not again.dynamic_partitions_requests  # in step: nothing to add or remove


def test_the_month_end_run_materializes_every_statement_of_the_closed_month(
    synced: Synced,
) -> None:
    closed = synced.server.sandbox.world.store.singletons["book_period"]
    assert synced.closed_month == closed["end"]
    month = closed["start"]
    for name in MONTHLY_REPORTS:
        done = synced.instance.get_materialized_partitions(report_asset_key(name))
        assert {partition_key(month, s) for s in synced.subsidiaries} <= done, name
        for subsidiary in synced.subsidiaries:
            key = report_period(catalog.report(name), month, subsidiary).key(name)
            assert store.read_lines(synced.engine, key), (name, subsidiary)


def test_every_check_passes_on_simulator_data(synced: Synced) -> None:
    ran = {(e.asset_key.to_user_string(), e.check_name) for e in synced.evaluations}
    expected = {(c.asset.to_user_string(), c.name) for c in checks.REPORT_CHECKS} | {
        (models.model_key(c.model).to_user_string(), c.name) for c in checks.MODEL_CHECKS
    }
    expected.add((models.model_key("general_ledger").to_user_string(), "raw_entities_are_fresh"))
    assert ran == expected
    failed = [(e.check_name, e.description) for e in synced.evaluations if not e.passed]
    assert failed == []
    reconciled = [
        e for e in synced.evaluations if e.check_name == "ledger_reproduces_trial_balance"
    ]
    assert len(reconciled) == len(synced.subsidiaries)
    assert all(e.metadata["checked"].value > 0 for e in reconciled)  # type: ignore[attr-defined]


def usd_subsidiary(synced: Synced) -> str:
    return next(
        s.id for s in synced.server.sandbox.world.ledger.subsidiaries if s.currency == "USD"
    )


def test_a_corrupted_warehouse_amount_fails_reconciliation_naming_account_and_difference(
    synced: Synced,
) -> None:
    subsidiary = usd_subsidiary(synced)
    entries = table_for("journal_entry")
    items = table_for("journal_entry_item")
    accounts = table_for("account")
    with synced.engine.connect() as conn:
        victim = conn.execute(
            sa.select(items.c.parent_id, items.c.line_key, items.c.amount, accounts.c.code)
            .join(entries, entries.c.id == items.c.parent_id)
            .join(accounts, accounts.c.id == items.c.account_id)
            .where(
                entries.c.subsidiary_id == subsidiary,
                entries.c.date <= synced.yesterday,
                entries.c.deleted_at.is_(None),
            )
            .order_by(entries.c.date.desc())
            .limit(1)
        ).one()
    where = sa.and_(items.c.parent_id == victim.parent_id, items.c.line_key == victim.line_key)
    with synced.engine.begin() as conn:
        conn.execute(sa.update(items).where(where).values(amount=victim.amount + Decimal("0.01")))
    try:
        result = run_job(
            synced,
            DAILY_TRIAL_BALANCE_JOB,
            partition_key(synced.yesterday.isoformat(), subsidiary),
        )
        by_name = {e.check_name: e for e in result.get_asset_check_evaluations()}
        reconciliation = by_name["ledger_reproduces_trial_balance"]
        assert not reconciliation.passed
        assert f"account {victim.code} " in (reconciliation.description or "")
        assert "difference 0.01" in (reconciliation.description or "") or (
            "difference -0.01" in (reconciliation.description or "")
        )
        assert reconciliation.metadata["largest_difference"].value == "0.01 USD"  # type: ignore[attr-defined]
        unbalanced = by_name["journal_entries_balance"]
        assert not unbalanced.passed
        assert f"journal entry {victim.parent_id}" in (unbalanced.description or "")
        # Rillet's own report is still consistent: the blocking checks pass.
        assert by_name["debits_equal_credits"].passed
    finally:
        with synced.engine.begin() as conn:
            conn.execute(sa.update(items).where(where).values(amount=victim.amount))


def test_an_unbalanced_report_fails_its_blocking_checks(synced: Synced) -> None:
    key = report_period(
        catalog.report("trial_balance"), synced.yesterday.isoformat(), CONSOLIDATED
    ).key("trial_balance")
    lines = store.read_lines(synced.engine, key)
    debit = next(r for r in lines if r["line_type"] == "total" and r["measure"] == "debit_total")
    account = next(
        r for r in lines if r["line_type"] == "account" and r["measure"] == "debit_total"
    )
    table = store.LINES
    bump = [
        (debit["line"], debit["amount"] + Decimal("5.00")),
        (account["line"], account["amount"] + Decimal("5.00")),
    ]
    partition = store._partition_filter(table, key)
    with synced.engine.begin() as conn:
        for line, amount in bump:
            conn.execute(
                sa.update(table).where(partition, table.c.line == line).values(amount=amount)
            )
    balanced = checks.debits_equal_credits(synced.engine, key)
    rolled = checks.each_account_rolls_forward(synced.engine, key)
    assert "difference 5.00" in balanced.problems[0]
    assert f"account {account['account_code']} " in rolled.problems[0]
    assert "difference -5.00" in rolled.problems[0]
    # Undo: the partition is simply taken again.
    run_job(
        synced, DAILY_TRIAL_BALANCE_JOB, partition_key(synced.yesterday.isoformat(), CONSOLIDATED)
    )
    assert not checks.debits_equal_credits(synced.engine, key).problems


def test_models_are_exact_and_agree_with_rillet(synced: Synced) -> None:
    with synced.engine.connect() as conn:
        ledger = conn.execute(sa.select(models.GENERAL_LEDGER)).mappings().all()
        aging = conn.execute(sa.select(models.AR_AGING)).mappings().all()
        revenue = conn.execute(sa.select(models.REVENUE_BY_CUSTOMER_MONTH)).mappings().all()
        balances = conn.execute(sa.select(models.ACCOUNT_BALANCES)).mappings().all()
    assert ledger and aging and revenue and balances
    assert all(isinstance(r["signed_amount"], Decimal) for r in ledger)
    assert sum((r["signed_amount"] for r in ledger), Decimal(0)) == 0
    # Open amounts as of today are Rillet's amount_due for every invoice with one.
    invoices = {r["id"]: r for r in synced.server.sandbox.world.store["invoice"].all_records()}
    due = {i: Decimal(r["amount_due"]["amount"]) for i, r in invoices.items()}
    assert {r["invoice_id"]: r["open_amount"] for r in aging} == {
        i: amount for i, amount in due.items() if amount != 0
    }
    assert {r["bucket"] for r in aging} <= {"current", "1-30", "31-60", "61-90", "90+"}
    # Closing balances of the last day per account = the ledger's net per account.
    last: dict[tuple[str, str, str], Decimal] = {}
    for row in sorted(balances, key=lambda r: r["date"]):
        last[(row["subsidiary_id"], row["account_id"], row["currency"])] = row["closing_balance"]
    net: dict[tuple[str, str, str], Decimal] = {}
    for row in ledger:
        k = (row["subsidiary_id"] or "", row["account_id"], row["currency"])
        net[k] = net.get(k, Decimal(0)) + row["signed_amount"]
    assert last == net
    invoiced = sum(
        (Decimal(r["net_amount"]["amount"]) for r in invoices.values() if r["customer_id"]),
        Decimal(0),
    )
    assert sum((r["invoiced"] for r in revenue), Decimal(0)) == invoiced


def test_a_statement_total_that_does_not_add_up_is_named(synced: Synced) -> None:
    key = report_period(
        catalog.report("balance_sheet"), synced.closed_month[:8] + "01", CONSOLIDATED
    ).key("balance_sheet")
    lines = store.read_lines(synced.engine, key)
    group = next(r for r in lines if r["line_type"] == "group" and r["section"] == "Assets")
    table = store.LINES
    partition = store._partition_filter(table, key)
    with synced.engine.begin() as conn:
        conn.execute(
            sa.update(table)
            .where(partition, table.c.line == group["line"])
            .values(amount=group["amount"] + Decimal("0.01"))
        )
    try:
        problems = checks.totals_add_up(synced.engine, key).problems
        assert len(problems) == 2  # the group itself, and the Assets section above it
        assert any(p.startswith(f"Assets > {group['group_path']} ") for p in problems)
        assert all("difference 0.01" in p or "difference -0.01" in p for p in problems)
    finally:
        with synced.engine.begin() as conn:
            conn.execute(
                sa.update(table)
                .where(partition, table.c.line == group["line"])
                .values(amount=group["amount"])
            )
