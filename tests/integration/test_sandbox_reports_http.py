"""Reports over real HTTP agree to the cent with the journal entries the API serves."""

from __future__ import annotations

from collections import defaultdict
from datetime import date, timedelta
from decimal import Decimal

import httpx
import pytest

from rillet_dagster import catalog
from rillet_dagster.rillet.money import Money
from rillet_dagster.sandbox.server import SandboxServer
from tests.integration.test_sandbox_lists import read_all


def ledger_from_api(api: httpx.Client, subsidiary_id: str) -> list[tuple[str, str, str, Decimal]]:
    """(date, account id, side, amount) of every journal-entry line of one subsidiary."""
    entries, _ = read_all(api, catalog.entity("journal_entry"), subsidiary_id=subsidiary_id)
    return [
        (e["date"], item["account_id"], item["side"], Money.parse(item["amount"]).amount)
        for e in entries
        for item in e["items"]
    ]


def expected_trial_balance(
    lines: list[tuple[str, str, str, Decimal]], start: str, end: str
) -> dict[str, tuple[Decimal, Decimal, Decimal]]:
    """Per account: (beginning balance, debits, credits), debit-positive, computed naively."""
    result: dict[str, list[Decimal]] = defaultdict(lambda: [Decimal(0)] * 3)
    for posted, account, side, amount in lines:
        if posted > end:
            continue
        row = result[account]
        if posted < start:
            row[0] += amount if side == "DEBIT" else -amount
        elif side == "DEBIT":
            row[1] += amount
        else:
            row[2] += amount
    return {a: (r[0], r[1], r[2]) for a, r in result.items() if any(r)}


@pytest.mark.parametrize(
    ("start", "end"),
    [("2026-01-01", "2026-01-31"), ("2025-06-01", "2026-11-28"), ("2026-11-01", "2026-11-15")],
)
def test_trial_balance_equals_journal_lines_per_account(
    api: httpx.Client, sandbox: SandboxServer, start: str, end: str
) -> None:
    for subsidiary in sandbox.sandbox.world.subsidiaries:
        lines = ledger_from_api(api, subsidiary["id"])
        params = {"from_date": start, "to_date": end, "subsidiary_id": subsidiary["id"]}
        report = api.get("/reports/trial-balance", params=params).json()
        assert report["currency"] == subsidiary["currency"]
        got = {
            row["id"]: (
                Money.parse(row["beginning_balance"]).amount,
                Money.parse(row["debit_total"]).amount,
                Money.parse(row["credit_total"]).amount,
            )
            for row in report["accounts"]
        }
        assert got == expected_trial_balance(lines, start, end)
        totals = report["totals"]
        assert Money.parse(totals["debit_total"]) == Money.parse(totals["credit_total"])
        assert Money.parse(totals["ending_balance"]).amount == 0
        for row in report["accounts"]:
            ending = Money.parse(row["ending_balance"]).amount
            begin, debit, credit = got[row["id"]]
            assert ending == begin + debit - credit


def test_consolidated_trial_balance_balances_in_reporting_currency(api: httpx.Client) -> None:
    report = api.get(
        "/reports/trial-balance", params={"from_date": "2026-01-01", "to_date": "2026-06-30"}
    ).json()
    assert report["currency"] == "USD"
    totals = report["totals"]
    assert Money.parse(totals["debit_total"]) == Money.parse(totals["credit_total"])


def test_jpy_amounts_have_no_decimals(api: httpx.Client, sandbox: SandboxServer) -> None:
    jpy = next(s for s in sandbox.sandbox.world.subsidiaries if s["currency"] == "JPY")
    report = api.get(
        "/reports/trial-balance",
        params={"from_date": "2026-01-01", "to_date": "2026-01-31", "subsidiary_id": jpy["id"]},
    ).json()
    amounts = [row["debit_total"]["amount"] for row in report["accounts"]]
    assert amounts
    assert all("." not in a for a in amounts)


def test_balance_sheet_balances_and_statements_agree(api: httpx.Client) -> None:
    sheet = api.get("/reports/balance-sheet", params={"as_of_date": "2026-10-31"}).json()
    totals = {s["name"]: Money.parse(s["totals"][0]["amount"]).amount for s in sheet["sections"]}
    assert totals["Assets"] == totals["Liabilities"] + totals["Equity"]
    period = {"from_date": "2026-10-01", "to_date": "2026-10-31"}
    income = api.get("/reports/income-statement", params=period).json()
    executive = api.get("/reports/executive-pl", params=period).json()

    def net_income(report: dict) -> Decimal:
        line = next(s for s in report["summaries"] if s["name"] == "Net Income")
        return Money.parse(line["amounts"][0]["amount"]).amount

    assert net_income(income) == net_income(executive)
    cash = api.get("/reports/cash-flow-statement", params=period).json()
    summary = {s["name"]: Money.parse(s["amounts"][0]["amount"]).amount for s in cash["summaries"]}
    assert summary["Ending Cash"] == summary["Beginning Cash"] + summary["Net Change in Cash"]


def test_breakdown_by_subsidiary_has_a_column_per_subsidiary(
    api: httpx.Client, sandbox: SandboxServer
) -> None:
    report = api.get(
        "/reports/income-statement",
        params={"from_date": "2026-01-01", "to_date": "2026-03-31", "breakdown_by": "SUBSIDIARY"},
    ).json()
    assert {b["id"] for b in report["breakdowns"]} == {
        s["id"] for s in sandbox.sandbox.world.subsidiaries
    }


@pytest.mark.parametrize(
    ("path", "params", "named"),
    [
        ("/reports/trial-balance", {"from_date": "2026-01-01"}, "to_date"),
        (
            "/reports/trial-balance",
            {"from_date": "2026-02-01", "to_date": "2026-01-01"},
            "from_date",
        ),
        ("/reports/balance-sheet", {}, "as_of_date"),
        ("/reports/income-statement", {"from_date": "Jan", "to_date": "2026-01-31"}, "from_date"),
        (
            "/reports/executive-pl",
            {"from_date": "2026-01-01", "to_date": "2026-01-31", "breakdown_by": "REGION"},
            "breakdown_by",
        ),
        ("/reports/arr-waterfall", {"month": "2026-01", "status": "ACTIVE"}, "breakdown"),
    ],
)
def test_report_parameters_are_enforced(
    api: httpx.Client, path: str, params: dict[str, str], named: str
) -> None:
    response = api.get(path, params=params)
    assert response.status_code == 400
    assert named in response.json()["detail"]


def test_arr_waterfall_pages_customers(api: httpx.Client) -> None:
    params = {"month": "2026-06", "status": "ACTIVE", "breakdown": "ARR", "limit": "3"}
    first = api.get("/reports/arr-waterfall", params=params).json()
    assert len(first["customers"]) <= 3
    amounts = [Money.parse(c["total"]["amount"]).amount for c in first["customers"]]
    assert amounts == sorted(amounts, reverse=True)
    assert all(a > 0 for a in amounts)


def test_reporting_journal_entries_carry_local_and_reporting_amounts(api: httpx.Client) -> None:
    entries = api.get("/reports/journal-entries", params={"limit": "50"}).json()["journal_entries"]
    for entry in entries:
        debit = sum(
            Money.parse(i["reporting_amount"]).amount
            for i in entry["items"]
            if i["side"] == "DEBIT"
        )
        credit = sum(
            Money.parse(i["reporting_amount"]).amount
            for i in entry["items"]
            if i["side"] == "CREDIT"
        )
        assert debit == credit
        assert all(i["reporting_amount"]["currency"] == "USD" for i in entry["items"])
        assert "updated_at" not in entry


def test_recent_dates_are_within_the_generated_period(sandbox: SandboxServer) -> None:
    world = sandbox.sandbox.world
    assert world.anchor - timedelta(days=31 * 18) < date(2026, 1, 1) <= world.anchor
