"""``rillet-dagster events``: look at the webhook queue and act on what was set aside.

    rillet-dagster events                      counts per status, quarantined per entity
    rillet-dagster events list                 quarantined events with their errors
    rillet-dagster events requeue --all        try them again (after a fix)
    rillet-dagster events discard --id ID      give up on one
    rillet-dagster events purge                delete applied events past the retention

The databases are the ones the code location uses (``RILLET_STATE_URL``,
``RILLET_WAREHOUSE_URL``, read from the environment and ``./.env`` as Dagster's CLI does).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dotenv import load_dotenv
from sqlalchemy.engine import make_url

from rillet_dagster.settings import (
    EVENT_RETENTION_VAR,
    Settings,
    SettingsError,
    parse_retention_days,
)
from rillet_dagster.warehouse import state

_SET_ASIDE = list(state.SET_ASIDE)


def add_events_parser(commands: Any) -> None:
    events = commands.add_parser(
        "events",
        help="the webhook queue: counts, quarantined events, requeue, discard, purge",
        description="Inspect the webhook queue in the state database and act on events that "
        "were set aside (quarantined: could not be applied; poison: unreadable body; unknown: "
        "an entity or event this version does not know).",
    )
    actions = events.add_subparsers(dest="action")
    listing = actions.add_parser("list", help="set-aside events with their errors")
    _filters(listing)
    listing.add_argument("--limit", type=_positive, default=50)
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    for name, verb in (("requeue", "make them pending again"), ("discard", "give up on them")):
        action = actions.add_parser(name, help=f"{verb}: --id ID..., --entity E or --all")
        _filters(action)
        action.add_argument("--id", action="append", dest="ids", metavar="ID")
        action.add_argument("--all", action="store_true", help="every event of the status")
    purge = actions.add_parser("purge", help="delete applied events past the retention")
    purge.add_argument(
        "--older-than-days",
        help=f"default {EVENT_RETENTION_VAR} (7): settled events older than this go",
    )


def _filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--entity", help="only this entity (INVOICE, credit-memo, ...)")
    parser.add_argument(
        "--status",
        choices=_SET_ASIDE,
        default="quarantined",
        help="which set-aside events (default quarantined)",
    )


def ensure_sqlite_directory(url: str) -> None:
    # resources.py has the same helper but imports Dagster: seconds this command need not wait.
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def run_events(args: argparse.Namespace) -> None:
    load_dotenv(Path.cwd() / ".env", override=False)
    try:
        settings = Settings.from_env()
    except SettingsError as error:
        sys.exit(f"rillet-dagster events: {error}")
    ensure_sqlite_directory(settings.state_url)
    engine = state.make_state_engine(settings.state_url)
    try:
        with engine.begin() as connection:
            state.ensure_state_schema(connection)
        action = args.action or "summary"
        if action == "summary":
            _summary(engine, settings)
        elif action == "list":
            _list(engine, args)
        elif action in ("requeue", "discard"):
            _act(engine, args)
        else:
            _purge(engine, settings, args)
    finally:
        engine.dispose()


def _summary(engine: Any, settings: Settings) -> None:
    with engine.connect() as connection:
        counters = state.queue_counters(connection)
        quarantined = state.quarantine_summary(connection)
    where = make_url(settings.state_url).render_as_string(hide_password=True)
    print(f"webhook queue at {where}")
    print("  " + ", ".join(f"{status} {count}" for status, count in counters.items()))
    for entity, summary in sorted(quarantined.items()):
        print(f"  {entity}: {summary.count} quarantined; first: {summary.first_error}")
    if quarantined:
        print("see them: rillet-dagster events list; retry: rillet-dagster events requeue --all")


def _list(engine: Any, args: argparse.Namespace) -> None:
    with engine.connect() as connection:
        events = state.set_aside_events(
            connection, entity=args.entity, statuses=[args.status], limit=args.limit
        )
    for event in events:
        if args.json:
            print(
                json.dumps(
                    {
                        "id": event.id,
                        "entity": event.entity,
                        "event": event.event,
                        "received_at": event.received_at.isoformat(),
                        "attempts": event.attempts,
                        "error": event.error,
                        "body_bytes": len(event.body),
                    }
                )
            )
        else:
            print(
                f"{event.id}  {event.entity} {event.event}  received "
                f"{event.received_at:%Y-%m-%d %H:%M:%S}Z  attempts {event.attempts}\n"
                f"    {event.error or '(no error recorded)'}"
            )
    if not events and not args.json:
        print(f"no {args.status} events" + (f" of {args.entity}" if args.entity else ""))


def _act(engine: Any, args: argparse.Namespace) -> None:
    chosen = [bool(args.ids), bool(args.entity), args.all]
    if sum(chosen) != 1:
        sys.exit(f"rillet-dagster events {args.action}: give exactly one of --id, --entity, --all")
    with engine.begin() as connection:
        if args.action == "requeue":
            requeued, removed = state.requeue(
                connection, ids=args.ids, entity=args.entity, statuses=[args.status]
            )
            print(f"requeued {requeued} {args.status} event(s); the webhook sensor applies them")
            if removed:
                print(
                    f"{removed} of them were records a sync could not store: the next full sync "
                    "reads them again"
                )
        else:
            count = state.discard(
                connection, ids=args.ids, entity=args.entity, statuses=[args.status]
            )
            print(f"discarded {count} {args.status} event(s)")


def _purge(engine: Any, settings: Settings, args: argparse.Namespace) -> None:
    from rillet_dagster.automation.retention import purge
    from rillet_dagster.warehouse.schema import make_engine

    try:
        days = (
            settings.event_retention_days
            if args.older_than_days is None
            else parse_retention_days(args.older_than_days, "--older-than-days")
        )
    except SettingsError as error:
        sys.exit(f"rillet-dagster events purge: {error}")
    warehouse = make_engine(settings.warehouse_url)
    try:
        purged = purge(engine, warehouse, days, datetime.now(UTC))
    finally:
        warehouse.dispose()
    print(
        f"purged {purged.events} webhook events and {purged.ledger_rows} ledger rows settled "
        f"before {purged.cutoff:%Y-%m-%d %H:%M}Z"
    )
