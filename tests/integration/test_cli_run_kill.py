"""A ``dagster job execute`` run SIGKILLed mid-step blocks nothing: the rerun with the same
instance starts its steps at once and succeeds, and the warehouse ends equal to the sandbox.

Before (a one-slot ``rillet_api`` pool), the killed run kept its slot, because only the daemon's
run monitoring frees the slots of runs it sees end, and a killed CLI run never ends: the rerun
logged "blocked by limit for pool rillet_api" for every step and waited 11+ minutes. Now no step
claims a pool; what a killed process may still hold is its in-flight slots of the rate budget,
which age out after the request timeout (30 s, README "Operating": the documented bound).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import dagster as dg
import httpx
import pytest

from rillet_dagster.sandbox.server import SandboxOptions, SandboxServer, build_sandbox
from tests import canary
from tests.run_processes import (
    assert_warehouse_equals_sandbox,
    instance_home,
    process_env,
    wait_for,
)

KEY = canary.api_key("cli-kill")
CHECKED = ("invoice", "journal_entry", "customer", "bill", "product")
# The rerun's first step must start within this many seconds of the command: the process
# start-up and code load (a few seconds, more on a loaded machine), and no wait for a slot.
STEP_START_BOUND = 45

pytestmark = [pytest.mark.slow]


@pytest.fixture
def server() -> Iterator[SandboxServer]:
    options = SandboxOptions(size="tiny", api_keys=(KEY,), rate_limit=1_000_000)
    started = SandboxServer(build_sandbox(options)).start()
    yield started
    started.stop()


def execute(env: dict[str, str], cwd: Path, start: str, end: str) -> subprocess.Popen[bytes]:
    tags = {
        "dagster/asset_partition_range_start": start,
        "dagster/asset_partition_range_end": end,
    }
    return subprocess.Popen(
        [
            str(Path(sys.executable).with_name("dagster")),
            "job",
            "execute",
            "-m",
            "rillet_dagster.definitions",
            "-j",
            "sync_all",
            "--tags",
            json.dumps(tags),
        ],
        env=env,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def first_step_start(instance: dg.DagsterInstance, run_id: str) -> float | None:
    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.STEP_START, limit=1
    ).records
    return records[0].timestamp if records else None


def test_a_sigkilled_cli_run_does_not_block_its_rerun(
    server: SandboxServer, tmp_path: Path, today: date
) -> None:
    start, end = (today - timedelta(days=1)).isoformat(), today.isoformat()
    home = instance_home(tmp_path)
    env = process_env(tmp_path, home, server, KEY, start)
    # Slow responses keep the first run busy long enough to be killed in a step.
    httpx.put(
        f"{server.base_url}/_sandbox/faults", json={"latency_min_ms": 20, "latency_max_ms": 40}
    )
    with dg.DagsterInstance.from_config(str(home)) as instance:
        first = execute(env, tmp_path, start, end)
        run = wait_for(lambda: instance.get_runs(limit=1), 120, "the first run")[0]
        wait_for(
            lambda: (
                instance.get_records_for_run(
                    run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION, limit=1
                ).records
            ),
            120,
            "a first materialization",
        )
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        killed = instance.get_run_by_id(run.run_id)
        assert killed is not None and killed.status == dg.DagsterRunStatus.STARTED
        httpx.put(
            f"{server.base_url}/_sandbox/faults", json={"latency_min_ms": 0, "latency_max_ms": 0}
        )
        launched = time.time()
        rerun_process = execute(env, tmp_path, start, end)
        rerun = wait_for(
            lambda: [r for r in instance.get_runs(limit=2) if r.run_id != run.run_id],
            120,
            "the rerun",
        )[0]
        started = wait_for(
            lambda: first_step_start(instance, rerun.run_id), STEP_START_BOUND, "a rerun step"
        )
        assert started - launched <= STEP_START_BOUND
        assert rerun_process.wait(timeout=300) == 0
        final = instance.get_run_by_id(rerun.run_id)
        assert final is not None and final.status == dg.DagsterRunStatus.SUCCESS
        blocked = [
            entry.message
            for entry in instance.all_logs(rerun.run_id)
            if "blocked" in (entry.message or "").lower() or "pool" in (entry.message or "")
        ]
        assert blocked == []
    assert_warehouse_equals_sandbox(server, env["RILLET_WAREHOUSE_URL"], CHECKED)
