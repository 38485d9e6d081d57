"""Dagster resources: the Rillet API (behind the shared rate budget) and the SQL warehouse."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlparse

import dagster as dg
from pydantic import Field, PrivateAttr
from sqlalchemy import text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError

from rillet_dagster import catalog
from rillet_dagster.rillet.client import RilletClient
from rillet_dagster.rillet.errors import DEFAULT_MAX_RETRY_AFTER_SECONDS
from rillet_dagster.rillet.ratelimit import RateBudget
from rillet_dagster.settings import (
    API_KEY_VAR,
    BASE_URL_ALIASES,
    resolve_base_url,
    tls_verification,
)
from rillet_dagster.warehouse.schema import build_metadata, ensure_schema, make_engine

# The sandbox simulator's default key, accepted only for loopback URLs (the local simulator).
LOCAL_SANDBOX_KEY = "sandbox-key"


def ensure_sqlite_directory(url: str) -> None:
    """SQLite creates the file but not its folder (``./.rillet`` on a fresh clone)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def is_local(url: str) -> bool:
    return (urlparse(url).hostname or "") in {"127.0.0.1", "localhost", "::1"}


class RilletResource(dg.ConfigurableResource):
    """The Rillet API for one key; every request takes a slot from the shared budget.

    ``api_key`` comes from ``EnvVar("RILLET_API_KEY")`` so that the UI shows the variable's
    name, never its value; it is also hidden from ``repr``.
    """

    base_url: str = "sandbox"
    api_key: str = Field(default="", repr=False)
    api_version: int = catalog.DEFAULT_API_VERSION
    timeout_seconds: float = 30.0
    # URLs may hold a password once a run resolves their EnvVar: kept out of repr.
    state_url: str = Field(
        description="SQLAlchemy URL of the state database (rate budget)", repr=False
    )
    rate_limit_requests: int = 60
    rate_limit_window_seconds: float = 60.0
    rate_limit_margin: int = 0
    lookback_minutes: float = 5.0
    max_retry_after_seconds: float = Field(
        default=DEFAULT_MAX_RETRY_AFTER_SECONDS,
        description=(
            "Longest Retry-After believed on a 429 or 503, and longest pause of the shared rate "
            "budget; a longer or malformed value counts as absent (the client backs off itself)"
        ),
    )
    tls_verify: bool = Field(
        default=True,
        description="Verify Rillet's TLS certificate (RILLET_TLS_VERIFY; production refuses false)",
    )
    ca_bundle: str = Field(
        default="",
        description=(
            "PEM file of the certificate authorities trusted for Rillet's certificate instead of "
            "the default ones (RILLET_CA_BUNDLE); empty: the default trust store"
        ),
    )

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        ensure_sqlite_directory(self.state_url)
        url = resolve_base_url(self.base_url)
        if not self.api_key.strip() and not is_local(url):
            raise dg.DagsterInvariantViolationError(
                f"No Rillet API key for {url}: set the environment variable {API_KEY_VAR} "
                "(create one in Rillet under Organization Settings > API Access; sandbox and "
                f"production keys differ). Hosts: {', '.join(BASE_URL_ALIASES.values())}."
            )

    def _key(self) -> str:
        return self.api_key.strip() or LOCAL_SANDBOX_KEY

    @contextmanager
    def client(self) -> Iterator[RilletClient]:
        budget = RateBudget(
            self.state_url,
            self._key(),
            requests=self.rate_limit_requests,
            window_seconds=self.rate_limit_window_seconds,
            margin=self.rate_limit_margin,
            request_timeout=self.timeout_seconds,
            max_pause_seconds=self.max_retry_after_seconds,
        )
        client = RilletClient(
            api_key=self._key(),
            base_url=self.base_url,
            api_version=self.api_version,
            timeout=self.timeout_seconds,
            budget=budget,
            lookback=timedelta(minutes=self.lookback_minutes),
            max_retry_after_seconds=self.max_retry_after_seconds,
            verify=tls_verification(self.tls_verify, self.ca_bundle),
        )
        try:
            yield client
        finally:
            client.close()


class WarehouseResource(dg.ConfigurableResource):
    """The SQL warehouse (SQLite file by default, PostgreSQL in production)."""

    url: str = Field(description="SQLAlchemy URL of the warehouse", repr=False)
    _engine: Engine | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        shown = make_url(self.url).render_as_string(hide_password=True)
        ensure_sqlite_directory(self.url)
        try:
            # pre_ping: a database restarted mid-run hands out fresh connections on retry.
            engine = make_engine(self.url, pool_pre_ping=True)
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            ensure_schema(engine, build_metadata())
        except SQLAlchemyError as error:
            raise dg.DagsterInvariantViolationError(
                f"Cannot use the warehouse at {shown}: {type(error).__name__}: "
                f"{str(error).splitlines()[0]}. Check RILLET_WAREHOUSE_URL and that the "
                "database is running."
            ) from None
        self._engine = engine

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise dg.DagsterInvariantViolationError("the warehouse resource was not set up")
        return self._engine

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._engine is not None:
            self._engine.dispose()
