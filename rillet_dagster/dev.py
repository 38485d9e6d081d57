"""``rillet-dagster dev``: the whole local stack in one command, ending in a reconciled company.

Starts the sandbox simulator (with live activity) on loopback, the webhook receiver (the
sandbox signs and delivers every change to it with a token made for this session) and
``dagster dev`` (UI and daemon) with a persistent ``DAGSTER_HOME``; writes the settings it uses
to ``.env``, which Dagster's own CLI loads, so every README command works from another shell;
then :mod:`rillet_dagster.first_run` syncs everything, takes recent reports and builds the
models and their checks.

The console shows only what the user can act on: the addresses, the first run's progress, a
"ready" line, and failed runs afterwards. Dagster's own output and the receiver's go to log
files under ``$DAGSTER_HOME/logs``. Ctrl+C stops every child (each runs in its own process
group, so the terminal's SIGINT reaches only this process) without a traceback.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

from rillet_dagster.sandbox.activity import Activity
from rillet_dagster.sandbox.server import SandboxOptions, SandboxServer, build_sandbox
from rillet_dagster.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
# The simulator is Rillet-faithful at 60 requests per minute; the local demo runs ten times
# faster so that a first full sync takes seconds, not minutes. Both sides use the same limit.
DEV_RATE_LIMIT = (600, 60.0)
# Written to .env, in this order; Dagster's CLI loads the file from the folder it runs in.
ENV_KEYS = (
    "DAGSTER_HOME",
    "RILLET_BASE_URL",
    "RILLET_API_KEY",
    "RILLET_RATE_LIMIT",
    "RILLET_WAREHOUSE_URL",
    "RILLET_STATE_URL",
    "RILLET_WEBHOOK_SECRETS",
    "RILLET_START_DATE",
)
# Entity partitions start a week back: each daily partition of a run costs Dagster a planned
# and a finished event per table (a first sync over 32 days wrote 2,000 events and took twice
# as long); the first partition holds everything older.
DEV_HISTORY_DAYS = 7
STOP_SECONDS = 20


def say(message: str) -> None:
    print(f"rillet-dagster dev: {message}", flush=True)


def ports_in_use(ports: Mapping[str, int]) -> list[str]:
    taken = []
    for what, port in ports.items():
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                taken.append(f"{port} ({what})")
    return taken


def write_env_file(path: Path, env: Mapping[str, str]) -> None:
    lines = [
        "# Written by `rillet-dagster dev` for the stack it runs. Dagster's CLI (dagster, dg) and",
        "# `rillet-dagster receiver` load this file from this folder, so commands run here reach",
        "# the same sandbox, warehouse and Dagster instance. Rewritten at every start.",
        *(f"{key}={env[key]}" for key in ENV_KEYS),
    ]
    path.write_text("\n".join(lines) + "\n")


class Child:
    """A child process in its own process group, its output in a log file."""

    def __init__(self, name: str, command: list[str], env: Mapping[str, str], cwd: Path, log: Path):
        self.name = name
        self.log = log
        self._out: IO[bytes] = log.open("ab")
        self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and entry points
            command,
            env=dict(env),
            cwd=cwd,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_SECONDS) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout)
        # Whatever it started and left behind (code servers) goes with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self._out.close()

    def tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_dev(
    *,
    seed: int,
    size: str,
    sandbox_port: int,
    ui_port: int,
    activity: float,
    receiver_port: int = 8780,
    report_months: int = 1,
    env_file: Path | None = None,
) -> int:
    home = Path(os.environ.get("DAGSTER_HOME") or ROOT / ".dagster_home").resolve()
    env_file = (env_file or ROOT / ".env").resolve()
    taken = ports_in_use(
        {"sandbox": sandbox_port, "Dagster UI": ui_port, "webhook receiver": receiver_port}
    )
    if taken:
        say(
            f"port {', '.join(taken)} is in use (another rillet-dagster dev?); stop it or choose "
            "other ports with --port, --ui-port and --receiver-port"
        )
        return 2
    home.mkdir(parents=True, exist_ok=True)
    # Not "logs": Dagster moves $DAGSTER_HOME/logs away for its telemetry at start.
    logs = home / "dev_logs"
    logs.mkdir(exist_ok=True)
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
    say(f"building the {size} sandbox company (seed {seed}) ...")
    sandbox = build_sandbox(options)
    server = SandboxServer(sandbox, port=sandbox_port).start()
    mover = Activity(sandbox.writer, sandbox.world, rate_per_second=activity)
    env = dict(os.environ)
    env.update(
        DAGSTER_HOME=str(home),
        RILLET_BASE_URL=server.base_url,
        RILLET_API_KEY=options.api_keys[0],
        RILLET_RATE_LIMIT=f"{requests}/{window:g}",
        RILLET_WEBHOOK_SECRETS=token,
        RILLET_WAREHOUSE_URL=f"sqlite:///{home / 'warehouse.db'}",
        RILLET_STATE_URL=f"sqlite:///{home / 'state.db'}",
        PYTHONUNBUFFERED="1",
    )
    first_day = datetime.now(UTC).date() - timedelta(days=DEV_HISTORY_DAYS)
    env.setdefault("RILLET_START_DATE", first_day.isoformat())
    os.environ.update({key: env[key] for key in ENV_KEYS})
    write_env_file(env_file, env)
    records = sum(len(c) for c in sandbox.world.store.collections.values())
    print(
        f"rillet-dagster dev\n"
        f"  sandbox:   {server.base_url} ({records:,} records, key {options.api_keys[0]}, "
        f"about {activity:g} changes/s)\n"
        f"  webhooks:  http://127.0.0.1:{receiver_port}/webhooks/rillet\n"
        f"  Dagster:   http://127.0.0.1:{ui_port}\n"
        f"  warehouse: {env['RILLET_WAREHOUSE_URL']}\n"
        f"  settings:  {env_file} (for dagster and rillet-dagster commands in another shell)\n"
        f"  logs:      {logs}/dagster.log, {logs}/receiver.log\n"
        "  Ctrl+C stops everything.",
        flush=True,
    )
    bin_dir = Path(sys.executable).parent
    children: list[Child] = []
    stop = threading.Event()
    # Ctrl+C and SIGTERM both stop the stack cleanly, also when this process was started with
    # SIGINT ignored (a background job of a non-interactive shell).
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        children.append(
            Child(
                "webhook receiver",
                [
                    str(bin_dir / "rillet-dagster"),
                    "receiver",
                    "--port",
                    str(receiver_port),
                    "--log-level",
                    "warning",
                ],
                env,
                home,
                logs / "receiver.log",
            )
        )
        dagster = Child(
            "dagster dev",
            [
                sys.executable,
                "-m",
                "dagster",
                "dev",
                "-w",
                str(ROOT / "workspace.yaml"),
                "-p",
                str(ui_port),
            ],
            env,
            home,  # DAGSTER_HOME is the working folder: its dagster.yaml is the one in use
            logs / "dagster.log",
        )
        children.append(dagster)
        mover.start()
        first = threading.Thread(
            target=_first_run,
            args=(home, ui_port, report_months, stop),
            name="first-run",
            daemon=True,
        )
        first.start()
        watcher = threading.Thread(
            target=_watch_failures, args=(home, ui_port, stop), name="failures", daemon=True
        )
        watcher.start()
        while True:
            for child in children:
                if child.process.poll() is not None:
                    say(
                        f"{child.name} stopped (exit code {child.process.returncode}); the end "
                        f"of {child.log}:\n{child.tail()}"
                    )
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        print(flush=True)
        say("stopping ...")
        return 0
    finally:
        stop.set()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        with _ignoring_interrupts():
            for child in reversed(children):
                child.stop(signal.SIGINT if child.name == "dagster dev" else signal.SIGTERM)
            mover.stop()
            server.stop()
            # The settings describe this stack; once it is gone they would only mislead.
            if env_file.exists() and f"RILLET_WEBHOOK_SECRETS={token}" in env_file.read_text():
                env_file.unlink()
        say("stopped")


class _ignoring_interrupts:
    """A second Ctrl+C while children stop must not leave them running."""

    def __enter__(self) -> None:
        self._previous = signal.signal(signal.SIGINT, signal.SIG_IGN)

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)


def _first_run(home: Path, ui_port: int, report_months: int, stop: threading.Event) -> None:
    from rillet_dagster.first_run import FirstRun

    try:
        FirstRun(
            home=home,
            ui_port=ui_port,
            settings=Settings.from_env(),
            report_months=report_months,
            say=say,
            stopped=stop.is_set,
        ).run()
    except Exception as error:
        if not stop.is_set():
            say(f"the first run stopped: {type(error).__name__}: {error}")


def _watch_failures(home: Path, ui_port: int, stop: threading.Event) -> None:
    """Name every run that fails from now on, with its link: the one thing worth a line."""
    import dagster as dg

    seen: set[str] = set()
    started = time.time()
    while not stop.wait(5):
        try:
            with dg.DagsterInstance.from_config(str(home)) as instance:
                while not stop.wait(5):
                    for record in instance.get_run_records(
                        filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]), limit=20
                    ):
                        run = record.dagster_run
                        if run.run_id in seen or (record.create_timestamp.timestamp() < started):
                            continue
                        seen.add(run.run_id)
                        if run.tags.get("rillet/first_run"):
                            continue  # the first run names its own failures
                        say(
                            f"run {run.job_name} FAILED: http://127.0.0.1:{ui_port}/runs/{run.run_id}"
                        )
        except Exception:  # noqa: S112 - the instance is still being created: retry
            continue
