"""The simulator's financial reports: pure functions from a ledger view to the served JSON.

Rillet's reference (``rillet-api.md`` §4) gives the shapes but leaves the accounting conventions
open, so the simulator fixes them here:

* **Exact money.** Every amount is an integer count of minor units summed from ledger lines and
  formatted with :func:`money_json`; no float touches money. Margins are the only JSON numbers.
* **Trial balance** is debit-positive (debit minus credit). ``beginning_balance`` is the net of
  every line dated before ``from_date``; ``debit_total`` and ``credit_total`` are the unsigned sums
  of lines dated ``from_date`` through ``to_date`` inclusive; ``ending_balance`` is
  ``beginning_balance + debit_total - credit_total``. An account is listed only when one of those
  four is non-zero, in account-code order. ``totals`` are the column sums over the listed rows,
  computed rather than forced, so an unbalanced ledger shows as unbalanced totals.
* **Statements** are natural-side positive: assets and expenses debit-positive; liabilities,
  equity and income credit-positive. Sections that net income against expense ("Other Income
  and Expense", "Other") show income positive and expense negative, so their total is net other
  income. Within a section, accounts are grouped by subtype in account-code order; accounts that
  are zero in every column and groups left without accounts are omitted, while the named
  sections are always present.
* **Balance sheet** balances are cumulative from the first line through ``as_of_date``. Equity
  ends with a synthetic "Net Income" group (cumulative income minus expense) so that Assets equal
  Liabilities plus Equity.
* **Cash flow** uses the indirect method over the period: net income, then the negated
  debit-positive movement of every non-cash balance-sheet account, classed as investing
  (``INVESTING_SUBTYPES``), financing (``FINANCING_SUBTYPES`` and every other equity account) or
  working capital (the rest).
* **Translation differences.** Each line carries its own reporting-currency amount, so a ledger
  balanced in local currency can be off by rounding once translated. Should that happen, the
  difference is shown rather than hidden: Equity gains a "Cumulative Translation Adjustment"
  group and the cash-flow statement an "Effect of Exchange Rate Changes" summary. Neither appears
  while the ledger balances in the column's currency.
* **Currency and columns.** With ``subsidiary_id`` the report is in that subsidiary's own
  currency; without it, consolidated in the organization's reporting currency.
  ``breakdown_by=SUBSIDIARY`` gives one reporting-currency column per subsidiary; combined with
  ``subsidiary_id`` the single column is that subsidiary, in its own currency like any other
  report filtered to it. Without a breakdown there is one ``PERIOD`` column with id ``total``.
* **Parameters** arrive as raw query strings. An empty value counts as absent. Parameters a
  report does not know are left to the HTTP layer; ``custom_field_id`` without
  ``breakdown_by=CUSTOM_FIELD`` is ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from fractions import Fraction
from typing import Any, Protocol

import numpy as np

from rillet_dagster.rillet.money import money_json
from rillet_dagster.sandbox.chart import (
    CASH_SUBTYPES,
    FINANCING_SUBTYPES,
    INVESTING_SUBTYPES,
    OPERATING_EXPENSE_SUBTYPES,
)

__all__ = [
    "AccountInfo",
    "LedgerView",
    "ReportParamError",
    "SubsidiaryInfo",
    "balance_sheet",
    "cash_flow_statement",
    "executive_pl",
    "income_statement",
    "trial_balance",
]

Json = dict[str, Any]

ASSET = "ASSET"
LIABILITY = "LIABILITY"
EQUITY = "EQUITY"
INCOME = "INCOME"
EXPENSE = "EXPENSE"
_BALANCE_SHEET_TYPES = frozenset({ASSET, LIABILITY, EQUITY})
_PROFIT_AND_LOSS_TYPES = frozenset({INCOME, EXPENSE})

REVENUE_SUBTYPE = "Revenue"
COST_OF_REVENUE_SUBTYPE = "Cost of Revenue"
DEPRECIATION_SUBTYPE = "Depreciation"
GENERAL_AND_ADMINISTRATIVE = "General & Administrative"

BREAKDOWN_SUBSIDIARY = "SUBSIDIARY"
BREAKDOWN_CUSTOM_FIELD = "CUSTOM_FIELD"
TOTAL_COLUMN_ID = "total"

_NO_CUSTOM_FIELDS = (
    "the sandbox ledger has no custom-field dimensions; use SUBSIDIARY or no breakdown"
)
# date.fromisoformat alone would also take "20260131" and non-ASCII digits.
_DATE_TEXT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


@dataclass(frozen=True)
class AccountInfo:
    id: str
    code: str
    name: str
    type: str
    subtype: str


@dataclass(frozen=True)
class SubsidiaryInfo:
    id: str
    trade_name: str
    currency: str


class LedgerView(Protocol):
    accounts: Sequence[AccountInfo]  # position = account index
    subsidiaries: Sequence[SubsidiaryInfo]  # position = subsidiary index
    reporting_currency: str  # the organization's currency (consolidation)

    def sums(
        self, *, subsidiary: int | None, start: date | None, end: date, reporting: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """(debit_minor, credit_minor): int64 arrays of len(accounts), the sum of journal-entry
        line amounts (unsigned, in minor units) posted to each account with dates in
        [start, end] inclusive (start None = from the beginning of time). subsidiary None = all
        subsidiaries (then reporting must be True); reporting=True gives amounts in
        reporting_currency, False in the subsidiary's own currency."""
        ...


class ReportParamError(ValueError):
    """A report parameter that is missing or invalid; the HTTP layer answers 400 naming it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


# --------------------------------------------------------------------------- parameters


def _param(params: Mapping[str, str], name: str) -> str | None:
    value = params.get(name)
    return value if value else None


def _parse_date(params: Mapping[str, str], name: str) -> date:
    raw = params[name]
    if not _DATE_TEXT.fullmatch(raw):
        raise ReportParamError(name, f"{name} must be a date in YYYY-MM-DD form, got {raw!r}")
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise ReportParamError(name, f"{name} {raw!r} is not a calendar date") from None


def _parse_period(params: Mapping[str, str]) -> tuple[date, date]:
    for name in ("from_date", "to_date"):
        if _param(params, name) is None:
            raise ReportParamError(name, "from_date and to_date must both be provided")
    start = _parse_date(params, "from_date")
    end = _parse_date(params, "to_date")
    if start > end:
        raise ReportParamError(
            "from_date", f"from_date {start.isoformat()} is after to_date {end.isoformat()}"
        )
    return start, end


def _parse_as_of(params: Mapping[str, str]) -> date:
    if _param(params, "as_of_date") is None:
        raise ReportParamError("as_of_date", "as_of_date must be provided")
    return _parse_date(params, "as_of_date")


def _parse_subsidiary(view: LedgerView, params: Mapping[str, str]) -> int | None:
    raw = _param(params, "subsidiary_id")
    if raw is None:
        return None
    # UUIDs compare case-insensitively (RFC 9562), and clients differ in the case they send.
    wanted = raw.lower()
    for index, subsidiary in enumerate(view.subsidiaries):
        if subsidiary.id.lower() == wanted:
            return index
    raise ReportParamError("subsidiary_id", f"no subsidiary with id {raw!r}")


# --------------------------------------------------------------------------- columns


@dataclass(frozen=True)
class _Column:
    id: str
    breakdown: Json
    subsidiary: int | None
    reporting: bool


@dataclass(frozen=True)
class _Layout:
    currency: str
    columns: tuple[_Column, ...]

    @property
    def width(self) -> int:
        return len(self.columns)


def _subsidiary_column(view: LedgerView, index: int, *, reporting: bool) -> _Column:
    info = view.subsidiaries[index]
    breakdown = {"type": BREAKDOWN_SUBSIDIARY, "name": info.trade_name, "id": info.id}
    return _Column(info.id, breakdown, index, reporting)


def _layout(
    view: LedgerView, params: Mapping[str, str], *, period_name: str, custom_field_declared: bool
) -> _Layout:
    subsidiary = _parse_subsidiary(view, params)
    breakdown_by = _param(params, "breakdown_by")
    if breakdown_by is not None and breakdown_by not in (
        BREAKDOWN_SUBSIDIARY,
        BREAKDOWN_CUSTOM_FIELD,
    ):
        raise ReportParamError(
            "breakdown_by", f"breakdown_by must be SUBSIDIARY or CUSTOM_FIELD, got {breakdown_by!r}"
        )
    if breakdown_by == BREAKDOWN_CUSTOM_FIELD:
        # The missing id is the nearer mistake to report where the endpoint declares the
        # parameter; on the balance sheet, which does not, only breakdown_by can be wrong.
        if custom_field_declared and _param(params, "custom_field_id") is None:
            raise ReportParamError(
                "custom_field_id", "custom_field_id is required when breakdown_by is CUSTOM_FIELD"
            )
        raise ReportParamError("breakdown_by", _NO_CUSTOM_FIELDS)

    if subsidiary is not None:
        currency = view.subsidiaries[subsidiary].currency
        if breakdown_by == BREAKDOWN_SUBSIDIARY:
            return _Layout(currency, (_subsidiary_column(view, subsidiary, reporting=False),))
        period = {"type": "PERIOD", "name": period_name, "id": TOTAL_COLUMN_ID}
        return _Layout(currency, (_Column(TOTAL_COLUMN_ID, period, subsidiary, False),))
    if breakdown_by == BREAKDOWN_SUBSIDIARY:
        columns = tuple(
            _subsidiary_column(view, index, reporting=True)
            for index in range(len(view.subsidiaries))
        )
        return _Layout(view.reporting_currency, columns)
    period = {"type": "PERIOD", "name": period_name, "id": TOTAL_COLUMN_ID}
    return _Layout(view.reporting_currency, (_Column(TOTAL_COLUMN_ID, period, None, True),))


def _period_layout(view: LedgerView, params: Mapping[str, str]) -> tuple[date, date, _Layout]:
    start, end = _parse_period(params)
    layout = _layout(
        view,
        params,
        period_name=f"{start.isoformat()} - {end.isoformat()}",
        custom_field_declared=True,
    )
    return start, end, layout


# --------------------------------------------------------------------------- ledger sums


def _day_before(day: date) -> date | None:
    return None if day == date.min else day - timedelta(days=1)


def _debits_credits(
    view: LedgerView, column: _Column, start: date | None, end: date | None
) -> tuple[list[int], list[int]]:
    if end is None:
        zeros = [0] * len(view.accounts)
        return zeros, list(zeros)
    debit, credit = view.sums(
        subsidiary=column.subsidiary, start=start, end=end, reporting=column.reporting
    )
    # tolist() yields Python ints, so totals below cannot overflow int64.
    debits = [int(value) for value in np.asarray(debit).tolist()]
    credits = [int(value) for value in np.asarray(credit).tolist()]
    if len(debits) != len(view.accounts) or len(credits) != len(view.accounts):
        raise ValueError(
            f"ledger view returned {len(debits)}/{len(credits)} sums "
            f"for {len(view.accounts)} accounts"
        )
    return debits, credits


def _net_by_account(
    view: LedgerView, layout: _Layout, start: date | None, end: date | None
) -> list[list[int]]:
    """Debit-positive net per account (outer) per column (inner)."""
    per_column = []
    for column in layout.columns:
        debits, credits = _debits_credits(view, column, start, end)
        per_column.append([d - c for d, c in zip(debits, credits, strict=True)])
    return [[net[index] for net in per_column] for index in range(len(view.accounts))]


def _code_order(view: LedgerView) -> list[int]:
    for account in view.accounts:
        if account.type not in _BALANCE_SHEET_TYPES | _PROFIT_AND_LOSS_TYPES:
            # An account no statement can place would silently break Assets = L + E.
            raise ValueError(f"account {account.code} has unknown type {account.type!r}")
    return sorted(range(len(view.accounts)), key=lambda i: (view.accounts[i].code, i))


def _column_sum(width: int, rows: Iterable[Sequence[int]]) -> list[int]:
    totals = [0] * width
    for row in rows:
        for k, value in enumerate(row):
            totals[k] += value
    return totals


def _combine(*terms: tuple[int, Sequence[int]]) -> list[int]:
    """Per-column linear combination: ``_combine((1, a), (-1, b))`` is ``a - b``."""
    width = len(terms[0][1])
    return [sum(sign * values[k] for sign, values in terms) for k in range(width)]


# --------------------------------------------------------------------------- statement model


@dataclass
class _Group:
    name: str
    lines: list[tuple[AccountInfo, list[int]]] = field(default_factory=list)
    # An account-less line such as "Net Income": shown even when zero, unless optional.
    synthetic: list[int] | None = None
    optional: bool = False

    def totals(self, width: int) -> list[int]:
        if self.synthetic is not None:
            return list(self.synthetic)
        return _column_sum(width, (values for _, values in self.lines))


@dataclass
class _Section:
    name: str
    groups: list[_Group] = field(default_factory=list)

    def totals(self, width: int) -> list[int]:
        return _column_sum(width, (group.totals(width) for group in self.groups))


def _subtype_groups(
    view: LedgerView, indices: Iterable[int], values: list[list[int]], sign: int
) -> list[_Group]:
    """Accounts (already in code order) grouped by subtype, first appearance first."""
    groups: dict[str, _Group] = {}
    for index in indices:
        account = view.accounts[index]
        group = groups.setdefault(account.subtype, _Group(account.subtype))
        group.lines.append((account, [sign * value for value in values[index]]))
    return list(groups.values())


def _amounts(values: Sequence[int], layout: _Layout) -> list[Json]:
    return [
        {"breakdown_id": column.id, "amount": money_json(value, layout.currency)}
        for column, value in zip(layout.columns, values, strict=True)
    ]


def _render_group(group: _Group, layout: _Layout) -> Json | None:
    accounts = [
        {
            "id": account.id,
            "code": account.code,
            "name": account.name,
            "balances": _amounts(values, layout),
        }
        for account, values in group.lines
        if any(values)
    ]
    totals = group.totals(layout.width)
    if group.synthetic is not None:
        if group.optional and not any(totals):
            return None
    elif not accounts:
        return None
    return {
        "name": group.name,
        "totals": _amounts(totals, layout),
        "accounts": accounts,
        "groups": [],
    }


def _render_section(section: _Section, layout: _Layout) -> Json:
    groups = [_render_group(group, layout) for group in section.groups]
    return {
        "name": section.name,
        "totals": _amounts(section.totals(layout.width), layout),
        "groups": [group for group in groups if group is not None],
    }


def _margin(value: int, revenue: int) -> float:
    # Rounded exactly (half to even) before the one float conversion the wire form needs.
    return float(round(Fraction(value, revenue), 4))


def _summary(
    name: str, values: Sequence[int], layout: _Layout, revenue: Sequence[int] | None = None
) -> Json:
    line: Json = {"name": name, "amounts": _amounts(values, layout)}
    if revenue is not None:
        margins = [
            {"breakdown_id": column.id, "value": _margin(value, base)}
            for column, value, base in zip(layout.columns, values, revenue, strict=True)
            if base != 0
        ]
        if margins:
            line["margins"] = margins
    return line


def _breakdowns(layout: _Layout) -> list[Json]:
    return [dict(column.breakdown) for column in layout.columns]


def _period_json(start: date, end: date) -> Json:
    return {"from_date": start.isoformat(), "to_date": end.isoformat()}


def _period_statement(
    start: date, end: date, layout: _Layout, sections: Sequence[_Section], summaries: list[Json]
) -> Json:
    """The envelope every period statement shares (income, executive P&L, cash flow)."""
    return {
        "period": _period_json(start, end),
        "currency": layout.currency,
        "breakdowns": _breakdowns(layout),
        "sections": [_render_section(section, layout) for section in sections],
        "summaries": summaries,
    }


# --------------------------------------------------------------------------- trial balance


def trial_balance(view: LedgerView, params: Mapping[str, str]) -> Json:
    """``GET /reports/trial-balance``: debit-positive balances per account over the period."""
    start, end = _parse_period(params)
    subsidiary = _parse_subsidiary(view, params)
    if subsidiary is None:
        column = _Column(TOTAL_COLUMN_ID, {}, None, True)
        currency = view.reporting_currency
    else:
        column = _Column(TOTAL_COLUMN_ID, {}, subsidiary, False)
        currency = view.subsidiaries[subsidiary].currency

    before_debits, before_credits = _debits_credits(view, column, None, _day_before(start))
    debits, credits = _debits_credits(view, column, start, end)

    rows: list[Json] = []
    totals = [0, 0, 0, 0]
    for index in _code_order(view):
        beginning = before_debits[index] - before_credits[index]
        ending = beginning + debits[index] - credits[index]
        values = (beginning, debits[index], credits[index], ending)
        if not any(values):
            continue
        for k, value in enumerate(values):
            totals[k] += value
        account = view.accounts[index]
        rows.append(
            {
                "id": account.id,
                "code": account.code,
                "name": account.name,
                **_trial_balance_columns(values, currency),
            }
        )
    return {
        "period": _period_json(start, end),
        "currency": currency,
        "accounts": rows,
        "totals": _trial_balance_columns(tuple(totals), currency),
    }


def _trial_balance_columns(values: Sequence[int], currency: str) -> Json:
    beginning, debit, credit, ending = values
    return {
        "beginning_balance": money_json(beginning, currency),
        "debit_total": money_json(debit, currency),
        "credit_total": money_json(credit, currency),
        "ending_balance": money_json(ending, currency),
    }


# --------------------------------------------------------------------------- balance sheet


def balance_sheet(view: LedgerView, params: Mapping[str, str]) -> Json:
    """``GET /reports/balance-sheet``: cumulative natural-side balances as of a date."""
    as_of = _parse_as_of(params)
    layout = _layout(view, params, period_name=as_of.isoformat(), custom_field_declared=False)
    order = _code_order(view)
    balances = _net_by_account(view, layout, None, as_of)
    width = layout.width

    def of_type(kind: str) -> list[int]:
        return [i for i in order if view.accounts[i].type == kind]

    net_income = [
        -value
        for value in _column_sum(
            width, (balances[i] for i in order if view.accounts[i].type in _PROFIT_AND_LOSS_TYPES)
        )
    ]
    # Debit-positive sum of every account: zero when the ledger balances in this currency.
    imbalance = _column_sum(width, balances)

    assets = _Section("Assets", _subtype_groups(view, of_type(ASSET), balances, 1))
    liabilities = _Section("Liabilities", _subtype_groups(view, of_type(LIABILITY), balances, -1))
    equity = _Section(
        "Equity",
        [
            *_subtype_groups(view, of_type(EQUITY), balances, -1),
            _Group("Net Income", synthetic=net_income),
            _Group("Cumulative Translation Adjustment", synthetic=imbalance, optional=True),
        ],
    )
    liabilities_and_equity = _combine((1, liabilities.totals(width)), (1, equity.totals(width)))
    return {
        "as_of_date": as_of.isoformat(),
        "currency": layout.currency,
        "breakdowns": _breakdowns(layout),
        "sections": [_render_section(s, layout) for s in (assets, liabilities, equity)],
        "summaries": [_summary("Total Liabilities and Equity", liabilities_and_equity, layout)],
    }


# --------------------------------------------------------------------------- profit and loss


def _profit_and_loss_section_name(account: AccountInfo, *, executive: bool) -> str | None:
    if account.type == INCOME and account.subtype == REVENUE_SUBTYPE:
        return "Revenue"
    if account.type == EXPENSE and account.subtype == COST_OF_REVENUE_SUBTYPE:
        return "Cost of Revenue"
    if account.type == EXPENSE and account.subtype in OPERATING_EXPENSE_SUBTYPES:
        return account.subtype if executive else "Operating Expenses"
    if account.type == EXPENSE and account.subtype == DEPRECIATION_SUBTYPE:
        return GENERAL_AND_ADMINISTRATIVE if executive else "Operating Expenses"
    if account.type in _PROFIT_AND_LOSS_TYPES:
        # Unclassified income and expense still belong in net income, as other items.
        return "Other" if executive else "Other Income and Expense"
    return None


def _profit_and_loss_sections(
    view: LedgerView, movements: list[list[int]], *, executive: bool
) -> list[_Section]:
    """The P&L sections in order: revenue, cost of revenue, expenses..., then other (net).

    Every INCOME and EXPENSE account lands in exactly one section, so net income built from
    the sections equals income minus expense over the whole ledger.
    """
    expenses = [*OPERATING_EXPENSE_SUBTYPES] if executive else ["Operating Expenses"]
    if executive and GENERAL_AND_ADMINISTRATIVE not in expenses:
        expenses.append(GENERAL_AND_ADMINISTRATIVE)
    other = "Other" if executive else "Other Income and Expense"
    members: dict[str, list[int]] = {
        name: [] for name in ("Revenue", "Cost of Revenue", *expenses, other)
    }
    for index in _code_order(view):
        name = _profit_and_loss_section_name(view.accounts[index], executive=executive)
        if name is not None:
            members[name].append(index)
    # Income is credit-positive; in the other section expenses then come out negative.
    signs = {"Revenue": -1, other: -1}
    return [
        _Section(name, _subtype_groups(view, indices, movements, signs.get(name, 1)))
        for name, indices in members.items()
    ]


def income_statement(view: LedgerView, params: Mapping[str, str]) -> Json:
    """``GET /reports/income-statement``: natural-side movements over the period."""
    start, end, layout = _period_layout(view, params)
    movements = _net_by_account(view, layout, start, end)
    sections = _profit_and_loss_sections(view, movements, executive=False)
    width = layout.width
    revenue, cost, operating, other = (section.totals(width) for section in sections)
    gross_profit = _combine((1, revenue), (-1, cost))
    operating_income = _combine((1, gross_profit), (-1, operating))
    net_income = _combine((1, operating_income), (1, other))
    return _period_statement(
        start,
        end,
        layout,
        sections,
        [
            _summary("Gross Profit", gross_profit, layout, revenue),
            _summary("Operating Income", operating_income, layout, revenue),
            _summary("Net Income", net_income, layout, revenue),
        ],
    )


def executive_pl(view: LedgerView, params: Mapping[str, str]) -> Json:
    """``GET /reports/executive-pl``: the income statement by department, with EBITDA."""
    start, end, layout = _period_layout(view, params)
    movements = _net_by_account(view, layout, start, end)
    sections = _profit_and_loss_sections(view, movements, executive=True)
    width = layout.width
    revenue = sections[0].totals(width)
    cost = sections[1].totals(width)
    operating_expenses = _column_sum(width, (s.totals(width) for s in sections[2:-1]))
    other = sections[-1].totals(width)
    depreciation = _column_sum(
        width,
        (
            movements[i]
            for i, account in enumerate(view.accounts)
            if account.type == EXPENSE and account.subtype == DEPRECIATION_SUBTYPE
        ),
    )
    gross_profit = _combine((1, revenue), (-1, cost))
    operating_income = _combine((1, gross_profit), (-1, operating_expenses))
    ebitda = _combine((1, operating_income), (1, depreciation))
    net_income = _combine((1, operating_income), (1, other))
    return _period_statement(
        start,
        end,
        layout,
        sections,
        [
            _summary("Gross Profit", gross_profit, layout, revenue),
            _summary("Total Operating Expenses", operating_expenses, layout, revenue),
            _summary("EBITDA", ebitda, layout, revenue),
            _summary("Net Income", net_income, layout, revenue),
        ],
    )


# --------------------------------------------------------------------------- cash flow


def cash_flow_statement(view: LedgerView, params: Mapping[str, str]) -> Json:
    """``GET /reports/cash-flow-statement``: the indirect method over the period."""
    start, end, layout = _period_layout(view, params)
    width = layout.width
    order = _code_order(view)
    movements = _net_by_account(view, layout, start, end)
    before = _net_by_account(view, layout, None, _day_before(start))

    cash: list[int] = []
    working_capital: list[int] = []
    investing: list[int] = []
    financing: list[int] = []
    for index in order:
        account = view.accounts[index]
        if account.type not in _BALANCE_SHEET_TYPES:
            continue
        if account.subtype in CASH_SUBTYPES:
            cash.append(index)
        elif account.subtype in INVESTING_SUBTYPES:
            investing.append(index)
        elif account.subtype in FINANCING_SUBTYPES or account.type == EQUITY:
            financing.append(index)
        else:
            working_capital.append(index)

    net_income = [
        -value
        for value in _column_sum(
            width, (movements[i] for i in order if view.accounts[i].type in _PROFIT_AND_LOSS_TYPES)
        )
    ]
    # An outflow is a rise in a debit-positive balance, hence the negated movements.
    changes = _Group(
        "Changes in Working Capital",
        [(view.accounts[i], [-value for value in movements[i]]) for i in working_capital],
    )
    sections = [
        _Section("Operating Activities", [_Group("Net Income", synthetic=net_income), changes]),
        _Section("Investing Activities", _subtype_groups(view, investing, movements, -1)),
        _Section("Financing Activities", _subtype_groups(view, financing, movements, -1)),
    ]
    # Non-zero only when translated lines do not balance; it closes the gap to the cash
    # accounts' own movement instead of leaving the statement unreconciled.
    exchange_effect = _column_sum(width, movements)
    net_change = _column_sum(
        width, [*(section.totals(width) for section in sections), exchange_effect]
    )
    beginning_cash = _column_sum(width, (before[i] for i in cash))
    ending_cash = _combine(
        (1, beginning_cash), (1, _column_sum(width, (movements[i] for i in cash)))
    )

    summaries = []
    if any(exchange_effect):
        summaries.append(_summary("Effect of Exchange Rate Changes", exchange_effect, layout))
    summaries += [
        _summary("Net Change in Cash", net_change, layout),
        _summary("Beginning Cash", beginning_cash, layout),
        _summary("Ending Cash", ending_cash, layout),
    ]
    return _period_statement(start, end, layout, sections, summaries)
