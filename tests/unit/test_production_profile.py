"""The production profile (test-matrix X5): start-up refuses plain HTTP to Rillet, TLS
verification turned off, and databases reached without verified TLS, each with a clear error.

Also: the profile and TLS settings are validated, a correct production configuration starts,
the code location and ``rillet-dagster receiver`` run the check, and ``RILLET_CA_BUNDLE`` /
``RILLET_TLS_VERIFY`` really reach the HTTPS connection to Rillet (a local TLS server with a
certificate of its own).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rillet_dagster.rillet.client import RetryPolicy
from rillet_dagster.rillet.errors import RilletConnectionError
from rillet_dagster.settings import Settings, SettingsError
from tests import canary

PASSWORD = canary.password("production-profile")
TOKEN = canary.webhook_token("production-profile")
VERIFIED = (
    f"postgresql+psycopg://rillet_code:{PASSWORD}@db.example.com:5432/rillet_warehouse"
    "?sslmode=verify-full&sslrootcert=/etc/rillet/pg-ca.crt"
)
SOCKET = f"postgresql+psycopg://rillet_code:{PASSWORD}@/rillet_state?host=/var/run/postgresql"
GOOD = {
    "RILLET_PROFILE": "production",
    "RILLET_BASE_URL": "production",
    "RILLET_API_KEY": "live-key-0123456789",
    "RILLET_WAREHOUSE_URL": VERIFIED,
    "RILLET_STATE_URL": SOCKET,
}

_SCRIPT = Path(sys.executable).parent / "rillet-dagster"
# The installed console script when there is one, so the test runs what an operator runs.
RECEIVER = (
    [str(_SCRIPT), "receiver"]
    if _SCRIPT.exists()
    else [sys.executable, "-m", "rillet_dagster.cli", "receiver"]
)


def refusal(**changes: str | None) -> str:
    """The production refusal for GOOD with ``changes`` (``None`` unsets a variable)."""
    env = {**GOOD, **changes}
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({k: v for k, v in env.items() if v is not None})
    message = str(raised.value)
    assert message.startswith("RILLET_PROFILE=production refuses")
    assert PASSWORD not in message
    return message


def test_a_correct_production_configuration_passes() -> None:
    settings = Settings.from_env(GOOD)
    assert (settings.profile, settings.base_url, settings.tls_verify) == (
        "production", "https://api.rillet.com", True,
    )  # fmt: skip
    assert settings.production_problems() == []
    # The sandbox host is HTTPS too; two Unix-socket hosts; the profile's name in any case.
    both_sockets = f"{SOCKET.split('?')[0]}?host=/run/pg,/var/run/postgresql"
    for changes in (
        {"RILLET_BASE_URL": "sandbox", "RILLET_PROFILE": " Production "},
        {"RILLET_BASE_URL": "https://rillet-proxy.internal:8443/api"},
        {"RILLET_WAREHOUSE_URL": both_sockets, "RILLET_TLS_VERIFY": "TRUE"},
    ):
        assert Settings.from_env({**GOOD, **changes}).profile == "production"


def test_development_allows_what_production_refuses() -> None:
    loose = {
        "RILLET_BASE_URL": "http://127.0.0.1:8765",
        "RILLET_TLS_VERIFY": "false",
        "RILLET_WAREHOUSE_URL": "postgresql+psycopg://postgres@db.example.com/w",
    }
    settings = Settings.from_env(loose)
    assert (settings.profile, settings.tls_verify) == ("development", False)
    assert settings.production_problems() == []
    explicit = Settings.from_env({**loose, "RILLET_PROFILE": "development"})
    assert explicit.profile == "development"


def test_plain_http_to_rillet_is_refused() -> None:
    message = refusal(RILLET_BASE_URL="http://api.rillet.com")
    assert "refuses 1 setting(s)" in message
    assert "RILLET_BASE_URL=http://api.rillet.com is plain HTTP" in message
    assert "set RILLET_BASE_URL=production (https://api.rillet.com)" in message


def test_tls_verification_off_is_refused() -> None:
    message = refusal(RILLET_TLS_VERIFY="false")
    assert "refuses 1 setting(s)" in message
    assert "RILLET_TLS_VERIFY=false turns off certificate verification" in message
    assert "RILLET_CA_BUNDLE=/path/to/ca.pem" in message
    assert "refuses 1 setting(s)" in refusal(RILLET_TLS_VERIFY="0")


@pytest.mark.parametrize(
    ("variable", "url", "found"),
    [
        ("RILLET_WAREHOUSE_URL", f"postgresql+psycopg://u:{PASSWORD}@db.example.com/w",
         "no sslmode"),
        ("RILLET_STATE_URL", f"postgresql://u:{PASSWORD}@10.0.0.5/s?sslmode=require",
         "sslmode=require"),
        ("RILLET_WAREHOUSE_URL", f"postgresql+psycopg://u:{PASSWORD}@db/w?sslmode=verify-ca",
         "sslmode=verify-ca"),
        # A TCP host name beside a socket path is still a network connection.
        ("RILLET_STATE_URL", f"postgresql+psycopg://u:{PASSWORD}@/s?host=/run/pg,db.example.com",
         "no sslmode"),
        # No host at all: libpq's default (or PGHOST) decides, so production must say.
        ("RILLET_STATE_URL", f"postgresql+psycopg://u:{PASSWORD}@/s", "no sslmode"),
    ],
)  # fmt: skip
def test_postgres_without_verify_full_is_refused(variable: str, url: str, found: str) -> None:
    message = refusal(**{variable: url})
    assert "refuses 1 setting(s)" in message
    shown = url.replace(PASSWORD, "***")
    assert f"{variable}={shown} has {found}" in message
    assert "add sslmode=verify-full" in message and "host=/var/run/postgresql" in message


def test_a_password_in_the_query_string_is_hidden_too() -> None:
    message = refusal(RILLET_STATE_URL=f"postgresql://db.example.com/s?user=u&password={PASSWORD}")
    assert "password=***" in message


@pytest.mark.parametrize("variable", ["RILLET_WAREHOUSE_URL", "RILLET_STATE_URL"])
def test_sqlite_is_refused_set_or_by_default(variable: str, tmp_path: Path) -> None:
    explicit = refusal(**{variable: f"sqlite:///{tmp_path}/db.sqlite"})
    assert f"{variable}=sqlite:///{tmp_path}/db.sqlite is a SQLite file" in explicit
    assert "production keeps its data in PostgreSQL" in explicit
    assert f"set {variable}=postgresql+psycopg://" in explicit and "sslmode=verify-full" in explicit
    unset = refusal(**{variable: None})
    assert f"{variable}=sqlite:///" in unset and "what an unset" in unset
    other = refusal(**{variable: "mysql+pymysql://u@db.example.com/w"})
    assert "is mysql: production supports PostgreSQL only" in other
    garbled = refusal(**{variable: f"db.example.com:{PASSWORD}"})
    assert f"{variable} is not a database URL; set it to postgresql+psycopg://" in garbled


def test_every_problem_is_named_at_once() -> None:
    message = refusal(
        RILLET_BASE_URL="http://rillet.example.com",
        RILLET_TLS_VERIFY="no",
        RILLET_WAREHOUSE_URL=None,
        RILLET_STATE_URL=f"postgresql+psycopg://u:{PASSWORD}@db.example.com/s?sslmode=prefer",
    )
    assert "refuses 4 setting(s)" in message
    lines = message.splitlines()[1:]
    assert [line.split("=")[0].strip(" -") for line in lines] == [
        "RILLET_BASE_URL", "RILLET_TLS_VERIFY", "RILLET_WAREHOUSE_URL", "RILLET_STATE_URL",
    ]  # fmt: skip


def test_only_what_a_caller_uses_is_checked() -> None:
    """The receiver's container has the state database only: Rillet's and the warehouse's
    settings are not its to refuse, and ``uses=()`` leaves the check to the caller."""
    env = {**GOOD, "RILLET_BASE_URL": "http://x.example.com", "RILLET_WAREHOUSE_URL": ""}
    settings = Settings.from_env(env, uses=("state",))
    assert settings.production_problems(("state",)) == []
    assert len(settings.production_problems()) == 2
    [problem] = settings.production_problems((), databases={"--state-url": "sqlite:///q.db"})
    assert problem.startswith("--state-url=sqlite:///q.db is a SQLite file")


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("RILLET_PROFILE", "prod", "RILLET_PROFILE='prod' is not a profile; use 'development'"),
        ("RILLET_TLS_VERIFY", "maybe", "RILLET_TLS_VERIFY='maybe' is neither true nor false"),
        ("RILLET_CA_BUNDLE", "/nonexistent/ca.pem", "RILLET_CA_BUNDLE='/nonexistent/ca.pem' is "
         "not a usable PEM certificate bundle (No such file or directory)"),
    ],
)  # fmt: skip
def test_values_are_validated(variable: str, value: str, expected: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({variable: value})
    assert expected in str(raised.value)


def test_ca_bundle_must_hold_certificates_and_verification(tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(SettingsError, match="is not a usable PEM certificate bundle"):
        Settings.from_env({"RILLET_CA_BUNDLE": str(not_pem)})
    cert, _key = certificate(tmp_path)
    with pytest.raises(SettingsError, match="RILLET_TLS_VERIFY=false turns verification off"):
        Settings.from_env({"RILLET_CA_BUNDLE": str(cert), "RILLET_TLS_VERIFY": "false"})
    relative = os.path.relpath(cert)
    assert Settings.from_env({"RILLET_CA_BUNDLE": relative}).ca_bundle == str(cert.resolve())


def test_code_location_load_refuses_and_passes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``defs = build_definitions()`` is what loading the code location runs."""
    from rillet_dagster.definitions import build_definitions

    for name in list(os.environ):
        if name.startswith("RILLET_"):
            monkeypatch.delenv(name)
    for name, value in {**GOOD, "RILLET_BASE_URL": "http://api.rillet.com"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=r"RILLET_BASE_URL=http://api\.rillet\.com is plain"):
        build_definitions()
    cert, _key = certificate(tmp_path)
    monkeypatch.setenv("RILLET_BASE_URL", "production")
    monkeypatch.setenv("RILLET_CA_BUNDLE", str(cert))
    rillet = build_definitions().resources["rillet"]
    assert (rillet.tls_verify, rillet.ca_bundle) == (True, str(cert))


def _production_receiver_env(**env: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RILLET_")}
    return {**clean, "RILLET_PROFILE": "production", "RILLET_WEBHOOK_SECRETS": TOKEN, **env}


def test_receiver_refuses_to_start_without_a_traceback() -> None:
    bad_state = f"postgresql+psycopg://rillet_receiver:{PASSWORD}@db.example.com/rillet_state"
    # A port already taken: a receiver that skipped the check would stop at once too (bind
    # error), not serve until the timeout.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        refused = subprocess.run(
            [*RECEIVER, "--port", str(taken.getsockname()[1])],
            env=_production_receiver_env(RILLET_STATE_URL=bad_state),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert refused.stderr.startswith(
        "rillet-dagster receiver: RILLET_PROFILE=production refuses 1 setting(s):\n"
        "  - RILLET_STATE_URL=postgresql+psycopg://rillet_receiver:***@db.example.com/"
        "rillet_state has no sslmode"
    ), refused.stderr
    assert refused.returncode == 1
    assert "Traceback" not in refused.stderr and PASSWORD not in refused.stderr


def test_receiver_checks_its_state_url_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    """--state-url replaces RILLET_STATE_URL, so it is what is checked; Rillet's URL and the
    warehouse are not the receiver's (the deployment gives it the state database alone)."""
    from rillet_dagster import cli
    from rillet_dagster.receiver import serve

    for name in list(os.environ):
        if name.startswith("RILLET_"):
            monkeypatch.delenv(name)
    for name, value in _production_receiver_env(RILLET_STATE_URL=SOCKET).items():
        monkeypatch.setenv(name, value)
    served: list[str] = []
    monkeypatch.setattr(serve, "serve", lambda config, *_a, **_k: served.append(config.state_url))
    with pytest.raises(SystemExit) as refused:
        cli.main(["receiver", "--port", "0", "--state-url", "sqlite:///queue.db"])
    assert str(refused.value.code).startswith(
        "rillet-dagster receiver: RILLET_PROFILE=production refuses 1 setting(s):\n"
        "  - --state-url=sqlite:///queue.db is a SQLite file"
    )
    assert served == []
    monkeypatch.setenv("RILLET_BASE_URL", "http://not-used.example.com")
    cli.main(["receiver", "--port", "0"])
    assert served == [SOCKET]


# ---- TLS settings reach the HTTPS connection --------------------------------------------------


def certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own certificate authority)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    if not cert.exists():
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out", str(cert),
             "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True,
            capture_output=True,
        )  # fmt: skip
    return cert, key


class _Answer(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def https_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTPS server on loopback with a certificate no default trust store holds."""
    cert, key = certificate(tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", cert
    server.shutdown()
    server.server_close()


def test_tls_settings_reach_the_rillet_connection(
    https_server: tuple[str, Path], tmp_path: Path
) -> None:
    """From the environment through the Definitions' resource to httpx: the default trust
    store refuses the server, RILLET_CA_BUNDLE trusts it, RILLET_TLS_VERIFY=false skips it."""
    from rillet_dagster.definitions import build_definitions

    url, cert = https_server
    base = {
        "RILLET_BASE_URL": url,
        "RILLET_API_KEY": "tls-key-0123456789",
        "RILLET_STATE_URL": f"sqlite:///{tmp_path}/state.db",
        "RILLET_WAREHOUSE_URL": f"sqlite:///{tmp_path}/warehouse.db",
    }

    def get(**env: str) -> object:
        rillet = build_definitions(Settings.from_env({**base, **env})).resources["rillet"]
        with rillet.client() as client:
            client.retry = RetryPolicy(max_attempts=1)
            return client.request("GET", "/invoices")

    with pytest.raises(RilletConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        get()
    assert get(RILLET_CA_BUNDLE=str(cert)) == {"path": "/invoices"}
    assert get(RILLET_TLS_VERIFY="false") == {"path": "/invoices"}
    # A bundle replaces the default trust store: one without this server's CA refuses it.
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(RilletConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        get(RILLET_CA_BUNDLE=str(certificate(other)[0]))
