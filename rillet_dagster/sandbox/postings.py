"""How documents post to the general ledger, shared by the data generator and API writes.

Every document that moves money (invoice, payment, credit memo, bill, bill payment, charge,
reimbursement, vendor credit) owns exactly one journal entry whose lines come from here, so the
ledger, the reports and the documents always agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rillet_dagster.rillet.money import Money, money_json

AR = "12001"
AP = "20001"
TAX_PAYABLE = "22001"
CREDIT_CARD = "21501"
REIMBURSEMENTS_PAYABLE = "21601"


@dataclass(frozen=True)
class PostingLine:
    account_code: str
    side: str  # DEBIT | CREDIT
    minor: int
    description: str


def minor(money: Mapping[str, Any]) -> int:
    return Money.parse(money).to_minor()


def _net(lines: list[PostingLine]) -> list[PostingLine]:
    """Drop zero lines; a negative amount flips to the other side (Rillet amounts are unsigned)."""
    result = []
    for line in lines:
        if line.minor == 0:
            continue
        if line.minor < 0:
            other = "CREDIT" if line.side == "DEBIT" else "DEBIT"
            line = PostingLine(line.account_code, other, -line.minor, line.description)
        result.append(line)
    return result


def invoice_lines(invoice: Mapping[str, Any]) -> list[PostingLine]:
    """Dr receivables for the total; Cr revenue per item (net of discount); Cr sales tax."""
    lines = [
        PostingLine(AR, "DEBIT", minor(invoice["total"]), f"Invoice {invoice['invoice_number']}")
    ]
    for item in invoice["items"]:
        net = minor(item["total_amount"]) - minor(item["total_discount"])
        lines.append(
            PostingLine(item["revenue"]["account_code"], "CREDIT", net, item["description"])
        )
    lines.append(PostingLine(TAX_PAYABLE, "CREDIT", minor(invoice["taxed_amount"]), "Sales tax"))
    return _net(lines)


def invoice_payment_lines(payment: Mapping[str, Any], invoice_number: str) -> list[PostingLine]:
    amount = minor(payment["amount"])
    text = f"Payment for invoice {invoice_number}"
    return _net(
        [
            PostingLine(payment["account_code"], "DEBIT", amount, text),
            PostingLine(AR, "CREDIT", amount, text),
        ]
    )


def credit_memo_lines(memo: Mapping[str, Any]) -> list[PostingLine]:
    lines = []
    for item in memo["items"]:
        lines.append(
            PostingLine(
                item["revenue"]["account_code"],
                "DEBIT",
                minor(item["net_amount"]),
                item["description"],
            )
        )
    lines.append(
        PostingLine(TAX_PAYABLE, "DEBIT", minor(memo["taxed_amount"]), "Sales tax reversed")
    )
    lines.append(
        PostingLine(AR, "CREDIT", minor(memo["total"]), f"Credit memo {memo['credit_memo_number']}")
    )
    return _net(lines)


def expense_lines(
    items: Sequence[Mapping[str, Any]], credit_account: str, description: str
) -> list[PostingLine]:
    """Bills, charges and reimbursements: Dr each item's expense; Cr the payable or card."""
    lines = [
        PostingLine(
            i["account_code"], "DEBIT", minor(i["amount"]), i.get("description") or description
        )
        for i in items
    ]
    total = sum(line.minor for line in lines)
    return _net([*lines, PostingLine(credit_account, "CREDIT", total, description)])


def vendor_credit_lines(credit: Mapping[str, Any]) -> list[PostingLine]:
    lines = [
        PostingLine(i["account_code"], "CREDIT", minor(i["amount"]), i.get("description") or "")
        for i in credit["line_items"]
    ]
    total = sum(line.minor for line in lines)
    text = f"Vendor credit {credit['credit_number']}"
    return _net([PostingLine(AP, "DEBIT", total, text), *lines])


def payment_out_lines(amount_minor: int, cash_account: str, description: str) -> list[PostingLine]:
    return _net(
        [
            PostingLine(AP, "DEBIT", amount_minor, description),
            PostingLine(cash_account, "CREDIT", amount_minor, description),
        ]
    )


def journal_entry(
    *,
    entry_id: str,
    name: str,
    subsidiary_id: str,
    currency: str,
    posted: str,
    lines: Sequence[PostingLine],
    accounts_by_code: Mapping[str, Mapping[str, Any]],
    new_id: Callable[[], str],
    updated_at: str,
    related_entity: Mapping[str, str] | None = None,
    fields: Sequence[Mapping[str, str]] = (),
) -> dict[str, Any]:
    """A journal-entry record in Rillet's v4 read shape."""
    return {
        "id": entry_id,
        "subsidiary_id": subsidiary_id,
        "name": name,
        "currency": currency,
        "date": posted,
        "reversal_date": None,
        "related_entity": dict(related_entity) if related_entity else None,
        "attachmentUrl": None,
        "exchange_rate": None,
        "items": [
            {
                "id": new_id(),
                "account_id": accounts_by_code[line.account_code]["id"],
                "account_code": line.account_code,
                "side": line.side,
                "amount": money_json(line.minor, currency),
                "original_transaction_amount": money_json(line.minor, currency),
                "description": line.description,
                "fields": [dict(f) for f in fields],
            }
            for line in lines
        ],
        "updated_at": updated_at,
    }
