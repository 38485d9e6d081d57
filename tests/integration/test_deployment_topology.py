"""The deployment's process topology on PostgreSQL (issue 14): the code server, the webserver,
the daemon and the webhook receiver as separate processes, as ``docker/docker-compose.yml``
starts them, with Dagster's instance, the warehouse and the state database on PostgreSQL.

``sync_all`` is launched through the GraphQL API and must succeed; signed webhooks from the
sandbox go through the receiver and are applied by the daemon's sensor; then the code server and
the daemon are killed, webhooks keep arriving while they are down, and after a restart every one
of them is applied: nothing acknowledged is lost, and the warehouse equals the sandbox.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from rillet_dagster import catalog
from rillet_dagster.sandbox.activity import Activity
from rillet_dagster.sandbox.server import SandboxOptions, SandboxServer, build_sandbox
from tests import canary
from tests.dev_stack import free_port
from tests.pg import ADMIN_URL, require_postgres
from tests.topology import (
    DOCKER,
    SERVICES,
    Topology,
    pending,
    percentile,
    running,
    wait_applied,
    wait_delivered,
)
from tests.warehouse_compare import assert_warehouse_equals_sandbox

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.timeout(600),
    # dagster-graphql's client calls gql the old way; not ours to change.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:gql"),
]

KEY = canary.api_key("topology")
TOKEN = canary.webhook_token("topology")
ENTITIES = [spec.name for spec in catalog.ENTITIES]
# What webhooks bring up to date (the reporting view of journal entries has no webhooks: the
# hourly backstop sync refreshes it).
WEBHOOK_FED = [s.name for s in catalog.ENTITIES if s.webhook_entity or s.read_on_webhooks_of]


@dataclass
class Databases:
    """Dagster's database and the project's two, made by docker/postgres-init.sh (with
    docker/postgres-roles.sql) under names of this test's own, with a role per service."""

    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:10])

    def name(self, what: str) -> str:
        return f"rt_topo_{what}_{self.suffix}"

    def password(self, role: str) -> str:
        return canary.password(f"{role}-{self.suffix}")

    def url(self, role: str, database: str, driver: str = "psycopg") -> str:
        admin = sa.engine.make_url(ADMIN_URL)
        return admin.set(
            drivername=f"postgresql+{driver}",
            username=self.name(role),
            password=self.password(role),
            database=self.name(database),
        ).render_as_string(hide_password=False)

    def create(self) -> None:
        psql = shutil.which("psql")
        if psql is None:
            if "CI" in os.environ:
                pytest.fail("psql is not installed; CI must run the deployment tests")
            pytest.skip("psql is not installed")
        admin = sa.engine.make_url(ADMIN_URL)
        env = {
            **os.environ,
            "PGHOST": admin.host or "127.0.0.1",
            "PGPORT": str(admin.port or 5432),
            "POSTGRES_USER": admin.username or "postgres",
            "ROLES_SQL": str(DOCKER / "postgres-roles.sql"),
            "DAGSTER_PG_ROLE": self.name("dagster"),
            "DAGSTER_PG_DB": self.name("dagster"),
            "DAGSTER_PG_PASSWORD": self.password("dagster"),
            "RILLET_CODE_PG_PASSWORD": self.password("code"),
            "RILLET_RECEIVER_PG_PASSWORD": self.password("receiver"),
            "RILLET_ANALYST_PG_PASSWORD": self.password("analyst"),
        }
        names = {
            "warehouse_db": self.name("warehouse"),
            "state_db": self.name("state"),
            "code_role": self.name("code"),
            "receiver_role": self.name("receiver"),
            "analyst_role": self.name("analyst"),
        }
        variables = [f"--set={key}={value}" for key, value in names.items()]
        done = subprocess.run(
            ["bash", str(DOCKER / "postgres-init.sh"), *variables],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr

    def drop(self) -> None:
        engine = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            for database in ("dagster", "warehouse", "state"):
                connection.execute(
                    sa.text(f'DROP DATABASE IF EXISTS "{self.name(database)}" WITH (FORCE)')
                )
            for role in ("dagster", "code", "receiver", "analyst"):
                connection.execute(sa.text(f'DROP ROLE IF EXISTS "{self.name(role)}"'))
        engine.dispose()


@pytest.fixture
def topology(tmp_path: Path, today: date) -> Iterator[tuple[Topology, SandboxServer]]:
    require_postgres()
    databases = Databases()
    receiver_port = free_port()
    options = SandboxOptions(
        size="tiny",
        api_keys=(KEY,),
        rate_limit=1_000_000,
        webhook_urls=(f"http://127.0.0.1:{receiver_port}/webhooks/rillet",),
        webhook_tokens=(TOKEN,),
        webhook_time_factor=0.001,
    )
    sandbox = SandboxServer(build_sandbox(options)).start()
    # As docker-compose.yml gives them, with CI's server instead of the socket: each service its
    # own role, the receiver only what it needs.
    env = {
        "DAGSTER_PG_URL": databases.url("dagster", "dagster", driver="psycopg2"),
        # The sandbox speaks http on loopback, and CI's server no TLS: the production profile
        # would refuse both (tests/unit/test_production_profile.py).
        "RILLET_PROFILE": "development",
        "RILLET_API_KEY": KEY,
        "RILLET_BASE_URL": sandbox.base_url,
        "RILLET_WAREHOUSE_URL": databases.url("code", "warehouse"),
        "RILLET_STATE_URL": databases.url("code", "state"),
        "RILLET_WEBHOOK_SECRETS": TOKEN,
        "RILLET_RATE_LIMIT": "100000/60",
        "RILLET_START_DATE": (today - timedelta(days=2)).isoformat(),
    }
    receiver_env = {
        "RILLET_PROFILE": "development",
        "RILLET_WEBHOOK_SECRETS": TOKEN,
        "RILLET_STATE_URL": databases.url("receiver", "state"),
    }
    try:
        databases.create()
        with running(tmp_path, env, receiver_env=receiver_env) as started:
            started.ports["receiver"] = receiver_port
            yield started, sandbox
    finally:
        sandbox.stop()
        databases.drop()


def test_the_compose_topology_syncs_applies_webhooks_and_survives_restarts(
    topology: tuple[Topology, SandboxServer], today: date
) -> None:
    deployment, sandbox = topology
    began = time.monotonic()
    for service in SERVICES:
        deployment.start(service)
    ui = deployment.wait_until(
        "UI answer", lambda: deployment.answers(f"{deployment.ui_url}/server_info"), 120
    )
    deployment.wait_until("code location", deployment.location_loaded, 120)
    deployment.wait_until(
        "receiver health",
        lambda: deployment.answers(f"http://127.0.0.1:{deployment.ports['receiver']}/health"),
        60,
    )

    # The README's first load: `rillet-dagster sync --wait` against the webserver.
    cli = str(Path(sys.executable).with_name("rillet-dagster"))
    launched = subprocess.run(
        [cli, "sync", "--ui", deployment.ui_url, "--wait"],
        env=deployment.service_env("code"),
        cwd=deployment.home,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert launched.returncode == 0, f"{launched.stdout}{launched.stderr}\n{deployment.logs()}"
    days = [(today - timedelta(days=n)).isoformat() for n in (2, 1, 0)]
    assert f"launched sync_all over {days[0]}..{days[-1]} (3 days)" in launched.stdout
    run_id = launched.stdout.rsplit("/runs/", 1)[1].strip()
    assert "sync_all success" in launched.stdout
    sync = deployment.run(run_id)
    assert sync["status"] == "SUCCESS", deployment.logs()
    warehouse = deployment.env["RILLET_WAREHOUSE_URL"]
    assert_warehouse_equals_sandbox(sandbox, warehouse, ENTITIES)

    # Webhooks through the receiver, applied by the daemon's sensor and its runs.
    activity = Activity(sandbox.sandbox.writer, sandbox.sandbox.world, rate_per_second=1.0, seed=5)
    first = [activity.step() for _ in range(8)]
    delivered = wait_delivered(sandbox, 60)
    lags = wait_applied(deployment, delivered, 180)
    assert_warehouse_equals_sandbox(sandbox, warehouse, WEBHOOK_FED)

    # The code server and the daemon go down hard; Rillet keeps sending, the receiver keeps
    # acknowledging; after they come back every acknowledged event is applied.
    # Between runs (a run caught starting by the crash would hold the webhook run slot until run
    # monitoring's start timeout, 180 s, gives up on it; the test is about events that arrive
    # while nothing can apply them).
    deployment.wait_until("no run in flight", lambda: not deployment.busy(), 120)
    deployment.kill("daemon")
    deployment.kill("code")
    second = [activity.step() for _ in range(8)]
    while_down = wait_delivered(sandbox, 60) - delivered
    assert while_down, "no webhook was delivered while the code server and daemon were down"
    assert pending(deployment, while_down) == while_down, "events applied with no daemon running"
    deployment.start("code")
    deployment.start("daemon")
    deployment.wait_until("code location after restart", deployment.location_loaded, 120)
    after_restart = wait_applied(deployment, while_down, 240)
    wait_applied(deployment, delivered | while_down, 10)
    assert_warehouse_equals_sandbox(sandbox, warehouse, WEBHOOK_FED)

    sync_seconds = (sync["endTime"] or 0) - (sync["startTime"] or 0)
    print(
        f"\ntopology on PostgreSQL: UI answered {ui:.1f} s after start; sync_all "
        f"{sync_seconds:.1f} s (run start to end); {len(first) + len(second)} changes, "
        f"{len(delivered | while_down)} webhooks; lag p50 {statistics.median(lags):.1f} s, "
        f"p95 {percentile(lags, 95):.1f} s; the {len(while_down)} sent while the code server "
        f"and daemon were down: applied {max(after_restart):.1f} s after receipt at most; "
        f"{time.monotonic() - began:.0f} s in all"
    )
