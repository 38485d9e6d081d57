"""The Dagster UI of a real ``rillet-dagster dev`` in headless Chromium, as an analyst sees it.

After the stack's first run said "ready": the global asset lineage shows the three groups, a
report's asset page shows its latest materialization's metadata (period, subsidiary, totals), and
the Checks tab of the reconciliation (and of the trial balance) shows every check succeeded. No
"Join the Dagster community" dialog covers any page. Each view is saved as a screenshot for the
README in ``docs/screenshots/`` (overwritten on every run).

Chromium is driven over the DevTools protocol (``tests/browser.py``). Without Chromium the module
is skipped, except in CI (``CI`` set), where it fails: CI must run it.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser import Browser, find_chromium
from tests.dev_stack import DevStack

pytestmark = [pytest.mark.slow, pytest.mark.serial, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "docs" / "screenshots"
WIDTH, HEIGHT = 1600, 1000
LOAD = 120.0  # seconds for a view to render and fetch its data: the UI is slow on 2 busy cores
GROUPS = ("rillet_entities", "rillet_reports", "finance_models")
REPORT = "rillet/reports/income_statement"
COMMUNITY = "Join the Dagster community"
FAILED = re.compile(r"\b(Failed|failed)\b")
# What the Checks tab lists under a check's name (Dagster 1.13).
CHECK_STATUSES = {
    "Succeeded",
    "Failed",
    "Execution failed",
    "In progress",
    "Skipped",
    "Not evaluated",
}

# The rendered text of each node of the lineage graph (group nodes when collapsed), once every
# node has its statuses: null while the graph is still drawing or fetching.
GRAPH_NODES = """(() => {
  const nodes = [...document.querySelectorAll('svg foreignObject')].map(
    (node) => (node.firstElementChild ? node.firstElementChild.innerText : node.textContent)
  );
  if (nodes.length === 0 || nodes.some((text) => text.includes('fetching statuses'))) {
    return null;
  }
  return nodes;
})()"""

# The status icons of an asset page's "Latest check results" (e.g. ["check_circle 1"]), once
# every one has settled: null while loading or while a check is executing (a spinner).
LATEST_CHECK_RESULTS = """(() => {
  const title = [...document.querySelectorAll('span, div')].find(
    (element) => element.children.length === 0
      && element.textContent.trim() === 'Latest check results'
  );
  if (!title) {
    return null;
  }
  const tags = [...title.parentElement.querySelectorAll('.BaseTag')].map((tag) => {
    const icon = tag.querySelector('[role="img"][aria-label]');
    return icon ? `${icon.getAttribute('aria-label')} ${tag.innerText.trim()}` : null;
  });
  return tags.length > 0 && tags.every(Boolean) ? tags : null;
})()"""

# Visible dialogs (Blueprint or Radix) over the page, by their text.
DIALOGS = """[...document.querySelectorAll(
  '[role="dialog"], [role="alertdialog"], .bp5-dialog, .bp4-dialog'
)].filter((element) => element.getClientRects().length > 0).map((element) => element.innerText)"""


@pytest.fixture(scope="module")
def chromium() -> str:
    """Chromium's executable: skipped without it locally, failed without it in CI."""
    found = find_chromium()
    if found is None:
        reason = "no Chromium on this machine (apt-get install chromium) for the UI browser test"
        if "CI" in os.environ:
            pytest.fail(f"CI must run the UI browser test: {reason}")
        pytest.skip(reason)
    return found


@pytest.fixture(scope="module")
def ui(chromium: str, request: pytest.FixtureRequest) -> str:
    """The UI of the session's dev stack after its first run (started only if Chromium is here)."""
    stack: DevStack = request.getfixturevalue("dev_stack")
    stack.wait_ready()
    return stack.ui_url


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Browser]:
    with Browser.launch(chromium, width=WIDTH, height=HEIGHT, timeout=LOAD) as browser:
        yield browser


def _open(browser: Browser, url: str, first_text: str) -> str:
    browser.navigate(url)
    return browser.wait_for_text(first_text, LOAD)


def _wait_for_all(browser: Browser, texts: tuple[str, ...]) -> str:
    seen = ""
    for text in texts:
        seen = browser.wait_for_text(text, LOAD)
    return seen


def _assert_nothing_covers_the_page(browser: Browser) -> None:
    text = browser.text()
    assert COMMUNITY not in text, f"the {COMMUNITY!r} dialog covers the UI:\n{text[:2000]}"
    dialogs = browser.evaluate(DIALOGS)
    assert not dialogs, f"a dialog covers {browser.evaluate('location.href')}: {dialogs}"


def _check_statuses(text: str, names: tuple[str, ...]) -> dict[str, str]:
    """Each check's status in the Checks tab's list: the line after its name there."""
    lines = [line.strip() for line in text.splitlines()]
    start = next((i for i, line in enumerate(lines) if line.startswith("Checks (")), 0)
    statuses: dict[str, str] = {}
    for name in names:
        if name not in lines[start:]:
            continue
        at = lines.index(name, start)
        while at < len(lines) and lines[at] == name:  # listed truncated, then in full (tooltip)
            at += 1
        if at < len(lines):
            statuses[name] = lines[at]
    return statuses


def _wait_for_statuses(browser: Browser, names: tuple[str, ...]) -> tuple[dict[str, str], str]:
    """Every check's status once the list shows one for each (statuses load after the names)."""
    deadline = time.monotonic() + LOAD
    while True:
        text = browser.text()
        statuses = _check_statuses(text, names)
        if len(statuses) == len(names) and set(statuses.values()) <= CHECK_STATUSES:
            return statuses, text
        if time.monotonic() > deadline:
            raise AssertionError(f"the Checks tab shows no status for each of {names}:\n{text}")
        time.sleep(0.25)


def test_the_lineage_shows_the_three_groups(ui: str, browser: Browser) -> None:
    _open(browser, f"{ui}/asset-groups", "Global asset lineage")
    nodes: list[str] = browser.wait_for(
        GRAPH_NODES, LOAD, "the lineage graph with every node's statuses"
    )
    for group in GROUPS:
        assert any(node.startswith(group) for node in nodes), (
            f"no {group} node in the lineage graph: {nodes}"
        )
    text = browser.text()
    assert not FAILED.search(text), f"the lineage shows a failure:\n{text}"
    _assert_nothing_covers_the_page(browser)
    browser.screenshot(SHOTS / "asset-lineage.png")


def test_a_report_asset_shows_its_latest_materialization_metadata(
    ui: str, browser: Browser
) -> None:
    _open(browser, f"{ui}/assets/{REPORT}", "Latest materialization")
    # The status card (when, and which month x subsidiary partition), loaded on its own.
    latest = browser.wait_for_match(
        r"Latest materialization\n(.+)\n(\d{4}-\d{2}-01\|\S+)\n|Never materialized", LOAD
    )
    assert latest.group(2), f"{REPORT} was never materialized:\n{browser.text()}"
    # The metadata keys of the latest materialization, and the totals table's lines.
    text = _wait_for_all(
        browser, ("period_start", "period_end", "subsidiary", "totals", "Revenue", "Net Income")
    )
    results: list[str] = browser.wait_for(
        LATEST_CHECK_RESULTS, LOAD, f"the latest check results of {REPORT} to settle"
    )
    assert all(result.startswith("check_circle") for result in results), (
        f"the latest check results of {REPORT} are not all green: {results}"
    )
    period_end = re.search(r"\nperiod_end\s+.+\s+(\d{4}-\d{2}-\d{2})\n", text)
    assert period_end, f"period_end has no date in the metadata:\n{text}"
    assert re.search(r"Net Income\s.*\s-?\d+\.\d{2} [A-Z]{3}", text), (
        f"the totals show no net income amount:\n{text}"
    )
    _assert_nothing_covers_the_page(browser)
    browser.screenshot(SHOTS / "report-asset.png")


@pytest.mark.parametrize(
    ("asset", "checks", "screenshot"),
    [
        pytest.param(
            "ledger/trial_balance_reconciliation",
            ("journal_entries_balance", "ledger_reproduces_trial_balance"),
            "checks.png",
            id="reconciliation",
        ),
        pytest.param(
            "rillet/reports/trial_balance",
            ("debits_equal_credits", "each_account_rolls_forward"),
            None,
            id="trial_balance",
        ),
    ],
)
def test_the_checks_tab_shows_every_check_succeeded(
    ui: str, browser: Browser, asset: str, checks: tuple[str, ...], screenshot: str | None
) -> None:
    _open(browser, f"{ui}/assets/{asset}?view=checks", f"Checks ({len(checks)})")
    statuses, text = _wait_for_statuses(browser, checks)
    assert statuses == dict.fromkeys(checks, "Succeeded"), f"{asset}: {statuses}\n{text}"
    # The first check is selected: its latest evaluation passed.
    text = browser.wait_for_text("Evaluation result", LOAD)
    result = browser.wait_for_match(
        r"Evaluation result\n(?:.*\n){0,8}?(Passed|Failed|Execution failed|Skipped)\n", LOAD
    )
    assert result.group(1) == "Passed", f"{asset}: the latest evaluation is not Passed:\n{text}"
    text = browser.text()
    assert not FAILED.search(text), f"the Checks tab of {asset} shows a failure:\n{text}"
    _assert_nothing_covers_the_page(browser)
    if screenshot:
        browser.screenshot(SHOTS / screenshot)
