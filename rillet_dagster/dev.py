"""``rillet-dagster dev``: the whole local stack in one command.

Starts the sandbox simulator (with live activity) on loopback, the webhook receiver (the
sandbox signs and delivers every change to it with a token made for this session), points the
code location at both through the environment, starts ``dagster dev`` (UI and daemon, so the
webhook sensor turns queued events into runs) with a persistent ``DAGSTER_HOME``, and, once the
UI answers, launches the ``sync_all`` job over every partition through Dagster's own GraphQL
API, so that the SQLite warehouse fills while you watch and then follows every change live.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

from dagster_graphql import DagsterGraphQLClient

from rillet_dagster.sandbox.activity import Activity
from rillet_dagster.sandbox.server import SandboxOptions, SandboxServer, build_sandbox
from rillet_dagster.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
# The simulator is Rillet-faithful at 60 requests per minute; the local demo runs ten times
# faster so that a first full sync takes seconds, not minutes. Both sides use the same limit.
DEV_RATE_LIMIT = (600, 60.0)


def _wait_for_port(port: int, stop: threading.Event, timeout: float = 180.0) -> bool:
    waited = 0.0
    while waited < timeout and not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            stop.wait(0.5)
            waited += 0.5
    return False


def _launch_initial_sync(ui_port: int, stop: threading.Event) -> None:
    if not _wait_for_port(ui_port, stop):
        return
    settings = Settings.from_env()
    from rillet_dagster.assets.entities import daily_partitions

    keys = daily_partitions(settings).get_partition_keys()
    client = DagsterGraphQLClient("127.0.0.1", port_number=ui_port)
    for _ in range(60):  # the code location may still be loading
        try:
            run_id = client.submit_job_execution(
                "sync_all",
                repository_location_name="rillet_dagster",
                tags={
                    "dagster/asset_partition_range_start": keys[0],
                    "dagster/asset_partition_range_end": keys[-1],
                    "rillet/trigger": "manual",
                },
            )
            print(f"rillet-dagster dev: launched sync_all over {len(keys)} days: run {run_id}")
            return
        except Exception as error:
            last = error
            stop.wait(2)
    print(f"rillet-dagster dev: could not launch sync_all ({last}); launch it from the UI")


def _start_receiver(port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    command = [
        str(Path(sys.executable).with_name("rillet-dagster")),
        "receiver",
        "--port",
        str(port),
    ]
    return subprocess.Popen(command, env=env, cwd=ROOT)  # noqa: S603 - our own entry point


def run_dev(
    *,
    seed: int,
    size: str,
    sandbox_port: int,
    ui_port: int,
    activity: float,
    receiver_port: int = 8780,
) -> int:
    home = Path(os.environ.get("DAGSTER_HOME") or ROOT / ".dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ROOT / "dagster.yaml", home / "dagster.yaml")
    requests, window = DEV_RATE_LIMIT
    token = base64.b64encode(secrets.token_bytes(32)).decode()
    options = SandboxOptions(
        seed=seed,
        size=size,
        rate_limit=requests,
        rate_window_seconds=window,
        webhook_urls=(f"http://127.0.0.1:{receiver_port}/webhooks/rillet",),
        webhook_tokens=(token,),
    )
    sandbox = build_sandbox(options)
    server = SandboxServer(sandbox, port=sandbox_port).start()
    mover = Activity(sandbox.writer, sandbox.world, rate_per_second=activity)
    mover.start()
    env = dict(os.environ)
    env.update(
        DAGSTER_HOME=str(home),
        RILLET_BASE_URL=server.base_url,
        RILLET_API_KEY=options.api_keys[0],
        RILLET_RATE_LIMIT=f"{requests}/{window:g}",
        RILLET_WEBHOOK_SECRETS=token,
    )
    env.setdefault("RILLET_WAREHOUSE_URL", f"sqlite:///{home / 'warehouse.db'}")
    env.setdefault("RILLET_STATE_URL", f"sqlite:///{home / 'state.db'}")
    os.environ.update(
        {
            k: env[k]
            for k in (
                "RILLET_BASE_URL",
                "RILLET_API_KEY",
                "RILLET_RATE_LIMIT",
                "RILLET_WAREHOUSE_URL",
                "RILLET_STATE_URL",
                "RILLET_WEBHOOK_SECRETS",
                "DAGSTER_HOME",
            )
        }
    )
    print(
        f"rillet-dagster dev\n  sandbox:   {server.base_url} (key {options.api_keys[0]}, "
        f"{activity:g} changes/s)\n  webhooks:  http://127.0.0.1:{receiver_port}/webhooks/rillet "
        f"(queue in {env['RILLET_STATE_URL']})\n  Dagster:   http://127.0.0.1:{ui_port}\n"
        f"  warehouse: {env['RILLET_WAREHOUSE_URL']}\n  history:   {home}",
        flush=True,
    )
    stop = threading.Event()
    launcher = threading.Thread(target=_launch_initial_sync, args=(ui_port, stop), daemon=True)
    command = [
        sys.executable,
        "-m",
        "dagster",
        "dev",
        "-w",
        str(ROOT / "workspace.yaml"),
        "-p",
        str(ui_port),
    ]
    receiver = _start_receiver(receiver_port, env)
    process = subprocess.Popen(command, env=env, cwd=ROOT)  # noqa: S603 - our own interpreter
    launcher.start()
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        return process.wait()
    finally:
        stop.set()
        mover.stop()
        server.stop()
        receiver.terminate()
        receiver.wait(timeout=10)
