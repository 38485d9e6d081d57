"""Environment variables, read in one place.

Every setting has a default that works on a fresh machine against the sandbox simulator. Secrets
(the API key, webhook tokens) are read here only to check that they are present; Dagster resources
receive them through ``dagster.EnvVar`` so that their values never reach logs or the UI.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from rillet_dagster.catalog import API_VERSIONS, DEFAULT_API_VERSION
from rillet_dagster.rillet.signatures import MIN_TOKEN_BYTES, NEW_KEY_COMMAND, decode_token

BASE_URL_ALIASES: dict[str, str] = {
    "production": "https://api.rillet.com",
    "sandbox": "https://sandbox.api.rillet.com",
}

API_KEY_VAR = "RILLET_API_KEY"
BASE_URL_VAR = "RILLET_BASE_URL"
API_VERSION_VAR = "RILLET_API_VERSION"
WAREHOUSE_URL_VAR = "RILLET_WAREHOUSE_URL"
STATE_URL_VAR = "RILLET_STATE_URL"
WEBHOOK_SECRETS_VAR = "RILLET_WEBHOOK_SECRETS"
RATE_LIMIT_VAR = "RILLET_RATE_LIMIT"
START_DATE_VAR = "RILLET_START_DATE"
EVENT_RETENTION_VAR = "RILLET_EVENT_RETENTION_DAYS"
DEFAULT_EVENT_RETENTION_DAYS = 7.0
PROFILE_VAR = "RILLET_PROFILE"
TLS_VERIFY_VAR = "RILLET_TLS_VERIFY"
CA_BUNDLE_VAR = "RILLET_CA_BUNDLE"

Profile = Literal["development", "production"]
PROFILES: tuple[Profile, ...] = ("development", "production")
# What a start-up path talks to; the production profile checks the settings of each.
Use = Literal["rillet", "warehouse", "state"]
EVERY_USE: tuple[Use, ...] = ("rillet", "warehouse", "state")

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_POSTGRES_EXAMPLE = "postgresql+psycopg://USER:PASSWORD@HOST:5432/DATABASE?sslmode=verify-full"

_RATE_LIMIT = re.compile(r"^\s*(\d+)\s*(?:/|per)\s*(\d+(?:\.\d+)?)\s*s?\s*$")


class SettingsError(ValueError):
    """A setting with a value we cannot use; the message names the variable and the fix."""


@dataclass(frozen=True)
class RateLimit:
    """N requests per rolling W seconds."""

    requests: int = 60
    window_seconds: float = 60.0

    @classmethod
    def parse(cls, text: str, variable: str = RATE_LIMIT_VAR) -> RateLimit:
        match = _RATE_LIMIT.match(text)
        if not match or int(match.group(1)) < 1 or float(match.group(2)) <= 0:
            raise SettingsError(
                f"{variable}={text!r} is not a rate limit; write it as REQUESTS/SECONDS, "
                "for example 60/60"
            )
        return cls(int(match.group(1)), float(match.group(2)))

    def __str__(self) -> str:
        return f"{self.requests}/{self.window_seconds:g}s"


def resolve_base_url(value: str) -> str:
    """``production`` / ``sandbox`` aliases or any http(s) URL, without a trailing slash."""
    url = BASE_URL_ALIASES.get(value.strip().lower(), value.strip())
    if not re.match(r"^https?://[^/\s]+", url):
        raise SettingsError(
            f"{BASE_URL_VAR}={value!r} is neither 'production', 'sandbox' nor an http(s) URL"
        )
    return url.rstrip("/")


def parse_api_version(value: str) -> int:
    try:
        version = int(value)
    except ValueError:
        version = 0
    if version not in API_VERSIONS:
        raise SettingsError(
            f"{API_VERSION_VAR}={value!r} is not a Rillet API version; use one of "
            f"{', '.join(map(str, API_VERSIONS))}"
        )
    return version


def parse_webhook_secrets(text: str, variable: str = WEBHOOK_SECRETS_VAR) -> tuple[str, ...]:
    """Comma-separated base64 webhook tokens; an error names the position, never the value."""
    tokens = tuple(t.strip() for t in text.split(",") if t.strip())
    for position, token in enumerate(tokens, start=1):
        try:
            decode_token(token, min_bytes=MIN_TOKEN_BYTES)
        except ValueError as error:
            raise SettingsError(
                f"{variable}: webhook token {position}: {error}; copy the whole Webhook Token "
                "that Rillet shows, or for a sender of your own generate one with: "
                f"{NEW_KEY_COMMAND}"
            ) from None
    return tokens


def parse_retention_days(text: str, variable: str = EVENT_RETENTION_VAR) -> float:
    """Days that applied webhook events are kept (blank: the default)."""
    if not text.strip():
        return DEFAULT_EVENT_RETENTION_DAYS
    try:
        days = float(text)
    except ValueError:
        days = -1.0
    if not 0 < days <= 3650:
        raise SettingsError(
            f"{variable}={text!r} is not a number of days between 0 and 3650; write it like 7 "
            "or 0.5 (applied webhook events older than that are purged)"
        )
    return days


def parse_profile(text: str) -> Profile:
    value = text.strip().lower() or "development"
    for profile in PROFILES:
        if value == profile:
            return profile
    raise SettingsError(
        f"{PROFILE_VAR}={text!r} is not a profile; use 'development' (the default) or "
        "'production' (refuses plain HTTP, unverified TLS and databases without verified TLS)"
    )


def parse_tls_verify(text: str) -> bool:
    value = text.strip().lower()
    if not value or value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SettingsError(
        f"{TLS_VERIFY_VAR}={text!r} is neither true nor false; leave it unset (certificates "
        f"are verified), or for a private certificate authority set {CA_BUNDLE_VAR} instead"
    )


def parse_ca_bundle(text: str) -> str:
    """An absolute path to a PEM bundle that ``ssl`` loads (blank: the default trust store).

    Absolute, because run workers and the code server need not share a working folder.
    """
    if not text.strip():
        return ""
    path = Path(text.strip()).expanduser().resolve()
    try:
        ssl.create_default_context(cafile=str(path))
    except (OSError, ssl.SSLError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise SettingsError(
            f"{CA_BUNDLE_VAR}={text!r} is not a usable PEM certificate bundle ({reason}); point "
            "it at the PEM file of the certificate authority that signs the Rillet endpoint's "
            "certificate (your TLS proxy's, for example), or unset it"
        ) from None
    return str(path)


def tls_verification(tls_verify: bool, ca_bundle: str) -> ssl.SSLContext | bool:
    """What httpx's ``verify=`` gets: the bundle replaces the default trust store when set."""
    if not tls_verify:
        return False
    if ca_bundle:
        return ssl.create_default_context(cafile=ca_bundle)
    return True


def shown_url(url: str | URL) -> str:
    """A database URL fit for a message: the password hidden (in the userinfo or the query),
    the query as people write it (``host=/var/run/postgresql``, not percent-encoded)."""
    parsed = make_url(url)
    shown = parsed.set(query={}).render_as_string(hide_password=True)
    pairs = [
        f"{name}={'***' if name == 'password' else value}"
        for name, values in parsed.query.items()
        for value in ([values] if isinstance(values, str) else values)
    ]
    return shown + ("?" + "&".join(pairs) if pairs else "")


def _query_values(url: URL, name: str) -> list[str]:
    value = url.query.get(name)
    if value is None:
        return []
    values = [value] if isinstance(value, str) else list(value)
    return [part for item in values for part in item.split(",")]


def database_url_problem(variable: str, url: str) -> str | None:
    """Why the production profile refuses this database URL, or ``None`` if it does not.

    Production keeps its databases in PostgreSQL, reached over TLS that verifies the server's
    certificate and host name (``sslmode=verify-full``), or over the server's Unix socket
    (``host=/var/run/postgresql``), which never leaves the machine.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        return f"{variable} is not a database URL; set it to {_POSTGRES_EXAMPLE}"
    shown = shown_url(parsed)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return (
            f"{variable}={shown} is a SQLite file (what an unset {WAREHOUSE_URL_VAR} or "
            f"{STATE_URL_VAR} gives): production keeps its data in PostgreSQL; set "
            f"{variable}={_POSTGRES_EXAMPLE}"
        )
    if backend != "postgresql":
        return f"{variable}={shown} is {backend}: production supports PostgreSQL only"
    socket_hosts = _query_values(parsed, "host")
    if not parsed.host and socket_hosts and all(h.startswith("/") for h in socket_hosts):
        return None
    modes = _query_values(parsed, "sslmode")
    if modes == ["verify-full"]:
        return None
    found = f"sslmode={modes[-1]}" if modes else "no sslmode"
    return (
        f"{variable}={shown} has {found}: production needs TLS that verifies the server; add "
        "sslmode=verify-full (with sslrootcert=/path/to/ca.crt unless the CA is in "
        "~/.postgresql/root.crt), or use the server's Unix socket (host=/var/run/postgresql "
        "and no host name)"
    )


def production_refusal(problems: Collection[str]) -> SettingsError:
    """One error naming every problem, so that one restart is enough to fix them all."""
    listed = "".join(f"\n  - {problem}" for problem in problems)
    return SettingsError(f"{PROFILE_VAR}=production refuses {len(problems)} setting(s):{listed}")


def default_data_dir(environ: Mapping[str, str]) -> Path:
    """Where local files live: ``$DAGSTER_HOME`` when set, else ``./.rillet``."""
    home = environ.get("DAGSTER_HOME")
    return Path(home) if home else Path.cwd() / ".rillet"


@dataclass(frozen=True)
class Settings:
    base_url: str = BASE_URL_ALIASES["sandbox"]
    api_version: int = DEFAULT_API_VERSION
    # Database URLs may hold passwords: kept out of repr, shown as EnvVars by the Definitions.
    warehouse_url: str = field(default="", repr=False)
    state_url: str = field(default="", repr=False)
    rate_limit: RateLimit = field(default_factory=RateLimit)
    start_date: date = date(2026, 11, 1)
    event_retention_days: float = DEFAULT_EVENT_RETENTION_DAYS
    has_api_key: bool = False
    webhook_secret_count: int = 0
    # The receiver needs the tokens themselves; repr=False keeps them out of logs and errors.
    webhook_secrets: tuple[str, ...] = field(default=(), repr=False)
    profile: Profile = "development"
    tls_verify: bool = True
    ca_bundle: str = ""

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, uses: Collection[Use] = EVERY_USE
    ) -> Settings:
        """The settings from ``environ`` (default ``os.environ``).

        Args:
            uses: what the caller talks to; under ``RILLET_PROFILE=production`` the settings
                of each are checked (:meth:`check_production`) and refused with one error
                naming every problem. ``()`` leaves the check to the caller.
        """
        env = os.environ if environ is None else environ
        data_dir = default_data_dir(env)
        warehouse = env.get(WAREHOUSE_URL_VAR) or f"sqlite:///{data_dir / 'warehouse.db'}"
        state = env.get(STATE_URL_VAR) or f"sqlite:///{data_dir / 'state.db'}"
        start_text = env.get(START_DATE_VAR, "2026-11-01")
        try:
            start = date.fromisoformat(start_text)
        except ValueError:
            raise SettingsError(
                f"{START_DATE_VAR}={start_text!r} is not a date; write it as YYYY-MM-DD"
            ) from None
        secrets = parse_webhook_secrets(env.get(WEBHOOK_SECRETS_VAR, ""))
        retention = parse_retention_days(env.get(EVENT_RETENTION_VAR, ""))
        tls_verify = parse_tls_verify(env.get(TLS_VERIFY_VAR, ""))
        ca_bundle = parse_ca_bundle(env.get(CA_BUNDLE_VAR, ""))
        if ca_bundle and not tls_verify:
            raise SettingsError(
                f"{CA_BUNDLE_VAR} is set but {TLS_VERIFY_VAR}=false turns verification off: "
                "unset one of them"
            )
        settings = cls(
            base_url=resolve_base_url(env.get(BASE_URL_VAR, "sandbox")),
            api_version=parse_api_version(env.get(API_VERSION_VAR, str(DEFAULT_API_VERSION))),
            warehouse_url=warehouse,
            state_url=state,
            rate_limit=RateLimit.parse(env.get(RATE_LIMIT_VAR, "60/60")),
            start_date=start,
            event_retention_days=retention,
            has_api_key=bool(env.get(API_KEY_VAR, "").strip()),
            webhook_secret_count=len(secrets),
            webhook_secrets=secrets,
            profile=parse_profile(env.get(PROFILE_VAR, "")),
            tls_verify=tls_verify,
            ca_bundle=ca_bundle,
        )
        settings.check_production(uses)
        return settings

    def production_problems(
        self, uses: Collection[Use] = EVERY_USE, *, databases: Mapping[str, str] | None = None
    ) -> list[str]:
        """What the production profile refuses in the settings of ``uses`` and in
        ``databases`` (source name, e.g. a command-line option, to URL); empty outside it."""
        if self.profile != "production":
            return []
        problems: list[str] = []
        if "rillet" in uses:
            if urlparse(self.base_url).scheme != "https":
                problems.append(
                    f"{BASE_URL_VAR}={self.base_url} is plain HTTP: production talks to Rillet "
                    f"over HTTPS only; set {BASE_URL_VAR}=production "
                    f"({BASE_URL_ALIASES['production']}) or another https:// URL"
                )
            if not self.tls_verify:
                problems.append(
                    f"{TLS_VERIFY_VAR}=false turns off certificate verification, which "
                    f"production refuses; unset it (for a private certificate authority, set "
                    f"{CA_BUNDLE_VAR}=/path/to/ca.pem instead)"
                )
        urls: dict[str, str | None] = {
            WAREHOUSE_URL_VAR: self.warehouse_url if "warehouse" in uses else None,
            STATE_URL_VAR: self.state_url if "state" in uses else None,
            **(databases or {}),
        }
        for variable, url in urls.items():
            problem = None if url is None else database_url_problem(variable, url)
            if problem is not None:
                problems.append(problem)
        return problems

    def check_production(
        self, uses: Collection[Use] = EVERY_USE, *, databases: Mapping[str, str] | None = None
    ) -> None:
        """Raise :class:`SettingsError` listing every :meth:`production_problems` entry."""
        problems = self.production_problems(uses, databases=databases)
        if problems:
            raise production_refusal(problems)
