"""Helpers for tests that run Dagster in real processes (CLI runs, the daemon) against a sandbox:
an instance home with the shipped ``dagster.yaml``, the environment of such a process, waiting
on the instance, and the warehouse compared with the sandbox at the end."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

from rillet_dagster.sandbox.server import SandboxServer
from tests import warehouse_compare

ROOT = Path(__file__).resolve().parents[1]


def instance_home(tmp_path: Path, **run_monitoring: Any) -> Path:
    """A DAGSTER_HOME with the shipped instance settings (``run_monitoring`` overridden)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    config = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    config["run_monitoring"].update(run_monitoring)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    # Create the instance's tables now: two processes starting on an empty home would both
    # create them, and the loser fails with "table already exists".
    with dg.DagsterInstance.from_config(str(home)):
        pass
    return home


def process_env(
    tmp_path: Path, home: Path, server: SandboxServer, key: str, start: str
) -> dict[str, str]:
    """The environment of a Dagster process of the test: nothing of the caller's settings."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("RILLET_", "DAGSTER_"))},
        "DAGSTER_HOME": str(home),
        "RILLET_BASE_URL": server.base_url,
        "RILLET_API_KEY": key,
        "RILLET_WAREHOUSE_URL": f"sqlite:///{tmp_path}/warehouse.db",
        "RILLET_STATE_URL": f"sqlite:///{tmp_path}/state.db",
        "RILLET_RATE_LIMIT": "1000000/60",
        "RILLET_START_DATE": start,
    }


def wait_for(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def assert_warehouse_equals_sandbox(
    server: SandboxServer, warehouse_url: str, entities: tuple[str, ...]
) -> None:
    """0 lost, 0 duplicated, every column of every header and child table equal."""
    warehouse_compare.assert_warehouse_equals_sandbox(server, warehouse_url, entities)
