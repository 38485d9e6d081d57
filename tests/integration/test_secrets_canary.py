"""X1 on the error paths: a wrong key (401), Rillet failing (5xx) until the retries run out, a
step failed on every Dagster retry, bad webhook signatures, settings that are refused, and the
``repr()`` of every object that holds a secret.

Every secret here is a canary (``tests/canary.py``). Besides what each test reads back (exception
texts, tracebacks with their causes, Dagster's failure events and run, HTTP answers), the suite's
watch sees the logs at DEBUG and every database write of each test.
"""

from __future__ import annotations

import socket
import traceback
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import httpx
import pytest
import sqlalchemy as sa
from dagster._serdes import serialize_value

from rillet_dagster import catalog
from rillet_dagster.assets import entities
from rillet_dagster.clock import FakeClock
from rillet_dagster.definitions import build_definitions
from rillet_dagster.receiver.app import ReceiverConfig
from rillet_dagster.resources import RilletResource, WarehouseResource
from rillet_dagster.rillet.client import RetryPolicy, RilletClient
from rillet_dagster.rillet.errors import (
    AuthenticationError,
    RilletConnectionError,
    ServerError,
)
from rillet_dagster.rillet.ratelimit import RateBudget, RateBudgetTimeout
from rillet_dagster.sandbox.faults import Faults
from rillet_dagster.sandbox.server import SandboxServer
from rillet_dagster.settings import Settings, SettingsError
from tests import canary
from tests.conftest import API_KEY
from tests.integration.test_receiver import PATH, Delivery, _serve, invoice_body
from tests.pg import postgres_url

WRONG_KEY = canary.api_key("x1-wrong")
TOKEN = canary.webhook_token("x1")
OTHER_TOKEN = canary.webhook_token("x1-other")
PASSWORD = canary.password("x1")
FAST = RetryPolicy(max_attempts=4, base_seconds=0.01, cap_seconds=0.05, rate_limited_seconds=0.01)


def texts_of(error: BaseException) -> list[str]:
    """What a user or a log may show of an exception: its message, repr, attributes and the
    whole traceback with every cause and context."""
    return [
        str(error),
        repr(error),
        repr(vars(error)),
        "".join(traceback.format_exception(error)),
    ]


def assert_hidden(*texts: str) -> None:
    for text in texts:
        assert not canary.contains(text), canary.excerpt(text)


# ----------------------------------------------------------------------------- Rillet errors


def test_a_wrong_key_is_a_401_that_never_shows_the_key(
    sandbox: SandboxServer, clock: FakeClock
) -> None:
    with RilletClient(
        api_key=WRONG_KEY, base_url=sandbox.base_url, clock=clock, retry=FAST
    ) as client:
        with pytest.raises(AuthenticationError) as caught:
            client.list_all("account")
        assert caught.value.status == 401
        assert_hidden(*texts_of(caught.value), repr(client), str(client))


def test_5xx_until_the_retries_run_out_never_shows_the_key(
    sandbox: SandboxServer, clock: FakeClock
) -> None:
    sandbox.sandbox.faults.set(Faults(error_rate=1.0))
    with RilletClient(api_key=API_KEY, base_url=sandbox.base_url, clock=clock, retry=FAST) as c:
        with pytest.raises(ServerError) as caught:
            c.list_all("account")
        assert c.stats.requests == FAST.max_attempts and c.stats.retries == FAST.max_attempts - 1
    assert_hidden(*texts_of(caught.value))


def test_a_dropped_connection_never_shows_the_key(clock: FakeClock) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with (
        RilletClient(api_key=API_KEY, base_url=closed, clock=clock, retry=FAST) as client,
        pytest.raises(RilletConnectionError) as refused,
    ):
        client.list_all("account")
    assert client.stats.requests == FAST.max_attempts
    assert_hidden(*texts_of(refused.value))


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_a_full_rate_budget_never_shows_the_key_or_the_state_password(
    clock: FakeClock, tmp_path: Path, backend: str
) -> None:
    """The budget's timeout names the key by a hash prefix and its state database without the
    password (PostgreSQL's trust authentication ignores the canary password)."""
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    if backend == "postgresql":
        plain = sa.engine.make_url(postgres_url(f"x1_budget_{tmp_path.name}"))
        state_url = plain.set(password=PASSWORD).render_as_string(hide_password=False)
    budget = RateBudget(state_url, API_KEY, requests=1, clock=clock, max_wait_seconds=0)
    budget.acquire()
    with pytest.raises(RateBudgetTimeout) as full:
        budget.acquire()
    assert "key sha256" in str(full.value)
    assert_hidden(*texts_of(full.value), repr(budget), str(budget))


def test_a_step_failed_on_every_dagster_retry_records_no_secret(
    sandbox: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync step with a wrong key, retried by Dagster and failed: the retry and failure
    events (error text, stack, causes), the run and what ``materialize`` raises."""
    monkeypatch.setenv("RILLET_API_KEY", WRONG_KEY)
    settings = Settings.from_env(
        {
            "RILLET_WAREHOUSE_URL": f"sqlite:///{tmp_path}/w.db",
            "RILLET_STATE_URL": f"sqlite:///{tmp_path}/s.db",
        }
    )
    asset = entities.entity_asset(
        catalog.entity("product"),
        entities.daily_partitions(settings),
        retry_policy=dg.RetryPolicy(max_retries=1, delay=0),
    )
    resources = {
        "rillet": RilletResource(
            base_url=sandbox.base_url,
            api_key=dg.EnvVar("RILLET_API_KEY"),
            state_url=settings.state_url,
        ),
        "warehouse": WarehouseResource(url=settings.warehouse_url),
    }
    with dg.DagsterInstance.ephemeral() as instance:
        failed = dg.materialize(
            [asset], resources=resources, instance=instance, raise_on_error=False
        )
        assert not failed.success
        kinds = {event.event_type for event in failed.all_events}
        assert {dg.DagsterEventType.STEP_UP_FOR_RETRY, dg.DagsterEventType.STEP_FAILURE} <= kinds
        [failure] = failed.get_step_failure_events()
        error = failure.step_failure_data.error
        assert error is not None and "AuthenticationError" in error.to_string()
        stored = [serialize_value(entry) for entry in instance.all_logs(failed.run_id)]
        assert_hidden(
            error.to_string(), *stored, serialize_value(instance.get_run_by_id(failed.run_id))
        )
        with pytest.raises(dg.DagsterError) as raised:  # retries exhausted, as the CLI shows it
            dg.materialize([asset], resources=resources, instance=instance)
    assert_hidden(*texts_of(raised.value))


# ----------------------------------------------------------------------------- webhooks


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[str]:
    config = ReceiverConfig(state_url=f"sqlite:///{tmp_path / 'state.db'}", secrets=(TOKEN,))
    server, url, thread = _serve(config)
    yield url
    server.should_exit = True
    thread.join(10)


def test_bad_webhook_signatures_are_refused_without_showing_a_token(receiver: str) -> None:
    """Signed with another token, or with the token itself pasted as the signature (a sender's
    mistake): 401, and neither token in the answer (nor, by the watch, in any log)."""
    wrong = Delivery(invoice_body(), tokens=(OTHER_TOKEN,))
    pasted = Delivery(invoice_body(2), tokens=(TOKEN,))
    answers = [
        httpx.post(receiver + PATH, content=wrong.body, headers=wrong.headers()),
        httpx.post(
            receiver + PATH,
            content=pasted.body,
            headers=pasted.headers(X_Rillet_Signature=TOKEN),
        ),
        httpx.post(
            receiver + PATH,
            content=pasted.body,
            headers=pasted.headers(X_Rillet_Signature=f"{OTHER_TOKEN},{TOKEN}"),
        ),
    ]
    assert [answer.status_code for answer in answers] == [401, 401, 401]
    assert_hidden(*(answer.text for answer in answers), *(str(a.headers) for a in answers))
    good = Delivery(invoice_body(3), tokens=(TOKEN,))
    accepted = httpx.post(receiver + PATH, content=good.body, headers=good.headers())
    assert accepted.status_code == 200  # the same receiver, with the right token


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("secrets", "names"),
    [
        (f"{TOKEN},{canary.MARKER}-not-base64!", "webhook token 2: not standard base64"),
        (f"{canary.MARKER}wh", "webhook token 1: decodes to 6 bytes"),
    ],
    ids=["not-base64", "too-short"],
)
def test_refused_webhook_tokens_are_named_by_position_never_shown(secrets: str, names: str) -> None:
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({"RILLET_WEBHOOK_SECRETS": secrets})
    assert names in str(refused.value)
    assert_hidden(*texts_of(refused.value))


def test_an_unusable_warehouse_url_fails_the_run_without_its_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A URL that does not parse (a port that is not a number) and one whose server is not
    there: the resource fails, and the failure shows no password."""
    asset = entities.entity_asset(
        catalog.entity("product"),
        entities.daily_partitions(Settings()),
        retry_policy=dg.RetryPolicy(max_retries=0),
    )
    for url in (
        f"postgresql+psycopg://analyst:{PASSWORD}@db.invalid:port/w",
        f"postgresql+psycopg://analyst:{PASSWORD}@127.0.0.1:1/w",
    ):
        monkeypatch.setenv("RILLET_WAREHOUSE_URL", url)
        resources = {
            "rillet": RilletResource(
                base_url="http://127.0.0.1:1", state_url=f"sqlite:///{tmp_path}/s.db"
            ),
            "warehouse": WarehouseResource(url=dg.EnvVar("RILLET_WAREHOUSE_URL")),
        }
        with dg.DagsterInstance.ephemeral() as instance:
            with pytest.raises(dg.DagsterError) as caught:
                dg.materialize([asset], resources=resources, instance=instance)
            [run] = instance.get_runs()
            stored = [serialize_value(entry) for entry in instance.all_logs(run.run_id)]
        assert run.status == dg.DagsterRunStatus.FAILURE and stored
        assert_hidden(*texts_of(caught.value), *stored, serialize_value(run))


# ----------------------------------------------------------------------------- repr()


def test_objects_holding_the_key_or_tokens_never_show_them(
    sandbox: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``repr()`` and ``str()`` of the resources as configured and as a run resolves them,
    the settings, the client, the rate budget and the receiver's configuration."""
    state_url = f"sqlite:///{tmp_path}/s.db"
    env = {
        "RILLET_BASE_URL": sandbox.base_url,
        "RILLET_API_KEY": API_KEY,
        "RILLET_WEBHOOK_SECRETS": f"{TOKEN},{OTHER_TOKEN}",
        "RILLET_WAREHOUSE_URL": f"sqlite:///{tmp_path}/w.db",
        "RILLET_STATE_URL": state_url,
    }
    monkeypatch.setenv("RILLET_API_KEY", API_KEY)
    settings = Settings.from_env(env)
    resources = build_definitions(settings).resources or {}
    direct = RilletResource(base_url=sandbox.base_url, api_key=API_KEY, state_url=state_url)
    seen: dict[str, str] = {}

    @dg.asset
    def looks(rillet: RilletResource) -> None:
        seen["resolved"] = repr(rillet) + str(rillet)
        with rillet.client() as client:
            seen["client"] = repr(client) + str(client) + repr(client.budget)

    with dg.DagsterInstance.ephemeral() as instance:
        assert dg.materialize([looks], resources={"rillet": resources["rillet"]}, instance=instance)
    config = ReceiverConfig(state_url=state_url, secrets=settings.webhook_secrets)
    assert seen and settings.webhook_secret_count == 2 and settings.has_api_key
    assert_hidden(
        repr(settings),
        str(settings),
        repr(resources),
        *(repr(r) + str(r) for r in resources.values()),
        repr(direct),
        str(direct),
        *seen.values(),
        repr(config),
        str(config),
    )


def test_objects_holding_a_database_password_never_show_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The resources as a run sees them: Dagster resolves each EnvVar and builds the resource
    again from the values (done here by Dagster for the Rillet resource; the warehouse one
    would connect while doing so, so it is built from the value as Dagster would)."""
    url = f"postgresql+psycopg://analyst:{PASSWORD}@db.invalid:5432/w"
    monkeypatch.setenv("RILLET_STATE_URL", url)
    monkeypatch.setenv("RILLET_API_KEY", API_KEY)
    configured = RilletResource(
        base_url="sandbox",
        api_key=dg.EnvVar("RILLET_API_KEY"),
        state_url=dg.EnvVar("RILLET_STATE_URL"),
    )
    assert_hidden(repr(configured))  # as configured: the variable's name
    resolved = [
        configured.process_config_and_initialize(),
        WarehouseResource(url=url),
        ReceiverConfig(state_url=url),
    ]
    assert_hidden(*(repr(r) + str(r) for r in resolved))
