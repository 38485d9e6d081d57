"""A private, throwaway PostgreSQL cluster for tests that stop and restart the server.

The shared server on 127.0.0.1:5432 serves every other test running in parallel, so a test that
crashes PostgreSQL gets its own: ``initdb`` into a temporary folder (outside the test's
``tmp_path``, which the suite scans file by file), trust authentication, a free TCP port on
loopback and the Unix socket in that folder. ``initdb`` and ``pg_ctl`` refuse to run as root: as
root they run as the ``postgres`` OS user, which then owns the folder.

Without PostgreSQL's server programs the fixture skips, except in CI (``CI`` set), where their
absence is a failure.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

# Where Debian and Ubuntu install the server programs (``pg_config --bindir`` is the client's).
_BINDIRS = ("/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin", "/usr/pgsql-*/bin")
_OS_USER = "postgres"


def _bindir() -> Path | None:
    override = os.environ.get("RILLET_TEST_PG_BINDIR")
    candidates = [override] if override else []
    for pattern in _BINDIRS:
        candidates += sorted(glob.glob(pattern), reverse=True)  # the newest version first
    return next((Path(c) for c in candidates if (Path(c) / "initdb").is_file()), None)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrivateCluster:
    """One PostgreSQL cluster of this test: :meth:`stop` (``immediate`` by default: the
    postmaster and its backends quit at once, no checkpoint, so :meth:`start` recovers from
    the WAL as after a crash) and :meth:`start` at will."""

    def __init__(self, bindir: Path, root: Path, user: pwd.struct_passwd | None) -> None:
        self.bindir, self.root, self.user = bindir, root, user
        self.data = root / "data"
        self.log = root / "server.log"
        self.port = _free_port()
        self.running = False

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bindir / program), *args]
        if self.user is not None:
            command = ["runuser", "-u", self.user.pw_name, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{program} {' '.join(args)} failed ({done.returncode}):\n"
                f"{done.stdout}{done.stderr}\n{log}"
            )

    def init(self) -> None:
        # --no-sync: initdb's own final fsync only; the server keeps fsync on.
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"port = {self.port}\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.root}'\n"
                "max_connections = 30\n"
                "shared_buffers = 16MB\n"
            )

    def start(self) -> None:
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.log))
        self.running = True

    def stop(self, mode: str = "immediate") -> None:
        self._run("pg_ctl", "stop", "-w", "-t", "60", "-m", mode, "-D", str(self.data))
        self.running = False

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """An empty database ``name``; its URL."""
        engine = sa.create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.url(name)

    def close(self) -> None:
        try:
            if self.running:
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _unavailable() -> tuple[Path, pwd.struct_passwd | None] | str:
    bindir = _bindir()
    if bindir is None:
        return "PostgreSQL's server programs (initdb, pg_ctl) are not installed"
    if os.geteuid() != 0:
        return bindir, None
    try:
        return bindir, pwd.getpwnam(_OS_USER)
    except KeyError:
        return f"running as root, and there is no {_OS_USER!r} OS user to run initdb as"


@pytest.fixture(name="private_postgres")
def private_postgres_fixture() -> Iterator[PrivateCluster]:
    """A started private cluster (stopped and deleted after the test)."""
    found = _unavailable()
    if isinstance(found, str):
        if "CI" in os.environ:
            pytest.fail(f"{found}; CI must run the tests that restart PostgreSQL")
        pytest.skip(found)
    bindir, user = found
    # Short: a Unix socket's path must fit in 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="rillet-pg-"))
    if user is not None:
        os.chown(root, user.pw_uid, user.pw_gid)
    cluster = PrivateCluster(bindir, root, user)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.close()
