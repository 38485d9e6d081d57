"""``rillet-dagster``: the command line.

rillet-dagster sandbox [--port 8765] [--seed 7] [--size small] [--api-key KEY]
                       [--webhook-url URL --webhook-token TOKEN] [--activity RATE]
                       [--faults error_rate=0.1,latency=20-500] [--rate-limit 60/60]
rillet-dagster receiver [--host 127.0.0.1] [--port 8780] [--state-url URL]
                        [--secrets-env RILLET_WEBHOOK_SECRETS] [--max-body-bytes N]
                        [--max-buffered-bytes N]
                        [--max-future-seconds 300] [--max-age-seconds 604800]
                        [--http httptools|h11]
rillet-dagster dev [--port 8765] [--ui-port 3000] [--receiver-port 8780] [--seed 7]
                   [--size small] [--activity RATE] [--report-months 1] [--env-file .env]
rillet-dagster events [list|requeue|discard|purge] ...
rillet-dagster sync [--ui http://127.0.0.1:3000] [--wait]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from dotenv import load_dotenv

from rillet_dagster.events_cli import add_events_parser, run_events
from rillet_dagster.launch_cli import add_sync_parser, run_sync
from rillet_dagster.sandbox.data import SIZES, parse_size
from rillet_dagster.sandbox.faults import parse_faults
from rillet_dagster.sandbox.server import (
    DEFAULT_API_KEY,
    SandboxOptions,
    build_sandbox,
    serve_forever,
)
from rillet_dagster.settings import (
    WEBHOOK_SECRETS_VAR,
    RateLimit,
    Settings,
    SettingsError,
    parse_webhook_secrets,
)


def _positive_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of changes per second")
    return value


def _size(text: str) -> str:
    try:
        parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _faults(text: str) -> str:
    try:
        parse_faults(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _rate_limit(text: str) -> RateLimit:
    try:
        return RateLimit.parse(text, variable="--rate-limit")
    except SettingsError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rillet-dagster", description="Rillet accounting data into a warehouse, with Dagster."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    sandbox = commands.add_parser(
        "sandbox",
        help="run the local Rillet sandbox simulator",
        description="Serve a simulated Rillet organization on loopback (no network, no key).",
    )
    _sandbox_arguments(sandbox)
    dev = commands.add_parser(
        "dev",
        help="the local stack: sandbox with live activity and webhooks, receiver, Dagster UI "
        "and daemon, first sync",
        description="Start the sandbox simulator with live activity delivering signed webhooks "
        "to the webhook receiver, the Dagster UI and daemon (persistent DAGSTER_HOME, default "
        "./.dagster_home) and launch sync_all into the SQLite warehouse; the webhook sensor then "
        "applies every change.",
    )
    dev.add_argument("--port", type=int, default=8765, help="sandbox port (default 8765)")
    dev.add_argument("--ui-port", type=int, default=3000, help="Dagster UI port (default 3000)")
    dev.add_argument(
        "--receiver-port", type=int, default=8780, help="webhook receiver port (default 8780)"
    )
    dev.add_argument("--seed", type=int, default=7)
    dev.add_argument("--size", type=_size, default="small")
    dev.add_argument("--activity", type=_positive_rate, default=1.0, metavar="RATE")
    dev.add_argument(
        "--report-months",
        type=_count,
        default=1,
        metavar="N",
        help="month-end packs taken after the first sync, for the last N months (default 1)",
    )
    dev.add_argument(
        "--env-file",
        type=Path,
        help="where to write the stack's settings for other shells (default ./.env in the "
        "project folder, which Dagster's CLI loads)",
    )
    receiver = commands.add_parser(
        "receiver",
        help="run the webhook receiver (POST /webhooks/rillet into the state database queue)",
        description="Verify signed Rillet webhooks and store them durably in the queue of the "
        "state database before acknowledging them.",
    )
    _receiver_arguments(receiver)
    add_events_parser(commands)
    add_sync_parser(commands)
    return parser


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def _receiver_arguments(receiver: argparse.ArgumentParser) -> None:
    receiver.add_argument("--host", default="127.0.0.1")
    receiver.add_argument("--port", type=int, default=8780)
    receiver.add_argument(
        "--state-url", help="SQLAlchemy URL of the queue (default: RILLET_STATE_URL's default)"
    )
    receiver.add_argument(
        "--secrets-env",
        default=WEBHOOK_SECRETS_VAR,
        metavar="VAR",
        help=f"environment variable holding the comma-separated base64 webhook tokens "
        f"(default {WEBHOOK_SECRETS_VAR}; tokens are never taken on the command line)",
    )
    receiver.add_argument("--max-body-bytes", type=_positive_int, default=1024 * 1024)
    receiver.add_argument(
        "--max-buffered-bytes",
        type=_positive_int,
        default=64 * 1024 * 1024,
        help="request bodies held in memory across all connections; beyond it, 503 with "
        "Retry-After (default 64 MiB)",
    )
    receiver.add_argument(
        "--max-future-seconds",
        type=_seconds,
        default=300.0,
        help="refuse timestamps further ahead than this clock skew (default 300)",
    )
    receiver.add_argument(
        "--max-age-seconds",
        type=_seconds,
        default=7 * 86400.0,
        help="refuse new events older than this (default 7 days; 0 accepts any age)",
    )
    receiver.add_argument(
        "--http",
        choices=("httptools", "h11"),
        default="httptools",
        help="HTTP parser (default httptools, the faster; both get the same limits)",
    )
    receiver.add_argument("--log-level", default="info")


def run_receiver(args: argparse.Namespace) -> None:
    from rillet_dagster.receiver.app import ReceiverConfig, receiver_keys, timestamp_policy
    from rillet_dagster.receiver.serve import serve

    # The settings `rillet-dagster dev` wrote for other shells, as Dagster's CLI reads them;
    # variables already set win.
    load_dotenv(Path.cwd() / ".env", override=False)
    try:
        # The receiver talks to the state database only: under the production profile its URL
        # (or --state-url) is checked, not Rillet's or the warehouse's, which its container
        # need not be given.
        settings = Settings.from_env(uses=())
        if args.state_url:
            settings.check_production((), databases={"--state-url": args.state_url})
        else:
            settings.check_production(("state",))
        secrets = parse_webhook_secrets(os.environ.get(args.secrets_env, ""), args.secrets_env)
    except SettingsError as error:
        sys.exit(f"rillet-dagster receiver: {error}")
    if not secrets:
        sys.exit(
            f"rillet-dagster receiver: set {args.secrets_env} to the webhook token(s), "
            "comma-separated, as Rillet shows them"
        )
    try:
        receiver_keys(secrets)  # a token too short to be safe: the message says how to make one
    except ValueError as error:
        sys.exit(f"rillet-dagster receiver: {args.secrets_env}: {error}")
    try:
        config = ReceiverConfig(
            state_url=args.state_url or settings.state_url,
            secrets=secrets,
            max_body_bytes=args.max_body_bytes,
            max_buffered_bytes=args.max_buffered_bytes,
            timestamp_policy=timestamp_policy(
                args.max_future_seconds, args.max_age_seconds or None
            ),
        )
    except ValueError as error:
        sys.exit(f"rillet-dagster receiver: {error}")
    print(
        f"Rillet webhook receiver on http://{args.host}:{args.port}/webhooks/rillet "
        f"({len(secrets)} token(s))",
        flush=True,
    )
    serve(config, args.host, args.port, http=args.http, log_level=args.log_level)


def _sandbox_arguments(sandbox: argparse.ArgumentParser) -> None:
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8765)
    sandbox.add_argument("--seed", type=int, default=7, help="same seed, same company (default 7)")
    sandbox.add_argument(
        "--size",
        type=_size,
        default="small",
        help=f"one of {', '.join(SIZES)} or customers=N,vendors=N,journal_entries=N",
    )
    sandbox.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        help=f"accepted bearer key (repeatable; default {DEFAULT_API_KEY!r})",
    )
    sandbox.add_argument("--webhook-url", action="append", default=[], dest="webhook_urls")
    sandbox.add_argument(
        "--webhook-token",
        action="append",
        default=[],
        dest="webhook_tokens",
        help="base64 signing token (repeat to sign with several, as during rotation)",
    )
    sandbox.add_argument(
        "--activity",
        type=_positive_rate,
        metavar="RATE",
        help="keep creating, updating and deleting records at RATE changes per second",
    )
    sandbox.add_argument("--faults", type=_faults, default="", help="e.g. error_rate=0.1")
    sandbox.add_argument("--rate-limit", type=_rate_limit, default=RateLimit())


def run_sandbox(args: argparse.Namespace) -> None:
    keys = tuple(args.api_keys or (DEFAULT_API_KEY,))
    options = SandboxOptions(
        seed=args.seed,
        size=args.size,
        api_keys=keys,
        rate_limit=args.rate_limit.requests,
        rate_window_seconds=args.rate_limit.window_seconds,
        faults=parse_faults(args.faults),
        webhook_urls=args.webhook_urls,
        webhook_tokens=args.webhook_tokens,
    )
    try:
        sandbox = build_sandbox(options)
    except ValueError as error:
        sys.exit(f"rillet-dagster sandbox: {error}")
    base_url = f"http://{args.host}:{args.port}"
    counts = {name: len(c) for name, c in sandbox.world.store.collections.items() if len(c)}
    print(f"Rillet sandbox (seed {args.seed}, size {args.size}): {sum(counts.values())} records")
    print(f"  export RILLET_BASE_URL={base_url}")
    print(f"  export RILLET_API_KEY={keys[0]}")
    print(f"  try: curl -H 'Authorization: Bearer {keys[0]}' -H 'X-Rillet-API-Version: 4' "
          f"'{base_url}/invoices?limit=2'")  # fmt: skip
    print(f"  sandbox controls (faults, webhooks, stats): {base_url}/_sandbox", flush=True)
    activity = None
    if args.activity:
        from rillet_dagster.sandbox.activity import Activity

        activity = Activity(sandbox.writer, sandbox.world, rate_per_second=args.activity)
        activity.start()
        print(f"  activity: about {args.activity:g} changes per second", flush=True)
    try:
        serve_forever(sandbox, args.host, args.port)
    finally:
        if activity is not None:
            activity.stop()


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "sandbox":
        run_sandbox(args)
    elif args.command == "receiver":
        run_receiver(args)
    elif args.command == "events":
        run_events(args)
    elif args.command == "sync":
        run_sync(args)
    elif args.command == "dev":
        from rillet_dagster.dev import run_dev

        sys.exit(
            run_dev(
                seed=args.seed,
                size=args.size,
                sandbox_port=args.port,
                ui_port=args.ui_port,
                activity=args.activity,
                receiver_port=args.receiver_port,
                report_months=args.report_months,
                env_file=args.env_file,
            )
        )


if __name__ == "__main__":
    main()
