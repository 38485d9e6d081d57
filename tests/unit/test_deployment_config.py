"""The deployment files agree with each other, with the code and with Dagster (issue 14).

``docker/docker-compose.yml``, ``docker/dagster.yaml``, ``docker/workspace.yaml``, the
Dockerfile, ``docker/.env.example``, the Helm values and the receiver's Kubernetes manifest are
parsed; every name one of them gives another (services, commands, ports, variables, volumes,
networks, databases, the code location) must match, and Dagster's own schemas must accept the
instance configuration. No Docker engine is needed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster._core.instance.config import dagster_instance_config
from dagster._serdes import ConfigurableClassData
from dagster_docker import DockerRunLauncher

from rillet_dagster import settings as settings_module
from rillet_dagster.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
APP_SERVICES = ("code", "webserver", "daemon", "receiver")
# Everything the local instance and the deployment's must say alike (storage and run launching
# are what differ).
SHARED_INSTANCE_KEYS = (
    "concurrency",
    "run_coordinator",
    "run_monitoring",
    "run_retries",
    "retention",
    "telemetry",
    "nux",
)
_SUBSTITUTION = re.compile(r"\$\{([A-Z0-9_]+)(?:(:?[-?])([^}]*))?\}")


def load(name: str) -> Any:
    return yaml.safe_load((DOCKER / name).read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load("docker-compose.yml")


@pytest.fixture(scope="module")
def instance() -> dict[str, Any]:
    return load("dagster.yaml")


def example_env() -> dict[str, str]:
    """Every variable docker/.env.example names (set or commented out), with its value."""
    found: dict[str, str] = {}
    for line in (DOCKER / ".env.example").read_text().splitlines():
        match = re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=(\S*)", line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def substitute(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}``; a missing required one
    raises as ``docker compose`` refuses to start."""

    def one(match: re.Match[str]) -> str:
        name, operator, argument = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if operator == ":-":
            return argument
        if operator == ":?":
            raise KeyError(f"{name}: {argument}")
        return ""

    return _SUBSTITUTION.sub(one, value)


def service_env(compose: dict[str, Any], service: str, env: dict[str, str]) -> dict[str, str]:
    raw = compose["services"][service].get("environment", {})
    return {key: substitute(str(value), env) for key, value in raw.items()}


def option(command: list[str], *names: str) -> str:
    for index, part in enumerate(command):
        if part in names:
            return str(command[index + 1])
    raise AssertionError(f"none of {names} in {command}")


def filled_env() -> dict[str, str]:
    """docker/.env.example as a user fills it in."""
    env = {k: v for k, v in example_env().items() if v}
    for name in example_env():
        env.setdefault(name, "")
    env.update(
        POSTGRES_PASSWORD="pw-postgres",
        DAGSTER_PG_PASSWORD="pw-dagster",
        RILLET_CODE_PG_PASSWORD="pw-code",
        RILLET_RECEIVER_PG_PASSWORD="pw-receiver",
        RILLET_ANALYST_PG_PASSWORD="pw-analyst",
        RILLET_API_KEY="rk_live_0123456789",
        RILLET_WEBHOOK_SECRETS="c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTAx",
        RILLET_START_DATE="2026-01-01",
    )
    return {k: v for k, v in env.items() if v}


def test_the_instance_config_is_valid_for_dagster_and_the_docker_run_launcher(
    instance: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DAGSTER_PG_URL", "postgresql+psycopg2://dagster:pw@/dagster?host=/tmp")
    validated, _ = dagster_instance_config(str(DOCKER), "dagster.yaml")
    assert validated["storage"]["postgres"]["postgres_url"] == {"env": "DAGSTER_PG_URL"}
    launcher = validated["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_docker", "DockerRunLauncher")
    built = DockerRunLauncher.from_config_value(
        ConfigurableClassData("dagster_docker", "DockerRunLauncher", "{}"), launcher["config"]
    )
    assert built.env_vars == launcher["config"]["env_vars"]


def test_local_and_deployed_instances_bound_and_schedule_runs_alike(
    instance: dict[str, Any],
) -> None:
    local = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    for key in SHARED_INSTANCE_KEYS:
        assert instance.get(key) == local.get(key), f"{key} differs from ./dagster.yaml"
    assert set(instance) == {*SHARED_INSTANCE_KEYS, "storage", "run_launcher"}


def test_every_app_service_runs_the_one_image_with_the_code_location_of_the_workspace(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    images = {services[name]["image"] for name in APP_SERVICES}
    assert images == {"${RILLET_IMAGE:-rillet-dagster:latest}"}
    for name in APP_SERVICES:
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile"
        assert "healthcheck" in services[name], f"{name} has no health check"
        assert services[name]["restart"] == "unless-stopped"

    local = yaml.safe_load((ROOT / "workspace.yaml").read_text())["load_from"][0]["python_module"]
    deployed = load("workspace.yaml")["load_from"]
    assert len(deployed) == 1
    grpc = deployed[0]["grpc_server"]
    code = [str(part) for part in services["code"]["command"]]
    assert code[:3] == ["dagster", "code-server", "start"]
    assert option(code, "--module-name", "-m") == local["module_name"]
    assert option(code, "--location-name") == local["location_name"] == grpc["location_name"]
    assert grpc["host"] == "code", "the workspace must name the code server's compose service"
    assert str(grpc["port"]) == option(code, "--port", "-p")
    assert option(code, "--host", "-h") == "0.0.0.0"
    code_check = services["code"]["healthcheck"]["test"]
    assert option(code_check, "--port") == str(grpc["port"])

    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'code_location_name = "{grpc["location_name"]}"' in pyproject
    assert f'module_name = "{local["module_name"]}"' in pyproject


def test_servers_listen_where_their_ports_health_checks_and_workspace_point(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    workspace = "/opt/dagster/home/workspace.yaml"
    webserver = [str(p) for p in services["webserver"]["command"]]
    assert webserver[0] == "dagster-webserver"
    assert option(webserver, "--workspace", "-w") == workspace
    daemon = [str(p) for p in services["daemon"]["command"]]
    assert daemon[:2] == ["dagster-daemon", "run"]
    assert option(daemon, "--workspace", "-w") == workspace
    receiver = [str(p) for p in services["receiver"]["command"]]
    assert receiver[:2] == ["rillet-dagster", "receiver"]

    for name, command in (("webserver", webserver), ("receiver", receiver)):
        port = option(command, "--port", "-p")
        assert option(command, "--host", "-h") == "0.0.0.0"
        published = [str(p).rsplit(":", 1)[-1] for p in services[name]["ports"]]
        assert published == [port], f"{name} publishes {published}, listens on {port}"
        check = " ".join(services[name]["healthcheck"]["test"])
        assert f"127.0.0.1:{port}/" in check

    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "COPY --chown=rillet:rillet docker/dagster.yaml docker/workspace.yaml " in dockerfile
    assert "DAGSTER_HOME=/opt/dagster/home" in dockerfile
    assert re.search(r"^USER rillet$", dockerfile, re.MULTILINE), "the image must not run as root"
    assert "uv sync --locked --no-dev --extra docker --extra kubernetes --no-editable" in dockerfile
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for copied in ("pyproject.toml", "uv.lock", "README.md", "rillet_dagster/"):
        assert f"!{copied}" in ignore, f".dockerignore keeps {copied} out of the build"


def test_every_variable_the_code_reads_reaches_every_process_that_runs_it(
    compose: dict[str, Any], instance: dict[str, Any]
) -> None:
    read_by_code = {
        value
        for name, value in vars(settings_module).items()
        if name.endswith("_VAR") and isinstance(value, str) and value.startswith("RILLET_")
    }
    forwarded = set(instance["run_launcher"]["config"]["env_vars"])
    assert read_by_code <= forwarded, f"run containers miss {read_by_code - forwarded}"
    assert "DAGSTER_PG_URL" in forwarded
    for name in ("code", "daemon"):
        given = set(compose["services"][name]["environment"])
        # The daemon forwards the run launcher's variables from its own environment.
        assert forwarded <= given, f"{name} lacks {forwarded - given}"
    # The webserver imports no code of ours and launches no run: no Rillet secret for it.
    assert set(compose["services"]["webserver"]["environment"]) == {"DAGSTER_PG_URL"}
    webserver_url = service_env(compose, "webserver", filled_env())["DAGSTER_PG_URL"]
    assert webserver_url == service_env(compose, "code", filled_env())["DAGSTER_PG_URL"]


def test_env_example_names_every_variable_compose_substitutes(compose: dict[str, Any]) -> None:
    text = (DOCKER / "docker-compose.yml").read_text()
    substituted = {m.group(1) for m in _SUBSTITUTION.finditer(text)}
    named = set(example_env())
    assert substituted <= named, f"docker/.env.example misses {substituted - named}"
    assert named <= substituted, f"docker/.env.example names unused {named - substituted}"
    required = {m.group(1) for m in _SUBSTITUTION.finditer(text) if m.group(2) == ":?"}
    blank = {k for k, v in example_env().items() if not v}
    assert required <= blank, "a required secret has a value in the example"
    for secret in ("RILLET_API_KEY", "DAGSTER_PG_PASSWORD", "RILLET_CODE_PG_PASSWORD"):
        without = {k: v for k, v in filled_env().items() if k != secret}
        with pytest.raises(KeyError, match=f"{secret}: set {secret} in docker/.env"):
            service_env(compose, "code", without)


def test_databases_share_one_server_and_each_service_uses_its_own_role(
    compose: dict[str, Any], instance: dict[str, Any]
) -> None:
    env = filled_env()
    code = service_env(compose, "code", env)
    receiver = service_env(compose, "receiver", env)
    assert code["DAGSTER_PG_URL"].startswith("postgresql+psycopg2://dagster:pw-dagster@/dagster?")
    warehouse, state_url = code["RILLET_WAREHOUSE_URL"], code["RILLET_STATE_URL"]
    assert warehouse.startswith("postgresql+psycopg://rillet_code:pw-code@/rillet_warehouse?")
    assert state_url.startswith("postgresql+psycopg://rillet_code:pw-code@/rillet_state?")
    assert receiver["RILLET_STATE_URL"].startswith(
        "postgresql+psycopg://rillet_receiver:pw-receiver@/rillet_state?"
    )
    assert set(receiver) == {"RILLET_PROFILE", "RILLET_WEBHOOK_SECRETS", "RILLET_STATE_URL"}
    socket = "host=/var/run/postgresql"
    for url in (code["DAGSTER_PG_URL"], warehouse, state_url, receiver["RILLET_STATE_URL"]):
        assert url.endswith(socket)

    # The socket's volume reaches every process that connects, run containers included.
    volumes = compose["volumes"]
    socket_volume = volumes["pgsocket"]["name"]
    assert (
        f"{socket_volume}:/var/run/postgresql"
        in instance["run_launcher"]["config"]["container_kwargs"]["volumes"]
    )
    for name in (*APP_SERVICES, "postgres"):
        assert "pgsocket:/var/run/postgresql" in compose["services"][name]["volumes"]
    logs = f"{volumes['compute_logs']['name']}:/opt/dagster/home/storage"
    assert logs in instance["run_launcher"]["config"]["container_kwargs"]["volumes"]
    assert "compute_logs:/opt/dagster/home/storage" in compose["services"]["webserver"]["volumes"]
    network = compose["networks"]["rillet_dagster"]["name"]
    assert instance["run_launcher"]["config"]["network"] == network

    init = (DOCKER / "postgres-init.sh").read_text()
    assert "DAGSTER_PG_ROLE:-dagster" in init and "DAGSTER_PG_DB:-dagster" in init
    roles = (DOCKER / "postgres-roles.sql").read_text()
    for variable, default in (
        ("warehouse_db", "rillet_warehouse"),
        ("state_db", "rillet_state"),
        ("code_role", "rillet_code"),
        ("receiver_role", "rillet_receiver"),
    ):
        assert f"\\set {variable} {default}" in roles, f"{variable} defaults to {default}"
    for password in ("RILLET_CODE_PG_PASSWORD", "RILLET_RECEIVER_PG_PASSWORD"):
        assert password in roles and password in compose["services"]["postgres"]["environment"]
    mounts = compose["services"]["postgres"]["volumes"]
    assert "./postgres-init.sh:/docker-entrypoint-initdb.d/10-rillet.sh:ro" in mounts
    assert any(m.startswith("./postgres-roles.sql:") for m in mounts)


def test_the_compose_environment_passes_the_code_locations_own_settings(
    compose: dict[str, Any],
) -> None:
    env = filled_env()
    settings = Settings.from_env(service_env(compose, "code", env))
    assert settings.base_url == "https://api.rillet.com"
    assert settings.has_api_key and settings.webhook_secret_count == 1
    assert service_env(compose, "code", env)["RILLET_PROFILE"] == "production"


def test_the_helm_values_run_the_same_image_location_and_instance_as_compose(
    compose: dict[str, Any], instance: dict[str, Any]
) -> None:
    helm = load("helm-values.yaml")
    deployments = helm["dagster-user-deployments"]["deployments"]
    assert len(deployments) == 1
    code = deployments[0]
    command = [str(part) for part in compose["services"]["code"]["command"]]
    assert code["codeServerArgs"] == [
        "--module-name",
        option(command, "--module-name"),
        "--location-name",
        option(command, "--location-name"),
    ]
    assert "dagsterApiGrpcArgs" not in code
    grpc = load("workspace.yaml")["load_from"][0]["grpc_server"]
    assert code["port"] == int(option(command, "--port")) == grpc["port"]
    assert helm["dagsterWebserver"]["workspace"]["servers"] == [
        {"host": code["name"], "port": code["port"], "name": grpc["location_name"]}
    ]
    assert code["replicaCount"] == 1 and code["includeConfigInLaunchedRuns"]["enabled"]
    secrets = [{"name": "rillet-dagster-env"}]
    assert code["envSecrets"] == helm["runLauncher"]["config"]["k8sRunLauncher"]["envSecrets"]
    assert code["envSecrets"] == secrets and helm["runLauncher"]["type"] == "K8sRunLauncher"
    assert {"name": "RILLET_PROFILE", "value": "production"} in code["env"]

    image = code["image"]
    assert helm["dagsterWebserver"]["image"] == helm["dagsterDaemon"]["image"] == image
    assert (
        f"${{RILLET_IMAGE:-{image['repository']}:{image['tag']}}}"
        == (compose["services"]["code"]["image"])
    )
    assert helm["global"]["dagsterHome"] == "/opt/dagster/home"
    webserver_port = int(option(compose["services"]["webserver"]["command"], "--port"))
    assert helm["dagsterWebserver"]["service"]["port"] == webserver_port
    assert helm["dagsterWebserver"]["readinessProbe"]["httpGet"] == {
        "path": "/server_info",
        "port": webserver_port,
    }

    # The instance: the chart's keys for what docker/dagster.yaml says.
    runs = instance["concurrency"]["runs"]
    assert helm["concurrency"]["runs"]["maxConcurrentRuns"] == runs["max_concurrent_runs"]
    assert helm["concurrency"]["runs"]["tagConcurrencyLimits"] == runs["tag_concurrency_limits"]
    daemon = helm["dagsterDaemon"]
    queue = daemon["runCoordinator"]["config"]["queuedRunCoordinator"]
    local_queue = instance["run_coordinator"]["config"]
    assert daemon["runCoordinator"]["type"] == instance["run_coordinator"]["class"]
    assert queue["dequeueIntervalSeconds"] == local_queue["dequeue_interval_seconds"]
    assert queue["dequeueUseThreads"] == local_queue["dequeue_use_threads"]
    assert queue["dequeueNumWorkers"] == local_queue["dequeue_num_workers"]
    assert queue["maxConcurrentRuns"] is None and queue["tagConcurrencyLimits"] == []
    monitoring = instance["run_monitoring"]
    for helm_key, key in (
        ("enabled", "enabled"),
        ("startTimeoutSeconds", "start_timeout_seconds"),
        ("pollIntervalSeconds", "poll_interval_seconds"),
        ("maxResumeRunAttempts", "max_resume_run_attempts"),
        ("maxRuntimeSeconds", "max_runtime_seconds"),
    ):
        assert daemon["runMonitoring"][helm_key] == monitoring[key], helm_key
    assert daemon["runRetries"] == {
        "enabled": instance["run_retries"]["enabled"],
        "maxRetries": instance["run_retries"]["max_retries"],
    }
    retention = instance["retention"]
    assert (
        helm["retention"]["schedule"]["purgeAfterDays"] == retention["schedule"]["purge_after_days"]
    )
    sensor = dict(helm["retention"]["sensor"]["purgeAfterDays"])
    assert sensor.pop("started") == -1 and sensor == retention["sensor"]["purge_after_days"]
    assert helm["telemetry"] == instance["telemetry"]
    assert helm["additionalInstanceConfig"]["nux"] == instance["nux"]

    # Dagster's storage: the same role, database and driver as compose's DAGSTER_PG_URL.
    url = service_env(compose, "code", filled_env())["DAGSTER_PG_URL"]
    postgres = helm["postgresql"]
    assert not postgres["enabled"] and not helm["generatePostgresqlPasswordSecret"]
    assert (
        url.startswith(f"{postgres['postgresqlScheme']}://{postgres['postgresqlUsername']}:")
        and f"@/{postgres['postgresqlDatabase']}?" in url
    )
    assert postgres["postgresqlParams"]["sslmode"] == "verify-full"
    for pod in (helm["dagsterWebserver"], daemon, code):
        assert pod["podSecurityContext"]["runAsUser"] == 10001
        assert pod["podSecurityContext"]["runAsNonRoot"] is True


def test_the_kubernetes_receiver_runs_the_compose_receiver_with_its_own_role() -> None:
    from rillet_dagster.receiver.app import HEALTH_PATH

    documents = [d for d in yaml.safe_load_all((DOCKER / "k8s-receiver.yaml").read_text()) if d]
    by_kind = {d["kind"]: d for d in documents}
    compose = load("docker-compose.yml")
    pod = by_kind["Deployment"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    command = [str(part) for part in compose["services"]["receiver"]["command"]]
    assert [*container.get("command", []), *container.get("args", [])] == command
    port = int(option(command, "--port"))
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert by_kind["Service"]["spec"]["ports"][0]["port"] == port
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == HEALTH_PATH
    env = {e["name"]: e for e in container["env"]}
    assert set(env) == set(compose["services"]["receiver"]["environment"])
    assert "envFrom" not in container, "the receiver must not get the API key or the code's URLs"
    secrets = env["RILLET_WEBHOOK_SECRETS"]["valueFrom"]["secretKeyRef"]
    assert secrets["name"] == "rillet-dagster-env"
    state_url = env["RILLET_STATE_URL"]["valueFrom"]["secretKeyRef"]
    assert state_url["name"] not in {"rillet-dagster-env"}
    assert env["RILLET_PROFILE"]["value"] == "production"
    labels = pod["metadata"]["labels"]
    assert by_kind["Service"]["spec"]["selector"].items() <= labels.items()
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001
    helm = load("helm-values.yaml")
    image = helm["dagster-user-deployments"]["deployments"][0]["image"]
    assert container["image"] == f"{image['repository']}:{image['tag']}"
