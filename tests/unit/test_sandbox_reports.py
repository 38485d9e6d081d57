"""The sandbox report builders against a small in-memory ledger.

Every expectation is recomputed line by line from the ledger, independently of the numpy sums
the reports use, so a report that reads the wrong window, sign or column fails here.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rillet_dagster.rillet.money import Money
from rillet_dagster.sandbox.chart import (
    CASH_SUBTYPES,
    CHART,
    FINANCING_SUBTYPES,
    INVESTING_SUBTYPES,
)
from rillet_dagster.sandbox.reports import (
    AccountInfo,
    LedgerView,
    ReportParamError,
    SubsidiaryInfo,
    balance_sheet,
    cash_flow_statement,
    executive_pl,
    income_statement,
    trial_balance,
)

Json = dict[str, Any]

ACCOUNTS: tuple[AccountInfo, ...] = tuple(
    AccountInfo(str(uuid.uuid5(uuid.NAMESPACE_URL, f"account/{a.code}")), a.code, a.name, a.type,
                a.subtype)
    for a in CHART
)  # fmt: skip
CODE = {a.code: i for i, a in enumerate(ACCOUNTS)}
SUBSIDIARIES: tuple[SubsidiaryInfo, ...] = (
    SubsidiaryInfo("6f1c2a52-0b7e-4d0e-9a51-2f4a1d3c0001", "Acme Inc", "USD"),
    SubsidiaryInfo("6f1c2a52-0b7e-4d0e-9a51-2f4a1d3c0002", "Acme KK", "JPY"),
    SubsidiaryInfo("6f1c2a52-0b7e-4d0e-9a51-2f4a1d3c0003", "Acme Ltd", "GBP"),
)
US, JP, UK = 0, 1, 2
# Reporting (USD cents) per local minor unit, as a fraction: 1 JPY = 0.67 cents, 1 GBP = 1.27 USD.
RATES: tuple[tuple[int, int], ...] = ((1, 1), (67, 100), (127, 100))

DAY0 = date(2026, 1, 1)
YEAR = 365


def to_reporting(subsidiary: int, local: int) -> int:
    numerator, denominator = RATES[subsidiary]
    return (local * numerator + denominator // 2) // denominator


@dataclass(frozen=True)
class Line:
    day: date
    subsidiary: int
    account: int
    side: str  # DEBIT | CREDIT
    local: int
    reporting: int


@dataclass
class MemoryLedger:
    lines: list[Line] = field(default_factory=list)
    accounts: Sequence[AccountInfo] = ACCOUNTS
    subsidiaries: Sequence[SubsidiaryInfo] = SUBSIDIARIES
    reporting_currency: str = "USD"

    def sums(
        self, *, subsidiary: int | None, start: date | None, end: date, reporting: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        assert subsidiary is not None or reporting, "consolidation is only in reporting currency"
        debit = np.zeros(len(self.accounts), dtype=np.int64)
        credit = np.zeros(len(self.accounts), dtype=np.int64)
        for line in self.lines:
            if subsidiary is not None and line.subsidiary != subsidiary:
                continue
            if (start is not None and line.day < start) or line.day > end:
                continue
            target = debit if line.side == "DEBIT" else credit
            target[line.account] += line.reporting if reporting else line.local
        return debit, credit

    def post(self, day: date, subsidiary: int, debit: str, credit: str, local: int) -> None:
        """A balanced two-line entry, translated once so it balances in reporting too."""
        amount = to_reporting(subsidiary, local)
        self.lines.append(Line(day, subsidiary, CODE[debit], "DEBIT", local, amount))
        self.lines.append(Line(day, subsidiary, CODE[credit], "CREDIT", local, amount))


def _view(ledger: MemoryLedger) -> LedgerView:
    return ledger


# --------------------------------------------------------------------------- naive recomputation


def naive_net(
    ledger: MemoryLedger,
    *,
    accounts: Callable[[AccountInfo], bool],
    subsidiary: int | None,
    reporting: bool,
    start: date | None = None,
    end: date | None = None,
) -> int:
    """Debit-positive net of the matching lines, straight from the line list."""
    total = 0
    for line in ledger.lines:
        if not accounts(ledger.accounts[line.account]):
            continue
        if subsidiary is not None and line.subsidiary != subsidiary:
            continue
        if (start is not None and line.day < start) or (end is not None and line.day > end):
            continue
        amount = line.reporting if reporting else line.local
        total += amount if line.side == "DEBIT" else -amount
    return total


def is_cash(account: AccountInfo) -> bool:
    return account.type in {"ASSET", "LIABILITY", "EQUITY"} and account.subtype in CASH_SUBTYPES


def is_depreciation(account: AccountInfo) -> bool:
    return account.type == "EXPENSE" and account.subtype == "Depreciation"


def is_pl(account: AccountInfo) -> bool:
    return account.type in {"INCOME", "EXPENSE"}


def minor(money: Json, currency: str) -> int:
    assert money["currency"] == currency
    return Money.parse(money).to_minor()


def column(values: Iterable[Json], currency: str) -> dict[str, int]:
    return {v["breakdown_id"]: minor(v["amount"], currency) for v in values}


def section(report: Json, name: str) -> Json:
    matches = [s for s in report["sections"] if s["name"] == name]
    assert len(matches) == 1, (
        f"{name!r} not exactly once in {[s['name'] for s in report['sections']]}"
    )
    return matches[0]


def group(parent: Json, name: str) -> Json | None:
    matches = [g for g in parent["groups"] if g["name"] == name]
    assert len(matches) <= 1
    return matches[0] if matches else None


def summary(report: Json, name: str) -> Json:
    matches = [s for s in report["summaries"] if s["name"] == name]
    assert len(matches) == 1, f"{name!r} not exactly once"
    return matches[0]


def section_total(report: Json, name: str) -> dict[str, int]:
    return column(section(report, name)["totals"], report["currency"])


def summary_amounts(report: Json, name: str) -> dict[str, int]:
    return column(summary(report, name)["amounts"], report["currency"])


def all_accounts(node: Json) -> Iterable[Json]:
    yield from node.get("accounts", [])
    for child in node.get("groups", []):
        yield from all_accounts(child)


def column_ids(report: Json) -> list[str]:
    return [b["id"] for b in report["breakdowns"]]


# --------------------------------------------------------------------------- random ledgers

ACCOUNT_INDEX = st.integers(min_value=0, max_value=len(ACCOUNTS) - 1)


@st.composite
def ledgers(draw: st.DrawFn) -> MemoryLedger:
    ledger = MemoryLedger()
    for _ in range(draw(st.integers(min_value=0, max_value=25))):
        day = DAY0 + timedelta(days=draw(st.integers(min_value=0, max_value=YEAR)))
        subsidiary = draw(st.integers(min_value=0, max_value=len(SUBSIDIARIES) - 1))
        # Multi-line entries are built from balanced pairs so each one balances in both
        # the local and the reporting currency, as the ledger guarantees.
        for _ in range(draw(st.integers(min_value=1, max_value=3))):
            debit = ACCOUNTS[draw(ACCOUNT_INDEX)].code
            credit = ACCOUNTS[draw(ACCOUNT_INDEX)].code
            amount = draw(st.integers(min_value=1, max_value=10**9))
            ledger.post(day, subsidiary, debit, credit, amount)
    return ledger


@st.composite
def periods(draw: st.DrawFn) -> tuple[date, date]:
    a = DAY0 + timedelta(days=draw(st.integers(min_value=-5, max_value=YEAR + 5)))
    b = DAY0 + timedelta(days=draw(st.integers(min_value=-5, max_value=YEAR + 5)))
    return min(a, b), max(a, b)


SCOPES: tuple[int | None, ...] = (None, US, JP, UK)
RANDOM = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def scope_params(scope: int | None) -> dict[str, str]:
    return {} if scope is None else {"subsidiary_id": SUBSIDIARIES[scope].id}


def scope_currency(scope: int | None) -> str:
    return "USD" if scope is None else SUBSIDIARIES[scope].currency


def period_params(start: date, end: date, scope: int | None = None) -> dict[str, str]:
    return {"from_date": start.isoformat(), "to_date": end.isoformat(), **scope_params(scope)}


# --------------------------------------------------------------------------- trial balance


@RANDOM
@given(ledgers(), periods())
def test_trial_balance_balances_and_matches_lines(
    ledger: MemoryLedger, span: tuple[date, date]
) -> None:
    start, end = span
    for scope in SCOPES:
        currency = scope_currency(scope)
        reporting = scope is None
        report = trial_balance(_view(ledger), period_params(start, end, scope))
        assert report["currency"] == currency
        assert report["period"] == {"from_date": start.isoformat(), "to_date": end.isoformat()}

        expected: dict[str, tuple[int, int, int, int]] = {}
        for index, account in enumerate(ACCOUNTS):
            beginning = ending = debits = credits = 0
            for line in ledger.lines:
                if line.account != index or (scope is not None and line.subsidiary != scope):
                    continue
                amount = line.reporting if reporting else line.local
                signed = amount if line.side == "DEBIT" else -amount
                if line.day < start:
                    beginning += signed
                elif line.day <= end:
                    if line.side == "DEBIT":
                        debits += amount
                    else:
                        credits += amount
                if line.day <= end:
                    ending += signed
            if any((beginning, debits, credits, ending)):
                expected[account.code] = (beginning, debits, credits, ending)

        got = {
            row["code"]: tuple(
                minor(row[key], currency)
                for key in ("beginning_balance", "debit_total", "credit_total", "ending_balance")
            )
            for row in report["accounts"]
        }
        assert got == expected
        codes = [row["code"] for row in report["accounts"]]
        assert codes == sorted(codes)
        for row in report["accounts"]:
            beginning, debits, credits, ending = got[row["code"]]
            assert ending == beginning + debits - credits
            assert row["id"] == ACCOUNTS[CODE[row["code"]]].id

        totals = {key: minor(value, currency) for key, value in report["totals"].items()}
        assert totals["debit_total"] == totals["credit_total"]
        assert totals["beginning_balance"] == 0
        assert totals["ending_balance"] == 0
        assert totals["debit_total"] == sum(v[1] for v in expected.values())
        assert set(report) == {"period", "currency", "accounts", "totals"}
        assert set(report["totals"]) == {
            "beginning_balance", "debit_total", "credit_total", "ending_balance"
        }  # fmt: skip


def test_trial_balance_lists_accounts_with_offsetting_activity_and_omits_idle_ones() -> None:
    ledger = MemoryLedger()
    ledger.post(date(2026, 3, 1), US, "11001", "12001", 500)
    ledger.post(date(2026, 3, 2), US, "12001", "11001", 500)
    report = trial_balance(_view(ledger), period_params(date(2026, 3, 1), date(2026, 3, 31)))
    rows = {row["code"]: row for row in report["accounts"]}
    assert set(rows) == {"11001", "12001"}
    assert rows["11001"]["ending_balance"] == {"amount": "0.00", "currency": "USD"}
    assert rows["11001"]["debit_total"] == {"amount": "5.00", "currency": "USD"}


def test_trial_balance_totals_are_computed_not_forced() -> None:
    ledger = MemoryLedger()
    # One translated line rounds differently from its partner: the report must show it.
    ledger.lines += [
        Line(date(2026, 2, 1), JP, CODE["12001"], "DEBIT", 3, 3),
        Line(date(2026, 2, 1), JP, CODE["40001"], "CREDIT", 3, 2),
    ]
    report = trial_balance(_view(ledger), period_params(date(2026, 2, 1), date(2026, 2, 28)))
    assert report["totals"]["debit_total"] == {"amount": "0.03", "currency": "USD"}
    assert report["totals"]["credit_total"] == {"amount": "0.02", "currency": "USD"}
    assert report["totals"]["ending_balance"] == {"amount": "0.01", "currency": "USD"}
    local = trial_balance(_view(ledger), period_params(date(2026, 2, 1), date(2026, 2, 28), JP))
    assert local["totals"]["ending_balance"] == {"amount": "0", "currency": "JPY"}


# --------------------------------------------------------------------------- balance sheet


def balance_sheet_param_sets(as_of: date) -> list[dict[str, str]]:
    base = {"as_of_date": as_of.isoformat()}
    return [
        base,
        {**base, "breakdown_by": "SUBSIDIARY"},
        *({**base, **scope_params(scope)} for scope in (US, JP, UK)),
    ]


@RANDOM
@given(ledgers(), st.integers(min_value=-5, max_value=YEAR + 5))
def test_balance_sheet_assets_equal_liabilities_plus_equity(
    ledger: MemoryLedger, offset: int
) -> None:
    as_of = DAY0 + timedelta(days=offset)
    for params in balance_sheet_param_sets(as_of):
        report = balance_sheet(_view(ledger), params)
        assert [s["name"] for s in report["sections"]] == ["Assets", "Liabilities", "Equity"]
        assets = section_total(report, "Assets")
        liabilities = section_total(report, "Liabilities")
        equity = section_total(report, "Equity")
        total = summary_amounts(report, "Total Liabilities and Equity")
        for col in column_ids(report):
            assert assets[col] == liabilities[col] + equity[col] == total[col]
        # Balanced reporting amounts leave nothing to translate.
        assert group(section(report, "Equity"), "Cumulative Translation Adjustment") is None
        assert group(section(report, "Equity"), "Net Income") is not None

        for sec in report["sections"]:
            for grp in sec["groups"]:
                # Group totals are exactly their accounts, sections exactly their groups.
                if grp["accounts"]:
                    for col in column_ids(report):
                        assert column(grp["totals"], report["currency"])[col] == sum(
                            column(a["balances"], report["currency"])[col] for a in grp["accounts"]
                        )
                for account in grp["accounts"]:
                    assert account["code"] in CODE
                    assert any(column(account["balances"], report["currency"]).values())


@RANDOM
@given(ledgers(), st.integers(min_value=0, max_value=YEAR))
def test_balance_sheet_accounts_match_lines(ledger: MemoryLedger, offset: int) -> None:
    as_of = DAY0 + timedelta(days=offset)
    for scope in SCOPES:
        report = balance_sheet(
            _view(ledger), {"as_of_date": as_of.isoformat(), **scope_params(scope)}
        )
        currency = scope_currency(scope)
        got = {
            a["code"]: column(a["balances"], currency)["total"]
            for s in report["sections"]
            for a in all_accounts(s)
        }
        expected = {}
        for account in ACCOUNTS:
            if is_pl(account):
                continue
            net = naive_net(
                ledger,
                accounts=lambda a, code=account.code: a.code == code,
                subsidiary=scope,
                reporting=scope is None,
                end=as_of,
            )
            natural = net if account.type == "ASSET" else -net
            if natural:
                expected[account.code] = natural
        assert got == expected
        net_income = group(section(report, "Equity"), "Net Income")
        assert net_income is not None
        assert column(net_income["totals"], currency)["total"] == -naive_net(
            ledger, accounts=is_pl, subsidiary=scope, reporting=scope is None, end=as_of
        )


def test_balance_sheet_groups_by_subtype_in_code_order() -> None:
    ledger = MemoryLedger()
    ledger.post(date(2026, 1, 5), US, "11001", "30001", 100_000_00)
    ledger.post(date(2026, 1, 6), US, "11002", "11001", 20_000_00)
    ledger.post(date(2026, 1, 7), US, "15001", "20001", 3_000_00)
    ledger.post(date(2026, 1, 8), US, "12001", "40001", 1_500_00)
    report = balance_sheet(_view(ledger), {"as_of_date": "2026-01-31"})
    assert report["as_of_date"] == "2026-01-31"
    assert report["breakdowns"] == [{"type": "PERIOD", "name": "2026-01-31", "id": "total"}]
    assets = section(report, "Assets")
    assert [g["name"] for g in assets["groups"]] == [
        "Cash", "Bank", "Accounts Receivable", "Fixed Assets"
    ]  # fmt: skip
    assert [g["name"] for g in section(report, "Liabilities")["groups"]] == ["Accounts Payable"]
    assert [g["name"] for g in section(report, "Equity")["groups"]] == [
        "Common Stock", "Net Income"
    ]  # fmt: skip
    net_income = group(section(report, "Equity"), "Net Income")
    assert net_income == {
        "name": "Net Income",
        "totals": [{"breakdown_id": "total", "amount": {"amount": "1500.00", "currency": "USD"}}],
        "accounts": [],
        "groups": [],
    }
    assert section(report, "Assets")["totals"][0]["amount"]["amount"] == "104500.00"
    assert summary(report, "Total Liabilities and Equity")["amounts"][0]["amount"] == {
        "amount": "104500.00", "currency": "USD"
    }  # fmt: skip


def test_unbalanced_translation_is_shown_and_statements_still_tie() -> None:
    ledger = MemoryLedger()
    ledger.post(date(2026, 1, 2), JP, "11001", "30001", 1_000_000)
    ledger.lines += [
        Line(date(2026, 2, 1), JP, CODE["11001"], "DEBIT", 3, 3),
        Line(date(2026, 2, 1), JP, CODE["40001"], "CREDIT", 3, 2),
    ]
    for params, jp_column in (({}, "total"), ({"breakdown_by": "SUBSIDIARY"}, SUBSIDIARIES[JP].id)):
        report = balance_sheet(_view(ledger), {"as_of_date": "2026-02-28", **params})
        adjustment = group(section(report, "Equity"), "Cumulative Translation Adjustment")
        assert adjustment is not None
        assert column(adjustment["totals"], "USD")[jp_column] == 1
        assert section_total(report, "Assets") == summary_amounts(
            report, "Total Liabilities and Equity"
        )

        flows = cash_flow_statement(
            _view(ledger), {"from_date": "2026-02-01", "to_date": "2026-02-28", **params}
        )
        assert summary_amounts(flows, "Effect of Exchange Rate Changes")[jp_column] == 1
        assert summary_amounts(flows, "Net Change in Cash")[jp_column] == 3
        assert summary_amounts(flows, "Ending Cash")[jp_column] == 670_000 + 3

    local = balance_sheet(_view(ledger), {"as_of_date": "2026-02-28", **scope_params(JP)})
    assert group(section(local, "Equity"), "Cumulative Translation Adjustment") is None


# --------------------------------------------------------------------------- profit and loss


def statement_param_sets(start: date, end: date) -> list[dict[str, str]]:
    base = period_params(start, end)
    return [
        base,
        {**base, "breakdown_by": "SUBSIDIARY"},
        *(period_params(start, end, scope) for scope in (US, JP, UK)),
    ]


@RANDOM
@given(ledgers(), periods())
def test_income_statement_and_executive_pl_agree_on_net_income(
    ledger: MemoryLedger, span: tuple[date, date]
) -> None:
    start, end = span
    for params in statement_param_sets(*span):
        statement = income_statement(_view(ledger), params)
        executive = executive_pl(_view(ledger), params)
        assert [s["name"] for s in statement["sections"]] == [
            "Revenue", "Cost of Revenue", "Operating Expenses", "Other Income and Expense"
        ]  # fmt: skip
        assert [s["name"] for s in executive["sections"]] == [
            "Revenue", "Cost of Revenue", "Sales & Marketing", "Research & Development",
            "General & Administrative", "Other",
        ]  # fmt: skip
        assert statement["breakdowns"] == executive["breakdowns"]
        net_income = summary_amounts(statement, "Net Income")
        assert net_income == summary_amounts(executive, "Net Income")

        revenue = section_total(statement, "Revenue")
        cost = section_total(statement, "Cost of Revenue")
        opex = section_total(statement, "Operating Expenses")
        other = section_total(statement, "Other Income and Expense")
        gross = summary_amounts(statement, "Gross Profit")
        operating = summary_amounts(statement, "Operating Income")
        for index, col in enumerate(column_ids(statement)):
            assert gross[col] == revenue[col] - cost[col]
            assert operating[col] == gross[col] - opex[col]
            assert net_income[col] == operating[col] + other[col]
            assert summary_amounts(executive, "Gross Profit")[col] == gross[col]
            assert summary_amounts(executive, "Total Operating Expenses")[col] == opex[col]

            if statement["breakdowns"][index]["type"] == "SUBSIDIARY":
                scope: int | None = [s.id for s in SUBSIDIARIES].index(col)
                reporting = "subsidiary_id" not in params
            else:
                scope = next(
                    (i for i, s in enumerate(SUBSIDIARIES) if s.id == params.get("subsidiary_id")),
                    None,
                )
                reporting = scope is None
            window = {"subsidiary": scope, "reporting": reporting, "start": start, "end": end}
            assert net_income[col] == -naive_net(ledger, accounts=is_pl, **window)
            depreciation = naive_net(ledger, accounts=is_depreciation, **window)
            assert summary_amounts(executive, "EBITDA")[col] == operating[col] + depreciation
            assert revenue[col] == -naive_net(
                ledger, accounts=lambda a: a.type == "INCOME" and a.subtype == "Revenue", **window
            )


@RANDOM
@given(ledgers(), st.integers(min_value=0, max_value=YEAR))
def test_cumulative_net_income_matches_balance_sheet(ledger: MemoryLedger, offset: int) -> None:
    as_of = DAY0 + timedelta(days=offset)
    statement = income_statement(_view(ledger), period_params(date(2000, 1, 1), as_of))
    sheet = balance_sheet(_view(ledger), {"as_of_date": as_of.isoformat()})
    net_income = group(section(sheet, "Equity"), "Net Income")
    assert net_income is not None
    assert column(net_income["totals"], "USD") == summary_amounts(statement, "Net Income")


def test_income_statement_sections_signs_and_margins() -> None:
    ledger = MemoryLedger()
    day = date(2026, 4, 10)
    ledger.post(day, US, "12001", "40001", 300_00)
    ledger.post(day, US, "50001", "20001", 100_00)
    ledger.post(day, US, "60002", "21501", 50_00)
    ledger.post(day, US, "63001", "15901", 10_00)
    ledger.post(day, US, "11001", "49001", 7_00)
    ledger.post(day, US, "69001", "11001", 2_00)
    params = period_params(date(2026, 4, 1), date(2026, 4, 30))
    report = income_statement(_view(ledger), params)
    assert report["breakdowns"] == [
        {"type": "PERIOD", "name": "2026-04-01 - 2026-04-30", "id": "total"}
    ]
    totals = {s["name"]: column(s["totals"], "USD")["total"] for s in report["sections"]}
    assert totals == {
        "Revenue": 300_00,
        "Cost of Revenue": 100_00,
        "Operating Expenses": 60_00,
        "Other Income and Expense": 5_00,
    }
    other = section(report, "Other Income and Expense")
    assert [g["name"] for g in other["groups"]] == ["Other Income", "Other Expense"]
    interest = group(other, "Other Expense")
    assert interest is not None
    assert interest["accounts"][0]["balances"][0]["amount"] == {
        "amount": "-2.00",
        "currency": "USD",
    }
    opex = section(report, "Operating Expenses")
    assert [g["name"] for g in opex["groups"]] == ["Sales & Marketing", "Depreciation"]

    gross = summary(report, "Gross Profit")
    assert gross["amounts"][0]["amount"] == {"amount": "200.00", "currency": "USD"}
    assert gross["margins"] == [{"breakdown_id": "total", "value": 0.6667}]
    assert summary(report, "Operating Income")["margins"] == [
        {"breakdown_id": "total", "value": 0.4667}
    ]
    net = summary(report, "Net Income")
    assert net["amounts"][0]["amount"] == {"amount": "145.00", "currency": "USD"}
    assert net["margins"] == [{"breakdown_id": "total", "value": 0.4833}]

    executive = executive_pl(_view(ledger), params)
    ga = section(executive, "General & Administrative")
    assert [g["name"] for g in ga["groups"]] == ["Depreciation"]
    assert column(ga["totals"], "USD")["total"] == 10_00
    ebitda = summary(executive, "EBITDA")
    assert ebitda["amounts"][0]["amount"] == {"amount": "150.00", "currency": "USD"}
    assert ebitda["margins"] == [{"breakdown_id": "total", "value": 0.5}]
    assert summary_amounts(executive, "Net Income") == {"total": 145_00}


def test_margins_are_omitted_without_revenue() -> None:
    ledger = MemoryLedger()
    ledger.post(date(2026, 4, 10), US, "62001", "11001", 1_000_00)
    ledger.post(date(2026, 4, 10), JP, "12001", "40001", 10_000)
    report = income_statement(
        _view(ledger),
        {"from_date": "2026-04-01", "to_date": "2026-04-30", "breakdown_by": "SUBSIDIARY"},
    )
    net = summary(report, "Net Income")
    # Only the Japanese column has revenue to divide by.
    assert net["margins"] == [{"breakdown_id": SUBSIDIARIES[JP].id, "value": 1.0}]
    only_us = income_statement(
        _view(ledger), period_params(date(2026, 4, 1), date(2026, 4, 30), US)
    )
    assert all("margins" not in line for line in only_us["summaries"])


# --------------------------------------------------------------------------- cash flow


@RANDOM
@given(ledgers(), periods())
def test_cash_flow_identities(ledger: MemoryLedger, span: tuple[date, date]) -> None:
    start, end = span
    for scope in SCOPES:
        report = cash_flow_statement(_view(ledger), period_params(start, end, scope))
        currency = scope_currency(scope)
        assert report["currency"] == currency
        assert [s["name"] for s in report["sections"]] == [
            "Operating Activities", "Investing Activities", "Financing Activities"
        ]  # fmt: skip
        assert [s["name"] for s in report["summaries"]] == [
            "Net Change in Cash", "Beginning Cash", "Ending Cash"
        ]  # fmt: skip
        window = {"subsidiary": scope, "reporting": scope is None}
        net_change = summary_amounts(report, "Net Change in Cash")["total"]
        beginning = summary_amounts(report, "Beginning Cash")["total"]
        ending = summary_amounts(report, "Ending Cash")["total"]
        assert net_change == naive_net(ledger, accounts=is_cash, start=start, end=end, **window)
        assert ending == beginning + net_change
        assert ending == naive_net(ledger, accounts=is_cash, end=end, **window)
        assert net_change == sum(
            section_total(report, name)["total"]
            for name in ("Operating Activities", "Investing Activities", "Financing Activities")
        )
        operating = section(report, "Operating Activities")
        assert operating["groups"][0]["name"] == "Net Income"
        assert column(operating["groups"][0]["totals"], currency)["total"] == -naive_net(
            ledger, accounts=is_pl, start=start, end=end, **window
        )
        investing = [a["code"] for a in all_accounts(section(report, "Investing Activities"))]
        financing = [a["code"] for a in all_accounts(section(report, "Financing Activities"))]
        working = [a["code"] for a in all_accounts(operating)]
        for code in investing:
            assert ACCOUNTS[CODE[code]].subtype in INVESTING_SUBTYPES
        for code in financing:
            account = ACCOUNTS[CODE[code]]
            assert account.subtype in FINANCING_SUBTYPES or account.type == "EQUITY"
        for code in working:
            account = ACCOUNTS[CODE[code]]
            assert account.type in {"ASSET", "LIABILITY"}
            assert account.subtype not in CASH_SUBTYPES | INVESTING_SUBTYPES | FINANCING_SUBTYPES


def test_cash_flow_classifies_movements() -> None:
    ledger = MemoryLedger()
    ledger.post(date(2025, 12, 1), US, "11001", "30001", 10_000_00)
    march = date(2026, 3, 15)
    ledger.post(march, US, "11001", "25001", 5_000_00)  # loan drawn
    ledger.post(march, US, "15001", "11001", 2_000_00)  # equipment bought
    ledger.post(march, US, "12001", "40001", 800_00)  # invoiced, not collected
    ledger.post(march, US, "11001", "40001", 200_00)  # cash sale
    ledger.post(march, US, "63001", "15901", 100_00)  # depreciation
    report = cash_flow_statement(_view(ledger), period_params(date(2026, 3, 1), date(2026, 3, 31)))
    totals = {s["name"]: column(s["totals"], "USD")["total"] for s in report["sections"]}
    assert totals == {
        "Operating Activities": 200_00,  # 900 net income - 800 receivable + 100 depreciation
        "Investing Activities": -2_000_00,
        "Financing Activities": 5_000_00,
    }
    changes = group(section(report, "Operating Activities"), "Changes in Working Capital")
    assert changes is not None
    assert {a["code"]: column(a["balances"], "USD")["total"] for a in changes["accounts"]} == {
        "12001": -800_00,
        "15901": 100_00,
    }
    assert summary_amounts(report, "Beginning Cash") == {"total": 10_000_00}
    assert summary_amounts(report, "Net Change in Cash") == {"total": 3_200_00}
    assert summary_amounts(report, "Ending Cash") == {"total": 13_200_00}


# --------------------------------------------------------------------------- breakdowns


@RANDOM
@given(ledgers(), periods())
def test_subsidiary_breakdown_sums_to_consolidated(
    ledger: MemoryLedger, span: tuple[date, date]
) -> None:
    start, end = span
    builders = {
        "balance_sheet": (balance_sheet, {"as_of_date": end.isoformat()}),
        "income_statement": (income_statement, period_params(start, end)),
        "executive_pl": (executive_pl, period_params(start, end)),
        "cash_flow_statement": (cash_flow_statement, period_params(start, end)),
    }
    for build, params in builders.values():
        consolidated = build(_view(ledger), params)
        split = build(_view(ledger), {**params, "breakdown_by": "SUBSIDIARY"})
        assert split["currency"] == consolidated["currency"] == "USD"
        assert split["breakdowns"] == [
            {"type": "SUBSIDIARY", "name": s.trade_name, "id": s.id} for s in SUBSIDIARIES
        ]
        for name in (s["name"] for s in consolidated["sections"]):
            assert (
                sum(section_total(split, name).values())
                == section_total(consolidated, name)["total"]
            )
        for name in (s["name"] for s in consolidated["summaries"]):
            assert (
                sum(summary_amounts(split, name).values())
                == summary_amounts(consolidated, name)["total"]
            )
        split_accounts: dict[str, int] = {}
        for sec in split["sections"]:
            for account in all_accounts(sec):
                split_accounts[account["code"]] = sum(column(account["balances"], "USD").values())
        whole_accounts = {
            a["code"]: column(a["balances"], "USD")["total"]
            for sec in consolidated["sections"]
            for a in all_accounts(sec)
        }
        assert {k: v for k, v in split_accounts.items() if v} == whole_accounts


def test_subsidiary_filter_with_breakdown_gives_that_subsidiary_only() -> None:
    ledger = MemoryLedger()
    ledger.post(date(2026, 5, 1), JP, "12001", "40001", 12_345)
    ledger.post(date(2026, 5, 1), UK, "12001", "40001", 999)
    params = {
        **period_params(date(2026, 5, 1), date(2026, 5, 31), JP),
        "breakdown_by": "SUBSIDIARY",
    }
    report = income_statement(_view(ledger), params)
    jp = SUBSIDIARIES[JP]
    assert report["currency"] == "JPY"
    assert report["breakdowns"] == [{"type": "SUBSIDIARY", "name": jp.trade_name, "id": jp.id}]
    assert section(report, "Revenue")["totals"] == [
        {"breakdown_id": jp.id, "amount": {"amount": "12345", "currency": "JPY"}}
    ]


# --------------------------------------------------------------------------- formatting


def test_jpy_and_usd_formatting() -> None:
    ledger = MemoryLedger()
    ledger.post(date(2026, 6, 1), JP, "12001", "40001", 1_500)
    ledger.post(date(2026, 6, 1), US, "12001", "40001", 5)
    period = (date(2026, 6, 1), date(2026, 6, 30))

    local = trial_balance(_view(ledger), period_params(*period, JP))
    revenue = next(row for row in local["accounts"] if row["code"] == "40001")
    assert local["currency"] == "JPY"
    assert revenue["credit_total"] == {"amount": "1500", "currency": "JPY"}
    assert revenue["debit_total"] == {"amount": "0", "currency": "JPY"}
    assert revenue["ending_balance"] == {"amount": "-1500", "currency": "JPY"}

    us = trial_balance(_view(ledger), period_params(*period, US))
    revenue = next(row for row in us["accounts"] if row["code"] == "40001")
    assert revenue["ending_balance"] == {"amount": "-0.05", "currency": "USD"}
    assert revenue["beginning_balance"] == {"amount": "0.00", "currency": "USD"}

    consolidated = trial_balance(_view(ledger), period_params(*period))
    revenue = next(row for row in consolidated["accounts"] if row["code"] == "40001")
    # 1500 JPY at 0.67 cents = 1005 cents, plus the US entity's 5 cents.
    assert revenue["credit_total"] == {"amount": "10.10", "currency": "USD"}

    statement = income_statement(_view(ledger), period_params(*period, JP))
    assert section(statement, "Revenue")["totals"] == [
        {"breakdown_id": "total", "amount": {"amount": "1500", "currency": "JPY"}}
    ]


# --------------------------------------------------------------------------- parameters

PERIOD_REPORTS = (trial_balance, income_statement, executive_pl, cash_flow_statement)
BREAKDOWN_REPORTS = (income_statement, executive_pl, cash_flow_statement)


@pytest.mark.parametrize("build", PERIOD_REPORTS)
@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"to_date": "2026-01-31"}, "from_date"),
        ({"from_date": "2026-01-01"}, "to_date"),
        ({"from_date": "", "to_date": "2026-01-31"}, "from_date"),
        ({"from_date": "2026-01-01", "to_date": "2026/01/31"}, "to_date"),
        ({"from_date": "20260101", "to_date": "2026-01-31"}, "from_date"),
        ({"from_date": "2026-02-30", "to_date": "2026-03-31"}, "from_date"),
        ({"from_date": "2026-02-01", "to_date": "2026-01-31"}, "from_date"),
        ({"from_date": "2026-01-01", "to_date": "2026-01-31", "subsidiary_id": "nope"},
         "subsidiary_id"),
    ],
)  # fmt: skip
def test_period_parameter_errors_name_the_parameter(
    build: Callable[[LedgerView, Mapping[str, str]], Json], params: dict[str, str], param: str
) -> None:
    with pytest.raises(ReportParamError) as caught:
        build(_view(MemoryLedger()), params)
    assert caught.value.param == param
    assert caught.value.message
    assert isinstance(caught.value, ValueError)


def test_missing_dates_message() -> None:
    with pytest.raises(ReportParamError, match="from_date and to_date must both be provided"):
        trial_balance(_view(MemoryLedger()), {"from_date": "2026-01-01"})


@pytest.mark.parametrize("build", BREAKDOWN_REPORTS)
@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"breakdown_by": "PERIOD"}, "breakdown_by"),
        ({"breakdown_by": "subsidiary"}, "breakdown_by"),
        ({"breakdown_by": "CUSTOM_FIELD"}, "custom_field_id"),
        ({"breakdown_by": "CUSTOM_FIELD", "custom_field_id": str(uuid.uuid4())}, "breakdown_by"),
    ],
)
def test_breakdown_errors_name_the_parameter(
    build: Callable[[LedgerView, Mapping[str, str]], Json], extra: dict[str, str], param: str
) -> None:
    params = {"from_date": "2026-01-01", "to_date": "2026-01-31", **extra}
    with pytest.raises(ReportParamError) as caught:
        build(_view(MemoryLedger()), params)
    assert caught.value.param == param
    if param == "breakdown_by" and extra["breakdown_by"] == "CUSTOM_FIELD":
        assert "no custom-field dimensions" in caught.value.message


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({}, "as_of_date"),
        ({"as_of_date": "2026-13-01"}, "as_of_date"),
        ({"as_of_date": "2026-01-31", "subsidiary_id": str(uuid.uuid4())}, "subsidiary_id"),
        ({"as_of_date": "2026-01-31", "breakdown_by": "CUSTOM_FIELD"}, "breakdown_by"),
        ({"as_of_date": "2026-01-31", "breakdown_by": "NONE"}, "breakdown_by"),
    ],
)
def test_balance_sheet_parameter_errors(params: dict[str, str], param: str) -> None:
    with pytest.raises(ReportParamError) as caught:
        balance_sheet(_view(MemoryLedger()), params)
    assert caught.value.param == param


def test_unknown_parameters_are_left_to_the_http_layer() -> None:
    ledger = MemoryLedger()
    ledger.post(date(2026, 1, 2), US, "11001", "30001", 100)
    params = {"from_date": "2026-01-01", "to_date": "2026-01-31", "custom_field_id": "x", "z": "1"}
    assert income_statement(_view(ledger), params)["currency"] == "USD"
    assert trial_balance(_view(ledger), params)["accounts"]


def test_subsidiary_id_matches_case_insensitively() -> None:
    ledger = MemoryLedger()
    ledger.post(date(2026, 1, 2), JP, "11001", "30001", 100)
    params = period_params(date(2026, 1, 1), date(2026, 1, 31))
    params["subsidiary_id"] = SUBSIDIARIES[JP].id.upper()
    assert trial_balance(_view(ledger), params)["currency"] == "JPY"
