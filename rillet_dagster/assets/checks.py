"""Asset checks that prove the numbers; each name says what must be true.

On the report assets (partitioned like them, so a check result belongs to one period x
subsidiary):

* trial balance: ``debits_equal_credits`` and ``each_account_rolls_forward`` (blocking: a
  report that does not add up must not flow on), ``journal_entries_balance`` (every synced entry
  of the partition's subsidiary and month to date balances), ``ledger_reproduces_trial_balance``
  (the warehouse's journal-entry lines, rolled up for the partition, give Rillet's trial balance
  for every account to the cent);
* balance sheet: ``assets_equal_liabilities_plus_equity`` (blocking);
* every statement: ``totals_add_up`` (blocking: each section and group total is the sum of its
  lines); cash flow: ``ending_cash_reconciles`` (beginning + net change = ending cash).

On the models (unpartitioned): ``every_journal_entry_balances`` and
``journal_lines_reference_known_accounts`` on the general ledger,
``invoice_items_sum_to_invoice_totals`` and ``payments_reference_known_invoices`` on AR aging, and
``raw_entities_are_fresh`` on the general ledger (the entities it is built from were synced
recently).

A failing check says which account or record is wrong and by how much, in its description and
in its metadata (money as text: metadata values cannot be ``Decimal``).

No ``from __future__ import annotations`` here: Dagster reads the check functions' annotations
at definition time to find their resources.
"""

import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import dagster as dg
from sqlalchemy import select
from sqlalchemy.engine import Connection, Engine

from rillet_dagster import catalog
from rillet_dagster.assets import models, reconciliation
from rillet_dagster.assets.reports import (
    partitions_for,
    period_of_partition,
    report_asset_key,
)
from rillet_dagster.resources import WarehouseResource
from rillet_dagster.settings import Settings
from rillet_dagster.warehouse import reports as store
from rillet_dagster.warehouse.reports import ReportKey
from rillet_dagster.warehouse.schema import table_for, table_name

ZERO = Decimal(0)
# How many problems a failing check lists; the count says how many there were in all.
SHOWN = 20
# The raw entities the models read must have been synced within this long.
FRESHNESS = timedelta(hours=26)
FRESH_ENTITIES = ("journal_entry", "account", "invoice", "invoice_payment", "credit_memo")


@dataclass
class Outcome:
    """What a check found: the problems (one sentence each) and what it looked at."""

    checked: int = 0
    problems: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def result(self, what: str) -> dg.AssetCheckResult:
        passed = not self.problems
        if passed:
            description = f"{what.rstrip('.')}: all {self.checked} checked."
        else:
            shown = "; ".join(self.problems[:SHOWN])
            more = f" (and {len(self.problems) - SHOWN} more)" if len(self.problems) > SHOWN else ""
            count = len(self.problems)
            noun = "problem" if count == 1 else "problems"
            description = f"{count} {noun} in {self.checked} checked: {shown}{more}"
        metadata: dict[str, Any] = {
            "checked": self.checked,
            "failures": len(self.problems),
            **self.extra,
        }
        if self.problems:
            metadata["problems"] = dg.MetadataValue.md(
                "\n".join(f"- {p}" for p in self.problems[:SHOWN])
            )
        return dg.AssetCheckResult(passed=passed, description=description, metadata=metadata)


def text(amount: Decimal, currency: str | None = None) -> str:
    return format(amount, "f") + (f" {currency}" if currency else "")


# --------------------------------------------------------------------------- report checks


def debits_equal_credits(engine: Engine, key: ReportKey) -> Outcome:
    """The trial balance's debit total equals its credit total, and the accounts net to zero."""
    lines = store.read_lines(engine, key)
    outcome = Outcome(checked=1)
    totals = {line["measure"]: line for line in lines if line["line_type"] == "total"}
    debit, credit = totals.get("debit_total"), totals.get("credit_total")
    if debit is not None and credit is not None and debit["amount"] != credit["amount"]:
        outcome.problems.append(
            f"debits {text(debit['amount'], debit['currency'])} != credits "
            f"{text(credit['amount'], credit['currency'])} "
            f"(difference {text(debit['amount'] - credit['amount'])})"
        )
    for measure in ("beginning_balance", "ending_balance"):
        net = sum(
            (
                line["amount"]
                for line in lines
                if line["line_type"] == "account" and line["measure"] == measure
            ),
            ZERO,
        )
        if net != 0:
            outcome.problems.append(f"accounts' {measure} sums to {text(net)}, not 0")
    return outcome


def each_account_rolls_forward(engine: Engine, key: ReportKey) -> Outcome:
    """Per account: beginning balance + debits - credits (+ FX) = ending balance."""
    values: dict[str, dict[str, Decimal]] = defaultdict(dict)
    labels: dict[str, str] = {}
    for line in store.read_lines(engine, key):
        if line["line_type"] != "account":
            continue
        values[line["account_id"]][line["measure"]] = line["amount"]
        labels[line["account_id"]] = f"{line['account_code']} {line['account_name']}"
    outcome = Outcome(checked=len(values))
    for account, measures in values.items():
        expected = (
            measures.get("beginning_balance", ZERO)
            + measures.get("debit_total", ZERO)
            - measures.get("credit_total", ZERO)
            + measures.get("debit_fx_total", ZERO)
            - measures.get("credit_fx_total", ZERO)
        )
        ending = measures.get("ending_balance", ZERO)
        if expected != ending:
            outcome.problems.append(
                f"account {labels[account]}: ending balance {text(ending)} but beginning + "
                f"debits - credits = {text(expected)} (difference {text(ending - expected)})"
            )
    return outcome


def assets_equal_liabilities_plus_equity(engine: Engine, key: ReportKey) -> Outcome:
    """Per breakdown column: the Assets total equals Liabilities plus Equity."""
    totals: dict[str | None, dict[str, Decimal]] = defaultdict(dict)
    currency: dict[str | None, str | None] = {}
    for line in store.read_lines(engine, key):
        if line["line_type"] == "section" and line["measure"] == "amount":
            totals[line["breakdown_id"]][line["section"]] = line["amount"]
            currency[line["breakdown_id"]] = line["currency"]
    outcome = Outcome(checked=len(totals))
    for column, sections in totals.items():
        assets = sections.get("Assets", ZERO)
        other_side = sections.get("Liabilities", ZERO) + sections.get("Equity", ZERO)
        if assets != other_side:
            outcome.problems.append(
                f"column {column}: assets {text(assets, currency[column])} != liabilities + "
                f"equity {text(other_side, currency[column])} "
                f"(difference {text(assets - other_side)})"
            )
    return outcome


def ledger_reproduces_trial_balance(engine: Engine, key: ReportKey) -> Outcome:
    """The warehouse ledger rolled up for the partition gives Rillet's trial balance exactly.

    Reads the partition of ``ledger/trial_balance_reconciliation`` (Rillet's figure beside the
    warehouse's for every account and measure): every difference must be zero. Per subsidiary
    the lines are the subsidiary's own journal entries in its currency; consolidated, the
    reporting-currency lines that Rillet's consolidated reports are built from.
    """
    rows = reconciliation.read_reconciliation(engine, key)
    outcome = Outcome(checked=len({row["account_id"] for row in rows}))
    largest = ZERO
    currency = None
    for row in rows:
        currency = row["currency"]
        if row["difference"] != 0:
            largest = max(largest, abs(row["difference"]))
            outcome.problems.append(
                f"account {row['account_code']} {row['account_name']} ({row['account_id']}): "
                f"{row['measure']} Rillet {text(row['rillet_amount'], currency)}, warehouse "
                f"ledger {text(row['warehouse_amount'], currency)}, difference "
                f"{text(row['difference'])}"
            )
    if not rows:
        outcome.problems.append(
            f"no reconciliation rows for {key.period_end} / {key.subsidiary_key}: materialize "
            "the partition of ledger/trial_balance_reconciliation first"
        )
    outcome.extra["largest_difference"] = text(largest, currency)
    outcome.extra["ledger_lines"] = rows[0]["ledger_lines"] if rows else 0
    return outcome


def journal_entries_balance(engine: Engine, key: ReportKey) -> Outcome:
    """Every live entry of the partition's subsidiary and period has debits = credits."""
    with engine.connect() as conn:
        lines = models.ledger_lines(conn, subsidiary_key=key.subsidiary_key, through=key.period_end)
    start = key.period_start or date.min
    return _entries_balance(line for line in lines if line.date >= start)


def _entries_balance(lines: Iterable[models.LedgerLine]) -> Outcome:
    net: dict[str, Decimal] = defaultdict(Decimal)
    currency: dict[str, str | None] = {}
    for line in lines:
        net[line.entry_id] += line.signed
        currency[line.entry_id] = line.currency
    outcome = Outcome(checked=len(net))
    for entry, difference in net.items():
        if difference != 0:
            outcome.problems.append(
                f"journal entry {entry}: debits - credits = {text(difference, currency[entry])}"
            )
    return outcome


def totals_add_up(engine: Engine, key: ReportKey) -> Outcome:
    """Every section and group total equals the sum of the accounts and groups under it.

    A group without accounts or subgroups (a computed line such as Net Income) has nothing to
    add up and is left out.
    """
    totals: dict[tuple[str, str, Any], tuple[Decimal, str | None]] = {}
    sums: dict[tuple[str, str, Any], Decimal] = defaultdict(Decimal)
    has_children: set[tuple[str, str, Any]] = set()
    for line in store.read_lines(engine, key):
        if line["measure"] != "amount" or line["line_type"] not in ("section", "group", "account"):
            continue
        section, path, column = line["section"], line["group_path"] or "", line["breakdown_id"]
        if line["line_type"] == "account":
            parent = (section, path, column)
        elif line["line_type"] == "group":
            totals[(section, path, column)] = (line["amount"], line["currency"])
            parent = (section, path.rpartition(store.GROUP_SEPARATOR)[0], column)
        else:
            totals[(section, "", column)] = (line["amount"], line["currency"])
            continue
        sums[parent] += line["amount"]
        has_children.add(parent)
    outcome = Outcome(checked=len(totals))
    for node, (total, currency) in totals.items():
        section, path, column = node
        if path and node not in has_children:
            continue
        if sums[node] != total:
            where = f"{section} > {path}" if path else section
            outcome.problems.append(
                f"{where} (column {column}): total {text(total, currency)}, its lines sum to "
                f"{text(sums[node], currency)} (difference {text(total - sums[node])})"
            )
    return outcome


def ending_cash_reconciles(engine: Engine, key: ReportKey) -> Outcome:
    """Beginning cash plus the net change in cash equals ending cash, per column."""
    summaries: dict[Any, dict[str, Decimal]] = defaultdict(dict)
    for line in store.read_lines(engine, key):
        if line["line_type"] == "summary" and line["measure"] == "amount":
            summaries[line["breakdown_id"]][line["name"]] = line["amount"]
    outcome = Outcome(checked=len(summaries))
    needed = ("Beginning Cash", "Net Change in Cash", "Ending Cash")
    for column, values in summaries.items():
        missing = [name for name in needed if name not in values]
        if missing:
            outcome.problems.append(f"column {column}: no {', '.join(missing)} summary")
            continue
        expected = values["Beginning Cash"] + values["Net Change in Cash"]
        ending = values["Ending Cash"]
        if expected != ending:
            outcome.problems.append(
                f"column {column}: beginning + net change = {text(expected)}, ending cash "
                f"{text(ending)} (difference {text(ending - expected)})"
            )
    return outcome


@dataclass(frozen=True)
class ReportCheck:
    """A check of one partition of ``report``, on the report asset or on ``on`` (an asset
    partitioned like it, such as the reconciliation of the warehouse ledger)."""

    report: str
    name: str
    blocking: bool
    run: Callable[[Engine, ReportKey], Outcome]
    on: dg.AssetKey | None = None

    @property
    def asset(self) -> dg.AssetKey:
        return self.on or report_asset_key(self.report)


REPORT_CHECKS = (
    ReportCheck("trial_balance", "debits_equal_credits", True, debits_equal_credits),
    ReportCheck("trial_balance", "each_account_rolls_forward", True, each_account_rolls_forward),
    ReportCheck(
        "trial_balance",
        "journal_entries_balance",
        False,
        journal_entries_balance,
        on=reconciliation.reconciliation_key(),
    ),
    ReportCheck(
        "trial_balance",
        "ledger_reproduces_trial_balance",
        False,
        ledger_reproduces_trial_balance,
        on=reconciliation.reconciliation_key(),
    ),
    ReportCheck(
        "balance_sheet",
        "assets_equal_liabilities_plus_equity",
        True,
        assets_equal_liabilities_plus_equity,
    ),
    *(
        ReportCheck(name, "totals_add_up", True, totals_add_up)
        for name in ("balance_sheet", "income_statement", "cash_flow_statement", "executive_pl")
    ),
    ReportCheck("cash_flow_statement", "ending_cash_reconciles", False, ending_cash_reconciles),
)


def report_check(check: ReportCheck, settings: Settings) -> dg.AssetChecksDefinition:
    spec = catalog.report(check.report)
    partitions = partitions_for(check.report, settings)
    what = (check.run.__doc__ or check.name).strip().splitlines()[0]

    def _check(
        context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource
    ) -> dg.AssetCheckResult:
        period = period_of_partition(spec, partitions, context.partition_key)
        store.ensure_report_schema(warehouse.engine)
        return check.run(warehouse.engine, period.key(check.report)).result(what)

    # Partitioned check specs are a preview in Dagster 1.13 and say so on every load; they are
    # what puts each result on its period x subsidiary partition, so we use them knowingly.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return dg.asset_check(
            asset=check.asset,
            name=check.name,
            description=what,
            blocking=check.blocking,
            partitions_def=partitions,
        )(_check)


# --------------------------------------------------------------------------- model checks


def every_journal_entry_balances(conn: Connection) -> Outcome:
    """Every live journal entry in the warehouse has debits = credits."""
    return _entries_balance(models.ledger_lines(conn))


def journal_lines_reference_known_accounts(conn: Connection) -> Outcome:
    """Every journal-entry line names an account of the synced chart of accounts."""
    known = set(models.account_names(conn))
    lines = models.ledger_lines(conn)
    outcome = Outcome(checked=len(lines))
    for line in lines:
        if line.account_id not in known:
            outcome.problems.append(
                f"journal entry {line.entry_id} line {line.line_key}: account "
                f"{line.account_id} ({line.account_code}) is not in the accounts table"
            )
    return outcome


def payments_reference_known_invoices(conn: Connection) -> Outcome:
    """Every payment and credit-memo application names a synced invoice."""
    invoices = table_for("invoice")
    known = set(conn.scalars(select(invoices.c.id)))
    payments = table_for("invoice_payment")
    applications = table_for("credit_memo_application")
    references = [
        ("payment", row[0], row[1])
        for row in conn.execute(
            select(payments.c.id, payments.c.invoice_id).where(payments.c.deleted_at.is_(None))
        )
    ] + [
        ("credit memo application", f"{row[0]}/{row[1]}", row[2])
        for row in conn.execute(
            select(applications.c.parent_id, applications.c.line_key, applications.c.invoice_id)
        )
    ]
    outcome = Outcome(checked=len(references))
    for kind, record, invoice in references:
        if invoice not in known:
            outcome.problems.append(f"{kind} {record}: invoice {invoice} is not in the warehouse")
    return outcome


def invoice_items_sum_to_invoice_totals(conn: Connection) -> Outcome:
    """Per invoice: items' amounts, discounts and taxes sum to the header's, and
    subtotal - discount + tax = total."""
    invoices = table_for("invoice")
    items = table_for("invoice_item")
    sums: dict[str, list[Decimal]] = defaultdict(lambda: [ZERO, ZERO, ZERO])
    for parent, amount, discount, tax in conn.execute(
        select(
            items.c.parent_id, items.c.total_amount, items.c.total_discount, items.c.taxed_amount
        )
    ):
        totals = sums[parent]
        for index, value in enumerate((amount, discount, tax)):
            totals[index] += value if value is not None else ZERO
    headers = conn.execute(
        select(
            invoices.c.id,
            invoices.c.invoice_number,
            invoices.c.subtotal,
            invoices.c.total_discount,
            invoices.c.taxed_amount,
            invoices.c.total,
            invoices.c.total_currency,
        ).where(invoices.c.deleted_at.is_(None))
    ).all()
    outcome = Outcome(checked=len(headers))
    for invoice_id, number, subtotal, discount, tax, total, currency in headers:
        label = f"invoice {number} ({invoice_id})"
        header = [value if value is not None else ZERO for value in (subtotal, discount, tax)]
        for name, ours, theirs in zip(
            ("subtotal", "total_discount", "taxed_amount"), sums[invoice_id], header, strict=True
        ):
            if ours != theirs:
                outcome.problems.append(
                    f"{label}: items' {name} sum to {text(ours, currency)}, header says "
                    f"{text(theirs, currency)} (difference {text(ours - theirs)})"
                )
        expected = header[0] - header[1] + header[2]
        if total is not None and expected != total:
            outcome.problems.append(
                f"{label}: subtotal - discount + tax = {text(expected, currency)}, total is "
                f"{text(total, currency)} (difference {text(expected - total)})"
            )
    return outcome


def raw_entities_are_fresh(
    last_synced: Callable[[str], datetime | None], now: datetime | None = None
) -> Outcome:
    """Each raw entity the models read was synced within the freshness window.

    "Synced" is the entity asset's last materialization, not the newest ``_synced_at`` in its
    table: an unchanged record keeps its load metadata, so a quiet weekend would look stale.
    """
    now = now or datetime.now(UTC)
    outcome = Outcome(checked=len(FRESH_ENTITIES))
    for entity in FRESH_ENTITIES:
        synced = last_synced(entity)
        outcome.extra[f"{entity}_synced_at"] = synced.isoformat() if synced else "never"
        if synced is None:
            outcome.problems.append(f"{entity}: never synced")
        elif now - synced > FRESHNESS:
            outcome.problems.append(
                f"{entity}: last synced {synced.isoformat()}, {now - synced} ago "
                f"(more than {FRESHNESS})"
            )
    return outcome


def last_materialized(instance: dg.DagsterInstance, entity: str) -> datetime | None:
    key = dg.AssetKey(["rillet", table_name(entity)])
    event = instance.get_latest_materialization_event(key)
    return None if event is None else datetime.fromtimestamp(event.timestamp, UTC)


def freshness_check() -> dg.AssetChecksDefinition:
    what = (raw_entities_are_fresh.__doc__ or "").strip().splitlines()[0]

    @dg.asset_check(
        asset=models.model_key("general_ledger"),
        name="raw_entities_are_fresh",
        description=what,
        blocking=False,
        additional_deps=[dg.AssetKey(["rillet", table_name(e)]) for e in FRESH_ENTITIES],
    )
    def _check(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        return raw_entities_are_fresh(
            lambda entity: last_materialized(context.instance, entity)
        ).result(what)

    return _check


@dataclass(frozen=True)
class ModelCheck:
    model: str
    name: str
    blocking: bool
    run: Callable[[Connection], Outcome]


MODEL_CHECKS = (
    ModelCheck(
        "general_ledger", "every_journal_entry_balances", True, every_journal_entry_balances
    ),
    ModelCheck(
        "general_ledger",
        "journal_lines_reference_known_accounts",
        False,
        journal_lines_reference_known_accounts,
    ),
    ModelCheck(
        "ar_aging",
        "invoice_items_sum_to_invoice_totals",
        False,
        invoice_items_sum_to_invoice_totals,
    ),
    ModelCheck(
        "ar_aging", "payments_reference_known_invoices", False, payments_reference_known_invoices
    ),
)


def model_check(check: ModelCheck) -> dg.AssetChecksDefinition:
    what = (check.run.__doc__ or check.name).strip().splitlines()[0]

    @dg.asset_check(
        asset=models.model_key(check.model),
        name=check.name,
        description=what,
        blocking=check.blocking,
    )
    def _check(warehouse: WarehouseResource) -> dg.AssetCheckResult:
        with warehouse.engine.connect() as conn:
            return check.run(conn).result(what)

    return _check


def build_checks(settings: Settings) -> list[dg.AssetChecksDefinition]:
    return [
        *(report_check(check, settings) for check in REPORT_CHECKS),
        *(model_check(check) for check in MODEL_CHECKS),
        freshness_check(),
    ]


def check_names(asset: dg.AssetKey) -> Sequence[str]:
    return [check.name for check in REPORT_CHECKS if check.asset == asset]
