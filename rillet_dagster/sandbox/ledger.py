"""The simulated general ledger: every journal-entry line as compact integer arrays.

Reports are computed from here, and here is fed from the journal entries themselves (generated,
written through the API, or rendered on demand from the bulk arrays), so the two can never
disagree. Amounts are integer minor units of the line's currency (``local``) and of the
organization's reporting currency (``reporting``); nothing is ever a float.

Each journal entry is also converted to the reporting currency at its month's rate, line by
line, with the rounding difference put on its largest line so that every entry still balances
in the reporting currency (what a consolidation does with its rounding account).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import numpy as np

from rillet_dagster.rillet.money import Money, minor_units
from rillet_dagster.sandbox.reports import AccountInfo, SubsidiaryInfo

DEBIT, CREDIT = 0, 1

# Month-start rates to USD; the simulator moves them a little month by month so that
# consolidated figures depend on the posting date, as they do in Rillet.
_BASE_RATES_TO_USD: dict[str, Decimal] = {
    "USD": Decimal(1),
    "JPY": Decimal("0.006700"),
    "GBP": Decimal("1.270000"),
    "EUR": Decimal("1.080000"),
    "BHD": Decimal("2.652000"),
}


def exchange_rate(currency: str, reporting: str, on: date) -> Decimal:
    """Deterministic rate from ``currency`` to ``reporting`` for ``on``'s month (6 decimals)."""
    if currency == reporting:
        return Decimal(1)
    drift = Decimal((on.year * 12 + on.month) % 7 - 3) / Decimal(400)  # within +-0.75 %
    to_usd = _BASE_RATES_TO_USD.get(currency, Decimal(1)) * (1 + drift)
    from_usd = _BASE_RATES_TO_USD.get(reporting, Decimal(1))
    return (to_usd / from_usd).quantize(Decimal("0.000001"), ROUND_HALF_EVEN)


def to_reporting(minor: int, currency: str, reporting: str, rate: Decimal) -> int:
    """``minor`` units of ``currency`` converted at ``rate``, rounded to ``reporting`` units."""
    scale = Decimal(10) ** (minor_units(reporting) - minor_units(currency))
    return int((Decimal(minor) * rate * scale).to_integral_value(ROUND_HALF_EVEN))


@dataclass(frozen=True)
class Line:
    account: int
    side: int  # DEBIT | CREDIT
    local: int
    reporting: int


def balanced_reporting(
    lines: Sequence[tuple[int, int, int]], currency: str, reporting: str, rate: Decimal
) -> list[Line]:
    """Convert (account, side, local minor) lines, plugging rounding onto the largest line."""
    converted = [Line(a, s, m, to_reporting(m, currency, reporting, rate)) for a, s, m in lines]
    debit = sum(line.reporting for line in converted if line.side == DEBIT)
    credit = sum(line.reporting for line in converted if line.side == CREDIT)
    if debit != credit and converted:
        short_side = DEBIT if debit < credit else CREDIT
        candidates = [i for i, line in enumerate(converted) if line.side == short_side]
        if candidates:
            i = max(candidates, key=lambda k: converted[k].reporting)
            line = converted[i]
            converted[i] = Line(
                line.account, line.side, line.local, line.reporting + abs(debit - credit)
            )
    return converted


class Ledger:
    """Journal-entry lines by entry, aggregated on demand; implements the reports' LedgerView."""

    def __init__(
        self,
        accounts: Sequence[AccountInfo],
        subsidiaries: Sequence[SubsidiaryInfo],
        reporting_currency: str,
    ) -> None:
        self.accounts = list(accounts)
        self.subsidiaries = list(subsidiaries)
        self.reporting_currency = reporting_currency
        self.account_index = {a.id: i for i, a in enumerate(self.accounts)}
        self.account_by_code = {a.code: i for i, a in enumerate(self.accounts)}
        self.subsidiary_index = {s.id: i for i, s in enumerate(self.subsidiaries)}
        self._lock = threading.RLock()
        # Bulk entries: numpy columns, one row per line, plus a per-entry liveness mask.
        self._bulk: dict[str, np.ndarray] | None = None
        self._bulk_alive: np.ndarray = np.zeros(0, dtype=bool)
        # Entries posted one by one: entry id -> (date ordinal, subsidiary, lines).
        self._entries: dict[str, tuple[int, int, list[Line]]] = {}
        self._arrays: dict[str, np.ndarray] | None = None

    # ---- feeding ---------------------------------------------------------------------------

    def load_bulk(
        self,
        *,
        entry: np.ndarray,
        date_ordinal: np.ndarray,
        subsidiary: np.ndarray,
        account: np.ndarray,
        side: np.ndarray,
        local: np.ndarray,
        reporting: np.ndarray,
        entries: int,
    ) -> None:
        """Lines of the bulk journal entries, one array element per line."""
        with self._lock:
            self._bulk = {
                "entry": entry,
                "date": date_ordinal,
                "subsidiary": subsidiary,
                "account": account,
                "side": side,
                "local": local,
                "reporting": reporting,
            }
            self._bulk_alive = np.ones(entries, dtype=bool)

    def retire_bulk(self, row: int) -> None:
        """A bulk entry was rewritten or deleted: its generated lines no longer count."""
        with self._lock:
            self._bulk_alive[row] = False

    def lines_of(self, record: Mapping[str, Any]) -> tuple[int, int, list[Line]]:
        """The ledger lines of a journal entry record (validated before it gets here)."""
        currency = record["currency"]
        posted = date.fromisoformat(record["date"])
        raw = []
        for item in record["items"]:
            account = self.account_index[item["account_id"]]
            side = DEBIT if item["side"] == "DEBIT" else CREDIT
            raw.append((account, side, Money.parse(item["amount"]).to_minor()))
        rate = exchange_rate(currency, self.reporting_currency, posted)
        lines = balanced_reporting(raw, currency, self.reporting_currency, rate)
        subsidiary = self.subsidiary_index.get(record.get("subsidiary_id") or "", -1)
        return posted.toordinal(), subsidiary, lines

    def post(self, record: Mapping[str, Any]) -> None:
        """Add or replace the lines of one journal entry."""
        posted = self.lines_of(record)
        with self._lock:
            self._entries[record["id"]] = posted
            self._arrays = None

    def unpost(self, entry_id: str) -> None:
        with self._lock:
            if self._entries.pop(entry_id, None) is not None:
                self._arrays = None

    def posted_lines(self, entry_id: str) -> list[Line] | None:
        with self._lock:
            found = self._entries.get(entry_id)
            return None if found is None else found[2]

    # ---- reading (LedgerView) ----------------------------------------------------------------

    def _posted_arrays(self) -> dict[str, np.ndarray]:
        with self._lock:
            if self._arrays is None:
                rows = [
                    (d, s, line.account, line.side, line.local, line.reporting)
                    for d, s, lines in self._entries.values()
                    for line in lines
                ]
                table = np.array(rows, dtype=np.int64).reshape(-1, 6)
                self._arrays = {
                    "date": table[:, 0],
                    "subsidiary": table[:, 1],
                    "account": table[:, 2],
                    "side": table[:, 3],
                    "local": table[:, 4],
                    "reporting": table[:, 5],
                }
            return self._arrays

    def sums(
        self, *, subsidiary: int | None, start: date | None, end: date, reporting: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        if subsidiary is None and not reporting:
            raise ValueError("an all-subsidiary sum is only meaningful in the reporting currency")
        debit = np.zeros(len(self.accounts), dtype=np.int64)
        credit = np.zeros(len(self.accounts), dtype=np.int64)
        with self._lock:
            parts = [(self._posted_arrays(), None)]
            if self._bulk is not None:
                parts.append((self._bulk, self._bulk_alive))
            for columns, alive in parts:
                if len(columns["date"]) == 0:
                    continue
                mask = columns["date"] <= end.toordinal()
                if start is not None:
                    mask &= columns["date"] >= start.toordinal()
                if subsidiary is not None:
                    mask &= columns["subsidiary"] == subsidiary
                if alive is not None:
                    mask &= alive[columns["entry"]]
                amounts = columns["reporting" if reporting else "local"]
                for side, target in ((DEBIT, debit), (CREDIT, credit)):
                    chosen = mask & (columns["side"] == side)
                    np.add.at(target, columns["account"][chosen], amounts[chosen])
        return debit, credit
