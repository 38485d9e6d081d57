"""The X1 watch itself (``tests/canary.py``): each channel it claims to search finds a canary.

Each test leaks a canary on purpose into one channel, then takes the finding out of the watch
(``WATCH.drain()``), so that the suite-wide check after the test sees nothing left over.
"""

from __future__ import annotations

import logging
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
import uvicorn

from rillet_dagster.rillet.signatures import MIN_TOKEN_BYTES, decode_token
from rillet_dagster.settings import parse_webhook_secrets
from tests import canary
from tests.conftest import API_KEY, WATCH, pytest_runtest_makereport

KEY = canary.api_key("watch")


def test_canaries_are_usable_secrets_that_carry_the_marker() -> None:
    token = canary.webhook_token("watch")
    assert parse_webhook_secrets(token) == (token,)
    assert canary.MARKER.encode() in decode_token(token, min_bytes=MIN_TOKEN_BYTES)
    for secret in (API_KEY, KEY, token, canary.password("watch")):
        assert canary.contains(secret) and canary.contains(secret.encode())
    # Cut short from either end, a key is still found (its first characters name it).
    assert canary.contains(KEY[: len("watch-") + 6]) and canary.contains(KEY[-6:])


def test_the_suite_runs_at_debug_everywhere() -> None:
    for name in ("rillet_dagster.rillet.client", "dagster", "httpx", "httpcore.http11", "x"):
        assert logging.getLogger(name).isEnabledFor(logging.DEBUG), name
    assert logging.getLogger("sqlalchemy.pool").isEnabledFor(logging.DEBUG)
    # Statements and their parameters; not every row read back (see tests/canary.py).
    assert logging.getLogger("sqlalchemy.engine.Engine").getEffectiveLevel() == logging.INFO
    assert WATCH.handler in logging.getLogger().handlers


def test_a_canary_logged_at_debug_or_in_a_traceback_is_found() -> None:
    logging.getLogger("httpcore.http11").debug("send_request_headers %s", [(b"x", KEY)])
    assert [f for f in WATCH.drain() if "httpcore.http11 DEBUG" in f]
    try:
        raise RuntimeError(f"request failed with {KEY}")
    except RuntimeError:
        # The key only in the traceback (at DEBUG: pytest's report keeps WARNING and above).
        logging.getLogger("rillet_dagster.x").debug("request failed", exc_info=True)
    [found] = WATCH.drain()
    assert "rillet_dagster.x DEBUG" in found and "RuntimeError" in found


def test_uvicorn_loggers_stay_at_debug_and_watched_after_a_server_is_configured() -> None:
    uvicorn.Config(app=lambda: None, log_level="warning")  # what every sandbox server does
    for name in ("uvicorn.error", "uvicorn.access"):
        assert logging.getLogger(name).isEnabledFor(logging.DEBUG), name
    # uvicorn's loggers do not propagate to the root: the watch listens on them directly.
    assert not logging.getLogger("uvicorn").propagate
    assert WATCH.handler in logging.getLogger("uvicorn").handlers


def test_a_canary_sent_to_any_database_is_found() -> None:
    engine = sa.create_engine("sqlite://")
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE t (a TEXT, b BLOB)"))
        connection.execute(sa.text("INSERT INTO t VALUES (:a, :b)"), {"a": "x", "b": b"y"})
        assert WATCH.drain() == []
        rows = [{"a": "x", "b": b"y"}, {"a": "x", "b": KEY.encode()}]
        connection.execute(sa.text("INSERT INTO t VALUES (:a, :b)"), rows)
        assert [f for f in WATCH.drain() if "SQL parameter of 'INSERT INTO t" in f]
    engine.dispose()


@pytest.mark.parametrize("channel", ["logged", "metadata", "run_config"])
def test_a_canary_in_a_dagster_event_log_or_run_is_found(
    channel: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """Whatever the instance (here an in-memory one): Dagster writes its runs and events
    through SQLAlchemy, where the watch listens."""

    @dg.asset(config_schema={"note": str})
    def leaky(context) -> dg.MaterializeResult:  # type: ignore[no-untyped-def]
        if channel == "logged":
            context.log.debug(f"calling Rillet with {KEY}")
        return dg.MaterializeResult(metadata={"key": KEY} if channel == "metadata" else {})

    run_config = {"ops": {"leaky": {"config": {"note": KEY if channel == "run_config" else ""}}}}
    with dg.DagsterInstance.ephemeral() as instance:
        assert dg.materialize([leaky], instance=instance, run_config=run_config).success
    found = WATCH.drain()
    table = "runs" if channel == "run_config" else "event_logs"
    assert [f for f in found if f"INSERT INTO {table}" in f], found
    capfd.readouterr()  # Dagster's console logger printed the debug line: consumed here


def test_a_canary_in_a_log_or_sqlite_file_left_on_disk_is_found(tmp_path: Path) -> None:
    home = tmp_path / "dagster_home" / "storage" / "run"
    home.mkdir(parents=True)
    (tmp_path / "script.py").write_text(f"KEY = {KEY!r}\n")  # a test's own script: not searched
    WATCH.scan_folder(tmp_path)
    assert WATCH.drain() == []
    (home / "compute.err").write_text(f"Traceback ... {KEY}\n")
    WATCH.scan_folder(tmp_path)
    assert [f for f in WATCH.drain() if "compute.err" in f]
    (home / "compute.err").unlink()


@pytest.mark.parametrize("section", ["stdout", "stderr", "log"])
def test_a_canary_in_what_pytest_captured_fails_the_test(section: str) -> None:
    """The report hook of ``tests/conftest.py``, handed a phase's report as pytest would: a
    canary in what pytest captured of that phase fails it; other phases' sections are theirs."""

    def report(sections: list[tuple[str, str]]) -> pytest.TestReport:
        made = pytest.TestReport("t.py::t", ("t.py", 1, "t"), {}, "passed", None, "call", sections)
        hook = pytest_runtest_makereport(None, None)  # type: ignore[arg-type]
        next(hook)
        with pytest.raises(StopIteration) as done:
            hook.send(made)
        return done.value.value  # type: ignore[no-any-return]

    leaked = report([(f"Captured {section} call", f"Authorization: Bearer {KEY}")])
    assert leaked.outcome == "failed"
    assert f"X1: a canary secret in Captured {section} call" in str(leaked.longrepr)
    quiet = report([(f"Captured {section} setup", KEY), (f"Captured {section} call", "fine")])
    assert quiet.outcome == "passed"  # the setup phase's own report judged that section
