"""The deployment of ``docker/`` run as plain processes, for tests and the topology benchmark.

This machine has no Docker engine, so each compose service that runs our image becomes a process
started with the service's own ``command`` from ``docker/docker-compose.yml``, reading
``docker/dagster.yaml`` and ``docker/workspace.yaml`` as the image holds them. What is changed,
and only that: host names and ports (``0.0.0.0`` listens on loopback, the ``code`` host is
127.0.0.1, free ports instead of 3000/4000/8780), the workspace path, and the run launcher
(``DockerRunLauncher`` needs an engine: runs are processes of the code server instead, Dagster's
``DefaultRunLauncher``). The environment is the compose file's, with the URLs of databases on
CI's PostgreSQL and the sandbox in place of Rillet.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
import yaml
from dagster_graphql import DagsterGraphQLClient

from rillet_dagster.sandbox.server import SandboxServer
from rillet_dagster.warehouse import state
from tests.dev_stack import free_port

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
# The compose services that run our image, in the order a deployment starts them.
SERVICES = ("receiver", "code", "webserver", "daemon")
LOCATION = "rillet_dagster"


def compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def instance_yaml(storage: str) -> str:
    """docker/dagster.yaml with the process run launcher; ``storage="sqlite"`` swaps in the
    local instance's storage (the repository's dagster.yaml) for a side-by-side figure."""
    config = yaml.safe_load((DOCKER / "dagster.yaml").read_text())
    config["run_launcher"] = {"module": "dagster", "class": "DefaultRunLauncher"}
    if storage == "sqlite":
        del config["storage"]
    return yaml.safe_dump(config, sort_keys=False)


@dataclass
class Topology:
    """The four services as processes, with their ports and logs under ``folder``."""

    folder: Path
    env: Mapping[str, str]
    storage: str = "postgres"
    # The receiver's own environment (compose gives it only its role's state URL and the tokens);
    # None: the same as the other services'.
    receiver_env: Mapping[str, str] | None = None
    ports: dict[str, int] = field(
        default_factory=lambda: {"code": free_port(), "webserver": free_port(), "receiver": 0}
    )
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ports["receiver"] = self.ports["receiver"] or free_port()
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "dagster.yaml").write_text(instance_yaml(self.storage))
        workspace = yaml.safe_load((DOCKER / "workspace.yaml").read_text())
        for entry in workspace["load_from"]:
            entry["grpc_server"]["host"] = "127.0.0.1"
            entry["grpc_server"]["port"] = self.ports["code"]
        (self.home / "workspace.yaml").write_text(yaml.safe_dump(workspace))

    @property
    def home(self) -> Path:
        return self.folder / "dagster_home"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['webserver']}"

    @property
    def webhook_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['receiver']}/webhooks/rillet"

    def command(self, service: str) -> list[str]:
        """The compose service's command with only hosts, ports and the workspace path changed."""
        spec = compose()["services"][service]
        command = [str(part) for part in spec["command"]]
        compose_port = {"code": "4000", "webserver": "3000", "receiver": "8780"}.get(service)
        out: list[str] = []
        for part in command:
            if part == "0.0.0.0":
                part = "127.0.0.1"
            elif compose_port is not None and part == compose_port:
                part = str(self.ports[service])
            elif part == "/opt/dagster/home/workspace.yaml":
                part = str(self.home / "workspace.yaml")
            out.append(part)
        # The venv's entry points (PATH in the image is /opt/venv/bin).
        out[0] = str(Path(sys.executable).with_name(out[0]))
        return out

    def service_env(self, service: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RILLET_", "DAGSTER_"))}
        given = self.receiver_env if service == "receiver" and self.receiver_env else self.env
        # Only the variables compose gives this service (the webserver gets no Rillet secret).
        names = set(compose()["services"][service].get("environment", {}))
        env.update({name: value for name, value in given.items() if name in names})
        env["DAGSTER_HOME"] = str(self.home)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self, service: str) -> subprocess.Popen[bytes]:
        log = (self.folder / f"{service}.log").open("ab")
        process = subprocess.Popen(
            self.command(service),
            cwd=self.home,
            env=self.service_env(service),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.processes[service] = process
        return process

    def kill(self, service: str) -> None:
        """SIGKILL the service and everything it started (a container stopped hard)."""
        process = self.processes.pop(service)
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL what is still up after 3 s (nothing is measured at teardown,
        and the webserver and the daemon may take 20 s to stop on their own)."""
        for service in reversed(list(self.processes)):
            process = self.processes[service]
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 3
        for service in list(self.processes):
            try:
                self.processes[service].wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(service)
        self.processes.clear()

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name} ---\n{path.read_text(errors='replace')[-4000:]}"
            for path in sorted(self.folder.glob("*.log"))
        )

    def wait_until(self, what: str, ready: Any, timeout: float) -> float:
        """Poll ``ready()`` until true; seconds it took. Fails with every service's log tail."""
        started = time.monotonic()
        while not ready():
            for service, process in self.processes.items():
                if process.poll() is not None:
                    raise AssertionError(
                        f"{service} exited while waiting for {what}\n{self.logs()}"
                    )
            if time.monotonic() - started > timeout:
                raise AssertionError(f"no {what} after {timeout} s\n{self.logs()}")
            time.sleep(0.25)
        return time.monotonic() - started

    def answers(self, url: str) -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def client(self) -> DagsterGraphQLClient:
        return DagsterGraphQLClient("127.0.0.1", port_number=self.ports["webserver"])

    def location_loaded(self) -> bool:
        try:
            result = self.client()._execute(
                "{ workspaceOrError { ... on Workspace { locationEntries { name "
                "locationOrLoadError { __typename } } } } }"
            )
        except Exception:  # the webserver still starting, or the code server not yet there
            return False
        entries = result["workspaceOrError"].get("locationEntries", [])
        return any(
            e["name"] == LOCATION and e["locationOrLoadError"]["__typename"] == "RepositoryLocation"
            for e in entries
        )

    def run(self, run_id: str) -> dict[str, Any]:
        result = self.client()._execute(
            "query($id: ID!) { runOrError(runId: $id) { __typename "
            "... on Run { status startTime endTime } } }",
            {"id": run_id},
        )
        return result["runOrError"]

    def busy(self) -> bool:
        """Whether a run is queued, starting or running."""
        result = self.client()._execute(
            "{ runsOrError(filter: {statuses: [QUEUED, NOT_STARTED, STARTING, STARTED]}) "
            "{ ... on Runs { results { runId } } } }"
        )
        return bool(result["runsOrError"]["results"])

    def reload_location(self) -> None:
        self.client().reload_repository_location(LOCATION)


@contextmanager
def running(
    folder: Path,
    env: Mapping[str, str],
    storage: str = "postgres",
    receiver_env: Mapping[str, str] | None = None,
) -> Iterator[Topology]:
    topology = Topology(folder, env, storage, receiver_env)
    try:
        yield topology
    finally:
        topology.stop()


def dagster_url(sqlalchemy_url: str) -> str:
    """Dagster's storage URL names psycopg2 (docker/dagster.yaml says why)."""
    return (
        sa.engine.make_url(sqlalchemy_url)
        .set(drivername="postgresql+psycopg2")
        .render_as_string(False)
    )


def wait_delivered(sandbox: SandboxServer, timeout: float) -> set[str]:
    """Ids of every delivery the sandbox made, once each one was acknowledged with a 2xx."""
    deadline = time.monotonic() + timeout
    while True:
        answer = httpx.get(f"{sandbox.base_url}/_sandbox/deliveries").json()
        records = answer.get("deliveries", answer) if isinstance(answer, dict) else answer
        if records and all(d.get("status") == "delivered" for d in records):
            return {d["id"] for d in records}
        assert time.monotonic() < deadline, f"deliveries not acknowledged: {records}"
        time.sleep(0.1)


def _statuses(deployment: Topology, ids: set[str]) -> dict[str, tuple[str, datetime, datetime]]:
    engine = state.make_state_engine(deployment.env["RILLET_STATE_URL"])
    table = state.webhook_events
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                sa.select(
                    table.c.id, table.c.status, table.c.received_at, table.c.applied_at
                ).where(table.c.id.in_(sorted(ids)))
            ).all()
    finally:
        engine.dispose()
    return {row.id: (row.status, row.received_at, row.applied_at) for row in rows}


def pending(deployment: Topology, ids: set[str]) -> set[str]:
    return {i for i, (status, *_) in _statuses(deployment, ids).items() if status == "pending"}


def wait_applied(deployment: Topology, ids: set[str], timeout: float) -> list[float]:
    """Until every acknowledged event is applied; their lags (received to applied), seconds."""
    found: dict[str, tuple[str, datetime, datetime]] = {}

    def all_applied() -> bool:
        found.update(_statuses(deployment, ids))
        return len(found) == len(ids) and all(s == "applied" for s, *_ in found.values())

    deployment.wait_until("every webhook applied", all_applied, timeout)
    assert set(found) == ids, f"lost: {sorted(ids - set(found))}"
    return [(applied - received).total_seconds() for _, received, applied in found.values()]


def percentile(values: list[float], q: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def sync_all(deployment: Topology, days: list[str], timeout: float = 300) -> dict[str, Any]:
    """Launch ``sync_all`` over ``days`` through the GraphQL API and wait for it to end; the
    run as the API reports it (status, start and end times)."""
    from rillet_dagster.automation.jobs import SYNC_ALL

    run_id = deployment.client().submit_job_execution(
        SYNC_ALL,
        repository_location_name=LOCATION,
        tags={
            "dagster/asset_partition_range_start": days[0],
            "dagster/asset_partition_range_end": days[-1],
        },
    )
    deployment.wait_until(
        "sync_all to end",
        lambda: deployment.run(run_id)["status"] in {"SUCCESS", "FAILURE", "CANCELED"},
        timeout,
    )
    return deployment.run(run_id)
