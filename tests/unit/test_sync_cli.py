"""``rillet-dagster sync`` refuses what it cannot use, saying what to fix (the launch itself is
tested against a running deployment in tests/integration/test_deployment_topology.py)."""

from __future__ import annotations

import pytest

from rillet_dagster.cli import main
from tests.dev_stack import free_port


def test_no_webserver_at_the_url_says_so_and_how_to_point_at_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RILLET_START_DATE", "2026-11-01")
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SystemExit) as exit_:
        main(["sync", "--ui", url])
    message = str(exit_.value.code)
    assert message.startswith(f"rillet-dagster sync: no Dagster webserver answers at {url}")
    assert "--ui" in message


@pytest.mark.parametrize("url", ["ftp://example.com", "http://"])
def test_a_url_that_is_not_http_is_refused(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RILLET_START_DATE", "2026-11-01")
    with pytest.raises(SystemExit) as exit_:
        main(["sync", "--ui", url])
    assert str(exit_.value.code) == f"rillet-dagster sync: --ui {url!r} is not an http(s) URL"


def test_bad_settings_are_refused_before_anything_is_launched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RILLET_START_DATE", "yesterday")
    with pytest.raises(SystemExit) as exit_:
        main(["sync", "--ui", "http://127.0.0.1:1"])
    assert "RILLET_START_DATE='yesterday' is not a date" in str(exit_.value.code)
