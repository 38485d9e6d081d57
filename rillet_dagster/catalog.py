"""The entity catalog: one declarative entry per Rillet entity and report.

Everything that talks about Rillet's surface reads this module: the client (paths, list keys,
pagination, allowed filters), the sandbox simulator (which lists and filters to serve, which
webhooks to fire), the warehouse schema (typed columns, money columns, child tables) and the
assets. Adding an entity is one entry here.

Facts come from ``shared/rillet-api.md`` sections 3, 4, 10 and 14 (the API as this project
models it); where sources disagree we follow its "Decisions" table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

# Rillet ids are canonical UUIDs ([M] OAS, CARBON; the sandbox generates them the same way). A
# record id goes into a URL path, so anything else (``..``, ``a/b``) is refused before a request.
UUID_PATTERN = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"


class FilterOp(StrEnum):
    """How a list filter compares a query parameter with a record field."""

    EQ = "eq"  # field == value (strings, UUIDs, enums)
    BOOL = "bool"  # field == (value == "true")
    GT = "gt"  # field > value (dates compare as ISO strings)
    GTE = "gte"
    LT = "lt"
    LTE = "lte"
    SEARCH = "search"  # case-insensitive substring
    ANY_LINE_ACCOUNT = "any_line_account"  # comma-separated account ids, any item matches
    EXTERNAL_REFERENCE = "external_reference"  # id + type must match one reference


@dataclass(frozen=True)
class FilterSpec:
    """A list filter: query parameter ``param`` compared with record field ``field`` by ``op``."""

    param: str
    field: str
    op: FilterOp = FilterOp.EQ


def _eq(*params: str) -> tuple[FilterSpec, ...]:
    return tuple(FilterSpec(p, p) for p in params)


def _date_range(param: str, record_field: str, ops: tuple[FilterOp, ...]) -> tuple[FilterSpec, ...]:
    return tuple(FilterSpec(f"{param}.{op.value}", record_field, op) for op in ops)


_POSTING_DATE = _date_range("date", "date", (FilterOp.GTE, FilterOp.LTE))
_ALL_RANGE_OPS = (FilterOp.GT, FilterOp.GTE, FilterOp.LT, FilterOp.LTE)


@dataclass(frozen=True)
class ChildSpec:
    """A nested array of a record that becomes its own table, keyed by parent id + line key.

    ``key`` names the line's own id field; ``None`` means the array has no ids and lines are
    keyed by their index in the array.
    """

    name: str
    field: str
    key: str | None = "id"
    money_fields: tuple[str, ...] = ()
    key_fields: tuple[str, ...] = ()


class WebhookEvent(StrEnum):
    CREATED = "CREATED"
    UPDATED = "UPDATED"
    DELETED = "DELETED"
    PAYMENT_UPDATED = "PAYMENT_UPDATED"


_CRUD_EVENTS = (WebhookEvent.CREATED, WebhookEvent.UPDATED, WebhookEvent.DELETED)


@dataclass(frozen=True)
class EntitySpec:
    """One Rillet entity as the API serves it.

    Attributes:
        name: singular snake-case name, also the warehouse table name (``invoice``).
        path: collection path (``/invoices``); for child collections it holds the parent id
            placeholder (``/bills/{bill_id}/payments``).
        list_key: key of the list in the response envelope; ``None`` for single-object
            endpoints (``/organizations/self``).
        paginated: served with ``limit``/``cursor`` and a ``pagination`` object.
        updated_gt: the list accepts ``updated.gt`` (strictly greater than).
        has_updated_at: records carry ``updated_at`` (some lists accept ``updated.gt`` but
            their records do not, so the watermark is the request start time).
        sort_by: the list accepts ``sort_by=created|updated`` (descending).
        filters: other query filters the list accepts.
        money_fields: dotted paths of Money objects on the record.
        key_fields: dotted paths of fields worth a typed warehouse column.
        date_field: the business date of the record, for partitioning and date filters.
        children: nested arrays that become child tables.
        webhook_entity: value of ``X-Rillet-Entity`` for this entity, if webhook-fed.
        webhook_events: the events Rillet sends for it.
        read_on_webhooks_of: for an entity Rillet sends no webhooks of its own, the webhook
            entity whose events say it changed (``INVOICE``'s ``PAYMENT_UPDATED`` for invoice
            payments): a webhook run of that entity also reads this one incrementally.
        writes: HTTP methods the sandbox (and the client) support on it.
        parent: entity whose id appears in ``path`` (bill payments live under bills).
        get_by_id: ``GET {path}/{id}`` exists.
        single: the endpoint returns one bare object, not a list.
        not_found_means_empty: a 404 on the single-object endpoint means "none yet".
        required_fields: fields every record must carry (missing ones are a schema error).
        id_pattern: regular expression a whole record id must match before the client puts it
            in a path (``GET {path}/{id}``, a parent id in ``path``).
        description: what one row is.
    """

    name: str
    path: str
    list_key: str | None
    paginated: bool
    description: str
    updated_gt: bool = False
    has_updated_at: bool = False
    sort_by: bool = False
    filters: tuple[FilterSpec, ...] = ()
    money_fields: tuple[str, ...] = ()
    key_fields: tuple[str, ...] = ()
    date_field: str | None = None
    children: tuple[ChildSpec, ...] = ()
    webhook_entity: str | None = None
    webhook_events: tuple[WebhookEvent, ...] = ()
    read_on_webhooks_of: str | None = None
    writes: frozenset[str] = frozenset()
    parent: str | None = None
    get_by_id: bool = True
    single: bool = False
    not_found_means_empty: bool = False
    required_fields: tuple[str, ...] = ("id",)
    group: str = "rillet_entities"
    id_pattern: str = UUID_PATTERN

    def is_valid_id(self, value: object) -> bool:
        """``value`` has this entity's id shape (whole string: no trailing newline slips by)."""
        return isinstance(value, str) and re.fullmatch(self.id_pattern, value) is not None

    @property
    def incremental(self) -> bool:
        """Synced with ``updated.gt`` rather than by full refresh."""
        return self.updated_gt

    @property
    def filter_params(self) -> frozenset[str]:
        return frozenset(f.param for f in self.filters)

    @property
    def query_params(self) -> frozenset[str]:
        """Every query parameter the list accepts (pagination and incremental included)."""
        params = set(self.filter_params)
        if self.paginated:
            params |= {"limit", "cursor"}
        if self.updated_gt:
            params.add("updated.gt")
        if self.sort_by:
            params.add("sort_by")
        return frozenset(params)


_FULL_WRITES = frozenset({"POST", "PUT", "DELETE"})

_BILL_LINE = ("account_code", "description")
_BILL_LINE_MONEY = ("amount",)


ENTITIES: tuple[EntitySpec, ...] = (
    EntitySpec(
        name="account",
        path="/accounts",
        list_key="accounts",
        paginated=False,
        updated_gt=True,
        has_updated_at=True,
        key_fields=("code", "name", "type", "subtype", "status", "intercompany"),
        required_fields=("id", "code", "name", "type"),
        get_by_id=False,
        description="One row is a general-ledger account of the chart of accounts.",
    ),
    EntitySpec(
        name="subsidiary",
        path="/subsidiaries",
        list_key="subsidiaries",
        paginated=False,
        key_fields=("trade_name", "currency", "timezone", "type"),
        required_fields=("id", "currency", "trade_name"),
        get_by_id=False,
        description="One row is a legal entity (subsidiary) with its functional currency.",
    ),
    EntitySpec(
        name="organization",
        path="/organizations/self",
        list_key=None,
        paginated=False,
        single=True,
        get_by_id=False,
        key_fields=("trade_name", "currency", "timezone"),
        description="One row is the organization that owns the API key.",
    ),
    EntitySpec(
        name="product",
        path="/products",
        list_key="products",
        paginated=True,
        filters=(*_eq("status"), FilterSpec("currency", "price.amount.currency")),
        money_fields=("price.amount",),
        key_fields=(
            "name",
            "price.type",
            "price.interval_months",
            "account_code",
            "status",
            "revenue_pattern",
            "include_in_arr_mrr",
        ),
        description="One row is a product or service that contracts and invoices sell.",
    ),
    EntitySpec(
        name="customer",
        path="/customers",
        list_key="customers",
        paginated=True,
        updated_gt=True,
        has_updated_at=True,
        sort_by=True,
        filters=(
            FilterSpec("search", "name", FilterOp.SEARCH),
            FilterSpec("external_reference_id", "external_references", FilterOp.EXTERNAL_REFERENCE),
            FilterSpec(
                "external_reference_type", "external_references", FilterOp.EXTERNAL_REFERENCE
            ),
        ),
        key_fields=("name", "name_on_invoice", "payment_terms"),
        children=(
            ChildSpec(
                name="customer_email", field="emails", key=None, key_fields=("email", "type")
            ),
        ),
        webhook_entity="CUSTOMER",
        webhook_events=_CRUD_EVENTS,
        writes=_FULL_WRITES,
        required_fields=("id", "name", "updated_at"),
        description="One row is a customer (the party invoices are issued to).",
    ),
    EntitySpec(
        name="contract",
        path="/contracts",
        list_key="contracts",
        paginated=True,
        filters=(
            *_eq("subsidiary_id", "status", "customer_id"),
            *_date_range("start_date", "start_date", _ALL_RANGE_OPS),
            *_date_range("end_date", "end_date", _ALL_RANGE_OPS),
        ),
        money_fields=("total_value",),
        key_fields=(
            "customer_id",
            "subsidiary_id",
            "name",
            "status",
            "start_date",
            "end_date",
            "close_date",
        ),
        date_field="start_date",
        children=(
            ChildSpec(
                name="contract_item",
                field="items",
                money_fields=("price", "total_value"),
                key_fields=("product_id", "quantity", "start_date", "end_date", "status"),
            ),
        ),
        webhook_entity="CONTRACT",
        webhook_events=_CRUD_EVENTS,
        description="One row is a customer contract (subscription) with its items.",
    ),
    EntitySpec(
        name="draft_contract",
        path="/draft-contracts",
        list_key="draft_contracts",
        paginated=True,
        filters=_eq("subsidiary_id", "customer_id"),
        money_fields=("amount",),
        key_fields=("customer_id", "subsidiary_id", "name", "close_date", "scope"),
        date_field="close_date",
        children=(
            ChildSpec(
                name="draft_contract_item",
                field="items",
                money_fields=("price", "total_value"),
                key_fields=("product_id", "quantity"),
            ),
        ),
        description="One row is a draft contract not yet in effect.",
    ),
    EntitySpec(
        name="invoice",
        path="/invoices",
        list_key="invoices",
        paginated=True,
        updated_gt=True,
        has_updated_at=True,
        filters=(
            *_eq("subsidiary_id", "customer_id", "status"),
            FilterSpec("overdue", "overdue", FilterOp.BOOL),
        ),
        money_fields=(
            "subtotal",
            "total_discount",
            "taxed_amount",
            "net_amount",
            "total",
            "amount_due",
        ),
        key_fields=(
            "subsidiary_id",
            "customer_id",
            "contract_id",
            "invoice_number",
            "invoice_date",
            "due_date",
            "status",
            "overdue",
            "sent_at",
        ),
        date_field="invoice_date",
        children=(
            ChildSpec(
                name="invoice_item",
                field="items",
                money_fields=("total_amount", "total_discount", "taxed_amount", "gross_rate"),
                key_fields=("product_id", "description", "quantity"),
            ),
        ),
        webhook_entity="INVOICE",
        webhook_events=(*_CRUD_EVENTS, WebhookEvent.PAYMENT_UPDATED),
        writes=_FULL_WRITES,
        required_fields=("id", "invoice_number", "customer_id", "items", "updated_at"),
        description="One row is a customer invoice (accounts receivable document).",
    ),
    EntitySpec(
        name="invoice_payment",
        path="/invoice-payments",
        list_key="payments",
        paginated=True,
        updated_gt=True,
        has_updated_at=True,
        sort_by=True,
        money_fields=("amount",),
        key_fields=("invoice_id", "status", "date", "account_code"),
        date_field="date",
        writes=_FULL_WRITES,
        get_by_id=False,
        required_fields=("id", "invoice_id", "amount", "updated_at"),
        read_on_webhooks_of="INVOICE",
        description="One row is a payment received against an invoice.",
    ),
    EntitySpec(
        name="credit_memo",
        path="/credit-memos",
        list_key="credit_memos",
        paginated=True,
        updated_gt=True,
        has_updated_at=True,
        filters=_eq("subsidiary_id"),
        money_fields=("net_amount", "total", "applied_amount", "remaining_amount", "taxed_amount"),
        key_fields=(
            "subsidiary_id",
            "customer_id",
            "credit_memo_number",
            "credit_memo_date",
            "status",
        ),
        date_field="credit_memo_date",
        children=(
            ChildSpec(
                name="credit_memo_item",
                field="items",
                money_fields=("total_amount", "net_amount", "taxed_amount"),
                key_fields=("product_id", "description", "quantity"),
            ),
            ChildSpec(
                name="credit_memo_application",
                field="applications",
                money_fields=("amount",),
                key_fields=("invoice_id", "invoice_number", "application_date"),
            ),
        ),
        webhook_entity="CREDIT_MEMO",
        webhook_events=(*_CRUD_EVENTS, WebhookEvent.PAYMENT_UPDATED),
        writes=_FULL_WRITES,
        required_fields=("id", "customer_id", "items", "updated_at"),
        description="One row is a credit memo issued to a customer, with its applications.",
    ),
    EntitySpec(
        name="vendor",
        path="/vendors",
        list_key="vendors",
        paginated=True,
        updated_gt=True,
        has_updated_at=True,
        key_fields=(
            "name",
            "account_code",
            "email",
            "payment_terms",
            "tax_id",
            "ten_ninety_nine_eligible",
        ),
        webhook_entity="VENDOR",
        webhook_events=_CRUD_EVENTS,
        required_fields=("id", "name", "updated_at"),
        description="One row is a vendor (supplier) the company buys from.",
    ),
    EntitySpec(
        name="vendor_credit",
        path="/vendor-credits",
        list_key="vendor_credits",
        paginated=True,
        updated_gt=True,
        has_updated_at=True,
        filters=_eq("vendor_id", "subsidiary_id"),
        money_fields=("amount", "applied_amount", "remaining_amount"),
        key_fields=(
            "vendor_id",
            "subsidiary_id",
            "credit_number",
            "date",
            "gl_impact_date",
            "status",
        ),
        date_field="date",
        children=(
            ChildSpec(
                name="vendor_credit_line",
                field="line_items",
                money_fields=("amount", "net_amount", "tax_amount"),
                key_fields=_BILL_LINE,
            ),
            ChildSpec(
                name="vendor_credit_application",
                field="applications",
                money_fields=("amount",),
                key_fields=("bill_id", "bill_number", "application_date"),
            ),
        ),
        description="One row is a credit received from a vendor, with its applications to bills.",
    ),
    EntitySpec(
        name="bill",
        path="/bills",
        list_key="bills",
        paginated=True,
        updated_gt=True,
        has_updated_at=True,
        # sort_by=updated is not in Rillet's OpenAPI but was verified on the sandbox (CARBON).
        sort_by=True,
        filters=_eq("subsidiary_id", "vendor_id", "status"),
        key_fields=(
            "vendor_id",
            "subsidiary_id",
            "expense_number",
            "bill_date",
            "due_date",
            "impact_date",
            "status",
        ),
        date_field="bill_date",
        children=(
            ChildSpec(
                name="bill_item",
                field="items",
                money_fields=_BILL_LINE_MONEY,
                key_fields=_BILL_LINE,
            ),
        ),
        webhook_entity="BILL",
        webhook_events=_CRUD_EVENTS,
        required_fields=("id", "vendor_id", "items", "updated_at"),
        description="One row is a vendor bill (accounts payable document).",
    ),
    EntitySpec(
        name="bill_payment",
        path="/bills/{bill_id}/payments",
        list_key="payments",
        paginated=False,
        parent="bill",
        get_by_id=False,
        money_fields=("amount",),
        key_fields=("bill_id", "status", "date", "account_code"),
        date_field="date",
        required_fields=("id", "bill_id", "amount"),
        description=(
            "One row is a payment of a vendor bill. Rillet has no org-wide feed: payments are "
            "read per bill, for the bills that changed."
        ),
    ),
    EntitySpec(
        name="charge",
        path="/charges",
        list_key="charges",
        paginated=True,
        updated_gt=True,
        has_updated_at=True,
        filters=_eq("subsidiary_id"),
        key_fields=(
            "vendor_id",
            "subsidiary_id",
            "charge_date",
            "impact_date",
            "credit_card_account_code",
            "status",
        ),
        date_field="charge_date",
        children=(
            ChildSpec(
                name="charge_item",
                field="items",
                money_fields=_BILL_LINE_MONEY,
                key_fields=_BILL_LINE,
            ),
        ),
        description="One row is a company credit-card charge.",
    ),
    EntitySpec(
        name="reimbursement",
        path="/reimbursements",
        list_key="reimbursements",
        paginated=True,
        updated_gt=True,
        has_updated_at=True,
        filters=_eq("subsidiary_id"),
        key_fields=("vendor_id", "subsidiary_id", "reimbursement_date", "impact_date", "status"),
        date_field="reimbursement_date",
        children=(
            ChildSpec(
                name="reimbursement_item",
                field="items",
                money_fields=_BILL_LINE_MONEY,
                key_fields=_BILL_LINE,
            ),
        ),
        description="One row is an employee expense reimbursement.",
    ),
    EntitySpec(
        name="journal_entry",
        path="/journal-entries",
        list_key="journal_entries",
        paginated=True,
        updated_gt=True,
        has_updated_at=True,
        sort_by=True,
        filters=(
            *_eq("subsidiary_id"),
            *_POSTING_DATE,
            FilterSpec("account_ids", "items", FilterOp.ANY_LINE_ACCOUNT),
        ),
        key_fields=("subsidiary_id", "name", "date", "currency", "reversal_date"),
        date_field="date",
        children=(
            ChildSpec(
                name="journal_entry_item",
                field="items",
                money_fields=("amount", "original_transaction_amount"),
                key_fields=("account_id", "account_code", "side", "description"),
            ),
        ),
        webhook_entity="JOURNAL_ENTRY",
        webhook_events=_CRUD_EVENTS,
        writes=_FULL_WRITES,
        required_fields=("id", "currency", "date", "items", "updated_at"),
        description="One row is a general-ledger journal entry; its items are debit/credit lines.",
    ),
    EntitySpec(
        name="reporting_journal_entry",
        path="/reports/journal-entries",
        list_key="journal_entries",
        paginated=True,
        updated_gt=True,
        has_updated_at=False,
        sort_by=True,
        get_by_id=False,
        filters=(
            *_eq("subsidiary_id"),
            *_POSTING_DATE,
            FilterSpec("account_ids", "items", FilterOp.ANY_LINE_ACCOUNT),
        ),
        key_fields=("subsidiary_id", "name", "date"),
        date_field="date",
        children=(
            ChildSpec(
                name="reporting_journal_entry_item",
                field="items",
                money_fields=("local_amount", "reporting_amount"),
                key_fields=("account_id", "account_code", "side", "exchange_rate"),
            ),
        ),
        group="rillet_reports",
        required_fields=("id", "date", "items"),
        description=(
            "One row is a journal entry in the organization's reporting currency "
            "(local and reporting amounts per line)."
        ),
    ),
    EntitySpec(
        name="bank_account",
        path="/bank-accounts",
        list_key="accounts",
        paginated=False,
        get_by_id=False,
        filters=_eq("subsidiary_id"),
        key_fields=(
            "name",
            "bank_name",
            "currency",
            "subsidiary_id",
            "account_code",
            "mask",
            "status",
        ),
        description="One row is a bank account connected to Rillet.",
    ),
    EntitySpec(
        name="bank_transaction",
        path="/bank-transactions",
        list_key="bank_transactions",
        paginated=True,
        updated_gt=True,
        has_updated_at=False,
        sort_by=True,
        filters=(*_eq("bank_account_id", "subsidiary_id"), *_POSTING_DATE),
        money_fields=("net_amount", "fee"),
        key_fields=(
            "bank_account_id",
            "subsidiary_id",
            "date",
            "name",
            "merchant",
            "pending",
            "excluded",
        ),
        date_field="date",
        description="One row is a bank-feed transaction of a connected bank account.",
    ),
    EntitySpec(
        name="tax_rate",
        path="/tax-rates",
        list_key="tax_rates",
        paginated=False,
        get_by_id=False,
        filters=_eq("country"),
        key_fields=("code", "country", "description", "percentage"),
        description="One row is a sales or VAT tax rate.",
    ),
    EntitySpec(
        name="field",
        path="/fields",
        list_key="fields",
        paginated=False,
        updated_gt=True,
        has_updated_at=True,
        get_by_id=False,
        key_fields=("name",),
        children=(
            ChildSpec(name="field_value", field="values", key_fields=("name", "deactivated")),
        ),
        description="One row is a custom field (dimension) with its allowed values.",
    ),
    EntitySpec(
        name="book_period",
        path="/books/periods/last-closed",
        list_key=None,
        paginated=False,
        single=True,
        not_found_means_empty=True,
        get_by_id=False,
        key_fields=("start", "end", "status", "closed_on"),
        group="rillet_reports",
        description="One row is the last closed accounting period (404 means none closed yet).",
    ),
)


@dataclass(frozen=True)
class ReportSpec:
    """A Rillet financial report endpoint (a snapshot, not a list of records)."""

    name: str
    path: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    description: str
    rows_key: str  # where the report's rows live in the response
    paginated: bool = False

    @property
    def params(self) -> frozenset[str]:
        base = set(self.required) | set(self.optional)
        if self.paginated:
            base |= {"limit", "cursor"}
        return frozenset(base)


_STATEMENT_OPTIONS = ("subsidiary_id", "breakdown_by", "custom_field_id")

REPORTS: tuple[ReportSpec, ...] = (
    ReportSpec(
        name="trial_balance",
        path="/reports/trial-balance",
        required=("from_date", "to_date"),
        optional=("subsidiary_id",),
        rows_key="accounts",
        description="Per account: beginning balance, debits, credits and ending balance.",
    ),
    ReportSpec(
        name="balance_sheet",
        path="/reports/balance-sheet",
        required=("as_of_date",),
        optional=("subsidiary_id", "breakdown_by"),
        rows_key="sections",
        description="Assets, liabilities and equity as of a date.",
    ),
    ReportSpec(
        name="income_statement",
        path="/reports/income-statement",
        required=("from_date", "to_date"),
        optional=_STATEMENT_OPTIONS,
        rows_key="sections",
        description="Income and expenses over a period, with net income.",
    ),
    ReportSpec(
        name="cash_flow_statement",
        path="/reports/cash-flow-statement",
        required=("from_date", "to_date"),
        optional=_STATEMENT_OPTIONS,
        rows_key="sections",
        description="Operating, investing and financing cash flows over a period (indirect).",
    ),
    ReportSpec(
        name="executive_pl",
        path="/reports/executive-pl",
        required=("from_date", "to_date"),
        optional=_STATEMENT_OPTIONS,
        rows_key="sections",
        description="Management P&L: revenue, cost of revenue, gross profit, operating expenses.",
    ),
    ReportSpec(
        name="arr_waterfall",
        path="/reports/arr-waterfall",
        required=("month", "status", "breakdown"),
        optional=("subsidiary_id",),
        rows_key="customers",
        paginated=True,
        description="Annual (or monthly) recurring revenue per customer for a month.",
    ),
)

ENTITY_BY_NAME: dict[str, EntitySpec] = {e.name: e for e in ENTITIES}
REPORT_BY_NAME: dict[str, ReportSpec] = {r.name: r for r in REPORTS}
WEBHOOK_ENTITY: dict[str, EntitySpec] = {e.webhook_entity: e for e in ENTITIES if e.webhook_entity}

MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 25
API_VERSIONS = (1, 2, 3, 4)
DEFAULT_API_VERSION = 4


def plural(name: str) -> str:
    """The warehouse table of an entity: ``journal_entry`` -> ``journal_entries``."""
    if name.endswith("y") and name[-2:-1] not in ("a", "e", "i", "o", "u"):
        return name[:-1] + "ies"
    if name.endswith(("s", "x", "z", "ch", "sh")):
        return name + "es"
    return name + "s"


def entity(name: str) -> EntitySpec:
    """The catalog entry called ``name``; a clear error names the known ones otherwise."""
    try:
        return ENTITY_BY_NAME[name]
    except KeyError:
        known = ", ".join(sorted(ENTITY_BY_NAME))
        raise KeyError(f"unknown Rillet entity {name!r}; the catalog knows: {known}") from None


def report(name: str) -> ReportSpec:
    try:
        return REPORT_BY_NAME[name]
    except KeyError:
        known = ", ".join(sorted(REPORT_BY_NAME))
        raise KeyError(f"unknown Rillet report {name!r}; the catalog knows: {known}") from None


def webhook_entity(header_value: str) -> EntitySpec | None:
    """Match an ``X-Rillet-Entity`` value case-insensitively, upper or lower-dashed form."""
    return WEBHOOK_ENTITY.get(header_value.strip().upper().replace("-", "_"))
