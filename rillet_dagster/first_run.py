"""What ``rillet-dagster dev`` does once the UI answers: a complete, reconciled company.

Through Dagster's own API (GraphQL to launch, the instance to watch), in order:

1. ``sync_all`` over every partition, with a progress line ("sync: 12/22 entities, 3,412
   records") whenever it moves;
2. once it succeeds: the report snapshots of recent periods for every subsidiary (yesterday's
   trial balance with its reconciliation, and the month-end pack of the last ``report_months``
   months), one run per partition as the schedules launch them; the analyst models and their
   checks are launched by the ``rillet_models_after_sync`` sensor, as after any sync;
3. a "ready" line when every one of those runs has finished: how long it took, how many records
   the warehouse holds and how many checks passed (failures are named with a link to the run).

Everything here is an ordinary run in the UI; nothing is done behind Dagster's back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_graphql import DagsterGraphQLClient

from rillet_dagster import catalog
from rillet_dagster.assets.reports import SUBSIDIARY_PARTITIONS_NAME, reports_start
from rillet_dagster.automation.jobs import REFRESH_MODELS, SYNC_ALL
from rillet_dagster.automation.report_schedules import (
    DAILY_TRIAL_BALANCE_JOB,
    MONTH_END_PACK_JOB,
    previous_month,
)
from rillet_dagster.settings import Settings
from rillet_dagster.warehouse.schema import table_name

LOCATION = "rillet_dagster"
FIRST_RUN_TAG = "rillet/first_run"
_FINISHED = {
    dg.DagsterRunStatus.SUCCESS,
    dg.DagsterRunStatus.FAILURE,
    dg.DagsterRunStatus.CANCELED,
}


@dataclass
class Launched:
    run_id: str
    job: str
    partition: str | None = None


@dataclass
class Progress:
    """What the first run has done so far (also read by the dev-ready benchmark)."""

    started: float = field(default_factory=time.monotonic)
    ui_seconds: float | None = None
    sync_seconds: float | None = None
    ready_seconds: float | None = None
    records: int = 0
    checks_passed: int = 0
    checks_failed: list[str] = field(default_factory=list)
    failed_runs: list[str] = field(default_factory=list)


def report_partitions(today: date, months: int, first: date) -> list[tuple[str, str]]:
    """(job, period key) of the recent reports: yesterday's trial balance and the month-end
    pack of the last ``months`` complete months, none before the first report partition."""
    wanted = [(DAILY_TRIAL_BALANCE_JOB, (today - timedelta(days=1)).isoformat())]
    month = previous_month(today)
    for _ in range(months):
        wanted.append((MONTH_END_PACK_JOB, month.isoformat()))
        month = previous_month(month)
    return [(job, key) for job, key in wanted if date.fromisoformat(key) >= first]


class FirstRun:
    """Drives the first sync, the reports and the models of a fresh ``dev`` instance."""

    def __init__(
        self,
        *,
        home: Path,
        ui_port: int,
        settings: Settings,
        report_months: int = 1,
        say: Callable[[str], None] = print,
        stopped: Callable[[], bool] = lambda: False,
    ) -> None:
        self.home = home
        self.ui_url = f"http://127.0.0.1:{ui_port}"
        self.ui_port = ui_port
        self.settings = settings
        self.report_months = report_months
        self.say = say
        self.stopped = stopped
        self.progress = Progress()

    # ---- the sequence ----------------------------------------------------------------------

    def run(self) -> Progress:
        client = self._wait_for_ui()
        if client is None:
            return self.progress
        with dg.DagsterInstance.from_config(str(self.home)) as instance:
            sync = self._launch_sync(client)
            launched: list[Launched] = []
            if sync is None or not self._follow_sync(instance, sync):
                return self.progress
            # After the sync: the reconciliation reads the synced ledger, and runs launched
            # during it would take the run slots that webhook runs need to keep up.
            launched += self._launch_reports(client, instance, DAILY_TRIAL_BALANCE_JOB)
            launched += self._launch_reports(client, instance, MONTH_END_PACK_JOB)
            models = self._models_run(instance, sync.run_id)
            if models is not None:
                launched.append(models)
            self._wait_all(instance, launched)
            self._summarize(instance, [sync, *launched])
        return self.progress

    def _wait_for_ui(self) -> DagsterGraphQLClient | None:
        client = DagsterGraphQLClient("127.0.0.1", port_number=self.ui_port)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not self.stopped():
            try:
                if self._location_loaded(client):
                    self.progress.ui_seconds = self._elapsed()
                    self.say(
                        f"Dagster UI answers at {self.ui_url} "
                        f"({self.progress.ui_seconds:.0f} s after start)"
                    )
                    return client
            except Exception:  # noqa: S110 - not up yet: ask again
                pass
            time.sleep(1)
        if not self.stopped():
            self.say(f"the Dagster UI did not answer at {self.ui_url} within 5 minutes")
        return None

    @staticmethod
    def _location_loaded(client: DagsterGraphQLClient) -> bool:
        result = client._execute(
            """{ workspaceOrError { ... on Workspace { locationEntries {
                   name locationOrLoadError { __typename } } } } }"""
        )
        entries = result["workspaceOrError"].get("locationEntries", [])
        return any(
            e["name"] == LOCATION
            and (e["locationOrLoadError"] or {}).get("__typename") == "RepositoryLocation"
            for e in entries
        )

    def _submit(self, client: DagsterGraphQLClient, job: str, tags: dict[str, str]) -> str | None:
        for attempt in range(5):
            try:
                return client.submit_job_execution(
                    job, repository_location_name=LOCATION, tags={FIRST_RUN_TAG: "1", **tags}
                )
            except Exception as error:
                if attempt == 4:
                    self.say(f"could not launch {job}: {error}; launch it from the UI")
                time.sleep(2)
        return None

    def _launch_sync(self, client: DagsterGraphQLClient) -> Launched | None:
        from rillet_dagster.assets.entities import daily_partitions

        keys = daily_partitions(self.settings).get_partition_keys()
        run_id = self._submit(
            client,
            SYNC_ALL,
            {
                "dagster/asset_partition_range_start": keys[0],
                "dagster/asset_partition_range_end": keys[-1],
            },
        )
        if run_id is None:
            return None
        self.say(f"sync: launched sync_all over {len(keys)} days ({self.ui_url}/runs/{run_id})")
        return Launched(run_id, SYNC_ALL)

    def _follow_sync(self, instance: dg.DagsterInstance, sync: Launched) -> bool:
        """Say how the sync goes until it ends."""
        steps = sum(1 for spec in catalog.ENTITIES if spec.name != "bill_payment")
        headers = {table_name(spec.name) for spec in catalog.ENTITIES}
        shown = ""
        last_said = 0.0
        while not self.stopped():
            run = instance.get_run_by_id(sync.run_id)
            done, records = _sync_counts(instance, sync.run_id, headers)
            line = f"sync: {done}/{steps} entities, {records:,} records"
            if line != shown and time.monotonic() - last_said >= 3:
                self.say(line)
                shown, last_said = line, time.monotonic()
            if run is not None and run.status in _FINISHED:
                self.progress.records = records
                if run.status != dg.DagsterRunStatus.SUCCESS:
                    self._failed(sync)
                    return False
                self.progress.sync_seconds = self._elapsed()
                self.say(
                    f"sync: done, {records:,} records of {done} entities "
                    f"({self.progress.sync_seconds:.0f} s after start)"
                )
                return True
            time.sleep(1)
        return False

    def _launch_reports(
        self, client: DagsterGraphQLClient, instance: dg.DagsterInstance, job_name: str
    ) -> list[Launched]:
        subsidiaries = sorted(instance.get_dynamic_partitions(SUBSIDIARY_PARTITIONS_NAME))
        if not subsidiaries:
            self.say("reports: no subsidiary partitions (is the subsidiaries table empty?)")
            return []
        today = datetime.now(UTC).date()
        wanted = [
            (job, period)
            for job, period in report_partitions(
                today, self.report_months, reports_start(self.settings)
            )
            if job == job_name
        ]
        launched = []
        for job, period in wanted:
            for subsidiary in subsidiaries:
                key = f"{period}|{subsidiary}"
                run_id = self._submit(client, job, {"dagster/partition": key})
                if run_id is not None:
                    launched.append(Launched(run_id, job, key))
        periods = ", ".join(sorted({period for _, period in wanted}))
        self.say(
            f"reports: launched {len(launched)} {job_name} runs ({periods} x "
            f"{len(subsidiaries)} subsidiary partitions)"
        )
        return launched

    def _models_run(self, instance: dg.DagsterInstance, sync_run_id: str) -> Launched | None:
        """The refresh_models run that the run-status sensor launches after the sync."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not self.stopped():
            runs = instance.get_runs(
                filters=dg.RunsFilter(
                    job_name=REFRESH_MODELS, tags={"rillet/after_run": sync_run_id}
                ),
                limit=1,
            )
            if runs:
                return Launched(runs[0].run_id, REFRESH_MODELS)
            time.sleep(1)
        if not self.stopped():
            self.say("models: rillet_models_after_sync launched nothing within 2 minutes")
        return None

    def _wait_all(self, instance: dg.DagsterInstance, launched: list[Launched]) -> None:
        waiting = {run.run_id: run for run in launched}
        while waiting and not self.stopped():
            for run_id in list(waiting):
                run = instance.get_run_by_id(run_id)
                if run is not None and run.status in _FINISHED:
                    if run.status != dg.DagsterRunStatus.SUCCESS:
                        self._failed(waiting[run_id])
                    del waiting[run_id]
            time.sleep(1)

    def _summarize(self, instance: dg.DagsterInstance, launched: Iterable[Launched]) -> None:
        if self.stopped():
            return
        for run in launched:
            for record in instance.get_records_for_run(
                run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
            ).records:
                evaluation = record.event_log_entry.dagster_event.event_specific_data  # type: ignore[union-attr]
                if evaluation.passed:
                    self.progress.checks_passed += 1
                else:
                    where = f" [{run.partition}]" if run.partition else ""
                    self.progress.checks_failed.append(
                        f"{evaluation.asset_key.to_user_string()} {evaluation.check_name}{where}"
                    )
        self.progress.ready_seconds = self._elapsed()
        failed = self.progress.checks_failed
        summary = f"{self.progress.checks_passed} checks passed"
        if failed:
            summary += f", {len(failed)} FAILED: " + "; ".join(failed[:5])
        if self.progress.failed_runs:
            summary += f", {len(self.progress.failed_runs)} runs FAILED"
        self.say(
            f"ready ({self.progress.ready_seconds:.0f} s after start): UI at {self.ui_url}, "
            f"{self.progress.records:,} records, {summary}"
        )

    # ---- helpers ---------------------------------------------------------------------------

    def _failed(self, run: Launched) -> None:
        where = f" [{run.partition}]" if run.partition else ""
        self.progress.failed_runs.append(run.run_id)
        self.say(f"run {run.job}{where} FAILED: {self.ui_url}/runs/{run.run_id}")

    def _elapsed(self) -> float:
        return time.monotonic() - self.progress.started


def _sync_counts(instance: dg.DagsterInstance, run_id: str, headers: set[str]) -> tuple[int, int]:
    """(entities materialized, their rows) in the run so far.

    A run over a range of daily partitions records one materialization per partition and
    table: each table counts once, with its latest row count.
    """
    rows: dict[str, int] = {}
    for record in instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION, limit=100_000
    ).records:
        materialization: Any = record.asset_materialization
        table = materialization.asset_key.path[-1] if materialization is not None else ""
        # Bill payments are read with the bills, not by an entity step of their own.
        if table not in headers or table == table_name("bill_payment"):
            continue
        count = materialization.metadata.get("dagster/row_count")
        rows[table] = int(count.value) if count is not None else 0
    return len(rows), sum(rows.values())
