"""Dagster's own machinery around our assets (test-matrix rows D2, D4, X2): op retries with
backoff and jitter, pool slots freed after a cancelled run, and secrets shown by name only."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from dagster_graphql.test.utils import define_out_of_process_context, execute_dagster_graphql

from rillet_dagster import catalog
from rillet_dagster.assets import checks, entities
from rillet_dagster.assets.entities import QUARANTINE_CHECK
from rillet_dagster.assets.reports import report_asset_key
from rillet_dagster.definitions import build_definitions
from rillet_dagster.resources import RilletResource, WarehouseResource
from rillet_dagster.rillet.errors import RilletConnectionError
from rillet_dagster.sandbox.server import SandboxOptions, SandboxServer, build_sandbox
from rillet_dagster.settings import Settings
from tests import canary

ROOT = Path(__file__).resolve().parents[2]
D2_KEY = canary.api_key("d2")


# ----------------------------------------------------------------------------- D2


# What SYNC_RETRY_POLICY promises (10 s, exponential, plus or minus one delay of jitter), in
# seconds: the wait before the first retry, then before the second. The test runs the policy
# scaled down (same shape, SCALE times the delay) and holds Dagster to these windows, scaled.
PROMISED_WAITS = ((0.0, 20.0), (20.0, 40.0))
SCALE = 0.02  # 10 s -> 0.2 s: the two retries cost the test about 0.8 s


def test_d2_transient_failures_are_retried_by_the_policy_with_bounded_delays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync step that fails transiently is retried by Dagster as our policy says: the waits it
    asked for and the time it actually waited are read back from the instance's event log."""
    production = entities.SYNC_RETRY_POLICY
    settings = Settings.from_env(
        {
            "RILLET_WAREHOUSE_URL": f"sqlite:///{tmp_path}/w.db",
            "RILLET_STATE_URL": f"sqlite:///{tmp_path}/s.db",
        }
    )
    # Every entity asset of the code location carries the policy (Dagster applies it per step).
    for built in entities.build_entity_assets(settings):
        assert built.op.retry_policy == production, built.op.name
    assert production.max_retries == len(PROMISED_WAITS)
    # Jitter: steps failed by one outage do not all come back at the same instant.
    assert production.jitter == dg.Jitter.PLUS_MINUS
    scaled = dg.RetryPolicy(
        max_retries=production.max_retries,
        delay=(production.delay or 0) * SCALE,
        backoff=production.backoff,
        jitter=production.jitter,
    )
    asset = entities.entity_asset(
        catalog.entity("product"), entities.daily_partitions(settings), retry_policy=scaled
    )
    real_sync = entities.sync_entity
    budget = {"failures": 0}
    attempts = [0]

    def flaky_sync(*args: Any, **kwargs: Any) -> Any:
        attempts[0] += 1
        if budget["failures"] > 0:
            budget["failures"] -= 1
            raise RilletConnectionError("Rillet at http://sandbox did not answer (injected)")
        return real_sync(*args, **kwargs)

    monkeypatch.setattr(entities, "sync_entity", flaky_sync)
    server = SandboxServer(
        build_sandbox(SandboxOptions(size="tiny", api_keys=(D2_KEY,), rate_limit=10**6))
    ).start()
    resources = {
        "rillet": RilletResource(
            base_url=server.base_url, api_key=D2_KEY, state_url=settings.state_url
        ),
        "warehouse": WarehouseResource(url=settings.warehouse_url),
    }
    try:
        with dg.DagsterInstance.ephemeral() as instance:
            # Two transient failures, then Rillet answers: the run succeeds on the last retry.
            budget["failures"] = production.max_retries
            recovered = dg.materialize([asset], resources=resources, instance=instance)
            assert recovered.success
            assert attempts[0] == production.max_retries + 1
            waits = applied_waits(instance, recovered.run_id)
            # Rillet stays down: the step is given up after exactly max_retries retries.
            budget["failures"], attempts[0] = 10**6, 0
            exhausted = dg.materialize(
                [asset], resources=resources, instance=instance, raise_on_error=False
            )
            assert not exhausted.success
            assert attempts[0] == production.max_retries + 1
            waits += applied_waits(instance, exhausted.run_id)
    finally:
        server.stop()
    for retry, (asked, waited) in enumerate(waits):
        low, high = (bound * SCALE for bound in PROMISED_WAITS[retry % production.max_retries])
        assert low <= asked <= high, (retry, asked)
        # Dagster held the step back for the wait it asked for (and not for much longer).
        assert asked - 0.01 <= waited <= high + 2.0, (retry, asked, waited)


def applied_waits(instance: dg.DagsterInstance, run_id: str) -> list[tuple[float, float]]:
    """Per retry of the run's step: the wait Dagster asked for (``STEP_UP_FOR_RETRY``) and the
    time until the step restarted (``STEP_RESTARTED``), from the instance's event log."""
    records = instance.all_logs(
        run_id,
        of_type={dg.DagsterEventType.STEP_UP_FOR_RETRY, dg.DagsterEventType.STEP_RESTARTED},
    )
    up = [r for r in records if r.dagster_event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]
    restarted = [r for r in records if r.dagster_event_type == dg.DagsterEventType.STEP_RESTARTED]
    assert len(up) == len(restarted) == entities.SYNC_RETRY_POLICY.max_retries
    waits = []
    for asked, again in zip(up, restarted, strict=True):
        retry = asked.dagster_event.step_retry_data  # type: ignore[union-attr]
        assert retry is not None and retry.seconds_to_wait is not None
        waits.append((float(retry.seconds_to_wait), again.timestamp - asked.timestamp))
    return waits


# ----------------------------------------------------------------------------- D4


def test_d4_no_step_claims_a_pool_so_no_run_can_hold_one() -> None:
    """D4's fault (a cancelled or killed run keeps a pool slot) cannot happen: no op claims a
    pool. The shared rate budget protects Rillet; the run queue bounds concurrency
    (``test_cli_run_kill.py`` reruns a SIGKILLed CLI run at once)."""
    shipped = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    assert "pools" not in shipped.get("concurrency", {})
    defs = build_definitions(
        Settings.from_env({"RILLET_WAREHOUSE_URL": "sqlite://", "RILLET_STATE_URL": "sqlite://"})
    )
    for job in defs.resolve_all_job_defs():
        for node in job.graph.node_defs:
            assert getattr(node, "pool", None) is None, (job.name, node.name)


# ----------------------------------------------------------------------------- the UI

CANARY = canary.api_key("graphql")
PASSWORD_CANARY = canary.password("graphql")
WAREHOUSE_WITH_PASSWORD = f"postgresql+psycopg://analyst:{PASSWORD_CANARY}@db.invalid:5432/w"
STATE_WITH_PASSWORD = f"postgresql+psycopg://dagster:{PASSWORD_CANARY}x@db.invalid:5432/s"
LOCATION = {"repositoryLocationName": "rillet_dagster", "repositoryName": "__repository__"}


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """What the webserver serves: the code location loaded from workspace.yaml in a code server,
    queried through Dagster's GraphQL API (one load for every test here: it takes ~10 s)."""
    del tmp_path_factory  # nothing is written: the databases are never opened
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RILLET_API_KEY", CANARY)
        patch.setenv("RILLET_BASE_URL", "production")
        # Loading the code location connects to neither database.
        patch.setenv("RILLET_WAREHOUSE_URL", WAREHOUSE_WITH_PASSWORD)
        patch.setenv("RILLET_STATE_URL", STATE_WITH_PASSWORD)
        patch.chdir(ROOT)
        with (
            dg.instance_for_test() as instance,
            define_out_of_process_context(str(ROOT / "workspace.yaml"), None, instance) as context,
        ):
            yield context


def test_x2_the_ui_shows_the_api_key_variable_never_its_value(ui: Any) -> None:
    query = """
      query Resource($selector: ResourceSelector!) {
        topLevelResourceDetailsOrError(resourceSelector: $selector) {
          __typename
          ... on ResourceDetails { name configuredValues { key value type } }
        }
      }
    """
    result = execute_dagster_graphql(
        ui, query, variables={"selector": {**LOCATION, "resourceName": "rillet"}}
    )
    details = result.data["topLevelResourceDetailsOrError"]
    assert details["__typename"] == "ResourceDetails", details
    values = {v["key"]: v for v in details["configuredValues"]}
    assert values["api_key"] == {"key": "api_key", "value": "RILLET_API_KEY", "type": "ENV_VAR"}
    assert CANARY not in json.dumps(result.data)


def test_x2_database_urls_with_passwords_are_shown_as_variables(ui: Any) -> None:
    """Issue 13, finding 4: the warehouse and state URLs' passwords never reach the UI."""
    query = """
      query Resource($selector: ResourceSelector!) {
        topLevelResourceDetailsOrError(resourceSelector: $selector) {
          ... on ResourceDetails { configuredValues { key value type } }
        }
      }
    """
    shown = {}
    for resource in ("rillet", "warehouse"):
        result = execute_dagster_graphql(
            ui, query, variables={"selector": {**LOCATION, "resourceName": resource}}
        )
        assert PASSWORD_CANARY not in json.dumps(result.data)
        details = result.data["topLevelResourceDetailsOrError"]
        shown |= {v["key"]: (v["value"], v["type"]) for v in details["configuredValues"]}
    assert shown["url"] == ("RILLET_WAREHOUSE_URL", "ENV_VAR")
    assert shown["state_url"] == ("RILLET_STATE_URL", "ENV_VAR")


def test_the_ui_shows_the_checks_on_each_report_asset(ui: Any) -> None:
    query = """
      query Reports($group: AssetGroupSelector!) {
        assetNodes(group: $group) {
          assetKey { path }
          isPartitioned
          assetChecksOrError {
            __typename
            ... on AssetChecks { checks { name blocking } }
          }
        }
      }
    """
    result = execute_dagster_graphql(
        ui, query, variables={"group": {**LOCATION, "groupName": "rillet_reports"}}
    )
    assert result.errors is None, result.errors
    shown = {
        "/".join(node["assetKey"]["path"]): (
            node["isPartitioned"],
            {(c["name"], c["blocking"]) for c in node["assetChecksOrError"]["checks"]},
        )
        for node in result.data["assetNodes"]
    }
    on_reports = [c for c in checks.REPORT_CHECKS if c.asset == report_asset_key(c.report)]
    for report in {c.report for c in on_reports}:
        expected = {(c.name, c.blocking) for c in on_reports if c.report == report}
        assert shown[report_asset_key(report).to_user_string()] == (True, expected), report
    reports = {report_asset_key(c.report).to_user_string() for c in on_reports}
    for asset, (_, shown_checks) in shown.items():
        if asset not in reports:  # an entity asset of the group (accounts, subsidiaries)
            assert shown_checks <= {(QUARANTINE_CHECK, False)}, asset
