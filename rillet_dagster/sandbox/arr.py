"""The ARR waterfall report: recurring revenue per customer for a month, from the contracts."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

from rillet_dagster.rillet.money import Money, money_json
from rillet_dagster.sandbox.cursors import CursorCodec, CursorState
from rillet_dagster.sandbox.data import World
from rillet_dagster.sandbox.ledger import exchange_rate, to_reporting
from rillet_dagster.sandbox.reports import ReportParamError

_MONTH = re.compile(r"^(\d{4})-(\d{2})$")


def arr_waterfall(
    world: World, params: Mapping[str, str], cursors: CursorCodec, now: float
) -> dict[str, Any]:
    """``GET /reports/arr-waterfall``: customers by recurring revenue, paginated.

    ACTIVE counts contracts in effect during the month; COMMITTED also counts contracts signed
    (closed) by the month's end that start later. ARR is twelve times MRR; amounts are in the
    organization's reporting currency at the month's rate.
    """
    for name in ("month", "status", "breakdown"):
        if not params.get(name):
            raise ReportParamError(name, f"{name} is required")
    match = _MONTH.match(params["month"])
    if not match or not 1 <= int(match.group(2)) <= 12:
        raise ReportParamError("month", "must be a month like 2026-01")
    month = date(int(match.group(1)), int(match.group(2)), 1)
    status, breakdown = params["status"], params["breakdown"]
    if status not in {"ACTIVE", "COMMITTED"}:
        raise ReportParamError("status", "must be ACTIVE or COMMITTED")
    if breakdown not in {"ARR", "MRR"}:
        raise ReportParamError("breakdown", "must be ARR or MRR")
    limit_text = params.get("limit", "25")
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= 100:
        raise ReportParamError("limit", "must be an integer from 1 to 100")
    subsidiary = params.get("subsidiary_id")
    month_end = (month + timedelta(days=32)).replace(day=1) - timedelta(days=1)
    reporting = world.reporting_currency
    totals: dict[str, int] = defaultdict(int)
    for contract in world.store["contract"].all_records():
        if subsidiary and contract["subsidiary_id"] != subsidiary:
            continue
        start = date.fromisoformat(contract["start_date"])
        end = date.fromisoformat(contract["end_date"]) if contract.get("end_date") else date.max
        in_effect = start <= month_end and end >= month
        committed = date.fromisoformat(contract["close_date"]) <= month_end and start > month_end
        if not (in_effect or (status == "COMMITTED" and committed)):
            continue
        for item in contract["items"]:
            mrr = Money.parse(item["price"]).amount * Decimal(item["quantity"])
            discount = item.get("discount") or {}
            if discount.get("type") == "PERCENTAGE":
                mrr = mrr * (100 - Decimal(str(discount["percentage_off"]))) / 100
            currency = item["price"]["currency"]
            local = Money(mrr, currency).rounded().to_minor()
            rate = exchange_rate(currency, reporting, month)
            totals[contract["customer_id"]] += to_reporting(local, currency, reporting, rate)
    factor = 12 if breakdown == "ARR" else 1
    names = {c["id"]: c["name"] for c in world.store["customer"].all_records()}
    ranked = sorted(totals.items(), key=lambda item: (-item[1], item[0]))
    query = ["arr", params["month"], status, breakdown, subsidiary]
    offset = 0
    if params.get("cursor"):
        state = cursors.decode(params["cursor"], entity="arr_waterfall", now=now)
        if state is not None and state.query == query:
            offset = state.position
    page = ranked[offset : offset + int(limit_text)]
    pagination: dict[str, str] = {}
    if offset + len(page) < len(ranked):
        state = CursorState("arr_waterfall", offset + len(page), query, now, cursors.epoch)
        pagination["next_cursor"] = cursors.encode(state)
    return {
        "customers": [
            {
                "id": customer_id,
                "name": names.get(customer_id, ""),
                "total": {
                    "year_month": params["month"],
                    "amount": money_json(amount * factor, reporting),
                },
            }
            for customer_id, amount in page
        ],
        "pagination": pagination,
    }
