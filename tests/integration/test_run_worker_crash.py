"""D1: SIGKILL the run worker of a real run launched by the daemon. The code server sees its
worker die, the run is marked failed, run retries launch it again, and the retry brings the
warehouse exactly in line with the sandbox."""

from __future__ import annotations

import json
import os
import re
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

ROOT = Path(__file__).resolve().parents[2]
KEY = canary.api_key("worker-crash")
POLL_SECONDS = 3  # run_monitoring.poll_interval_seconds for this test (30 s in dagster.yaml)
CHECKED = ("invoice", "journal_entry", "customer", "bill", "product")

# Serial: the matrix bounds the time to mark the killed run failed (2 x the poll interval).
pytestmark = [pytest.mark.slow, pytest.mark.serial]


@pytest.fixture
def server() -> Iterator[SandboxServer]:
    options = SandboxOptions(size="tiny", api_keys=(KEY,), rate_limit=1_000_000)
    started = SandboxServer(build_sandbox(options)).start()
    yield started
    started.stop()


def worker_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        found = re.search(r"Started process for run \(pid: (\d+)\)", entry.message or "")
        if found:
            return int(found.group(1))
    return None


def test_d1_a_killed_run_worker_is_failed_and_retried_to_the_same_result(
    server: SandboxServer, tmp_path: Path, today: date
) -> None:
    start = (today - timedelta(days=1)).isoformat()
    home = instance_home(tmp_path, poll_interval_seconds=POLL_SECONDS)
    env = process_env(tmp_path, home, server, KEY, start)
    # Slow responses keep the run busy long enough to be killed in the middle.
    httpx.put(
        f"{server.base_url}/_sandbox/faults", json={"latency_min_ms": 20, "latency_max_ms": 40}
    )
    bin_dir = Path(sys.executable).parent
    daemon = subprocess.Popen(
        [str(bin_dir / "dagster-daemon"), "run", "-w", str(ROOT / "workspace.yaml")],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        tags = {
            "dagster/asset_partition_range_start": start,
            "dagster/asset_partition_range_end": today.isoformat(),
        }
        launch = subprocess.run(
            [
                str(bin_dir / "dagster"),
                "job",
                "launch",
                "-w",
                str(ROOT / "workspace.yaml"),
                "-j",
                "sync_all",
                "--tags",
                json.dumps(tags),
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert launch.returncode == 0, launch.stderr[-3000:]
        with dg.DagsterInstance.from_config(str(home)) as instance:
            run = wait_for(lambda: instance.get_runs(limit=1), 30, "the run to be created")[0]
            try:
                pid = wait_for(lambda: worker_pid(instance, run.run_id), 120, "the run worker")
            except AssertionError:  # say where it got stuck: run status, its log, the daemon's
                status = instance.get_run_by_id(run.run_id).status  # type: ignore[union-attr]
                logs = [e.message for e in instance.all_logs(run.run_id)]
                daemon.kill()
                daemon_log = daemon.communicate()[1][-3000:]
                raise AssertionError(f"{status} {logs} {daemon_log!r}") from None
            wait_for(
                lambda: (
                    instance.get_records_for_run(
                        run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
                    ).records
                ),
                60,
                "a first materialization",
            )
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            wait_for(
                lambda: instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE,  # type: ignore[union-attr]
                2 * POLL_SECONDS,
                "the killed run to be marked failed",
            )
            assert time.monotonic() - killed_at <= 2 * POLL_SECONDS
            httpx.put(
                f"{server.base_url}/_sandbox/faults",
                json={"latency_max_ms": 0, "latency_min_ms": 0},
            )
            retry = wait_for(
                lambda: instance.get_runs(
                    filters=dg.RunsFilter(tags={"dagster/parent_run_id": run.run_id})
                ),
                60,
                "run retries to launch a retry",
            )[0]
            final = wait_for(
                lambda: (r := instance.get_run_by_id(retry.run_id)) and r.is_finished and r,
                180,
                "the retry to finish",
            )
            assert final.status == dg.DagsterRunStatus.SUCCESS
    finally:
        daemon.send_signal(signal.SIGINT)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
    assert_warehouse_equals_sandbox(server, env["RILLET_WAREHOUSE_URL"], CHECKED)
