"""Environment variables, read in one place.

Every setting has a default that works on a fresh machine against the sandbox simulator. Secrets
(the API key, webhook tokens) are read here only to check that they are present; Dagster resources
receive them through ``dagster.EnvVar`` so that their values never reach logs or the UI.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

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

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
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
        return cls(
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
        )
