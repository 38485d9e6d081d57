"""PostgreSQL for tests: a fresh database per use; in CI it must be there, elsewhere it may skip."""

from __future__ import annotations

import functools
import os
import re

import pytest
import sqlalchemy as sa

ADMIN_URL = os.environ.get(
    "RILLET_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@functools.cache
def _unavailable() -> str | None:
    engine = sa.create_engine(ADMIN_URL, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except sa.exc.SQLAlchemyError as error:
        return f"PostgreSQL at 127.0.0.1:5432 is unreachable ({type(error).__name__})"
    finally:
        engine.dispose()
    return None


def require_postgres() -> None:
    """Skip without PostgreSQL, except in CI (``CI`` set), where its absence is a failure."""
    reason = _unavailable()
    if reason is None:
        return
    if "CI" in os.environ:
        pytest.fail(f"{reason}; CI must run the PostgreSQL tests")
    pytest.skip(reason)


def postgres_url(name: str) -> str:
    """A URL of an empty database ``rt_<name>`` (dropped and recreated)."""
    require_postgres()
    # Parallel test workers (pytest-xdist) name their temp dirs alike: the worker keeps them apart.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    database = "rt_" + re.sub(r"[^a-z0-9_]", "_", f"{worker}_{name}".lower())[:58]
    engine = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
            connection.execute(sa.text(f'CREATE DATABASE "{database}"'))
    finally:
        engine.dispose()
    return (
        sa.engine.make_url(ADMIN_URL).set(database=database).render_as_string(hide_password=False)
    )
