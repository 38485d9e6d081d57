"""The simulated company's chart of accounts: codes, names, types and the subtypes reports use."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChartAccount:
    code: str
    name: str
    type: str  # ASSET | LIABILITY | EQUITY | INCOME | EXPENSE
    subtype: str


CHART: tuple[ChartAccount, ...] = (
    ChartAccount("11001", "Operating Cash", "ASSET", "Cash"),
    ChartAccount("11002", "Payroll Bank Account", "ASSET", "Bank"),
    ChartAccount("12001", "Accounts Receivable", "ASSET", "Accounts Receivable"),
    ChartAccount("13001", "Prepaid Expenses", "ASSET", "Prepaid"),
    ChartAccount("15001", "Computer Equipment", "ASSET", "Fixed Assets"),
    ChartAccount("15901", "Accumulated Depreciation", "ASSET", "Accumulated Depreciation"),
    ChartAccount("20001", "Accounts Payable", "LIABILITY", "Accounts Payable"),
    ChartAccount("21001", "Accrued Liabilities", "LIABILITY", "Accrued"),
    ChartAccount("21501", "Corporate Credit Card", "LIABILITY", "Credit Card"),
    ChartAccount("21601", "Reimbursements Payable", "LIABILITY", "Reimbursements Payable"),
    ChartAccount("22001", "Sales Tax Payable", "LIABILITY", "Tax Payable"),
    ChartAccount("23001", "Deferred Revenue", "LIABILITY", "Deferred Revenue"),
    ChartAccount("25001", "Term Loan", "LIABILITY", "Loans"),
    ChartAccount("30001", "Common Stock", "EQUITY", "Common Stock"),
    ChartAccount("32001", "Retained Earnings", "EQUITY", "Retained Earnings"),
    ChartAccount("40001", "Subscription Revenue", "INCOME", "Revenue"),
    ChartAccount("40002", "Professional Services Revenue", "INCOME", "Revenue"),
    ChartAccount("49001", "Interest Income", "INCOME", "Other Income"),
    ChartAccount("50001", "Hosting Costs", "EXPENSE", "Cost of Revenue"),
    ChartAccount("50002", "Customer Support Salaries", "EXPENSE", "Cost of Revenue"),
    ChartAccount("60001", "Sales Salaries", "EXPENSE", "Sales & Marketing"),
    ChartAccount("60002", "Advertising", "EXPENSE", "Sales & Marketing"),
    ChartAccount("61001", "Engineering Salaries", "EXPENSE", "Research & Development"),
    ChartAccount("61002", "Software Subscriptions", "EXPENSE", "Research & Development"),
    ChartAccount("62001", "Rent", "EXPENSE", "General & Administrative"),
    ChartAccount("62002", "Professional Fees", "EXPENSE", "General & Administrative"),
    ChartAccount("62003", "Travel & Meals", "EXPENSE", "General & Administrative"),
    ChartAccount("62004", "Bank Fees", "EXPENSE", "General & Administrative"),
    ChartAccount("63001", "Depreciation Expense", "EXPENSE", "Depreciation"),
    ChartAccount("69001", "Interest Expense", "EXPENSE", "Other Expense"),
)

CHART_BY_CODE: dict[str, ChartAccount] = {a.code: a for a in CHART}

# Subtypes whose balance is cash, for the cash-flow statement.
CASH_SUBTYPES = frozenset({"Cash", "Bank"})
# Balance-sheet subtypes whose movements are investing or financing cash flows; every other
# non-cash balance-sheet account is working capital (operating).
INVESTING_SUBTYPES = frozenset({"Fixed Assets"})
FINANCING_SUBTYPES = frozenset({"Loans", "Common Stock"})
# Non-cash charges such as depreciation need no special add-back: their balance-sheet side
# (Accumulated Depreciation) is a non-cash operating account, so its movement adds them back.
OPERATING_EXPENSE_SUBTYPES = (
    "Sales & Marketing",
    "Research & Development",
    "General & Administrative",
)
