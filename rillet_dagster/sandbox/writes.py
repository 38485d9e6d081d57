"""API writes against the simulated organization: customers, invoices and their payments, credit
memos and their applications, and manual journal entries.

Every public :class:`Writer` method holds the store lock for its whole run and validates the
request completely before it changes anything, so a refused request leaves the store, the ledger
and the notification stream exactly as they were. A money-moving document owns exactly one
journal entry (``World.posting_of``); the entry is created, replaced and deleted together with its
document so that reports computed from the ledger always agree with the documents.

Shapes and rules follow ``shared/rillet-api.md`` sections 2.4, 3.1, 5 and 7: creates answer the
object, deletes answer nothing (the HTTP layer sends 204), ``PUT`` is a full replacement, money is
``{"amount": "<decimal string>", "currency": "XXX"}`` and errors carry ``violations`` of
``{field, message}``.
"""

from __future__ import annotations

import copy
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation, localcontext
from typing import Any

from rillet_dagster.clock import Clock
from rillet_dagster.rillet.money import Money, is_currency_code, minor_units, money_json
from rillet_dagster.sandbox import postings
from rillet_dagster.sandbox.data import World, invoice_status
from rillet_dagster.sandbox.postings import PostingLine

Json = dict[str, Any]

# (method, path template) -> Writer method. Path parameters are passed by these names as keyword
# arguments, and the parsed JSON body as ``body`` to the methods that take one.
WRITE_ROUTES: dict[tuple[str, str], str] = {
    ("POST", "/customers"): "create_customer",
    ("PUT", "/customers/{id}"): "replace_customer",
    ("DELETE", "/customers/{id}"): "delete_customer",
    ("POST", "/invoices"): "create_invoice",
    ("PUT", "/invoices/{id}"): "replace_invoice",
    ("DELETE", "/invoices/{id}"): "delete_invoice",
    ("POST", "/invoices/{invoice_id}/payments"): "create_invoice_payment",
    ("PUT", "/invoices/{invoice_id}/payments/{payment_id}"): "replace_invoice_payment",
    ("DELETE", "/invoices/{invoice_id}/payments/{payment_id}"): "delete_invoice_payment",
    ("POST", "/credit-memos"): "create_credit_memo",
    ("PUT", "/credit-memos/{id}"): "replace_credit_memo",
    ("DELETE", "/credit-memos/{id}"): "delete_credit_memo",
    ("POST", "/credit-memos/{id}/applications"): "apply_credit_memo",
    ("DELETE", "/credit-memos/{id}/applications"): "delete_credit_memo_applications",
    ("POST", "/journal-entries"): "create_journal_entry",
    ("PUT", "/journal-entries/{id}"): "replace_journal_entry",
    ("DELETE", "/journal-entries/{id}"): "delete_journal_entry",
}

EMAIL_TYPES = ("MAIN_SENDER", "CC", "BCC")
REVENUE_PATTERNS = ("DAILY", "EVEN_PERIOD")
INVOICE_SCOPES = ("FULL", "AR_ONLY", "REVENUE_RECOGNITION_ONLY")
SIDES = ("DEBIT", "CREDIT")
RELATED_TYPES = {"CUSTOMER": "customer", "VENDOR": "vendor"}
CASH_SUBTYPES = ("Cash", "Bank")
# Payments that never arrived do not reduce what is owed.
_UNPAID_PAYMENT_STATUSES = frozenset({"FAILED"})
# Documents that post a journal entry, and how to name one in an error message.
_DOCUMENTS: tuple[tuple[str, str, str | None, str], ...] = (
    ("invoice", "invoice", "invoice_number", "/invoices/{id}"),
    ("invoice_payment", "invoice payment", None, "/invoices/{invoice_id}/payments/{id}"),
    ("credit_memo", "credit memo", "credit_memo_number", "/credit-memos/{id}"),
    ("bill", "bill", "expense_number", "/bills/{id}"),
    ("bill_payment", "bill payment", None, "/bills/{bill_id}/payments/{id}"),
    ("charge", "charge", None, "/charges/{id}"),
    ("reimbursement", "reimbursement", None, "/reimbursements/{id}"),
    ("vendor_credit", "vendor credit", "credit_number", "/vendor-credits/{id}"),
)

_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?")
_COUNTRY = re.compile(r"[A-Z]{2}")
# Unit prices are not RoundedMonetaryAmount (usage is priced in fractions of a cent); this bounds
# them to something a person would type.
_UNIT_PRICE_DECIMALS = 10
_RATE_QUANTUM = Decimal(1).scaleb(-_UNIT_PRICE_DECIMALS)
# Bounds that keep every minor-unit sum inside the ledger's int64 columns and every product of
# price and quantity exact.
_MAX_AMOUNT = Decimal(10) ** 13
_MAX_QUANTITY = Decimal(10) ** 9
# Enough digits for a 13-digit amount with 10 decimals times a 9-digit quantity, exactly.
_PRECISION = 60


# ---- errors ------------------------------------------------------------------------------------


class WriteError(Exception):
    """A refused write, rendered by the HTTP layer as an RFC 9457 problem."""

    status: int = 400
    title: str = "Bad Request"
    slug: str = "bad-request"

    def __init__(self, detail: str, violations: Iterable[Mapping[str, str]] = ()) -> None:
        super().__init__(detail)
        self.detail = detail
        self.violations: list[dict[str, str]] = [dict(v) for v in violations]


class ValidationFailed(WriteError):
    """The request body breaks one or more rules; every broken rule is listed."""

    status = 400
    title = "Validation failed"
    slug = "validation-failed"

    def __init__(self, violations: Iterable[Mapping[str, str]]) -> None:
        found = [dict(v) for v in violations]
        summary = "; ".join(f"{v['field'] or 'body'}: {v['message']}" for v in found)
        super().__init__(summary, found)


class NotFound(WriteError):
    """An id in the request path names nothing."""

    status = 404
    title = "Not Found"
    slug = "not-found"

    def __init__(self, what: str, record_id: str, field: str) -> None:
        message = f"no {what} with id {record_id!r}"
        super().__init__(message, [{"field": field, "message": message}])


class Refused(WriteError):
    """The path's resource is in a state that forbids the operation (whatever the body says)."""

    status = 400
    title = "Request refused"
    slug = "refused"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message, [{"field": field, "message": message}])


# ---- request parsing -------------------------------------------------------------------------


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _show(minor: int, currency: str) -> str:
    return money_json(minor, currency)["amount"]


def _to_minor(money: Money) -> int:
    return Money(money.amount, money.currency).to_minor()


def _round_minor(amount: Decimal, currency: str) -> int:
    """Half-even to the currency's decimals, as Rillet rounds line amounts."""
    with localcontext(prec=_PRECISION):
        return Money(amount, currency).rounded().to_minor()


def _product(left: Decimal, right: Decimal) -> Decimal:
    with localcontext(prec=_PRECISION):
        return left * right


@dataclass(frozen=True)
class _Priced:
    """A money value's currency and where it came from, for the later currency check."""

    path: str
    currency: str


class _Check:
    """Reads a request body field by field, collecting every violation instead of stopping."""

    def __init__(self) -> None:
        self.violations: list[dict[str, str]] = []
        self.priced: list[_Priced] = []

    def add(self, field: str, message: str) -> None:
        self.violations.append({"field": field, "message": message})

    @property
    def ok(self) -> bool:
        return not self.violations

    def raise_if_any(self) -> None:
        if self.violations:
            raise ValidationFailed(self.violations)

    def body(self, body: Any) -> Json:
        if not isinstance(body, dict):
            self.add("", "the request body must be a JSON object")
            return {}
        return body

    def _missing(self, path: str, key: str, required: bool) -> None:
        if required:
            self.add(path, f"{key} must not be null")

    def text(
        self, obj: Mapping[str, Any], key: str, path: str, *, required: bool = False
    ) -> str | None:
        """A trimmed string; blank counts as absent."""
        where = _join(path, key)
        value = obj.get(key)
        if value is None:
            self._missing(where, key, required)
            return None
        if not isinstance(value, str):
            self.add(where, f"{key} must be a string")
            return None
        value = value.strip()
        if not value:
            if required:
                self.add(where, f"{key} must not be blank")
            return None
        return value

    def day(
        self, obj: Mapping[str, Any], key: str, path: str, *, required: bool = False
    ) -> date | None:
        where = _join(path, key)
        value = obj.get(key)
        if value is None:
            self._missing(where, key, required)
            return None
        text = value.strip() if isinstance(value, str) else None
        if text is None or not _DATE.fullmatch(text):
            self.add(where, f"{key} {value!r} must be a date in YYYY-MM-DD form")
            return None
        try:
            return date.fromisoformat(text)
        except ValueError:
            self.add(where, f"{key} {value!r} is not a calendar date")
            return None

    def choice(
        self,
        obj: Mapping[str, Any],
        key: str,
        path: str,
        options: Iterable[str],
        *,
        required: bool = False,
    ) -> str | None:
        value = self.text(obj, key, path, required=required)
        allowed = tuple(options)
        if value is not None and value not in allowed:
            self.add(_join(path, key), f"{key} {value!r} must be one of {', '.join(allowed)}")
            return None
        return value

    def boolean(self, obj: Mapping[str, Any], key: str, path: str) -> bool | None:
        value = obj.get(key)
        if value is None:
            return None
        if not isinstance(value, bool):
            self.add(_join(path, key), f"{key} must be true or false")
            return None
        return value

    def integer(
        self, obj: Mapping[str, Any], key: str, path: str, low: int, high: int
    ) -> int | None:
        value = obj.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.add(_join(path, key), f"{key} must be a whole number from {low} to {high}")
            return None
        return value

    def number(
        self, obj: Mapping[str, Any], key: str, path: str, *, required: bool = False
    ) -> Decimal | None:
        """A JSON number (quantities), read exactly: floats through their shortest text."""
        where = _join(path, key)
        value = obj.get(key)
        if value is None:
            self._missing(where, key, required)
            return None
        if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
            self.add(where, f"{key} must be a JSON number")
            return None
        number = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
        if not number.is_finite() or abs(number) >= _MAX_QUANTITY:
            self.add(where, f"{key} must be a finite number below {_MAX_QUANTITY:,}")
            return None
        return number

    def objects(
        self, obj: Mapping[str, Any], key: str, path: str, *, required: bool = False
    ) -> list[tuple[str, Json]]:
        """A list of objects, each with its own path (``items[2]``)."""
        where = _join(path, key)
        value = obj.get(key)
        if value is None:
            self._missing(where, key, required)
            return []
        if not isinstance(value, list):
            self.add(where, f"{key} must be a list")
            return []
        found = []
        for index, element in enumerate(value):
            element_path = f"{where}[{index}]"
            if isinstance(element, dict):
                found.append((element_path, element))
            else:
                self.add(element_path, "each element must be an object")
        return found

    def mapping(
        self, obj: Mapping[str, Any], key: str, path: str, *, required: bool = False
    ) -> Json | None:
        where = _join(path, key)
        value = obj.get(key)
        if value is None:
            self._missing(where, key, required)
            return None
        if not isinstance(value, dict):
            self.add(where, f"{key} must be an object")
            return None
        return value

    def money(
        self,
        obj: Mapping[str, Any],
        key: str,
        path: str,
        *,
        required: bool = False,
        max_decimals: int | None = None,
    ) -> Money | None:
        """A Rillet money object: decimal-string amount, ISO 4217 currency, bounded decimals.

        ``max_decimals`` None means the currency's own decimals (RoundedMonetaryAmount).
        """
        where = _join(path, key)
        value = obj.get(key)
        if value is None:
            self._missing(where, key, required)
            return None
        if not isinstance(value, dict):
            example = '{"amount": "10.00", "currency": "USD"}'
            self.add(where, f"{key} must be an object like {example}")
            return None
        currency = self.currency_code(value.get("currency"), _join(where, "currency"))
        amount = self._amount(value.get("amount"), _join(where, "amount"))
        if currency is not None:
            # Checked against the document's currency even when the amount is unusable, so
            # that one answer lists every problem.
            self.priced.append(_Priced(where, currency))
        if currency is None or amount is None:
            return None
        if abs(amount) >= _MAX_AMOUNT:
            self.add(
                _join(where, "amount"),
                f"amount {value['amount'].strip()} is too large (at most 13 digits before the "
                "decimal point)",
            )
            return None
        allowed = minor_units(currency) if max_decimals is None else max_decimals
        if -amount.normalize().as_tuple().exponent > allowed:
            self.add(
                _join(where, "amount"),
                f"amount {value['amount'].strip()} has more decimals than "
                f"{currency if max_decimals is None else 'a unit price'} allows ({allowed})",
            )
            return None
        return Money(amount, currency)

    def currency_code(self, value: Any, where: str) -> str | None:
        if value is None:
            self.add(where, "currency must not be null")
            return None
        code = value.strip() if isinstance(value, str) else value
        if not is_currency_code(code):
            self.add(where, f"currency {value!r} is not an ISO 4217 code like USD")
            return None
        return str(code)

    def _amount(self, value: Any, where: str) -> Decimal | None:
        if value is None:
            self.add(where, "amount must not be null")
            return None
        if not isinstance(value, str):
            numeric = isinstance(value, int | float | Decimal) and not isinstance(value, bool)
            self.add(
                where,
                f'amount must be a decimal string like "{value if numeric else "10.00"}", '
                f"not a JSON {_kind(value)}",
            )
            return None
        text = value.strip()
        if not _DECIMAL.fullmatch(text):
            self.add(where, f'amount {value!r} is not a decimal number like "10.00"')
            return None
        return Decimal(text)

    def currencies(self, expected: str, owner: str, since: int = 0) -> None:
        """Every money value parsed after ``since`` must be in ``expected``."""
        for priced in self.priced[since:]:
            if priced.currency != expected:
                self.add(
                    _join(priced.path, "currency"),
                    f"currency {priced.currency} does not match {owner} {expected}",
                )

    def positive(self, money: Money | None, path: str) -> None:
        if money is not None and money.amount <= 0:
            self.add(_join(path, "amount"), f"amount {money.amount} must be greater than 0")

    def not_negative(self, money: Money | None, path: str) -> None:
        if money is not None and money.amount < 0:
            self.add(_join(path, "amount"), f"amount {money.amount} must not be negative")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float | Decimal):
        return "number"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _quantity_json(quantity: Decimal) -> int | float:
    """Quantities are JSON numbers; whole ones stay integers, as the generator writes them."""
    if quantity == quantity.to_integral_value():
        return int(quantity)
    return float(quantity)


# ---- the writer --------------------------------------------------------------------------------


@dataclass
class _Event:
    entity: str
    event: str
    body: Json | str


class Writer:
    """Applies API writes to a :class:`World`, keeping documents, ledger and webhooks in step."""

    def __init__(self, world: World, clock: Clock) -> None:
        self.world = world
        self.clock = clock
        self.store = world.store
        self.ledger = world.ledger
        self._subsidiaries = {s["id"]: s for s in world.subsidiaries}

    # ---- customers -------------------------------------------------------------------------

    def create_customer(self, body: Any) -> Json:
        with self.store.lock:
            fields = self._customer_fields(body)
            text, us = self._stamp()
            record = {"id": self.world.new_id(), "updated_at": text, **fields}
            self.store["customer"].insert(record, us)
            self._emit([_Event("customer", "CREATED", record)])
            return copy.deepcopy(record)

    def replace_customer(self, id: str, body: Any) -> Json:
        with self.store.lock:
            self._get("customer", id, "customer", "id")
            fields = self._customer_fields(body)
            text, us = self._stamp()
            record = {"id": id, "updated_at": text, **fields}
            self._replace("customer", record, us)
            self._emit([_Event("customer", "UPDATED", record)])
            return copy.deepcopy(record)

    def delete_customer(self, id: str) -> None:
        with self.store.lock:
            customer = self._get("customer", id, "customer", "id")
            users = []
            for entity, label, number in (
                ("invoice", "invoice", "invoice_number"),
                ("credit_memo", "credit memo", "credit_memo_number"),
                ("contract", "contract", "name"),
            ):
                found = [r for r in self.store[entity].all_records() if r["customer_id"] == id]
                if found:
                    example = found[-1].get(number) or found[-1]["id"]
                    users.append(f"{len(found)} {label}(s) (e.g. {example})")
            if users:
                raise Refused(
                    "id",
                    f"customer {customer['name']} still has {', '.join(users)}; delete those first",
                )
            _, us = self._stamp()
            self._delete("customer", id, us)
            self._emit([_Event("customer", "DELETED", id)])

    def _customer_fields(self, body: Any) -> Json:
        check = _Check()
        data = check.body(body)
        name = check.text(data, "name", "", required=True)
        emails = []
        for path, entry in check.objects(data, "emails", ""):
            email = check.text(entry, "email", path, required=True)
            if email is not None and "@" not in email:
                check.add(_join(path, "email"), f"email {email!r} is not an email address")
            kind = check.choice(entry, "type", path, EMAIL_TYPES, required=True)
            emails.append({"email": email, "type": kind})
        record = {
            "name": name,
            "name_on_invoice": check.text(data, "name_on_invoice", ""),
            "address": self._address(check, data, "address"),
            "shipping_address": self._address(check, data, "shipping_address"),
            "emails": emails,
            "external_references": self._references(check, data, ""),
            "payment_terms": check.integer(data, "payment_terms", "", 0, 365),
            "send_invoices_automatically": bool(
                check.boolean(data, "send_invoices_automatically", "")
            ),
            "send_payment_reminders": bool(check.boolean(data, "send_payment_reminders", "")),
            "fields": self._fields(check, data, ""),
        }
        check.raise_if_any()
        return record

    def _address(self, check: _Check, data: Mapping[str, Any], key: str) -> Json | None:
        value = check.mapping(data, key, "")
        if value is None:
            return None
        address = {}
        for part in ("line1", "line2", "city", "state", "zip_code", "country"):
            raw = value.get(part)
            if part != "line2" and (raw is None or (isinstance(raw, str) and not raw.strip())):
                check.add(
                    _join(key, part),
                    f"{part} is required when {key} is given ({key} is all-or-nothing: "
                    "line1, city, state, zip_code and country)",
                )
                address[part] = None
            else:
                address[part] = check.text(value, part, key)
        country = address["country"]
        if country is not None and not _COUNTRY.fullmatch(country):
            check.add(
                _join(key, "country"),
                f"country {country!r} must be an ISO 3166-1 alpha-2 code like US",
            )
        return address

    def _references(self, check: _Check, data: Mapping[str, Any], path: str) -> list[Json]:
        references = []
        for ref_path, ref in check.objects(data, "external_references", path):
            entry = {
                "type": check.text(ref, "type", ref_path, required=True),
                "id": check.text(ref, "id", ref_path, required=True),
            }
            url = check.text(ref, "url", ref_path)
            if url is not None:
                entry["url"] = url
            references.append(entry)
        return references

    def _fields(self, check: _Check, data: Mapping[str, Any], path: str) -> list[Json]:
        chosen = []
        for field_path, entry in check.objects(data, "fields", path):
            field_id = check.text(entry, "field_id", field_path, required=True)
            value_id = check.text(entry, "field_value_id", field_path, required=True)
            if field_id is None or value_id is None:
                continue
            field = self.store["field"].get(field_id)
            if field is None:
                check.add(_join(field_path, "field_id"), f"no field with id {field_id!r}")
                continue
            value = next((v for v in field["values"] if v["id"] == value_id), None)
            if value is None:
                check.add(
                    _join(field_path, "field_value_id"),
                    f"field {field['name']} has no value with id {value_id!r}",
                )
            elif value.get("deactivated"):
                check.add(
                    _join(field_path, "field_value_id"),
                    f"value {value['name']} of field {field['name']} is deactivated",
                )
            chosen.append({"field_id": field_id, "field_value_id": value_id})
        return chosen

    # ---- invoices --------------------------------------------------------------------------

    def create_invoice(self, body: Any) -> Json:
        with self.store.lock:
            invoice = self._invoice_record(body, existing=None, paid=0, credited=0)
            text, us = self._stamp()
            invoice["updated_at"] = text
            entry = self._invoice_entry(invoice, self.world.new_id(), text)
            self.store["invoice"].insert(invoice, us)
            self._create_entry(invoice["id"], entry, us)
            self._emit(
                [_Event("invoice", "CREATED", invoice), _Event("journal_entry", "CREATED", entry)]
            )
            return copy.deepcopy(invoice)

    def replace_invoice(self, id: str, body: Any) -> Json:
        with self.store.lock:
            existing = self._get("invoice", id, "invoice", "id")
            paid = self._paid(id)
            credited = self._credit_totals().get(id, 0)
            invoice = self._invoice_record(body, existing=existing, paid=paid, credited=credited)
            text, us = self._stamp()
            invoice["updated_at"] = text
            entry = self._invoice_entry(invoice, self._entry_id_of(id), text)
            self._replace("invoice", invoice, us)
            entry_event = self._write_document_entry(id, entry, us)
            self._emit([_Event("invoice", "UPDATED", invoice), entry_event])
            return copy.deepcopy(invoice)

    def delete_invoice(self, id: str) -> None:
        with self.store.lock:
            invoice = self._get("invoice", id, "invoice", "id")
            number = invoice["invoice_number"]
            payments = self._payments(id)
            if payments:
                raise Refused(
                    "id",
                    f"invoice {number} has {len(payments)} payment(s); an invoice with payments "
                    "cannot be deleted (delete its UNCLEARED payments first)",
                )
            memos = [m["credit_memo_number"] for m in self._memos_applied_to(id)]
            if memos:
                raise Refused(
                    "id",
                    f"invoice {number} has credit memo(s) {', '.join(memos)} applied; remove "
                    "those applications first (POST /credit-memos/{id}/applications)",
                )
            _, us = self._stamp()
            self._delete("invoice", id, us)
            events = [_Event("invoice", "DELETED", id)]
            events += self._delete_entry_of(id, us)
            self.world.payments_of.pop(id, None)
            self._emit(events)

    def _invoice_record(
        self, body: Any, *, existing: Json | None, paid: int, credited: int
    ) -> Json:
        check = _Check()
        data = check.body(body)
        customer_id = check.text(data, "customer_id", "", required=True)
        customer = None
        if customer_id is not None:
            customer = self.store["customer"].get(customer_id)
            if customer is None:
                check.add("customer_id", f"no customer with id {customer_id!r}")
        subsidiary = self._subsidiary(check, data)
        invoice_date = check.day(data, "invoice_date", "", required=True)
        due_date = check.day(data, "due_date", "")
        scope = check.choice(data, "scope", "", INVOICE_SCOPES)
        raw_items = check.objects(data, "items", "", required=True)
        if "items" in data and isinstance(data["items"], list) and not data["items"]:
            check.add("items", "items must not be empty: an invoice needs at least one line")
        if scope is None and "scope" not in data:
            scope = _infer_scope(raw_items)
        number = check.text(data, "invoice_number", "")
        if number is None and scope in ("AR_ONLY", "REVENUE_RECOGNITION_ONLY"):
            check.add("invoice_number", f"invoice_number must not be null for {scope} invoices")
        money_start = len(check.priced)
        items = [
            self._invoice_item(check, path, item, scope or "FULL", invoice_date)
            for path, item in raw_items
        ]
        memo = check.text(data, "memo", "")
        purchase_order = check.text(data, "purchase_order_number", "")
        references = self._references(check, data, "")
        if subsidiary is not None:
            check.currencies(subsidiary["currency"], "the subsidiary's currency", since=money_start)
        if number is not None:
            clash = self._number_taken("invoice", "invoice_number", number, existing)
            if clash:
                check.add("invoice_number", f"invoice_number {number} is already used ({clash})")
        if existing is not None and (paid or credited):
            self._keep_links(check, existing, customer_id, subsidiary, "payments or credits")
        if due_date is not None and invoice_date is not None and due_date < invoice_date:
            check.add(
                "due_date",
                f"due_date {due_date} is before invoice_date {invoice_date}",
            )
        check.raise_if_any()
        assert customer is not None
        assert subsidiary is not None
        assert invoice_date is not None
        currency = subsidiary["currency"]
        subtotal = sum(i["_gross"] for i in items)
        tax = sum(i["_tax"] for i in items)
        total = subtotal + tax
        if total <= 0:
            check.add("items", f"the invoice total {_show(total, currency)} must be more than 0")
        if total < paid + credited:
            check.add(
                "items",
                f"the new total {_show(total, currency)} {currency} is below the "
                f"{_show(paid + credited, currency)} already paid and credited; lower the "
                "payments or credit applications first",
            )
        check.raise_if_any()
        if due_date is None:
            if scope in ("AR_ONLY", "REVENUE_RECOGNITION_ONLY"):
                # Reference section 5: for these scopes due_date defaults to invoice_date.
                due_date = invoice_date
            else:
                due_date = invoice_date + timedelta(days=int(customer.get("payment_terms") or 0))
        if number is None:
            number = self._next_number("invoice", "invoice_number", "INV-API-")
        record = {
            "id": existing["id"] if existing else self.world.new_id(),
            "subsidiary_id": subsidiary["id"],
            "invoice_number": number,
            "customer_id": customer["id"],
            "contract_id": existing.get("contract_id") if existing else None,
            "items": self._finish_lines(items),
            "invoice_date": invoice_date.isoformat(),
            "due_date": due_date.isoformat(),
            "payment_terms": (due_date - invoice_date).days,
            "status": "UNPAID",
            "subtotal": money_json(subtotal, currency),
            "total_discount": money_json(0, currency),
            "taxed_amount": money_json(tax, currency),
            "net_amount": money_json(subtotal, currency),
            "total": money_json(total, currency),
            "amount_due": money_json(total, currency),
            "overdue": False,
            "purchase_order_number": purchase_order,
            "memo": memo,
            "exchange_rate": None,
            "address": None,
            "customer_address": copy.deepcopy(customer.get("address")),
            "shipping_address": copy.deepcopy(customer.get("shipping_address")),
            "bank_account": None,
            "external_references": references,
            "updated_at": "",
            "sent_at": existing.get("sent_at") if existing else None,
        }
        return self._settled(record, paid=paid, credited=credited)

    def _invoice_item(
        self,
        check: _Check,
        path: str,
        item: Json,
        scope: str,
        invoice_date: date | None,
    ) -> Json:
        price = item.get("price") if isinstance(item.get("price"), dict) else None
        # OAS nests product_id and quantity in price for FULL invoices; accept either place.
        source = item if "product_id" in item or price is None else price
        product = self._product(check, source, path)
        source = item if "quantity" in item or price is None else price
        quantity = check.number(source, "quantity", path, required=True)
        if quantity is not None and quantity <= 0:
            check.add(_join(path, "quantity"), f"quantity {quantity} must be greater than 0")
            quantity = None
        description = check.text(item, "description", path)
        gross: int | None = None
        rate: Decimal | None = None
        currency: str | None = None
        if scope == "FULL":
            if "total_amount" in item and item.get("price") is None:
                check.add(
                    _join(path, "price"),
                    "price must not be null for a FULL invoice (total_amount is for AR_ONLY "
                    "and REVENUE_RECOGNITION_ONLY invoices)",
                )
            else:
                price_obj = check.mapping(item, "price", path, required=True)
                if price_obj is not None:
                    unit = check.money(
                        price_obj,
                        "amount_per_unit",
                        _join(path, "price"),
                        required=True,
                        max_decimals=_UNIT_PRICE_DECIMALS,
                    )
                    check.not_negative(unit, _join(path, "price.amount_per_unit"))
                    if unit is not None and quantity is not None:
                        currency = unit.currency
                        rate = unit.amount
                        gross = _round_minor(_product(unit.amount, quantity), currency)
        else:
            if "price" in item and item.get("total_amount") is None:
                check.add(
                    _join(path, "total_amount"),
                    f"total_amount must not be null for a {scope} invoice (price is for FULL "
                    "invoices)",
                )
            else:
                total = check.money(item, "total_amount", path, required=True)
                check.not_negative(total, _join(path, "total_amount"))
                if total is not None and quantity is not None:
                    currency = total.currency
                    gross = _to_minor(total)
                    with localcontext(prec=_PRECISION):
                        rate = (total.amount / quantity).quantize(_RATE_QUANTUM, ROUND_HALF_EVEN)
        tax_money = check.money(item, "tax_amount", path)
        check.not_negative(tax_money, _join(path, "tax_amount"))
        revenue = self._revenue(check, item, path, product, invoice_date)
        references = self._references(check, item, path)
        fields = self._fields(check, item, path)
        if product is None or gross is None or rate is None or currency is None:
            return {"_gross": 0, "_tax": 0}
        tax = _to_minor(tax_money) if tax_money is not None else 0
        assert quantity is not None
        return {
            "id": "",
            "product_id": product["id"],
            "description": description or product["name"],
            "quantity": _quantity_json(quantity),
            "revenue": revenue,
            "total_amount": money_json(gross, currency),
            "total_discount": money_json(0, currency),
            "taxed_amount": money_json(tax, currency),
            "gross_rate": {"amount": format(rate.normalize(), "f"), "currency": currency},
            "external_references": references,
            "fields": fields,
            "_gross": gross,
            "_tax": tax,
        }

    def _product(self, check: _Check, source: Mapping[str, Any], path: str) -> Json | None:
        product_id = check.text(source, "product_id", path, required=True)
        if product_id is None:
            return None
        product = self.store["product"].get(product_id)
        if product is None:
            check.add(_join(path, "product_id"), f"no product with id {product_id!r}")
        return product

    def _revenue(
        self,
        check: _Check,
        item: Mapping[str, Any],
        path: str,
        product: Json | None,
        document_date: date | None,
    ) -> Json | None:
        where = _join(path, "revenue")
        revenue = check.mapping(item, "revenue", path) or {}
        start = end = document_date
        period = check.mapping(revenue, "period", where)
        if period is not None:
            start = check.day(period, "start", _join(where, "period"), required=True)
            end = check.day(period, "end", _join(where, "period"), required=True)
            if start is not None and end is not None and end < start:
                check.add(_join(where, "period.end"), f"end {end} is before start {start}")
        pattern = check.choice(revenue, "pattern", where, REVENUE_PATTERNS)
        code = check.text(revenue, "account_code", where)
        if code is not None:
            account = self.world.accounts_by_code.get(code)
            if account is None:
                check.add(_join(where, "account_code"), f"no account with code {code!r}")
            elif account["type"] != "INCOME":
                check.add(
                    _join(where, "account_code"),
                    f"account {code} ({account['name']}) is {account['type']}; revenue must go "
                    "to an INCOME account",
                )
        if product is None or start is None or end is None:
            return None
        return {
            "period": {"start": start.isoformat(), "end": end.isoformat()},
            "pattern": pattern or product["revenue_pattern"],
            "account_code": code or product["account_code"],
        }

    def _subsidiary(self, check: _Check, data: Mapping[str, Any]) -> Json | None:
        if data.get("subsidiary_id") is None:
            return self.world.subsidiaries[0]
        subsidiary_id = check.text(data, "subsidiary_id", "", required=True)
        if subsidiary_id is None:
            return None
        subsidiary = self._subsidiaries.get(subsidiary_id)
        if subsidiary is None:
            check.add("subsidiary_id", f"no subsidiary with id {subsidiary_id!r}")
        return subsidiary

    def _keep_links(
        self,
        check: _Check,
        existing: Json,
        customer_id: str | None,
        subsidiary: Json | None,
        because: str,
    ) -> None:
        """A document others point at must keep its customer and subsidiary."""
        if customer_id is not None and customer_id != existing["customer_id"]:
            check.add(
                "customer_id",
                f"customer_id cannot change while the document has {because}; "
                f"keep {existing['customer_id']}",
            )
        if subsidiary is not None and subsidiary["id"] != existing["subsidiary_id"]:
            check.add(
                "subsidiary_id",
                f"subsidiary_id cannot change while the document has {because}; "
                f"keep {existing['subsidiary_id']}",
            )

    def _invoice_entry(self, invoice: Json, entry_id: str, updated_at: str) -> Json:
        return self._entry_for(
            entry_id=entry_id,
            name=f"Invoice {invoice['invoice_number']}",
            subsidiary_id=invoice["subsidiary_id"],
            posted=invoice["invoice_date"],
            lines=postings.invoice_lines(invoice),
            updated_at=updated_at,
            related={"id": invoice["customer_id"], "type": "CUSTOMER"},
        )

    def _settled(self, invoice: Json, *, paid: int, credited: int) -> Json:
        """The invoice with amount_due, status and overdue derived from payments and credits."""
        currency = invoice["total"]["currency"]
        total = postings.minor(invoice["total"])
        due = total - paid - credited
        result = dict(invoice)
        result["amount_due"] = money_json(due, currency)
        result["status"] = invoice_status(total, paid, credited)
        result["overdue"] = due > 0 and date.fromisoformat(invoice["due_date"]) < self._today()
        return result

    def _payments(self, invoice_id: str) -> list[Json]:
        payments = self.store["invoice_payment"]
        found = (payments.get(pid) for pid in self.world.payments_of.get(invoice_id, ()))
        return [p for p in found if p is not None]

    def _paid(self, invoice_id: str, *, without: str | None = None) -> int:
        return sum(
            postings.minor(p["amount"])
            for p in self._payments(invoice_id)
            if p["id"] != without and p["status"] not in _UNPAID_PAYMENT_STATUSES
        )

    def _credit_totals(self) -> dict[str, int]:
        totals: dict[str, int] = defaultdict(int)
        for memo in self.store["credit_memo"].all_records():
            for application in memo["applications"]:
                totals[application["invoice_id"]] += postings.minor(application["amount"])
        return totals

    def _memos_applied_to(self, invoice_id: str) -> list[Json]:
        return [
            memo
            for memo in self.store["credit_memo"].all_records()
            if any(a["invoice_id"] == invoice_id for a in memo["applications"])
        ]

    # ---- invoice payments ------------------------------------------------------------------

    def create_invoice_payment(self, invoice_id: str, body: Any) -> Json:
        with self.store.lock:
            invoice = self._get("invoice", invoice_id, "invoice", "invoice_id")
            paid = self._paid(invoice_id)
            credited = self._credit_totals().get(invoice_id, 0)
            amount, day, account = self._payment_fields(body, invoice, paid + credited)
            text, us = self._stamp()
            payment = {
                "id": self.world.new_id(),
                "invoice_id": invoice_id,
                "status": "UNCLEARED",
                "amount": amount,
                "date": day,
                "account_code": account,
                "updated_at": text,
            }
            entry = self._payment_entry(payment, invoice, self.world.new_id(), text)
            updated = self._settled(
                {**invoice, "updated_at": text},
                paid=paid + postings.minor(amount),
                credited=credited,
            )
            self.store["invoice_payment"].insert(payment, us)
            self.world.payments_of[invoice_id].append(payment["id"])
            self._create_entry(payment["id"], entry, us)
            self._replace("invoice", updated, us)
            self._emit(
                [
                    _Event("invoice_payment", "CREATED", payment),
                    _Event("journal_entry", "CREATED", entry),
                    _Event("invoice", "PAYMENT_UPDATED", updated),
                ]
            )
            return copy.deepcopy(payment)

    def replace_invoice_payment(self, invoice_id: str, payment_id: str, body: Any) -> Json:
        with self.store.lock:
            invoice, existing = self._changeable_payment(invoice_id, payment_id)
            paid = self._paid(invoice_id, without=payment_id)
            credited = self._credit_totals().get(invoice_id, 0)
            amount, day, account = self._payment_fields(body, invoice, paid + credited)
            text, us = self._stamp()
            payment = {
                **existing,
                "amount": amount,
                "date": day,
                "account_code": account,
                "updated_at": text,
            }
            entry = self._payment_entry(payment, invoice, self._entry_id_of(payment_id), text)
            updated = self._settled(
                {**invoice, "updated_at": text},
                paid=paid + postings.minor(amount),
                credited=credited,
            )
            self._replace("invoice_payment", payment, us)
            entry_event = self._write_document_entry(payment_id, entry, us)
            self._replace("invoice", updated, us)
            self._emit(
                [
                    _Event("invoice_payment", "UPDATED", payment),
                    entry_event,
                    _Event("invoice", "PAYMENT_UPDATED", updated),
                ]
            )
            return copy.deepcopy(payment)

    def delete_invoice_payment(self, invoice_id: str, payment_id: str) -> None:
        with self.store.lock:
            invoice, _ = self._changeable_payment(invoice_id, payment_id)
            paid = self._paid(invoice_id, without=payment_id)
            credited = self._credit_totals().get(invoice_id, 0)
            text, us = self._stamp()
            updated = self._settled({**invoice, "updated_at": text}, paid=paid, credited=credited)
            self._delete("invoice_payment", payment_id, us)
            self.world.payments_of[invoice_id].remove(payment_id)
            events = [_Event("invoice_payment", "DELETED", payment_id)]
            events += self._delete_entry_of(payment_id, us)
            self._replace("invoice", updated, us)
            events.append(_Event("invoice", "PAYMENT_UPDATED", updated))
            self._emit(events)

    def _changeable_payment(self, invoice_id: str, payment_id: str) -> tuple[Json, Json]:
        invoice = self._get("invoice", invoice_id, "invoice", "invoice_id")
        payment = self.store["invoice_payment"].get(payment_id)
        if payment is None or payment["invoice_id"] != invoice_id:
            raise NotFound(
                f"payment of invoice {invoice['invoice_number']}", payment_id, "payment_id"
            )
        if payment["status"] != "UNCLEARED":
            raise Refused(
                "payment_id",
                f"only UNCLEARED payments can be changed; payment {payment_id} is "
                f"{payment['status']}",
            )
        return invoice, payment

    def _payment_fields(
        self, body: Any, invoice: Json, settled: int
    ) -> tuple[dict[str, str], str, str]:
        """(amount, date, account_code) of a valid payment of ``invoice``.

        ``settled`` is what is already paid and credited apart from this payment.
        """
        check = _Check()
        data = check.body(body)
        amount = check.money(data, "amount", "", required=True)
        day = check.day(data, "date", "", required=True)
        code = check.text(data, "account_code", "", required=True)
        if code is not None:
            account = self.world.accounts_by_code.get(code)
            if account is None:
                check.add("account_code", f"no account with code {code!r}")
            elif account["type"] != "ASSET" or account["subtype"] not in CASH_SUBTYPES:
                check.add(
                    "account_code",
                    f"account {code} ({account['name']}) is {account['type']}/"
                    f"{account['subtype']}; payments must go to a Cash or Bank ASSET account",
                )
        currency = invoice["total"]["currency"]
        check.currencies(currency, "the invoice's currency")
        check.positive(amount, "amount")
        if check.ok and amount is not None:
            open_amount = postings.minor(invoice["total"]) - settled
            if _to_minor(amount) > open_amount:
                check.add(
                    "amount",
                    f"amount {_show(_to_minor(amount), currency)} is more than the "
                    f"{_show(open_amount, currency)} {currency} due on invoice "
                    f"{invoice['invoice_number']}",
                )
        check.raise_if_any()
        assert amount is not None
        assert day is not None
        assert code is not None
        return money_json(_to_minor(amount), currency), day.isoformat(), code

    def _payment_entry(self, payment: Json, invoice: Json, entry_id: str, updated_at: str) -> Json:
        return self._entry_for(
            entry_id=entry_id,
            name=f"Payment for {invoice['invoice_number']}",
            subsidiary_id=invoice["subsidiary_id"],
            posted=payment["date"],
            lines=postings.invoice_payment_lines(payment, invoice["invoice_number"]),
            updated_at=updated_at,
            related={"id": invoice["customer_id"], "type": "CUSTOMER"},
        )

    # ---- credit memos ----------------------------------------------------------------------

    def create_credit_memo(self, body: Any) -> Json:
        with self.store.lock:
            memo = self._memo_record(body, existing=None)
            text, us = self._stamp()
            memo["updated_at"] = text
            entry = self._memo_entry(memo, self.world.new_id(), text)
            self.store["credit_memo"].insert(memo, us)
            self._create_entry(memo["id"], entry, us)
            self._emit(
                [
                    _Event("credit_memo", "CREATED", memo),
                    _Event("journal_entry", "CREATED", entry),
                ]
            )
            return copy.deepcopy(memo)

    def replace_credit_memo(self, id: str, body: Any) -> Json:
        with self.store.lock:
            existing = self._get("credit_memo", id, "credit memo", "id")
            memo = self._memo_record(body, existing=existing)
            text, us = self._stamp()
            memo["updated_at"] = text
            entry = self._memo_entry(memo, self._entry_id_of(id), text)
            self._replace("credit_memo", memo, us)
            entry_event = self._write_document_entry(id, entry, us)
            self._emit([_Event("credit_memo", "UPDATED", memo), entry_event])
            return copy.deepcopy(memo)

    def delete_credit_memo(self, id: str) -> None:
        with self.store.lock:
            memo = self._get("credit_memo", id, "credit memo", "id")
            if memo["applications"]:
                numbers = ", ".join(a["invoice_number"] for a in memo["applications"])
                raise Refused(
                    "id",
                    f"credit memo {memo['credit_memo_number']} is applied to {numbers}; remove "
                    "its applications first (POST /credit-memos/{id}/applications with an "
                    "empty list)",
                )
            _, us = self._stamp()
            self._delete("credit_memo", id, us)
            events = [_Event("credit_memo", "DELETED", id)]
            events += self._delete_entry_of(id, us)
            self._emit(events)

    def apply_credit_memo(self, id: str, body: Any) -> Json:
        """Full reconcile: the posted list becomes the memo's applications, omitted ones go."""
        with self.store.lock:
            memo = self._get("credit_memo", id, "credit memo", "id")
            applications = self._applications(memo, body)
            return self._reconcile(memo, applications)

    def delete_credit_memo_applications(self, id: str) -> None:
        with self.store.lock:
            memo = self._get("credit_memo", id, "credit memo", "id")
            self._reconcile(memo, [])

    def _memo_record(self, body: Any, *, existing: Json | None) -> Json:
        check = _Check()
        data = check.body(body)
        customer_id = check.text(data, "customer_id", "", required=True)
        customer = None
        if customer_id is not None:
            customer = self.store["customer"].get(customer_id)
            if customer is None:
                check.add("customer_id", f"no customer with id {customer_id!r}")
        subsidiary = self._subsidiary(check, data)
        memo_date = check.day(data, "credit_memo_date", "", required=True)
        raw_items = check.objects(data, "items", "", required=True)
        if "items" in data and isinstance(data["items"], list) and not data["items"]:
            check.add("items", "items must not be empty: a credit memo needs at least one line")
        money_start = len(check.priced)
        items = [self._memo_item(check, path, item, memo_date) for path, item in raw_items]
        number = check.text(data, "credit_memo_number", "")
        references = self._references(check, data, "")
        exchange_rate = self._exchange_rate(check, data)
        if subsidiary is not None:
            check.currencies(subsidiary["currency"], "the subsidiary's currency", since=money_start)
        if number is not None:
            clash = self._number_taken("credit_memo", "credit_memo_number", number, existing)
            if clash:
                check.add(
                    "credit_memo_number", f"credit_memo_number {number} is already used ({clash})"
                )
        applications = existing["applications"] if existing else []
        if applications and existing is not None:
            self._keep_links(check, existing, customer_id, subsidiary, "applications")
        check.raise_if_any()
        assert customer is not None
        assert subsidiary is not None
        assert memo_date is not None
        currency = subsidiary["currency"]
        net = sum(i["_net"] for i in items)
        tax = sum(i["_tax"] for i in items)
        total = net + tax
        applied = sum(postings.minor(a["amount"]) for a in applications)
        if total <= 0:
            check.add(
                "items", f"the credit memo total {_show(total, currency)} must be more than 0"
            )
        if total < applied:
            check.add(
                "items",
                f"the new total {_show(total, currency)} {currency} is below the "
                f"{_show(applied, currency)} already applied to invoices; reduce the "
                "applications first",
            )
        check.raise_if_any()
        memo_id = existing["id"] if existing else self.world.new_id()
        return {
            "id": memo_id,
            "subsidiary_id": subsidiary["id"],
            "credit_memo_number": number
            or self._next_number("credit_memo", "credit_memo_number", "CM-API-"),
            "customer_id": customer["id"],
            "credit_memo_date": memo_date.isoformat(),
            "address": copy.deepcopy(customer.get("address")),
            "items": self._finish_lines(items),
            "status": _memo_status(applied, total),
            "net_amount": money_json(net, currency),
            "total": money_json(total, currency),
            "applied_amount": money_json(applied, currency),
            "remaining_amount": money_json(total - applied, currency),
            "taxed_amount": money_json(tax, currency),
            "applications": copy.deepcopy(applications),
            "exchange_rate": exchange_rate,
            "external_references": references,
            "updated_at": "",
        }

    def _memo_item(self, check: _Check, path: str, item: Json, memo_date: date | None) -> Json:
        description = check.text(item, "description", path, required=True)
        price_path = _join(path, "price")
        price = check.mapping(item, "price", path, required=True)
        product = quantity = unit = None
        if price is not None:
            product = self._product(check, price, price_path)
            quantity = check.number(price, "quantity", price_path, required=True)
            if quantity is not None and quantity <= 0:
                check.add(
                    _join(price_path, "quantity"), f"quantity {quantity} must be greater than 0"
                )
                quantity = None
            unit = check.money(
                price,
                "amount_per_unit",
                price_path,
                required=True,
                max_decimals=_UNIT_PRICE_DECIMALS,
            )
            check.not_negative(unit, _join(price_path, "amount_per_unit"))
        percentage = self._percentage(check, item, path)
        revenue = self._revenue(check, item, path, product, memo_date)
        fields = self._fields(check, item, path)
        if product is None or quantity is None or unit is None or description is None:
            return {"_net": 0, "_tax": 0}
        currency = unit.currency
        net = _round_minor(_product(unit.amount, quantity), currency)
        tax = 0
        if percentage:
            with localcontext(prec=_PRECISION):
                tax = int((Decimal(net) * percentage / 100).to_integral_value(ROUND_HALF_EVEN))
        return {
            "id": "",
            "description": description,
            "revenue": revenue,
            "product_id": product["id"],
            "quantity": _quantity_json(quantity),
            "total_amount": money_json(net, currency),
            "net_amount": money_json(net, currency),
            "taxed_amount": money_json(tax, currency),
            "fields": fields,
            "_net": net,
            "_tax": tax,
        }

    def _percentage(self, check: _Check, item: Mapping[str, Any], path: str) -> Decimal | None:
        tax_rate = check.mapping(item, "tax_rate", path)
        if tax_rate is None:
            return None
        where = _join(path, "tax_rate.percentage")
        value = tax_rate.get("percentage")
        if value is None:
            check.add(where, "percentage must not be null when tax_rate is given")
            return None
        try:
            if isinstance(value, bool):
                raise InvalidOperation
            if isinstance(value, str):
                if not _DECIMAL.fullmatch(value.strip()):
                    raise InvalidOperation
                percentage = Decimal(value.strip())
            elif isinstance(value, float):
                percentage = Decimal(repr(value))
            elif isinstance(value, int | Decimal):
                percentage = Decimal(value)
            else:
                raise InvalidOperation
        except InvalidOperation:
            check.add(where, f'percentage {value!r} must be a number like 20 or "7.25"')
            return None
        if not 0 <= percentage <= 100:
            check.add(where, f"percentage {percentage} must be between 0 and 100")
            return None
        return percentage

    def _exchange_rate(self, check: _Check, data: Mapping[str, Any]) -> Json | None:
        rate = check.mapping(data, "exchange_rate", "")
        if rate is None:
            return None
        result: Json = {}
        for key in ("base", "target"):
            result[key] = check.currency_code(rate.get(key), _join("exchange_rate", key))
        value = rate.get("rate")
        text = value.strip() if isinstance(value, str) else None
        if text is None or not _DECIMAL.fullmatch(text) or Decimal(text) <= 0:
            check.add("exchange_rate.rate", f"rate {value!r} must be a positive decimal string")
        result["rate"] = text
        day = check.day(rate, "date", "exchange_rate", required=True)
        result["date"] = day.isoformat() if day else None
        return result

    def _memo_entry(self, memo: Json, entry_id: str, updated_at: str) -> Json:
        return self._entry_for(
            entry_id=entry_id,
            name=f"Credit memo {memo['credit_memo_number']}",
            subsidiary_id=memo["subsidiary_id"],
            posted=memo["credit_memo_date"],
            lines=postings.credit_memo_lines(memo),
            updated_at=updated_at,
            related={"id": memo["customer_id"], "type": "CUSTOMER"},
        )

    def _applications(self, memo: Json, body: Any) -> list[Json]:
        """The validated application list (ids reused for applications left unchanged)."""
        check = _Check()
        data = check.body(body)
        currency = memo["total"]["currency"]
        number = memo["credit_memo_number"]
        wanted: list[tuple[Json, int, date]] = []
        raw = check.objects(data, "applications", "", required=True)
        for path, entry in raw:
            invoice_id = check.text(entry, "invoice_id", path, required=True)
            amount = check.money(entry, "amount", path, required=True)
            day = check.day(entry, "application_date", path, required=True)
            check.positive(amount, _join(path, "amount"))
            invoice = None
            if invoice_id is not None:
                invoice = self.store["invoice"].get(invoice_id)
                if invoice is None:
                    check.add(_join(path, "invoice_id"), f"no invoice with id {invoice_id!r}")
                elif invoice["customer_id"] != memo["customer_id"]:
                    check.add(
                        _join(path, "invoice_id"),
                        f"invoice {invoice['invoice_number']} belongs to another customer than "
                        f"credit memo {number}",
                    )
                elif invoice["total"]["currency"] != currency:
                    check.add(
                        _join(path, "invoice_id"),
                        f"invoice {invoice['invoice_number']} is in "
                        f"{invoice['total']['currency']}; credit memo {number} is in {currency}",
                    )
            if invoice is not None and amount is not None and day is not None:
                wanted.append((invoice, _to_minor(amount), day))
        check.currencies(currency, "the credit memo's currency")
        check.raise_if_any()
        total_applied = sum(amount for _, amount, _ in wanted)
        memo_total = postings.minor(memo["total"])
        if total_applied > memo_total:
            check.add(
                "applications",
                f"applications total {_show(total_applied, currency)} {currency}, more than "
                f"credit memo {number}'s total {_show(memo_total, currency)}",
            )
        mine: dict[str, int] = defaultdict(int)
        for application in memo["applications"]:
            mine[application["invoice_id"]] += postings.minor(application["amount"])
        per_invoice: dict[str, int] = defaultdict(int)
        invoices: dict[str, Json] = {}
        for invoice, amount, _ in wanted:
            per_invoice[invoice["id"]] += amount
            invoices[invoice["id"]] = invoice
        for invoice_id, amount in per_invoice.items():
            invoice = invoices[invoice_id]
            room = postings.minor(invoice["amount_due"]) + mine.get(invoice_id, 0)
            if amount > room:
                check.add(
                    "applications",
                    f"applications to invoice {invoice['invoice_number']} total "
                    f"{_show(amount, currency)}, more than the {_show(room, currency)} "
                    f"{currency} open on it for this credit memo",
                )
        check.raise_if_any()
        unused = list(memo["applications"])
        result = []
        for invoice, amount, day in wanted:
            application = {
                "id": "",
                "credit_memo_id": memo["id"],
                "invoice_id": invoice["id"],
                "invoice_number": invoice["invoice_number"],
                "amount": money_json(amount, currency),
                "application_date": day.isoformat(),
            }
            # An application sent back unchanged keeps its id, so that downstream tables keyed
            # by it see an unchanged row rather than a delete and an insert.
            same = next(
                (a for a in unused if {**a, "id": ""} == application),
                None,
            )
            if same is not None:
                unused.remove(same)
                application["id"] = same["id"]
            result.append(application)
        for application in result:
            if not application["id"]:
                application["id"] = self.world.new_id()
        return result

    def _reconcile(self, memo: Json, applications: list[Json]) -> Json:
        currency = memo["total"]["currency"]
        before: dict[str, int] = defaultdict(int)
        after: dict[str, int] = defaultdict(int)
        for application in memo["applications"]:
            before[application["invoice_id"]] += postings.minor(application["amount"])
        for application in applications:
            after[application["invoice_id"]] += postings.minor(application["amount"])
        changed = [i for i in {**before, **after} if before.get(i, 0) != after.get(i, 0)]
        credits = self._credit_totals()
        text, us = self._stamp()
        total = postings.minor(memo["total"])
        applied = sum(after.values())
        updated_memo = {
            **memo,
            "applications": applications,
            "applied_amount": money_json(applied, currency),
            "remaining_amount": money_json(total - applied, currency),
            "status": _memo_status(applied, total),
            "updated_at": text,
        }
        invoices = []
        for invoice_id in changed:
            invoice = self.store["invoice"].get(invoice_id)
            if invoice is None:
                continue
            credited = credits.get(invoice_id, 0) - before.get(invoice_id, 0)
            credited += after.get(invoice_id, 0)
            invoices.append(
                self._settled(
                    {**invoice, "updated_at": text},
                    paid=self._paid(invoice_id),
                    credited=credited,
                )
            )
        self._replace("credit_memo", updated_memo, us)
        for invoice in invoices:
            self._replace("invoice", invoice, us)
        self._emit(
            [
                *(_Event("invoice", "UPDATED", i) for i in invoices),
                _Event("credit_memo", "PAYMENT_UPDATED", updated_memo),
            ]
        )
        return copy.deepcopy(updated_memo)

    # ---- journal entries -------------------------------------------------------------------

    def create_journal_entry(self, body: Any) -> Json:
        with self.store.lock:
            entry = self._manual_entry(body, existing=None)
            text, us = self._stamp()
            entry["updated_at"] = text
            self.store["journal_entry"].insert(entry, us)
            self.ledger.post(entry)
            self._emit([_Event("journal_entry", "CREATED", entry)])
            return copy.deepcopy(entry)

    def replace_journal_entry(self, id: str, body: Any) -> Json:
        with self.store.lock:
            existing = self._get("journal_entry", id, "journal entry", "id")
            self._refuse_document_entry(id, "replaced")
            entry = self._manual_entry(body, existing=existing)
            text, us = self._stamp()
            entry["updated_at"] = text
            self._replace_entry(entry, us)
            self._emit([_Event("journal_entry", "UPDATED", entry)])
            return copy.deepcopy(entry)

    def delete_journal_entry(self, id: str) -> None:
        with self.store.lock:
            self._get("journal_entry", id, "journal entry", "id")
            self._refuse_document_entry(id, "deleted")
            _, us = self._stamp()
            self._delete("journal_entry", id, us)
            self._retire_bulk(id)
            self.ledger.unpost(id)
            self._emit([_Event("journal_entry", "DELETED", id)])

    def _manual_entry(self, body: Any, *, existing: Json | None) -> Json:
        check = _Check()
        data = check.body(body)
        name = check.text(data, "name", "", required=True)
        currency = check.currency_code(data.get("currency"), "currency")
        posted = check.day(data, "date", "", required=True)
        reversal = check.day(data, "reversal_date", "")
        if posted is not None and reversal is not None and reversal < posted:
            check.add("reversal_date", f"reversal_date {reversal} is before date {posted}")
        if existing is None:
            subsidiary = self._subsidiary(check, data)
            related = self._related_entity(check, data)
        else:
            # The PUT body has no subsidiary_id or related_entity: they stay as they were.
            subsidiary = self._subsidiaries.get(existing.get("subsidiary_id") or "")
            related = copy.deepcopy(existing.get("related_entity"))
        if subsidiary is not None and currency is not None and currency != subsidiary["currency"]:
            check.add(
                "currency",
                f"currency {currency} does not match the subsidiary's currency "
                f"{subsidiary['currency']}",
            )
        raw_items = check.objects(data, "items", "", required=True)
        if "items" in data and isinstance(data["items"], list) and len(data["items"]) < 2:
            check.add(
                "items",
                f"items needs at least 2 lines (a debit and a credit), got {len(data['items'])}",
            )
        money_start = len(check.priced)
        lines = []
        for path, item in raw_items:
            amount = check.money(item, "amount", path, required=True)
            check.positive(amount, _join(path, "amount"))
            side = check.choice(item, "side", path, SIDES, required=True)
            code = check.text(item, "account_code", path, required=True)
            account = None
            if code is not None:
                account = self.world.accounts_by_code.get(code)
                if account is None:
                    check.add(_join(path, "account_code"), f"no account with code {code!r}")
            description = check.text(item, "description", path)
            fields = self._fields(check, item, path)
            if amount is not None and side is not None and account is not None:
                lines.append((account, side, amount, description, fields))
        if currency is not None:
            check.currencies(currency, "the entry's currency", since=money_start)
        attachment = check.text(data, "attachmentUrl", "")
        exchange_rate = self._exchange_rate(check, data)
        if check.ok and currency is not None:
            debits = sum(_to_minor(a) for _, s, a, _, _ in lines if s == "DEBIT")
            credits = sum(_to_minor(a) for _, s, a, _, _ in lines if s == "CREDIT")
            if debits != credits:
                check.add(
                    "items",
                    f"debits {_show(debits, currency)} must equal credits "
                    f"{_show(credits, currency)}",
                )
        check.raise_if_any()
        assert name is not None
        assert currency is not None
        assert posted is not None
        assert subsidiary is not None
        return {
            "id": existing["id"] if existing else self.world.new_id(),
            "subsidiary_id": subsidiary["id"],
            "name": name,
            "currency": currency,
            "date": posted.isoformat(),
            "reversal_date": reversal.isoformat() if reversal else None,
            "related_entity": related,
            "attachmentUrl": attachment,
            "exchange_rate": exchange_rate,
            "items": [
                {
                    "id": self.world.new_id(),
                    "account_id": account["id"],
                    "account_code": account["code"],
                    "side": side,
                    "amount": money_json(_to_minor(amount), currency),
                    "original_transaction_amount": money_json(_to_minor(amount), currency),
                    "description": description,
                    "fields": fields,
                }
                for account, side, amount, description, fields in lines
            ],
            "updated_at": "",
        }

    def _related_entity(self, check: _Check, data: Mapping[str, Any]) -> Json | None:
        related = check.mapping(data, "related_entity", "")
        if related is None:
            return None
        kind = check.choice(related, "type", "related_entity", tuple(RELATED_TYPES), required=True)
        related_id = check.text(related, "id", "related_entity", required=True)
        if (
            kind is not None
            and related_id is not None
            and self.store[RELATED_TYPES[kind]].get(related_id) is None
        ):
            check.add("related_entity.id", f"no {kind.lower()} with id {related_id!r}")
        return {"id": related_id, "type": kind}

    def _refuse_document_entry(self, entry_id: str, verb: str) -> None:
        document_id = next(
            (doc for doc, entry in self.world.posting_of.items() if entry == entry_id), None
        )
        if document_id is None:
            return
        for entity, label, number_field, route in _DOCUMENTS:
            document = self.store[entity].get(document_id)
            if document is None:
                continue
            named = document.get(number_field) if number_field else None
            what = f"{label} {named} ({document_id})" if named else f"{label} {document_id}"
            path = route.format(**{**document, "id": document_id})
            raise Refused(
                "id",
                f"journal entry {entry_id} is posted by {what} and cannot be {verb} directly; "
                f"change or delete the {label} instead ({path})",
            )
        raise Refused(
            "id",
            f"journal entry {entry_id} is posted by document {document_id} and cannot be "
            f"{verb} directly; change or delete that document instead",
        )

    # ---- shared plumbing -------------------------------------------------------------------

    def _stamp(self) -> tuple[str, int]:
        return self.store.stamp(self.clock.now())

    def _today(self) -> date:
        return self.clock.now().date()

    def _get(self, entity: str, record_id: Any, what: str, field: str) -> Json:
        record = self.store[entity].get(record_id) if isinstance(record_id, str) else None
        if record is None:
            raise NotFound(what, str(record_id), field)
        return record

    def _replace(self, entity: str, record: Json, us: int) -> None:
        collection = self.store[entity]
        seq = collection.seq_of(record["id"])
        assert seq is not None
        collection.replace(seq, record, us)

    def _delete(self, entity: str, record_id: str, us: int) -> None:
        collection = self.store[entity]
        seq = collection.seq_of(record_id)
        assert seq is not None
        collection.delete(seq, us)

    def _emit(self, events: list[_Event]) -> None:
        for event in events:
            self.store.notify(event.entity, event.event, event.body)

    def _entry_for(
        self,
        *,
        entry_id: str,
        name: str,
        subsidiary_id: str,
        posted: str,
        lines: list[PostingLine],
        updated_at: str,
        related: Json,
    ) -> Json:
        return postings.journal_entry(
            entry_id=entry_id,
            name=name,
            subsidiary_id=subsidiary_id,
            currency=self._subsidiaries[subsidiary_id]["currency"],
            posted=posted,
            lines=lines,
            accounts_by_code=self.world.accounts_by_code,
            new_id=self.world.new_id,
            updated_at=updated_at,
            related_entity=related,
        )

    def _create_entry(self, document_id: str, entry: Json, us: int) -> None:
        self.store["journal_entry"].insert(entry, us)
        self.ledger.post(entry)
        self.world.posting_of[document_id] = entry["id"]

    def _entry_id_of(self, document_id: str) -> str:
        return self.world.posting_of.get(document_id) or self.world.new_id()

    def _write_document_entry(self, document_id: str, entry: Json, us: int) -> _Event:
        """Replace the document's journal entry, or create it if the document never had one."""
        if self.world.posting_of.get(document_id) == entry["id"]:
            self._replace_entry(entry, us)
            return _Event("journal_entry", "UPDATED", entry)
        self._create_entry(document_id, entry, us)
        return _Event("journal_entry", "CREATED", entry)

    def _replace_entry(self, entry: Json, us: int) -> None:
        self._replace("journal_entry", entry, us)
        self._retire_bulk(entry["id"])
        self.ledger.post(entry)

    def _delete_entry_of(self, document_id: str, us: int) -> list[_Event]:
        entry_id = self.world.posting_of.pop(document_id, None)
        if entry_id is None:
            return []
        self._delete("journal_entry", entry_id, us)
        self.ledger.unpost(entry_id)
        return [_Event("journal_entry", "DELETED", entry_id)]

    def _retire_bulk(self, entry_id: str) -> None:
        bulk = self.world.bulk
        row = bulk.index_of(entry_id) if bulk is not None else None
        if row is not None:
            self.ledger.retire_bulk(row)

    def _finish_lines(self, lines: list[Json]) -> list[Json]:
        """Document lines with fresh ids, handed out only once the request proved valid."""
        return [
            {k: (self.world.new_id() if k == "id" else v) for k, v in line.items() if k[0] != "_"}
            for line in lines
        ]

    def _number_taken(
        self, entity: str, field: str, number: str, existing: Json | None
    ) -> str | None:
        own = existing["id"] if existing else None
        for record in self.store[entity].all_records():
            if record[field] == number and record["id"] != own:
                return f"by {record['id']}"
        return None

    def _next_number(self, entity: str, field: str, prefix: str) -> str:
        pattern = re.compile(re.escape(prefix) + r"(\d+)$")
        highest = 0
        for record in self.store[entity].all_records():
            match = pattern.match(record[field] or "")
            if match:
                highest = max(highest, int(match.group(1)))
        return f"{prefix}{highest + 1:05d}"


def _memo_status(applied: int, total: int) -> str:
    if applied <= 0:
        return "UNAPPLIED"
    return "APPLIED" if applied >= total else "PARTIALLY_APPLIED"


def _infer_scope(items: list[tuple[str, Json]]) -> str | None:
    """Without an explicit scope, the first line's money says which kind of invoice this is."""
    for _, item in items:
        if item.get("price") is not None:
            return "FULL"
        if item.get("total_amount") is not None:
            return "AR_ONLY"
    return None
