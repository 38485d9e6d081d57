"""``rillet-dagster sync``: launch ``sync_all`` over every daily partition through a running
Dagster webserver, the first load of a deployment (the hourly backstop then keeps today fresh).

It launches through Dagster's GraphQL API, exactly as the UI's "Materialize all" over the whole
partition range does: the run is queued, the daemon starts it, and it shows in the UI like any
other. ``--wait`` follows it to its end and exits non-zero unless it succeeded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError
from dotenv import load_dotenv

from rillet_dagster.automation.jobs import SYNC_ALL
from rillet_dagster.settings import Settings, SettingsError

LOCATION = "rillet_dagster"
_FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}


def add_sync_parser(commands: Any) -> None:
    sync = commands.add_parser(
        "sync",
        help="launch sync_all over every daily partition in a running Dagster (first load)",
        description="Launch sync_all from RILLET_START_DATE to today through the Dagster "
        "webserver's GraphQL API; the daemon runs it like any run launched from the UI.",
    )
    sync.add_argument(
        "--ui",
        default="http://127.0.0.1:3000",
        help="the Dagster webserver's URL (default http://127.0.0.1:3000)",
    )
    sync.add_argument(
        "--wait", action="store_true", help="follow the run; exit 1 unless it succeeds"
    )
    sync.add_argument(
        "--timeout",
        type=float,
        default=6 * 3600.0,
        help="with --wait, give up after this many seconds (default 6 h)",
    )


def _client(ui: str) -> DagsterGraphQLClient:
    parts = urlsplit(ui if "://" in ui else f"http://{ui}")
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise SystemExit(f"rillet-dagster sync: --ui {ui!r} is not an http(s) URL")
    return DagsterGraphQLClient(
        parts.hostname, port_number=parts.port, use_https=parts.scheme == "https"
    )


def run_sync(args: argparse.Namespace) -> None:
    from rillet_dagster.assets.entities import daily_partitions

    # The settings `rillet-dagster dev` wrote for other shells; variables already set win.
    load_dotenv(Path.cwd() / ".env", override=False)
    try:
        settings = Settings.from_env()
    except SettingsError as error:
        sys.exit(f"rillet-dagster sync: {error}")
    keys = daily_partitions(settings).get_partition_keys()
    if not keys:
        sys.exit(f"rillet-dagster sync: RILLET_START_DATE={settings.start_date} is in the future")
    client = _client(args.ui)
    ui = args.ui.rstrip("/")
    try:
        httpx.get(f"{ui}/server_info", timeout=10).raise_for_status()
    except httpx.HTTPError as error:
        sys.exit(
            f"rillet-dagster sync: no Dagster webserver answers at {ui} ({error}); start it "
            "(or the deployment) first, or pass its URL with --ui"
        )
    try:
        run_id = client.submit_job_execution(
            SYNC_ALL,
            repository_location_name=LOCATION,
            tags={
                "dagster/asset_partition_range_start": keys[0],
                "dagster/asset_partition_range_end": keys[-1],
            },
        )
    except DagsterGraphQLClientError as error:
        sys.exit(f"rillet-dagster sync: the webserver at {ui} refused the run: {error}")
    except Exception as error:  # connection refused, DNS, TLS: say where we tried
        sys.exit(f"rillet-dagster sync: cannot reach the Dagster webserver at {ui}: {error}")
    print(f"launched sync_all over {keys[0]}..{keys[-1]} ({len(keys)} days): {ui}/runs/{run_id}")
    if not args.wait:
        return
    deadline = time.monotonic() + args.timeout
    status = ""
    while time.monotonic() < deadline:
        try:
            status = client.get_run_status(run_id).value
        except Exception as error:  # a webserver restart: keep asking until the deadline
            print(f"cannot read the run's status yet ({type(error).__name__}); retrying")
        if status in _FINISHED:
            break
        time.sleep(5)
    print(f"sync_all {status.lower() or 'not finished'}: {ui}/runs/{run_id}")
    if status != "SUCCESS":
        sys.exit(1)
