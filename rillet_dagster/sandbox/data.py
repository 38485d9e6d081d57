"""A seeded, deterministic generator of a realistic SaaS company's books.

The same seed, size and anchor time always give the same organization: subsidiaries in USD, GBP
and JPY (a currency without decimals), a chart of accounts, customers on subscription contracts
billed monthly, payments, credit memos, vendors and their bills and payments, card charges,
reimbursements, bank feeds, payroll and other manual journal entries, over about 18 months up
to the anchor. Every money-moving document posts one balanced journal entry.

The size knob mostly scales a bulk of routine journal entries (accruals, processor fees,
amortization) that are kept as numpy arrays and rendered on demand, so a million entries start
in seconds and cost megabytes, not gigabytes.
"""

from __future__ import annotations

import random
import re
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import numpy as np

from rillet_dagster.catalog import ENTITIES
from rillet_dagster.clock import isoformat_z
from rillet_dagster.rillet.money import minor_units, money_json
from rillet_dagster.sandbox import postings
from rillet_dagster.sandbox.chart import CHART
from rillet_dagster.sandbox.ledger import CREDIT, DEBIT, Ledger, exchange_rate
from rillet_dagster.sandbox.reports import AccountInfo, SubsidiaryInfo
from rillet_dagster.sandbox.store import Store, dumps, to_us


@dataclass(frozen=True)
class Size:
    """How big the simulated company is."""

    customers: int
    vendors: int
    bulk_journal_entries: int
    months: int = 18


SIZES: dict[str, Size] = {
    "tiny": Size(customers=8, vendors=6, bulk_journal_entries=60),
    "small": Size(customers=40, vendors=15, bulk_journal_entries=2_000),
    "medium": Size(customers=600, vendors=120, bulk_journal_entries=40_000),
    "large": Size(customers=600, vendors=120, bulk_journal_entries=1_000_000),
}

_SIZE_FIELD = re.compile(r"^(customers|vendors|journal_entries|months)=(\d+)$")


def parse_size(text: str) -> Size:
    """A preset (tiny, small, medium, large) or ``customers=N,vendors=N,journal_entries=N``."""
    if text in SIZES:
        return SIZES[text]
    values = {"customers": 40, "vendors": 15, "journal_entries": 2_000, "months": 18}
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = _SIZE_FIELD.match(part)
        if not match:
            raise ValueError(
                f"size {text!r} is not one of {', '.join(SIZES)} nor a list like "
                "customers=100,vendors=20,journal_entries=50000,months=18"
            )
        values[match.group(1)] = int(match.group(2))
    if values["customers"] < 1 or values["vendors"] < 1 or not 2 <= values["months"] <= 120:
        raise ValueError("size needs at least 1 customer and 1 vendor, and 2-120 months")
    return Size(values["customers"], values["vendors"], values["journal_entries"], values["months"])


@dataclass(frozen=True)
class SubsidiarySeed:
    trade_name: str
    currency: str
    timezone: str
    country: str
    prefix: str
    tax_code: str
    tax_percentage: str
    funding: int  # opening capital in major units
    customer_share: float


_SUBSIDIARIES = (
    SubsidiarySeed(
        "Northwind Cloud, Inc.",
        "USD",
        "America/New_York",
        "US",
        "US",
        "US-CA",
        "7.25",
        5_000_000,
        0.6,
    ),
    SubsidiarySeed(
        "Northwind Cloud Ltd.", "GBP", "Europe/London", "GB", "UK", "GB-VAT", "20", 800_000, 0.25
    ),
    SubsidiarySeed(
        "Northwind Cloud K.K.", "JPY", "Asia/Tokyo", "JP", "JP", "JP-CT", "10", 150_000_000, 0.15
    ),
)

# Prices in USD major units; other currencies convert at a round list-price factor.
_PRICE_FACTOR = {"USD": Decimal(1), "GBP": Decimal("0.8"), "JPY": Decimal(150)}

_PRODUCTS = (
    ("Platform Subscription", "FIXED_RECURRING", Decimal("1500.00"), "40001"),
    ("Additional Seats", "FIXED_RECURRING", Decimal("45.00"), "40001"),
    ("Analytics Add-on", "FIXED_RECURRING", Decimal("399.00"), "40001"),
    ("API Usage", "USAGE", Decimal("0.0025"), "40001"),
    ("Onboarding Package", "ONE_TIME", Decimal("4800.00"), "40002"),
    ("Premium Support", "FIXED_RECURRING", Decimal("250.00"), "40001"),
)

_NAME_A = (
    "Acme",
    "Globex",
    "Initech",
    "Umbrella",
    "Hooli",
    "Vandelay",
    "Soylent",
    "Tyrell",
    "Wonka",
    "Aperture",
    "Monarch",
    "Nakatomi",
    "Virtucon",
    "Sterling",
    "Bluth",
    "Dunder",
    "Prestige",
    "Gekko",
    "Massive",
    "Pied Piper",
    "Zürich Café",
    "O'Brien & Sons",
    "Sakura",
    "Kappa",
    "Fujiyama",
    "Thames",
    "Highland",
    "Redwood",
    "Cobalt",
    "Helix",
)
_NAME_B = (
    "Labs",
    "Systems",
    "Analytics",
    "Logistics",
    "Health",
    "Foods",
    "Capital",
    "Robotics",
    "Media",
    "Energy",
    "Software",
    "Retail",
    "Biotech",
    "Partners",
    "Studios",
)
_SUFFIX = {"US": "Inc.", "GB": "Ltd.", "JP": "K.K."}
_CITIES = {
    "US": [
        ("San Francisco", "CA", "94105"),
        ("New York", "NY", "10001"),
        ("Austin", "TX", "78701"),
    ],
    "GB": [("London", "LDN", "EC1A 1BB"), ("Manchester", "MAN", "M1 1AE")],
    "JP": [("Tokyo", "13", "100-0001"), ("Osaka", "27", "530-0001")],
}
_VENDORS = (
    ("Amazon Web Services", "50001", Decimal("9000")),
    ("WeWork", "62001", Decimal("12000")),
    ("Atlassian", "61002", Decimal("1400")),
    ("Deloitte", "62002", Decimal("6500")),
    ("LinkedIn Ads", "60002", Decimal("4000")),
    ("Datadog", "50001", Decimal("2100")),
    ("Delta Air Lines", "62003", Decimal("1800")),
    ("Google Cloud", "50001", Decimal("3500")),
    ("Slack", "61002", Decimal("800")),
    ("Baker McKenzie", "62002", Decimal("5200")),
)

# Routine entries that make up the bulk: (name, debit account, credit account, USD range).
_BULK_TEMPLATES = (
    ("Hosting usage accrual", "50001", "21001", 40, 900),
    ("Payment processor fees", "62004", "11001", 5, 300),
    ("Prepaid software amortization", "61002", "13001", 20, 600),
    ("Advertising accrual", "60002", "21001", 50, 1500),
)


def _round(amount: Decimal, currency: str) -> Decimal:
    return amount.quantize(Decimal(1).scaleb(-minor_units(currency)), ROUND_HALF_EVEN)


def _to_minor(amount: Decimal, currency: str) -> int:
    return int(_round(amount, currency).scaleb(minor_units(currency)))


def _month_starts(first: date, last: date) -> list[date]:
    months, current = [], first.replace(day=1)
    while current <= last:
        months.append(current)
        current = (current + timedelta(days=32)).replace(day=1)
    return months


def _deterministic_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ID_BITS = 48
_ID_MASK = 2**_ID_BITS - 1


def from_us(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


def _timestamp_text(micros: int) -> str:
    """``isoformat_z(from_us(micros))`` without datetime formatting (a hot path for lists)."""
    days, rest = divmod(micros, 86_400_000_000)
    seconds, fraction = divmod(rest, 1_000_000)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    day = date.fromordinal(_EPOCH_ORDINAL + days).isoformat()
    return f"{day}T{hours:02d}:{minutes:02d}:{seconds:02d}.{fraction // 1000:03d}Z"


_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


class BulkJournalEntries:
    """Routine two-line journal entries kept as arrays and rendered on demand (a BulkSource).

    An id is a fixed 80-bit prefix derived from the seed followed by the row number masked, so
    it maps back to its row without any index; line ids use the complementary prefix.
    """

    def __init__(
        self,
        *,
        seed: int,
        count: int,
        start: date,
        end: date,
        subsidiaries: list[dict[str, Any]],
        accounts_by_code: dict[str, dict[str, Any]],
        now_us: int,
    ) -> None:
        prefix_rng = random.Random(f"bulk-journal-entries:{seed}")
        self._prefix = prefix_rng.getrandbits(80)
        self._line_prefix = prefix_rng.getrandbits(80)
        self._mask = prefix_rng.getrandbits(_ID_BITS)
        self._id_text = str(uuid.UUID(int=self._prefix << _ID_BITS, version=4))[:24]
        self._line_text = str(uuid.UUID(int=self._line_prefix << _ID_BITS, version=4))[:24]
        self.count = count
        self.subsidiaries = subsidiaries
        self.accounts_by_code = accounts_by_code
        self._json_templates: dict[tuple[int, int], str] = {}
        rng = np.random.default_rng(seed)
        span = (end - start).days + 1
        self.dates = np.sort(rng.integers(0, span, count)) + start.toordinal()
        self.subsidiary_idx = rng.integers(0, len(subsidiaries), count).astype(np.int64)
        self.template = rng.integers(0, len(_BULK_TEMPLATES), count).astype(np.int64)
        low = np.array([t[3] for t in _BULK_TEMPLATES], dtype=np.int64)[self.template]
        high = np.array([t[4] for t in _BULK_TEMPLATES], dtype=np.int64)[self.template]
        usd_cents = rng.integers(low * 100, high * 100 + 1)
        # Local minor units = USD cents x list-price factor, in exact integer steps.
        factor_hundredths = np.array(
            [int(_PRICE_FACTOR[s["currency"]] * 100) for s in subsidiaries], dtype=np.int64
        )
        scale = np.array([10 ** minor_units(s["currency"]) for s in subsidiaries], dtype=np.int64)
        local = usd_cents * factor_hundredths[self.subsidiary_idx] * scale[self.subsidiary_idx]
        self.local_minor = np.maximum(local // 1_000_000, 1)
        seconds = rng.integers(8 * 3600, 20 * 3600, count)
        day_us = (self.dates - _EPOCH.date().toordinal()) * 86_400_000_000
        updated = np.minimum(day_us + seconds * 1_000_000, now_us - 1_000)
        self.updated = updated // 1000 * 1000  # Rillet timestamps carry milliseconds

    def __len__(self) -> int:
        return self.count

    def record_id(self, index: int) -> str:
        # The prefix (version and variant bits included) is fixed: only the last 12 hex
        # digits vary, so format them onto the prefix's text instead of building a UUID.
        return f"{self._id_text}{index ^ self._mask:012x}"

    def _line_id(self, number: int) -> str:
        return f"{self._line_text}{number:012x}"

    def index_of(self, record_id: str) -> int | None:
        try:
            value = uuid.UUID(record_id).int
        except ValueError:
            return None
        row = (value & _ID_MASK) ^ self._mask
        if row >= self.count or self.record_id(row) != record_id.lower():
            return None
        return row

    def updated_us(self, index: int) -> int:
        return int(self.updated[index])

    def subsidiary(self, index: int) -> int:
        return int(self.subsidiary_idx[index])

    def date_ordinal(self, index: int) -> int:
        return int(self.dates[index])

    def lines(self) -> tuple[np.ndarray, ...]:
        """(entry, date, subsidiary, account, side, local minor) per line, two lines per entry."""
        codes = list(self.accounts_by_code)
        debit = np.array([codes.index(t[1]) for t in _BULK_TEMPLATES], dtype=np.int64)
        credit = np.array([codes.index(t[2]) for t in _BULK_TEMPLATES], dtype=np.int64)
        entry = np.repeat(np.arange(self.count, dtype=np.int64), 2)
        account = np.empty(self.count * 2, dtype=np.int64)
        account[0::2] = debit[self.template]
        account[1::2] = credit[self.template]
        side = np.tile(np.array([DEBIT, CREDIT], dtype=np.int64), self.count)
        return (
            entry,
            np.repeat(self.dates, 2),
            np.repeat(self.subsidiary_idx, 2),
            account,
            side,
            np.repeat(self.local_minor, 2),
        )

    def render_json(self, index: int) -> bytes:
        """``dumps(render(index))``, filled into a pre-serialized template (5x faster)."""
        key = (int(self.template[index]), int(self.subsidiary_idx[index]))
        template = self._json_templates.get(key)
        if template is None:
            template = self._json_template(*key)
            self._json_templates[key] = template
        currency = self.subsidiaries[key[1]]["currency"]
        return template.format(
            id=self.record_id(index),
            date=date.fromordinal(int(self.dates[index])).isoformat(),
            line1=self._line_id(2 * index),
            line2=self._line_id(2 * index + 1),
            amount=money_json(int(self.local_minor[index]), currency)["amount"],
            updated=_timestamp_text(int(self.updated[index])),
        ).encode()

    def _json_template(self, template: int, subsidiary: int) -> str:
        name, debit, credit, _, _ = _BULK_TEMPLATES[template]
        sub = self.subsidiaries[subsidiary]
        line_ids = iter(("@LINE1@", "@LINE2@"))
        sample = postings.journal_entry(
            entry_id="@ID@",
            name=name,
            subsidiary_id=sub["id"],
            currency=sub["currency"],
            posted="@DATE@",
            lines=[
                postings.PostingLine(debit, "DEBIT", 1, name),
                postings.PostingLine(credit, "CREDIT", 1, name),
            ],
            accounts_by_code=self.accounts_by_code,
            new_id=lambda: next(line_ids),
            updated_at="@UPDATED@",
        )
        for item in sample["items"]:
            item["amount"]["amount"] = "@AMOUNT@"
            item["original_transaction_amount"]["amount"] = "@AMOUNT@"
        text = dumps(sample).decode().replace("{", "{{").replace("}", "}}")
        for sentinel, field_name in (
            ("@ID@", "id"),
            ("@DATE@", "date"),
            ("@LINE1@", "line1"),
            ("@LINE2@", "line2"),
            ("@AMOUNT@", "amount"),
            ("@UPDATED@", "updated"),
        ):
            text = text.replace(sentinel, "{" + field_name + "}")
        return text

    def render(self, index: int) -> dict[str, Any]:
        name, debit, credit, _, _ = _BULK_TEMPLATES[int(self.template[index])]
        subsidiary = self.subsidiaries[int(self.subsidiary_idx[index])]
        amount = int(self.local_minor[index])
        line_numbers = iter((2 * index, 2 * index + 1))
        return postings.journal_entry(
            entry_id=self.record_id(index),
            name=name,
            subsidiary_id=subsidiary["id"],
            currency=subsidiary["currency"],
            posted=date.fromordinal(int(self.dates[index])).isoformat(),
            lines=[
                postings.PostingLine(debit, "DEBIT", amount, name),
                postings.PostingLine(credit, "CREDIT", amount, name),
            ],
            accounts_by_code=self.accounts_by_code,
            new_id=lambda: self._line_id(next(line_numbers)),
            updated_at=isoformat_z(from_us(int(self.updated[index]))),
        )


def bulk_reporting_minor(
    local: np.ndarray,
    dates: np.ndarray,
    subsidiary: np.ndarray,
    subsidiaries: list[dict[str, Any]],
    reporting: str,
) -> np.ndarray:
    """Vectorized :func:`ledger.to_reporting`: same rates, same half-even rounding, in integers."""
    result = np.zeros_like(local)
    if not len(local):
        return result
    unique_dates, inverse = np.unique(dates, return_inverse=True)
    month_of_unique = np.array(
        [date.fromordinal(int(d)).replace(day=1).toordinal() for d in unique_dates]
    )
    month = month_of_unique[inverse]
    for s_idx, sub in enumerate(subsidiaries):
        currency = sub["currency"]
        for month_ordinal in np.unique(month[subsidiary == s_idx]):
            chosen = (subsidiary == s_idx) & (month == month_ordinal)
            rate = exchange_rate(currency, reporting, date.fromordinal(int(month_ordinal)))
            micro = int(rate * 1_000_000)
            numerator = local[chosen] * micro * 10 ** minor_units(reporting)
            denominator = 1_000_000 * 10 ** minor_units(currency)
            quotient, remainder = np.divmod(numerator, denominator)
            round_up = (2 * remainder > denominator) | (
                (2 * remainder == denominator) & (quotient % 2 == 1)
            )
            result[chosen] = quotient + round_up
    return result


@dataclass
class World:
    """One simulated organization: its records, its ledger and the links between them."""

    store: Store
    ledger: Ledger
    anchor: date
    reporting_currency: str
    accounts_by_code: dict[str, dict[str, Any]]
    subsidiaries: list[dict[str, Any]]
    rng: random.Random
    posting_of: dict[str, str] = field(default_factory=dict)  # document id -> journal entry id
    payments_of: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    bulk: BulkJournalEntries | None = None

    def new_id(self) -> str:
        return _deterministic_uuid(self.rng)


class Generator:
    """Builds a :class:`World` from a seed, a size and the time it is generated at."""

    def __init__(self, *, seed: int, size: Size, now: datetime) -> None:
        self.seed = seed
        self.size = size
        self.now = now
        self.rng = random.Random(seed)
        self.anchor = now.date()
        first = (self.anchor - timedelta(days=31 * (size.months - 1))).replace(day=1)
        self.months = _month_starts(first, self.anchor)
        self.start = self.months[0]
        # entity -> (record, created µs, generation counter, updated µs)
        self.records: dict[str, list[tuple[dict[str, Any], int, int, int]]] = defaultdict(list)
        self._counter = 0
        self.posting_of: dict[str, str] = {}
        self.payments_of: dict[str, list[str]] = defaultdict(list)

    # ---- helpers -------------------------------------------------------------------------

    def uuid(self) -> str:
        return _deterministic_uuid(self.rng)

    def moment(self, on: date, *, late: bool = False) -> datetime:
        """A business-hours instant on ``on``, never after now."""
        seconds = self.rng.randint(8 * 3600, 19 * 3600) + (86_400 * 2 if late else 0)
        millis = self.rng.randint(0, 999)
        value = datetime.combine(on, time(), UTC) + timedelta(seconds=seconds, milliseconds=millis)
        return min(value, self.now - timedelta(seconds=self.rng.randint(1, 3600)))

    def add(
        self, entity: str, record: dict[str, Any], created: datetime, updated: datetime
    ) -> None:
        """Queue a record; collections load in creation order, then by generation order."""
        self._counter += 1
        if "updated_at" in record:
            record["updated_at"] = isoformat_z(updated)
        updated_ms = to_us(updated) // 1000 * 1000  # the precision updated_at carries
        self.records[entity].append((record, to_us(created), self._counter, updated_ms))

    def money(self, amount: Decimal, currency: str) -> dict[str, str]:
        return money_json(_to_minor(amount, currency), currency)

    def post(
        self,
        document_id: str | None,
        *,
        name: str,
        subsidiary: dict[str, Any],
        posted: date,
        lines: list[postings.PostingLine],
        created: datetime,
        updated: datetime,
        related: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        entry = postings.journal_entry(
            entry_id=self.uuid(),
            name=name,
            subsidiary_id=subsidiary["id"],
            currency=subsidiary["currency"],
            posted=posted.isoformat(),
            lines=lines,
            accounts_by_code=self.accounts_by_code,
            new_id=self.uuid,
            updated_at="",
            related_entity=related,
        )
        self.add("journal_entry", entry, created, updated)
        if document_id:
            self.posting_of[document_id] = entry["id"]
        return entry

    def list_price(self, usd: Decimal, currency: str) -> Decimal:
        return usd * _PRICE_FACTOR[currency]

    # ---- the company ---------------------------------------------------------------------

    def build(self) -> World:
        opened = datetime.combine(self.start, time(9), UTC)
        self.organization = {
            "id": self.uuid(),
            "trade_name": "Northwind Cloud Group",
            "currency": "USD",
            "timezone": "America/New_York",
        }
        self.accounts_by_code: dict[str, dict[str, Any]] = {}
        for chart in CHART:
            account = {
                "id": self.uuid(),
                "code": chart.code,
                "name": chart.name,
                "type": chart.type,
                "subtype": chart.subtype,
                "status": "ACTIVE",
                "intercompany": False,
                "updated_at": "",
            }
            self.accounts_by_code[chart.code] = account
            self.add("account", account, opened, opened)
        self.subsidiaries = []
        self.seeds: dict[str, SubsidiarySeed] = {}
        for seed in _SUBSIDIARIES:
            sub = {
                "id": self.uuid(),
                "currency": seed.currency,
                "timezone": seed.timezone,
                "trade_name": seed.trade_name,
                "type": "LEGAL_ENTITY",
            }
            self.subsidiaries.append(sub)
            self.seeds[sub["id"]] = seed
            self.add("subsidiary", sub, opened, opened)
        self._reference_data(opened)
        self._opening_entries()
        self._customers_and_revenue()
        self._vendors_and_spend()
        self._payroll_and_other_entries()
        return self._assemble()

    def _reference_data(self, opened: datetime) -> None:
        self.tax_rates = {}
        for sub in self.subsidiaries:
            seed = self.seeds[sub["id"]]
            rate = {
                "id": self.uuid(),
                "code": seed.tax_code,
                "country": seed.country,
                "description": f"{seed.country} standard rate",
                "percentage": seed.tax_percentage,
            }
            self.tax_rates[sub["id"]] = rate
            self.add("tax_rate", rate, opened, opened)
        self.region_field = {
            "id": self.uuid(),
            "name": "Region",
            "values": [
                {"id": self.uuid(), "name": n, "deactivated": False}
                for n in ("North America", "EMEA", "APAC")
            ],
            "settings": {"REVENUE": {"mandatory": False, "display": "STANDALONE"}},
            "updated_at": "",
        }
        department = {
            "id": self.uuid(),
            "name": "Department",
            "values": [
                {"id": self.uuid(), "name": n, "deactivated": n == "Legacy"}
                for n in ("Sales", "Engineering", "G&A", "Legacy")
            ],
            "settings": {"EXPENSES": {"mandatory": False, "display": "FREE_TAG"}},
            "updated_at": "",
        }
        self.add("field", self.region_field, opened, opened)
        self.add("field", department, opened, opened)
        self.products = []
        for name, kind, usd, account_code in _PRODUCTS:
            price: dict[str, Any] = {"type": kind}
            if kind != "USAGE":
                price["amount"] = self.money(usd, "USD")
            if kind != "ONE_TIME":
                price["interval_months"] = 1
            if kind == "USAGE":
                price["billing_scheme"] = "PER_UNIT"
            product = {
                "id": self.uuid(),
                "name": name,
                "description": f"{name} for Northwind Cloud",
                "price": price,
                "include_in_arr_mrr": kind != "ONE_TIME",
                "revenue_pattern": "DAILY" if kind == "FIXED_RECURRING" else "EVEN_PERIOD",
                "account_code": account_code,
                "status": "ACTIVE",
                "external_references": [],
                "_usd": usd,
            }
            self.products.append(product)
        for product in self.products:
            self.add("product", {k: v for k, v in product.items() if k != "_usd"}, opened, opened)
        self.bank_accounts: dict[str, dict[str, Any]] = {}
        for sub in self.subsidiaries:
            for code, label in (("11001", "Operating"), ("11002", "Payroll")):
                if code == "11002" and sub["currency"] != "USD":
                    continue
                account = {
                    "id": self.uuid(),
                    "name": f"{label} ({sub['currency']})",
                    "currency": sub["currency"],
                    "bank_name": "First Ledger Bank",
                    "subsidiary_id": sub["id"],
                    "account_code": code,
                    "mask": f"{self.rng.randint(0, 9999):04d}",
                    "transactions_start_date": self.start.isoformat(),
                    "status": "ACTIVE",
                }
                self.bank_accounts[f"{sub['id']}:{code}"] = account
                self.add("bank_account", account, opened, opened)

    def bank_transaction(
        self, sub: dict[str, Any], code: str, on: date, name: str, merchant: str, minor_amount: int
    ) -> None:
        account = self.bank_accounts.get(f"{sub['id']}:{code}")
        if account is None:
            return
        when = self.moment(on + timedelta(days=1))
        self.add(
            "bank_transaction",
            {
                "id": self.uuid(),
                "bank_account_id": account["id"],
                "subsidiary_id": sub["id"],
                "date": on.isoformat(),
                "name": name,
                "merchant": merchant,
                "net_amount": money_json(minor_amount, sub["currency"]),
                "fee": money_json(0, sub["currency"]),
                "pending": on >= self.anchor - timedelta(days=2),
                "excluded": False,
                "external_references": [],
            },
            when,
            when,
        )

    def _opening_entries(self) -> None:
        for sub in self.subsidiaries:
            seed = self.seeds[sub["id"]]
            amount = _to_minor(Decimal(seed.funding), sub["currency"])
            when = datetime.combine(self.start, time(10), UTC)
            self.post(
                None,
                name="Opening capital contribution",
                subsidiary=sub,
                posted=self.start,
                lines=[
                    postings.PostingLine("11001", "DEBIT", amount, "Capital"),
                    postings.PostingLine("30001", "CREDIT", amount, "Capital"),
                ],
                created=when,
                updated=when,
            )
            self.bank_transaction(
                sub, "11001", self.start, "Capital contribution", "Northwind Group", amount
            )
        us = self.subsidiaries[0]
        loan_day = self.months[min(3, len(self.months) - 1)]
        loan = _to_minor(Decimal(1_000_000), "USD")
        when = datetime.combine(loan_day, time(11), UTC)
        self.post(
            None,
            name="Term loan drawdown",
            subsidiary=us,
            posted=loan_day,
            lines=[
                postings.PostingLine("11001", "DEBIT", loan, "Loan proceeds"),
                postings.PostingLine("25001", "CREDIT", loan, "Loan proceeds"),
            ],
            created=when,
            updated=when,
        )

    def _customer_name(self, used: set[str], country: str) -> str:
        for _ in range(100):
            name = f"{self.rng.choice(_NAME_A)} {self.rng.choice(_NAME_B)} {_SUFFIX[country]}"
            if name not in used:
                break
        else:
            name = f"{name} {len(used)}"
        used.add(name)
        return name

    def _customers_and_revenue(self) -> None:
        used: set[str] = set()
        regions = {v["name"]: v["id"] for v in self.region_field["values"]}
        region_of = {"US": "North America", "GB": "EMEA", "JP": "APAC"}
        invoice_numbers: dict[str, int] = defaultdict(int)
        memo_number = 0
        onboarding = self.products[4]
        recurring = [p for p in self.products if p["price"]["type"] == "FIXED_RECURRING"]
        usage = self.products[3]
        for index in range(self.size.customers):
            roll, sub = self.rng.random(), self.subsidiaries[-1]
            for candidate in self.subsidiaries:
                roll -= self.seeds[candidate["id"]].customer_share
                if roll < 0:
                    sub = candidate
                    break
            seed = self.seeds[sub["id"]]
            currency = sub["currency"]
            city, state, zip_code = self.rng.choice(_CITIES[seed.country])
            joined_month = self.months[self.rng.randrange(max(1, int(len(self.months) * 0.6)))]
            joined = self.moment(joined_month + timedelta(days=self.rng.randrange(20)))
            name = self._customer_name(used, seed.country)
            address = {
                "line1": f"{self.rng.randint(1, 999)} Market Street",
                "line2": None,
                "city": city,
                "state": state,
                "zip_code": zip_code,
                "country": seed.country,
            }
            slug = re.sub(r"[^a-z0-9]+", "", name.lower())[:20] or f"customer{index}"
            customer = {
                "id": self.uuid(),
                "updated_at": "",
                "name": name,
                "name_on_invoice": name,
                "address": address,
                "shipping_address": None,
                "emails": [{"email": f"billing@{slug}.example", "type": "MAIN_SENDER"}]
                + ([{"email": f"finance@{slug}.example", "type": "CC"}] if index % 3 == 0 else []),
                "external_references": [],
                "payment_terms": 30 if index % 4 else 45,
                "send_invoices_automatically": True,
                "send_payment_reminders": index % 2 == 0,
                "fields": [
                    {
                        "field_id": self.region_field["id"],
                        "field_value_id": regions[region_of[seed.country]],
                    }
                ],
            }
            taxed = seed.country != "US" or city == "San Francisco"
            tax_rate = Decimal(seed.tax_percentage) / 100 if taxed else Decimal(0)
            contract_start = (joined.date() + timedelta(days=32)).replace(day=1)
            if contract_start > self.anchor:
                contract_start = self.months[-1]
            term = 12 if index % 3 else 24
            contract_end = (contract_start + timedelta(days=31 * term)).replace(day=1) - timedelta(
                days=1
            )
            items_spec: list[tuple[dict[str, Any], int]] = [(recurring[0], 1)]
            items_spec.append((recurring[1], self.rng.randint(5, 200)))
            if self.rng.random() < 0.4:
                items_spec.append((recurring[2], 1))
            if self.rng.random() < 0.3:
                items_spec.append((recurring[3], 1))
            uses_usage = self.rng.random() < 0.3
            discount_pct = Decimal(10) if self.rng.random() < 0.15 else Decimal(0)
            contract_items = []
            term_total = 0
            for product, quantity in items_spec:
                unit = self.list_price(product["_usd"], currency)
                line_total = _to_minor(unit * quantity * term * (1 - discount_pct / 100), currency)
                term_total += line_total
                contract_items.append(
                    {
                        "id": self.uuid(),
                        "product_id": product["id"],
                        "price": self.money(unit, currency),
                        "quantity": quantity,
                        "total_value": money_json(line_total, currency),
                        "revenue_pattern": product["revenue_pattern"],
                        "discount": {"type": "PERCENTAGE", "percentage_off": 10}
                        if discount_pct and product is recurring[0]
                        else None,
                        "tax_rate": None,
                        "start_date": contract_start.isoformat(),
                        "end_date": contract_end.isoformat(),
                        "status": "ACTIVE",
                        "amending": None,
                        "fields": [],
                        "external_references": [],
                        "usage_minimum_commitment": None,
                    }
                )
            contract = {
                "id": self.uuid(),
                "customer_id": customer["id"],
                "subsidiary_id": sub["id"],
                "name": f"{name} - {term}-month subscription",
                "items": contract_items,
                "status": "ACTIVE" if contract_end >= self.anchor else "ENDED",
                "start_date": contract_start.isoformat(),
                "end_date": contract_end.isoformat(),
                "close_date": joined.date().isoformat(),
                "invoicing": {"interval": "MONTHLY"},
                "usage_configuration": None,
                "total_value": money_json(term_total, currency),
                "external_references": [],
                "exchange_rate": None,
            }
            customer_updated = joined
            self.add("contract", contract, joined, joined)
            if contract["status"] == "ENDED" and self.rng.random() < 0.5:
                renewal = self.moment(min(contract_end, self.anchor))
                self.add(
                    "draft_contract",
                    {
                        "id": self.uuid(),
                        "customer_id": customer["id"],
                        "subsidiary_id": sub["id"],
                        "name": f"{name} - renewal",
                        "amount": money_json(term_total, currency),
                        "close_date": (contract_end + timedelta(days=30)).isoformat(),
                        "scope": "FULL",
                        "items": [
                            {
                                "id": self.uuid(),
                                "product_id": i["product_id"],
                                "price": i["price"],
                                "quantity": i["quantity"],
                                "total_value": i["total_value"],
                            }
                            for i in contract_items
                        ],
                        "external_references": [],
                    },
                    renewal,
                    renewal,
                )
            month = contract_start
            first = True
            while month <= min(contract_end, self.anchor):
                lines = list(items_spec)
                if first and self.rng.random() < 0.5:
                    lines.append((onboarding, 1))
                if uses_usage:
                    lines.append((usage, self.rng.randint(100, 4000)))  # thousands of calls
                first = False
                invoice_numbers[seed.prefix] += 1
                number = f"INV-{seed.prefix}-{invoice_numbers[seed.prefix]:05d}"
                updated = self._invoice(
                    customer,
                    contract,
                    sub,
                    month,
                    number,
                    lines,
                    tax_rate,
                    discount_pct,
                    recurring[0],
                )
                if self.rng.random() < 0.03 and month + timedelta(days=10) <= self.anchor:
                    memo_number += 1
                    updated = max(updated, self._credit_memo(memo_number))
                self._settle_invoice()
                customer_updated = max(customer_updated, min(updated, joined + timedelta(days=200)))
                month = (month + timedelta(days=32)).replace(day=1)
            self.add("customer", customer, joined, customer_updated)

    def _invoice(
        self,
        customer: dict[str, Any],
        contract: dict[str, Any],
        sub: dict[str, Any],
        month: date,
        number: str,
        lines: list[tuple[dict[str, Any], int]],
        tax_rate: Decimal,
        discount_pct: Decimal,
        discounted: dict[str, Any],
    ) -> datetime:
        currency = sub["currency"]
        period_end = (month + timedelta(days=32)).replace(day=1) - timedelta(days=1)
        items, totals = [], defaultdict(int)
        for product, quantity in lines:
            unit = self.list_price(
                product["_usd"] * (1000 if product is self.products[3] else 1), currency
            )
            gross = (
                _to_minor(unit * quantity, currency)
                if product is not self.products[3]
                else _to_minor(unit / 1000 * quantity, currency)
            )
            discount = (
                _to_minor(Decimal(gross) * discount_pct / 100, "JPY")
                if product is discounted
                else 0
            )
            tax = _to_minor(Decimal(gross - discount) * tax_rate, "JPY")
            totals["subtotal"] += gross
            totals["discount"] += discount
            totals["tax"] += tax
            rate = unit if product is not self.products[3] else unit / 1000
            items.append(
                {
                    "id": self.uuid(),
                    "product_id": product["id"],
                    "description": product["name"],
                    "quantity": quantity,
                    "revenue": {
                        "period": {"start": month.isoformat(), "end": period_end.isoformat()},
                        "pattern": product["revenue_pattern"],
                        "account_code": product["account_code"],
                    },
                    "total_amount": money_json(gross, currency),
                    "total_discount": money_json(discount, currency),
                    "taxed_amount": money_json(tax, currency),
                    "gross_rate": {"amount": format(rate.normalize(), "f"), "currency": currency},
                    "external_references": [],
                    "fields": [],
                }
            )
        net = totals["subtotal"] - totals["discount"]
        total = net + totals["tax"]
        issued = self.moment(month)
        terms = int(customer["payment_terms"])
        invoice = {
            "id": self.uuid(),
            "subsidiary_id": sub["id"],
            "invoice_number": number,
            "customer_id": customer["id"],
            "contract_id": contract["id"],
            "items": items,
            "invoice_date": month.isoformat(),
            "due_date": (month + timedelta(days=terms)).isoformat(),
            "payment_terms": terms,
            "status": "UNPAID",
            "subtotal": money_json(totals["subtotal"], currency),
            "total_discount": money_json(totals["discount"], currency),
            "taxed_amount": money_json(totals["tax"], currency),
            "net_amount": money_json(net, currency),
            "total": money_json(total, currency),
            "amount_due": money_json(total, currency),
            "overdue": False,
            "purchase_order_number": None,
            "memo": None,
            "exchange_rate": None,
            "address": None,
            "customer_address": customer["address"],
            "shipping_address": None,
            "bank_account": None,
            "external_references": [],
            "updated_at": "",
            "sent_at": isoformat_z(issued),
        }
        self._open_invoice = (invoice, sub, issued, total, 0, issued)
        self.post(
            invoice["id"],
            name=f"Invoice {number}",
            subsidiary=sub,
            posted=month,
            lines=postings.invoice_lines(invoice),
            created=issued,
            updated=issued,
            related={"id": customer["id"], "type": "CUSTOMER"},
        )
        return issued

    def _credit_memo(self, number: int) -> datetime:
        """A service credit of 10 % of the invoice's first line, applied to the invoice."""
        invoice, sub, issued, total, _, updated = self._open_invoice
        currency = sub["currency"]
        source = invoice["items"][0]
        net = (
            postings.minor(source["total_amount"]) - postings.minor(source["total_discount"])
        ) // 10
        line_tax = postings.minor(source["taxed_amount"]) // 10
        credit_total = net + line_tax
        memo_day = date.fromisoformat(invoice["invoice_date"]) + timedelta(days=10)
        when = self.moment(memo_day)
        memo_id = self.uuid()
        memo = {
            "id": memo_id,
            "subsidiary_id": sub["id"],
            "credit_memo_number": f"CM-{number:05d}",
            "customer_id": invoice["customer_id"],
            "credit_memo_date": memo_day.isoformat(),
            "address": invoice["customer_address"],
            "items": [
                {
                    "id": self.uuid(),
                    "description": f"Service credit: {source['description']}",
                    "revenue": source["revenue"],
                    "product_id": source["product_id"],
                    "quantity": 1,
                    "total_amount": money_json(net, currency),
                    "net_amount": money_json(net, currency),
                    "taxed_amount": money_json(line_tax, currency),
                    "fields": [],
                }
            ],
            "status": "APPLIED",
            "net_amount": money_json(net, currency),
            "total": money_json(credit_total, currency),
            "applied_amount": money_json(credit_total, currency),
            "remaining_amount": money_json(0, currency),
            "taxed_amount": money_json(line_tax, currency),
            "applications": [
                {
                    "id": self.uuid(),
                    "credit_memo_id": memo_id,
                    "invoice_id": invoice["id"],
                    "invoice_number": invoice["invoice_number"],
                    "amount": money_json(credit_total, currency),
                    "application_date": memo_day.isoformat(),
                }
            ],
            "exchange_rate": None,
            "external_references": [],
            "updated_at": "",
        }
        self.add("credit_memo", memo, when, when)
        self.post(
            memo_id,
            name=f"Credit memo CM-{number:05d}",
            subsidiary=sub,
            posted=memo_day,
            lines=postings.credit_memo_lines(memo),
            created=when,
            updated=when,
            related={"id": invoice["customer_id"], "type": "CUSTOMER"},
        )
        self._open_invoice = (invoice, sub, issued, total, credit_total, max(updated, when))
        return when

    def _settle_invoice(self) -> None:
        """Pay the open invoice (most are paid, some partly, recent ones not yet) and file it."""
        invoice, sub, issued, total, credited, updated = self._open_invoice
        currency = sub["currency"]
        invoice_day = date.fromisoformat(invoice["invoice_date"])
        paid = 0
        pay_day = invoice_day + timedelta(days=self.rng.randint(3, 50))
        if pay_day <= self.anchor and self.rng.random() < 0.93 and total > credited:
            paid = total - credited
            if self.rng.random() < 0.05:
                paid = paid // 2
            when = self.moment(pay_day)
            payment = {
                "id": self.uuid(),
                "invoice_id": invoice["id"],
                "status": "SUCCESSFUL",
                "amount": money_json(paid, currency),
                "date": pay_day.isoformat(),
                "account_code": "11001",
                "updated_at": "",
            }
            self.add("invoice_payment", payment, when, when)
            self.payments_of[invoice["id"]].append(payment["id"])
            self.post(
                payment["id"],
                name=f"Payment for {invoice['invoice_number']}",
                subsidiary=sub,
                posted=pay_day,
                lines=postings.invoice_payment_lines(payment, invoice["invoice_number"]),
                created=when,
                updated=when,
                related={"id": invoice["customer_id"], "type": "CUSTOMER"},
            )
            self.bank_transaction(
                sub,
                "11001",
                pay_day,
                f"Deposit {invoice['invoice_number']}",
                "Customer payment",
                paid,
            )
            updated = max(updated, when)
        due = total - credited - paid
        invoice["amount_due"] = money_json(due, currency)
        invoice["status"] = invoice_status(total, paid, credited)
        invoice["overdue"] = due > 0 and date.fromisoformat(invoice["due_date"]) < self.anchor
        self.add("invoice", invoice, issued, updated)

    # ---- spend -----------------------------------------------------------------------------

    def _vendors_and_spend(self) -> None:
        vendors = []
        opened = datetime.combine(self.start, time(9), UTC)
        for index in range(self.size.vendors):
            if index < len(_VENDORS):
                name, account_code, base = _VENDORS[index]
            else:
                name = f"{self.rng.choice(_NAME_A)} {self.rng.choice(_NAME_B)} Supplies #{index}"
                account_code = self.rng.choice(("61002", "62002", "62003", "50001"))
                base = Decimal(self.rng.randint(200, 3000))
            home = (
                self.subsidiaries[0]
                if index % 4
                else self.subsidiaries[index // 4 % len(self.subsidiaries)]
            )
            vendor = {
                "id": self.uuid(),
                "name": name,
                "account_code": account_code,
                "address": None,
                "email": f"ap@vendor{index}.example",
                "payment_terms": 30,
                "external_references": [],
                "ten_ninety_nine_eligible": index % 5 == 0,
                "tax_id": f"{self.rng.randint(10, 99)}-{self.rng.randint(1000000, 9999999)}",
                "fields": [],
                "updated_at": "",
            }
            vendors.append((vendor, home, account_code, base))
            self.add("vendor", vendor, opened, opened + timedelta(days=self.rng.randint(0, 90)))
        bill_number = credit_number = 0
        for month in self.months:
            month_end = min(
                (month + timedelta(days=32)).replace(day=1) - timedelta(days=1), self.anchor
            )
            for vendor, home, account_code, base in vendors:
                bill_day = month + timedelta(days=self.rng.randint(0, 6))
                if bill_day > self.anchor:
                    continue
                bill_number += 1
                credit = 0
                if account_code == "50001" and self.rng.random() < 0.08:
                    credit_number += 1
                    credit = self._vendor_credit(
                        vendor, home, bill_day, credit_number, account_code
                    )
                self._bill(vendor, home, bill_day, bill_number, account_code, base, credit)
            for sub in self.subsidiaries:
                self._card_and_reimbursements(sub, month, month_end)

    def _bill(
        self,
        vendor: dict[str, Any],
        sub: dict[str, Any],
        bill_day: date,
        number: int,
        account_code: str,
        base: Decimal,
        credit: int,
    ) -> None:
        currency = sub["currency"]
        amount = self.list_price(base * Decimal(self.rng.randint(80, 120)) / 100, currency)
        period_end = (bill_day.replace(day=1) + timedelta(days=32)).replace(day=1) - timedelta(
            days=1
        )
        items = [
            {
                "id": self.uuid(),
                "account_code": account_code,
                "amount": self.money(amount, currency),
                "description": f"{vendor['name']} {bill_day:%B %Y}",
                "tax_rate": None,
                "service_period": {
                    "start": bill_day.replace(day=1).isoformat(),
                    "end": period_end.isoformat(),
                },
                "fields": [],
            }
        ]
        if self.rng.random() < 0.25:
            extra = self.list_price(Decimal(self.rng.randint(50, 400)), currency)
            items.append(
                {
                    **items[0],
                    "id": self.uuid(),
                    "account_code": "62004",
                    "amount": self.money(extra, currency),
                    "description": "Service fee",
                }
            )
        total = sum(postings.minor(i["amount"]) for i in items)
        created = self.moment(bill_day)
        bill = {
            "id": self.uuid(),
            "vendor_id": vendor["id"],
            "expense_number": f"BILL-{number:05d}",
            "bill_date": bill_day.isoformat(),
            "due_date": (bill_day + timedelta(days=30)).isoformat(),
            "impact_date": bill_day.isoformat(),
            "subsidiary_id": sub["id"],
            "items": items,
            "external_references": [],
            "exchange_rate": None,
            "status": "UNPAID",
            "updated_at": "",
        }
        self.post(
            bill["id"],
            name=f"Bill {bill['expense_number']}",
            subsidiary=sub,
            posted=bill_day,
            lines=postings.expense_lines(items, postings.AP, f"Bill {bill['expense_number']}"),
            created=created,
            updated=created,
            related={"id": vendor["id"], "type": "VENDOR"},
        )
        if credit and self._pending_credit is not None:
            application = self._pending_credit["applications"]
            application.append(
                {
                    "id": self.uuid(),
                    "vendor_credit_id": self._pending_credit["id"],
                    "bill_id": bill["id"],
                    "bill_number": bill["expense_number"],
                    "amount": money_json(min(credit, total), currency),
                    "application_date": bill_day.isoformat(),
                }
            )
            credit = min(credit, total)
            self._pending_credit = None
        updated = created
        pay_day = bill_day + timedelta(days=30)
        if pay_day <= self.anchor and self.rng.random() < 0.95:
            paid = total - credit
            when = self.moment(pay_day)
            payment = {
                "id": self.uuid(),
                "bill_id": bill["id"],
                "status": "CLEARED",
                "amount": money_json(paid, currency),
                "date": pay_day.isoformat(),
                "account_code": "11001",
            }
            self.add("bill_payment", payment, when, when)
            self.payments_of[bill["id"]].append(payment["id"])
            text = f"Payment of {bill['expense_number']}"
            self.post(
                payment["id"],
                name=text,
                subsidiary=sub,
                posted=pay_day,
                lines=postings.payment_out_lines(paid, "11001", text),
                created=when,
                updated=when,
                related={"id": vendor["id"], "type": "VENDOR"},
            )
            self.bank_transaction(sub, "11001", pay_day, text, vendor["name"], -paid)
            bill["status"] = "PAID"
            updated = when
        elif credit:
            bill["status"] = "PARTIALLY_CREDITED"
        self.add("bill", bill, created, updated)

    def _vendor_credit(
        self, vendor: dict[str, Any], sub: dict[str, Any], on: date, number: int, account_code: str
    ) -> int:
        currency = sub["currency"]
        amount = _to_minor(self.list_price(Decimal(self.rng.randint(100, 500)), currency), currency)
        when = self.moment(on)
        credit = {
            "id": self.uuid(),
            "organization_id": self.organization["id"],
            "vendor_id": vendor["id"],
            "subsidiary_id": sub["id"],
            "credit_number": f"VC-{number:04d}",
            "date": on.isoformat(),
            "gl_impact_date": on.isoformat(),
            "memo": "Service credit",
            "status": "APPLIED",
            "amount": money_json(amount, currency),
            "applied_amount": money_json(amount, currency),
            "remaining_amount": money_json(0, currency),
            "line_items": [
                {
                    "id": self.uuid(),
                    "account_code": account_code,
                    "amount": money_json(amount, currency),
                    "description": "Service credit",
                    "tax_rate": None,
                    "net_amount": money_json(amount, currency),
                    "tax_amount": money_json(0, currency),
                    "fields": [],
                }
            ],
            "applications": [],
            "updated_at": "",
        }
        self._pending_credit = credit
        self.add("vendor_credit", credit, when, when)
        self.post(
            credit["id"],
            name=f"Vendor credit VC-{number:04d}",
            subsidiary=sub,
            posted=on,
            lines=postings.vendor_credit_lines(credit),
            created=when,
            updated=when,
            related={"id": vendor["id"], "type": "VENDOR"},
        )
        return amount

    _pending_credit: dict[str, Any] | None = None

    def _card_and_reimbursements(self, sub: dict[str, Any], month: date, month_end: date) -> None:
        currency = sub["currency"]
        vendor_ids = [r[0]["id"] for r in self.records["vendor"]]
        card_total = 0
        for _ in range(self.rng.randint(1, 3)):
            day = month + timedelta(days=self.rng.randint(0, 27))
            if day > self.anchor:
                continue
            code, text = self.rng.choice(
                (("62003", "Team travel"), ("61002", "SaaS tools"), ("60002", "Ads"))
            )
            amount = self.list_price(Decimal(self.rng.randint(20, 900)), currency)
            when = self.moment(day)
            items = [
                {
                    "id": self.uuid(),
                    "account_code": code,
                    "amount": self.money(amount, currency),
                    "description": text,
                    "tax_rate": None,
                    "service_period": None,
                    "fields": [],
                }
            ]
            charge = {
                "id": self.uuid(),
                "vendor_id": self.rng.choice(vendor_ids),
                "charge_date": day.isoformat(),
                "impact_date": day.isoformat(),
                "credit_card_account_code": postings.CREDIT_CARD,
                "subsidiary_id": sub["id"],
                "items": items,
                "external_references": [],
                "exchange_rate": None,
                "status": "PAID" if month_end < self.anchor else "UNPAID",
                "updated_at": "",
            }
            self.add("charge", charge, when, when)
            self.post(
                charge["id"],
                name=f"Card charge: {text}",
                subsidiary=sub,
                posted=day,
                lines=postings.expense_lines(items, postings.CREDIT_CARD, text),
                created=when,
                updated=when,
            )
            card_total += postings.minor(items[0]["amount"])
        reimbursed = 0
        if self.rng.random() < 0.7:
            day = month + timedelta(days=self.rng.randint(0, 25))
            if day <= self.anchor:
                amount = self.list_price(Decimal(self.rng.randint(30, 400)), currency)
                when = self.moment(day)
                items = [
                    {
                        "id": self.uuid(),
                        "account_code": "62003",
                        "amount": self.money(amount, currency),
                        "description": "Client dinner",
                        "tax_rate": None,
                        "service_period": None,
                        "fields": [],
                    }
                ]
                record = {
                    "id": self.uuid(),
                    "vendor_id": self.rng.choice(vendor_ids),
                    "reimbursement_date": day.isoformat(),
                    "impact_date": day.isoformat(),
                    "subsidiary_id": sub["id"],
                    "items": items,
                    "external_references": [],
                    "exchange_rate": None,
                    "status": "PAID" if month_end < self.anchor else "UNPAID",
                    "updated_at": "",
                }
                self.add("reimbursement", record, when, when)
                self.post(
                    record["id"],
                    name="Employee reimbursement",
                    subsidiary=sub,
                    posted=day,
                    lines=postings.expense_lines(
                        items, postings.REIMBURSEMENTS_PAYABLE, "Reimbursement"
                    ),
                    created=when,
                    updated=when,
                )
                reimbursed = postings.minor(items[0]["amount"])
        settle_day = month_end + timedelta(days=5)
        if month_end < self.anchor and settle_day <= self.anchor:
            when = self.moment(settle_day)
            for amount, account, text in (
                (card_total, postings.CREDIT_CARD, "Credit card statement payment"),
                (reimbursed, postings.REIMBURSEMENTS_PAYABLE, "Reimbursement payout"),
            ):
                if amount:
                    self.post(
                        None,
                        name=text,
                        subsidiary=sub,
                        posted=settle_day,
                        lines=[
                            postings.PostingLine(account, "DEBIT", amount, text),
                            postings.PostingLine("11001", "CREDIT", amount, text),
                        ],
                        created=when,
                        updated=when,
                    )
                    self.bank_transaction(
                        sub, "11001", settle_day, text, "First Ledger Bank", -amount
                    )

    # ---- payroll and other manual entries ------------------------------------------------

    def _payroll_and_other_entries(self) -> None:
        customers_per_sub: dict[str, int] = defaultdict(int)
        for contract, *_ in self.records["contract"]:
            customers_per_sub[contract["subsidiary_id"]] += 1
        for month in self.months:
            month_end = (month + timedelta(days=32)).replace(day=1) - timedelta(days=1)
            if month_end > self.anchor:
                break
            for sub in self.subsidiaries:
                currency = sub["currency"]
                headcount_usd = Decimal(18_000 + 1_400 * customers_per_sub[sub["id"]])
                split = (
                    ("60001", "Sales salaries", 30),
                    ("61001", "Engineering salaries", 50),
                    ("50002", "Support salaries", 20),
                )
                lines = [
                    postings.PostingLine(
                        code,
                        "DEBIT",
                        _to_minor(self.list_price(headcount_usd * pct / 100, currency), currency),
                        text,
                    )
                    for code, text, pct in split
                ]
                total = sum(line.minor for line in lines)
                cash = "11002" if currency == "USD" else "11001"
                when = self.moment(month_end)
                if cash == "11002":
                    self.post(
                        None,
                        name="Payroll account funding",
                        subsidiary=sub,
                        posted=month_end,
                        lines=[
                            postings.PostingLine("11002", "DEBIT", total, "Transfer"),
                            postings.PostingLine("11001", "CREDIT", total, "Transfer"),
                        ],
                        created=when,
                        updated=when,
                    )
                    self.bank_transaction(
                        sub, "11002", month_end, "Transfer from operating", "Internal", total
                    )
                    self.bank_transaction(
                        sub, "11001", month_end, "Transfer to payroll", "Internal", -total
                    )
                self.post(
                    None,
                    name=f"Payroll {month:%B %Y}",
                    subsidiary=sub,
                    posted=month_end,
                    lines=[*lines, postings.PostingLine(cash, "CREDIT", total, "Net pay")],
                    created=when,
                    updated=when,
                )
                self.bank_transaction(
                    sub, cash, month_end, f"Payroll {month:%b %Y}", "Payroll provider", -total
                )
                depreciation = _to_minor(self.list_price(Decimal(2_500), currency), currency)
                self.post(
                    None,
                    name=f"Depreciation {month:%B %Y}",
                    subsidiary=sub,
                    posted=month_end,
                    lines=[
                        postings.PostingLine("63001", "DEBIT", depreciation, "Depreciation"),
                        postings.PostingLine("15901", "CREDIT", depreciation, "Depreciation"),
                    ],
                    created=when,
                    updated=when,
                )
                if month.month % 3 == 1:
                    equipment = _to_minor(
                        self.list_price(Decimal(self.rng.randint(8_000, 30_000)), currency),
                        currency,
                    )
                    self.post(
                        None,
                        name="Laptops and equipment",
                        subsidiary=sub,
                        posted=month,
                        lines=[
                            postings.PostingLine("15001", "DEBIT", equipment, "Equipment"),
                            postings.PostingLine("11001", "CREDIT", equipment, "Equipment"),
                        ],
                        created=self.moment(month),
                        updated=self.moment(month),
                    )
            us = self.subsidiaries[0]
            if month >= self.months[min(3, len(self.months) - 1)]:
                interest = _to_minor(Decimal(1_000_000) * Decimal("0.08") / 12, "USD")
                when = self.moment(month_end)
                self.post(
                    None,
                    name=f"Loan interest {month:%B %Y}",
                    subsidiary=us,
                    posted=month_end,
                    lines=[
                        postings.PostingLine("69001", "DEBIT", interest, "Interest"),
                        postings.PostingLine("11001", "CREDIT", interest, "Interest"),
                    ],
                    created=when,
                    updated=when,
                )

    # ---- assembly --------------------------------------------------------------------------

    def _assemble(self) -> World:
        store = Store(ENTITIES)
        store.subsidiary_index.update({s["id"]: i for i, s in enumerate(self.subsidiaries)})
        accounts = [
            AccountInfo(a["id"], a["code"], a["name"], a["type"], a["subtype"])
            for a in self.accounts_by_code.values()
        ]
        subsidiaries = [
            SubsidiaryInfo(s["id"], s["trade_name"], s["currency"]) for s in self.subsidiaries
        ]
        reporting = self.organization["currency"]
        ledger = Ledger(accounts, subsidiaries, reporting)
        now_us = to_us(self.now)
        bulk = None
        if self.size.bulk_journal_entries:
            bulk = BulkJournalEntries(
                seed=self.seed,
                count=self.size.bulk_journal_entries,
                start=self.start,
                end=self.anchor,
                subsidiaries=self.subsidiaries,
                accounts_by_code=self.accounts_by_code,
                now_us=now_us,
            )
            entry, dates, subsidiary, account, side, local = bulk.lines()
            ledger.load_bulk(
                entry=entry,
                date_ordinal=dates,
                subsidiary=subsidiary,
                account=account,
                side=side,
                local=local,
                reporting=bulk_reporting_minor(
                    local, dates, subsidiary, self.subsidiaries, reporting
                ),
                entries=len(bulk),
            )
        for spec in ENTITIES:
            if spec.single or spec.name == "reporting_journal_entry":
                continue
            rows = sorted(self.records.get(spec.name, []), key=lambda r: (r[1], r[2]))
            records = [(record, updated) for record, _, _, updated in rows]
            if spec.name == "journal_entry" and bulk is not None:
                created = np.array([r[1] for r in rows] + list(bulk.updated), dtype=np.int64)
                order = np.argsort(created, kind="stable")
                eager = len(rows)
                order_list = [int(i) if i < eager else eager - 1 - int(i) for i in order]
                store[spec.name].load(records, bulk=bulk, order=order_list)
            else:
                store[spec.name].load(records)
        for record, _ in ((r[0], r[3]) for r in self.records["journal_entry"]):
            ledger.post(record)
        store.singletons["organization"] = self.organization
        store.singletons["book_period"] = self._last_closed_period()
        world = World(
            store=store,
            ledger=ledger,
            anchor=self.anchor,
            reporting_currency=reporting,
            accounts_by_code=self.accounts_by_code,
            subsidiaries=self.subsidiaries,
            rng=random.Random(f"{self.seed}:writes"),
            posting_of=self.posting_of,
            payments_of=self.payments_of,
            bulk=bulk,
        )
        return world

    def _last_closed_period(self) -> dict[str, Any] | None:
        """Books close about ten days after month end; the last closed month is its period."""
        closing = self.anchor - timedelta(days=10)
        period_end = closing.replace(day=1) - timedelta(days=1)
        if period_end < self.start:
            return None
        closed_on = period_end + timedelta(days=10)
        return {
            "id": _deterministic_uuid(random.Random(f"{self.seed}:{period_end}")),
            "start": period_end.replace(day=1).isoformat(),
            "end": period_end.isoformat(),
            "status": "CLOSED",
            "closed_on": closed_on.isoformat(),
        }


def invoice_status(total: int, paid: int, credited: int) -> str:
    """Rillet's invoice status from what was paid and credited (minor units)."""
    if credited >= total > 0:
        return "CREDITED"
    if paid + credited >= total:
        return "PAID"
    if paid and credited:
        return "PARTIALLY_PAID"
    if credited:
        return "PARTIALLY_CREDITED"
    if paid:
        return "PARTIALLY_PAID"
    return "UNPAID"


def generate(*, seed: int = 7, size: Size | str = "small", now: datetime | None = None) -> World:
    """Build the simulated organization (deterministic for a given seed, size and ``now``)."""
    resolved = parse_size(size) if isinstance(size, str) else size
    moment = now or datetime.now(UTC)
    return Generator(seed=seed, size=resolved, now=moment).build()
