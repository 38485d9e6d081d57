"""Report assets materialized against the sandbox: the warehouse holds Rillet's numbers exactly."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from rillet_dagster import catalog
from rillet_dagster.assets.reports import (
    CONSOLIDATED,
    DAILY_REPORTS,
    MONTHLY_REPORTS,
    SNAPSHOT_REPORTS,
    SUBSIDIARY_PARTITIONS_NAME,
    partition_key,
    report_asset_key,
    report_period,
)
from rillet_dagster.definitions import build_definitions
from rillet_dagster.sandbox import reports as simulated
from rillet_dagster.sandbox.server import SandboxOptions, SandboxServer, build_sandbox
from rillet_dagster.settings import Settings
from rillet_dagster.warehouse import reports as store
from rillet_dagster.warehouse.schema import make_engine
from rillet_dagster.warehouse.types import dumps, loads
from tests import canary
from tests.pg import postgres_url

KEY = canary.api_key("reports")
BUILDERS = {
    "trial_balance": simulated.trial_balance,
    "balance_sheet": simulated.balance_sheet,
    "income_statement": simulated.income_statement,
    "cash_flow_statement": simulated.cash_flow_statement,
    "executive_pl": simulated.executive_pl,
}


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxServer]:
    options = SandboxOptions(size="tiny", api_keys=(KEY,), rate_limit=1_000_000)
    server = SandboxServer(build_sandbox(options)).start()
    yield server
    server.stop()


def first_day(today: date) -> str:
    return (today - timedelta(days=3)).isoformat()


def report_settings(
    server: SandboxServer, warehouse_url: str, state_url: str, today: date
) -> Settings:
    os.environ["RILLET_API_KEY"] = KEY
    return Settings.from_env(
        {
            "RILLET_BASE_URL": server.base_url,
            "RILLET_API_KEY": KEY,
            "RILLET_WAREHOUSE_URL": warehouse_url,
            "RILLET_STATE_URL": state_url,
            "RILLET_RATE_LIMIT": "1000000/60",
            "RILLET_START_DATE": first_day(today),
        }
    )


def subsidiary_keys(server: SandboxServer) -> list[str]:
    return [s.id for s in server.sandbox.world.ledger.subsidiaries] + [CONSOLIDATED]


def report_assets(defs: dg.Definitions, names: tuple[str, ...]) -> list[dg.AssetsDefinition]:
    wanted = {report_asset_key(name) for name in names}
    return [a for a in defs.assets or [] if set(a.keys) & wanted]  # type: ignore[union-attr]


def period_key(name: str, today: date) -> str:
    """The last complete period before ``today``: yesterday, or last month."""
    yesterday = today - timedelta(days=1)
    last_month = (today.replace(day=1) - timedelta(days=1)).replace(day=1)
    return (yesterday if name in DAILY_REPORTS else last_month).isoformat()


def materialize_reports(
    defs: dg.Definitions, instance: dg.DagsterInstance, subsidiaries: list[str], today: date
) -> None:
    instance.add_dynamic_partitions(SUBSIDIARY_PARTITIONS_NAME, subsidiaries)
    for names in (tuple(DAILY_REPORTS), MONTHLY_REPORTS):
        for subsidiary in subsidiaries:
            result = dg.materialize(
                report_assets(defs, names),
                resources=defs.resources,
                instance=instance,
                partition_key=partition_key(period_key(names[0], today), subsidiary),
            )
            assert result.success
            for materialization in result.get_asset_materialization_events():
                named = materialization.materialization.metadata["subsidiary_name"].value  # type: ignore[union-attr]
                # No subsidiaries synced here: the id, except the consolidated partition.
                assert named == subsidiary or named.startswith("Consolidated")


def expected_response(
    server: SandboxServer, name: str, subsidiary: str, today: date
) -> dict[str, Any]:
    """What the simulator serves, as the client parses it (non-integers as Decimal)."""
    period = report_period(catalog.report(name), period_key(name, today), subsidiary)
    world = server.sandbox.world
    with world.store.lock:
        body = BUILDERS[name](world.ledger, period.params())
    return loads(dumps(body))


def money_objects(value: Any) -> list[tuple[str, str]]:
    """Every money object anywhere in a response, as (amount text, currency)."""
    if isinstance(value, dict):
        if set(value) == {"amount", "currency"}:
            return [(str(value["amount"]), str(value["currency"]))]
        return [pair for item in value.values() for pair in money_objects(item)]
    if isinstance(value, list):
        return [pair for item in value for pair in money_objects(item)]
    return []


def statement_accounts(body: dict[str, Any]) -> dict[tuple[str, str, str], Decimal]:
    """(section, account id, column) -> balance, walking the nested groups independently."""
    found: dict[tuple[str, str, str], Decimal] = {}

    def walk(section: str, node: dict[str, Any]) -> None:
        for account in node.get("accounts") or []:
            for balance in account["balances"]:
                found[(section, account["id"], balance["breakdown_id"])] = Decimal(
                    balance["amount"]["amount"]
                )
        for group in node.get("groups") or []:
            walk(section, group)

    for section in body["sections"]:
        walk(section["name"], section)
    return found


def test_report_assets_are_partitioned_by_period_and_subsidiary(today: date) -> None:
    defs = build_definitions(Settings.from_env({"RILLET_START_DATE": first_day(today)}))
    for name in SNAPSHOT_REPORTS:
        (assets_def,) = report_assets(defs, (name,))
        key = report_asset_key(name)
        assert key.path == ["rillet", "reports", name]
        assert assets_def.group_names_by_key[key] == "rillet_reports"
        assert assets_def.backfill_policy is None  # Dagster's single-run bugs with multi
        partitions = assets_def.partitions_def
        assert isinstance(partitions, dg.MultiPartitionsDefinition)
        dimensions = {d.name: d.partitions_def for d in partitions.partitions_defs}
        assert isinstance(dimensions["subsidiary"], dg.DynamicPartitionsDefinition)
        assert dimensions["subsidiary"].name == SUBSIDIARY_PARTITIONS_NAME
        grain = (
            dg.DailyPartitionsDefinition
            if name in DAILY_REPORTS
            else dg.MonthlyPartitionsDefinition
        )
        assert isinstance(dimensions["period"], grain)
        checks = {
            k.name
            for k in defs.get_repository_def().asset_graph.asset_check_keys
            if k.asset_key == key
        }
        # The UI lists these under the asset's Checks tab, per partition.
        assert checks >= {
            "trial_balance": {"debits_equal_credits", "each_account_rolls_forward"},
            "balance_sheet": {"assets_equal_liabilities_plus_equity", "totals_add_up"},
            "cash_flow_statement": {"totals_add_up", "ending_cash_reconciles"},
        }.get(name, {"totals_add_up"})


def test_report_periods_follow_the_documented_conventions() -> None:
    tb = report_period(catalog.report("trial_balance"), "2026-02-17", "sub")
    assert tb.params() == {
        "from_date": "2026-02-01",
        "to_date": "2026-02-17",
        "subsidiary_id": "sub",
    }
    bs = report_period(catalog.report("balance_sheet"), "2024-02-01", CONSOLIDATED)
    assert bs.params() == {"as_of_date": "2024-02-29"}
    pl = report_period(catalog.report("income_statement"), "2026-12-01", CONSOLIDATED)
    assert pl.params() == {"from_date": "2026-12-01", "to_date": "2026-12-31"}


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_report_rows_equal_the_simulator_responses_exactly(
    sandbox: SandboxServer, tmp_path: Path, backend: str, today: date
) -> None:
    warehouse_url = (
        f"sqlite:///{tmp_path}/warehouse.db"
        if backend == "sqlite"
        else postgres_url(f"reports_{tmp_path.name}")
    )
    defs = build_definitions(
        report_settings(sandbox, warehouse_url, f"sqlite:///{tmp_path}/state.db", today)
    )
    subsidiaries = subsidiary_keys(sandbox)
    with dg.DagsterInstance.ephemeral() as instance:
        materialize_reports(defs, instance, subsidiaries, today)
    engine = make_engine(warehouse_url)
    try:
        for name in SNAPSHOT_REPORTS:
            for subsidiary in subsidiaries:
                period = report_period(catalog.report(name), period_key(name, today), subsidiary)
                key = period.key(name)
                expected = expected_response(sandbox, name, subsidiary, today)
                lines = store.read_lines(engine, key)
                label = (name, subsidiary)
                assert lines, label
                assert all(isinstance(line["amount"], Decimal) for line in lines), label
                stored = Counter(
                    (format(line["amount"], "f"), line["currency"])
                    for line in lines
                    if line["measure"] != "margin"
                )
                # Exactly one row per money object, digit for digit (trailing zeros included).
                assert stored == Counter(money_objects(expected)), label
                assert store.read_response(engine, key) == expected, label
                if name == "trial_balance":
                    by_account = {
                        (line["account_id"], line["measure"]): line["amount"]
                        for line in lines
                        if line["line_type"] == "account"
                    }
                    assert by_account == {
                        (row["id"], measure): Decimal(row[measure]["amount"])
                        for row in expected["accounts"]
                        for measure in store.TRIAL_BALANCE_MEASURES
                        if measure in row
                    }, label
                else:
                    assert {
                        (line["section"], line["account_id"], line["breakdown_id"]): line["amount"]
                        for line in lines
                        if line["line_type"] == "account"
                    } == statement_accounts(expected), label
                    summaries = {
                        (line["name"], line["breakdown_id"]): line["amount"]
                        for line in lines
                        if line["line_type"] == "summary" and line["measure"] == "amount"
                    }
                    assert summaries == {
                        (s["name"], a["breakdown_id"]): Decimal(a["amount"]["amount"])
                        for s in expected.get("summaries") or []
                        for a in s["amounts"]
                    }, label
        # The consolidated partition calls Rillet without subsidiary_id: reporting currency.
        tb = store.read_lines(
            engine,
            report_period(
                catalog.report("trial_balance"), period_key("trial_balance", today), CONSOLIDATED
            ).key("trial_balance"),
        )
        assert {line["currency"] for line in tb} == {"USD"}
        assert all(line["subsidiary_id"] is None for line in tb)
    finally:
        engine.dispose()


def test_a_partition_is_replaced_atomically(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/w.db")
    store.ensure_report_schema(engine)
    assert store.ensure_report_schema(engine) == []  # idempotent
    key = store.ReportKey("trial_balance", date(2026, 10, 1), date(2026, 10, 5), CONSOLIDATED)
    other = store.ReportKey("trial_balance", date(2026, 10, 1), date(2026, 10, 6), CONSOLIDATED)
    body = {"currency": "USD", "accounts": [], "totals": {}}

    def line(amount: Any) -> store.ReportLine:
        return store.ReportLine("total", "debit_total", amount, "USD", name="Totals")

    now = datetime.now(UTC)
    store.replace_partition(engine, key, body, [line(Decimal("1.10"))], run_id="a", snapshot_at=now)
    store.replace_partition(engine, other, body, [line(Decimal("7"))], run_id="a", snapshot_at=now)
    # A write that fails half-way (a float is refused as money) leaves the old snapshot whole.
    with pytest.raises(Exception, match="float"):
        store.replace_partition(
            engine,
            key,
            body,
            [line(Decimal("2.20")), line(3.3)],
            run_id="b",
            snapshot_at=now,
        )
    assert [row["amount"] for row in store.read_lines(engine, key)] == [Decimal("1.10")]
    store.replace_partition(
        engine,
        key,
        body,
        [line(Decimal("2.20")), line(Decimal("0.00"))],
        run_id="c",
        snapshot_at=now,
    )
    assert [row["amount"] for row in store.read_lines(engine, key)] == [
        Decimal("2.20"),
        Decimal("0.00"),
    ]
    assert [row["amount"] for row in store.read_lines(engine, other)] == [Decimal("7")]
    assert json.loads(json.dumps(store.read_response(engine, key))) == body
    engine.dispose()


def test_models_are_warehouse_assets_with_their_checks(today: date) -> None:
    defs = build_definitions(Settings.from_env({"RILLET_START_DATE": first_day(today)}))
    graph = defs.get_repository_def().asset_graph
    models = {
        "ledger/general_ledger",
        "ledger/account_balances",
        "ledger/ar_aging",
        "ledger/revenue_by_customer_month",
    }
    for name in models:
        key = dg.AssetKey.from_user_string(name)
        assert graph.get(key).group_name == "finance_models"
        assert graph.get(key).partitions_def is None
    upstream = graph.get(dg.AssetKey.from_user_string("ledger/general_ledger")).parent_keys
    assert dg.AssetKey(["rillet", "journal_entry_items"]) in upstream
    checked = {k.asset_key.to_user_string() for k in graph.asset_check_keys}
    assert {"ledger/general_ledger", "ledger/ar_aging"} <= checked
