"""Least privilege on PostgreSQL (test-matrix X4): docker/postgres-roles.sql, run with psql, gives
the receiver, the code location and analysts their roles; each is denied what is outside them.

The script runs against databases and roles of this module's own (unique names, passed as psql
variables, dropped afterwards). The code location's role then creates its tables by really
running the code (a Dagster sync from the sandbox, the rate budget, the queue functions), the
real receiver app stores signed webhooks as the receiver role, and every forbidden statement is
tried as the receiver and as the analyst: each must fail with SQLSTATE 42501.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import httpx
import pytest
import sqlalchemy as sa

from rillet_dagster.definitions import build_definitions
from rillet_dagster.receiver.app import ReceiverConfig, timestamp_policy
from rillet_dagster.receiver.serve import build_server
from rillet_dagster.rillet.ratelimit import keys_table, slots_table
from rillet_dagster.sandbox.server import SandboxOptions, SandboxServer, build_sandbox
from rillet_dagster.settings import Settings
from rillet_dagster.warehouse import state
from rillet_dagster.warehouse.reports import LINES_TABLE, SNAPSHOTS_TABLE, ensure_report_schema
from tests import canary
from tests.integration.test_receiver import PATH, TOKEN, Delivery, invoice_body, rfc3339
from tests.pg import ADMIN_URL, require_postgres

pytestmark = pytest.mark.postgres

SCRIPT = Path(__file__).resolve().parents[2] / "docker" / "postgres-roles.sql"
KEY = canary.api_key("least-privilege")
QUEUE = state.WEBHOOK_EVENTS_TABLE
PRODUCTS = dg.AssetKey(["rillet", "products"])
INSUFFICIENT_PRIVILEGE = "42501"


@dataclass
class Deployment:
    """The names one run of the script was given, and URLs to connect as each role."""

    warehouse_db: str
    state_db: str
    code: str
    receiver: str
    analyst: str
    passwords: dict[str, str]
    # Password hashes before and after a rerun of the script (made after the sync).
    hashes: list[dict[str, str]] = field(default_factory=list)
    rerun: subprocess.CompletedProcess[str] | None = None

    def url(self, role: str, database: str) -> str:
        return (
            sa.engine.make_url(ADMIN_URL)
            .set(username=role, password=self.passwords[role], database=database)
            .render_as_string(hide_password=False)
        )

    def admin(self, database: str) -> sa.Engine:
        url = sa.engine.make_url(ADMIN_URL).set(database=database)
        return sa.create_engine(url, isolation_level="AUTOCOMMIT")

    def run_script(self) -> subprocess.CompletedProcess[str]:
        psql = shutil.which("psql")
        if psql is None:
            if "CI" in os.environ:
                pytest.fail("psql is not installed; CI must run the least-privilege tests")
            pytest.skip("psql is not installed")
        names = {
            "warehouse_db": self.warehouse_db,
            "state_db": self.state_db,
            "code_role": self.code,
            "receiver_role": self.receiver,
            "analyst_role": self.analyst,
        }
        admin = sa.engine.make_url(ADMIN_URL).set(drivername="postgresql")
        # Passwords through the environment, as the script's header says to pass them.
        env = {
            **os.environ,
            "RILLET_CODE_PG_PASSWORD": self.passwords[self.code],
            "RILLET_RECEIVER_PG_PASSWORD": self.passwords[self.receiver],
            "RILLET_ANALYST_PG_PASSWORD": self.passwords[self.analyst],
        }
        return subprocess.run(
            [psql, admin.render_as_string(hide_password=False), "-X", "-v", "ON_ERROR_STOP=1",
             *(f"--variable={name}={value}" for name, value in names.items()), "-f", str(SCRIPT)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )  # fmt: skip

    def password_hashes(self) -> dict[str, str]:
        engine = self.admin("postgres")
        try:
            with engine.connect() as connection:
                rows = connection.execute(
                    sa.text("SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY(:n)"),
                    {"n": [self.code, self.receiver, self.analyst]},
                )
                return {name: password for name, password in rows}
        finally:
            engine.dispose()


def scram_matches(verifier: str, password: str) -> bool:
    """Whether PostgreSQL's SCRAM-SHA-256 verifier (RFC 5803 form) is of ``password``."""
    method, rest = verifier.split("$", 1)
    assert method == "SCRAM-SHA-256", method
    iterations_salt, keys = rest.split("$")
    iterations, salt = iterations_salt.split(":")
    stored_key = keys.split(":")[0]
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(salt), int(iterations)
    )
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    return hashlib.sha256(client_key).digest() == base64.b64decode(stored_key)


def _sqlstate(url: str, statement: str, *, autocommit: bool) -> str | None:
    """The SQLSTATE ``statement`` fails with, or ``None`` if it ran (then rolled back, unless
    it is one that cannot run in a transaction)."""
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT" if autocommit else None)
    try:
        with engine.connect() as connection:
            connection.execute(sa.text(statement))
    except sa.exc.DBAPIError as error:
        return str(getattr(error.orig, "sqlstate", error))
    finally:
        engine.dispose()
    return None


def _denied(url: str, statement: str, *, autocommit: bool = False) -> None:
    assert _sqlstate(url, statement, autocommit=autocommit) == INSUFFICIENT_PRIVILEGE, statement


def _cannot_connect(url: str) -> None:
    engine = sa.create_engine(url)
    try:
        with pytest.raises(sa.exc.OperationalError, match="permission denied for database"):
            engine.connect().close()
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    require_postgres()
    suffix = uuid.uuid4().hex[:10]
    roles = {name: f"rt_lp_{name}_{suffix}" for name in ("code", "receiver", "analyst")}
    made = Deployment(
        warehouse_db=f"rt_lp_warehouse_{suffix}",
        state_db=f"rt_lp_state_{suffix}",
        **roles,
        passwords={role: f"first-{role}" for role in roles.values()},
    )
    try:
        first = made.run_script()
        assert first.returncode == 0, first.stderr
        yield made
    finally:
        engine = made.admin("postgres")
        with engine.connect() as connection:
            for database in (made.warehouse_db, made.state_db):
                connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
            for role in roles.values():
                connection.execute(sa.text(f'DROP ROLE IF EXISTS "{role}"'))
        engine.dispose()


@pytest.fixture(scope="module")
def synced(deployment: Deployment) -> Deployment:
    """The code location's role creates the warehouse and state tables by syncing the sandbox
    with Dagster, after the script ran (so the analyst's access comes from default privileges)."""
    options = SandboxOptions(size="tiny", api_keys=(KEY,), rate_limit=1_000_000)
    server = SandboxServer(build_sandbox(options)).start()
    try:
        with pytest.MonkeyPatch.context() as env:
            # From the environment, as a deployment: the resources read URLs with passwords and the
            # key through EnvVars.
            for name, value in {
                "RILLET_BASE_URL": server.base_url,
                "RILLET_API_KEY": KEY,
                "RILLET_WAREHOUSE_URL": deployment.url(deployment.code, deployment.warehouse_db),
                "RILLET_STATE_URL": deployment.url(deployment.code, deployment.state_db),
                "RILLET_RATE_LIMIT": "1000000/60",
            }.items():
                env.setenv(name, value)
            defs = build_definitions(Settings.from_env())
            # One asset is enough: its resources create every warehouse table and the rate budget's.
            # Resolved from the Definitions, with the resources the code location binds.
            products = defs.resolve_assets_def(PRODUCTS)
            with dg.DagsterInstance.ephemeral() as instance:
                result = dg.materialize([products], instance=instance)
                assert result.success
    finally:
        server.stop()
    # Rerun over existing tables, rotating one password: everything below sees the rerun's work.
    deployment.hashes.append(deployment.password_hashes())
    deployment.passwords[deployment.receiver] = "rotated-receiver-password"
    deployment.rerun = deployment.run_script()
    deployment.hashes.append(deployment.password_hashes())
    return deployment


def test_script_is_rerunnable_and_sets_passwords(synced: Deployment) -> None:
    assert synced.rerun is not None and synced.rerun.returncode == 0, synced.rerun
    assert synced.rerun.stderr == "", "a rerun is quiet: nothing to warn about"
    before, after = synced.hashes
    assert set(before) == {synced.code, synced.receiver, synced.analyst}
    assert all(before.values()), "every role has a password"
    # Every run sets each password again (a new salt); the receiver's is the rotated one.
    for role, password in synced.passwords.items():
        assert scram_matches(after[role], password), role
    assert not scram_matches(before[synced.receiver], synced.passwords[synced.receiver])
    assert scram_matches(before[synced.receiver], f"first-{synced.receiver}")
    engine = synced.admin("postgres")
    try:
        with engine.connect() as connection:
            powers = connection.execute(
                sa.text(
                    "SELECT bool_or(rolsuper OR rolcreatedb OR rolcreaterole OR rolbypassrls), "
                    "bool_and(rolcanlogin) FROM pg_roles WHERE rolname = ANY(:n)"
                ),
                {"n": list(after)},
            ).one()
            owners = connection.execute(
                sa.text("SELECT DISTINCT pg_get_userbyid(datdba) FROM pg_database "
                        "WHERE datname = ANY(:n)"),
                {"n": [synced.warehouse_db, synced.state_db]},
            ).scalars()  # fmt: skip
            assert list(owners) == [synced.code]
    finally:
        engine.dispose()
    assert tuple(powers) == (False, True)


def test_script_refuses_a_missing_password_or_one_database(deployment: Deployment) -> None:
    missing = replace(deployment, passwords={**deployment.passwords, deployment.analyst: ""})
    refused = missing.run_script()
    assert refused.returncode != 0
    assert "set RILLET_ANALYST_PG_PASSWORD" in refused.stderr
    same = replace(deployment, state_db=deployment.warehouse_db)
    refused = same.run_script()
    assert refused.returncode != 0
    assert "warehouse_db and state_db must be two different databases" in refused.stderr


def test_the_scripts_queue_table_is_the_codes(deployment: Deployment) -> None:
    """The script creates the queue (the receiver's grants are per column); it must be exactly
    the table that rillet_dagster/warehouse/state.py would create."""
    engine = deployment.admin(deployment.state_db)
    reference = "lp_reference"
    try:
        with engine.connect() as connection:
            connection.execute(sa.text(f"CREATE SCHEMA {reference}"))
        mapped = engine.execution_options(schema_translate_map={None: reference})
        with mapped.begin() as connection:
            state.STATE_METADATA.create_all(connection)
        inspector = sa.inspect(engine)

        def described(schema: str | None) -> dict[str, object]:
            columns = [
                {k: str(v) for k, v in column.items()}
                for column in inspector.get_columns(QUEUE, schema=schema)
            ]
            pk = inspector.get_pk_constraint(QUEUE, schema=schema)["constrained_columns"]
            indexes = inspector.get_indexes(QUEUE, schema=schema)
            comment = inspector.get_table_comment(QUEUE, schema=schema)
            return {"columns": columns, "pk": pk, "indexes": indexes, "comment": comment}

        assert described(None) == described(reference)
        with engine.connect() as connection:
            owner = connection.execute(
                sa.text("SELECT tableowner FROM pg_tables WHERE tablename = :t "
                        "AND schemaname = 'public'"),
                {"t": QUEUE},
            ).scalar_one()  # fmt: skip
        assert owner == deployment.code
    finally:
        with engine.connect() as connection:
            connection.execute(sa.text(f"DROP SCHEMA IF EXISTS {reference} CASCADE"))
        engine.dispose()


@pytest.fixture
def receiver_url(synced: Deployment) -> Iterator[str]:
    """The real receiver app in uvicorn, connected to the queue as the receiver role."""
    config = ReceiverConfig(
        state_url=synced.url(synced.receiver, synced.state_db),
        secrets=(TOKEN,),
        storage_timeout=10.0,
        timestamp_policy=timestamp_policy(max_age_seconds=3600),
    )
    server = build_server(config, "127.0.0.1", 0, log_level="warning")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "receiver did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)


def test_receiver_adds_to_the_queue_as_its_role(synced: Deployment, receiver_url: str) -> None:
    """Store, redeliver (upsert), redeliver when stale (counted only), refuse a stale new id;
    then the code location's role applies and purges what the receiver stored."""
    with httpx.Client(base_url=receiver_url, timeout=10) as client:

        def post(delivery: Delivery) -> httpx.Response:
            return client.post(PATH, content=delivery.body, headers=delivery.headers())

        assert client.get("/health").status_code == 200
        fresh = Delivery(invoice_body(1))
        assert post(fresh).json() == {"id": fresh.event_id, "status": "pending"}
        assert post(fresh).json() == {"id": fresh.event_id, "status": "duplicate"}
        old = rfc3339(datetime.now(UTC) - timedelta(hours=2))
        stale_copy = Delivery(fresh.body, event_id=fresh.event_id, timestamp=old)
        assert post(stale_copy).json() == {"id": fresh.event_id, "status": "duplicate"}
        assert post(Delivery(invoice_body(2), timestamp=old)).status_code == 400
        counters = client.get("/health").json()["counters"]
    assert counters == {"pending": 1, "duplicate": 2, "refused_stale": 1}

    code = sa.create_engine(synced.url(synced.code, synced.state_db))
    try:
        with code.begin() as connection:
            stored = state.get_event(connection, fresh.event_id)
            assert stored is not None
            assert (stored.body, stored.status, stored.duplicates) == (fresh.body, "pending", 2)
            assert state.mark_applied(connection, [fresh.event_id], "run-1", at=datetime.now(UTC))
            later = datetime.now(UTC) + timedelta(seconds=1)
            assert state.purge_settled(connection, later) == 1
    finally:
        code.dispose()


def test_receiver_is_denied_everything_else(synced: Deployment) -> None:
    # The statements name the tables; the code names them so (a missing table would be 42P01).
    assert (QUEUE, slots_table.name, keys_table.name) == (
        "rillet_webhook_events", "rillet_rate_slots", "rillet_rate_keys",
    )  # fmt: skip
    url = synced.url(synced.receiver, synced.state_db)
    for statement in (
        "SELECT * FROM rillet_webhook_events",
        "SELECT body FROM rillet_webhook_events",
        "SELECT status, error FROM rillet_webhook_events",
        "UPDATE rillet_webhook_events SET status = 'applied'",
        "UPDATE rillet_webhook_events SET body = ''::bytea WHERE id = 'x'",
        "DELETE FROM rillet_webhook_events",
        "TRUNCATE rillet_webhook_events",
        "ALTER TABLE rillet_webhook_events ADD COLUMN note text",
        "CREATE INDEX ix_lp ON rillet_webhook_events (entity)",
        "DROP TABLE rillet_webhook_events",
        "SELECT * FROM rillet_rate_slots",
        "INSERT INTO rillet_rate_keys (key_hash, paused_until) VALUES ('k', 1e12)",
        "DELETE FROM rillet_rate_slots",
        "CREATE TABLE public.lp_receiver_table (i int)",
        "CREATE TEMP TABLE lp_receiver_temp (i int)",
        "CREATE SCHEMA lp_receiver_schema",
    ):
        _denied(url, statement)
    _cannot_connect(synced.url(synced.receiver, synced.warehouse_db))


def test_analyst_reads_the_warehouse_and_nothing_else(synced: Deployment) -> None:
    url = synced.url(synced.analyst, synced.warehouse_db)
    analyst = sa.create_engine(url)
    code = sa.create_engine(synced.url(synced.code, synced.warehouse_db))
    try:
        before = set(sa.inspect(code).get_table_names())
        assert {"products", "rillet_watermarks", "invoices"} <= before
        # Tables made after the script's last run (its reruns grant SELECT on what exists):
        # readable through the default privileges alone.
        assert ensure_report_schema(code)
        tables = sa.inspect(code).get_table_names()
        assert {LINES_TABLE, SNAPSHOTS_TABLE} <= set(tables) - before
        # Every table, created by the code location's role after the script ran: readable.
        with analyst.connect() as seen, code.connect() as truth:
            for table in tables:
                query = sa.select(sa.func.count()).select_from(sa.table(table))
                assert seen.execute(query).scalar_one() == truth.execute(query).scalar_one()
            assert seen.execute(sa.text("SELECT count(*) FROM products")).scalar_one() > 0
    finally:
        analyst.dispose()
        code.dispose()
    for statement in (
        "INSERT INTO products (id, _record, _record_hash, _synced_at, _run_id) "
        "VALUES ('p', '{}', 'h', now(), 'r')",
        "UPDATE products SET _run_id = 'analyst'",
        "DELETE FROM products",
        "TRUNCATE products",
        "ALTER TABLE products ADD COLUMN note text",
        "CREATE INDEX ix_lp_analyst ON products (_run_id)",
        "DROP TABLE products",
        "CREATE TABLE public.lp_analyst_table (i int)",
        "CREATE TEMP TABLE lp_analyst_temp (i int)",
        "CREATE SCHEMA lp_analyst_schema",
        "SELECT * FROM products FOR UPDATE",
    ):
        _denied(url, statement)
    _cannot_connect(synced.url(synced.analyst, synced.state_db))


def test_code_role_cannot_act_as_a_superuser(synced: Deployment) -> None:
    """Owning its databases, the code location still cannot reach beyond them."""
    url = synced.url(synced.code, synced.state_db)
    for statement in (
        f'CREATE DATABASE "rt_lp_extra_{uuid.uuid4().hex[:8]}"',
        f'CREATE ROLE "rt_lp_extra_{uuid.uuid4().hex[:8]}"',
        "SELECT pg_read_file('postgresql.conf')",
    ):
        _denied(url, statement, autocommit=True)
