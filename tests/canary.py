"""Canary secrets for the whole suite (test-matrix X1) and the watch that looks for them.

Every API key, webhook token and database password the suite hands to the code is made here and
carries :data:`MARKER`, so one substring search finds any of them, whole or cut short, wherever it
leaks. While tests run, everything is at DEBUG (httpx, httpcore, uvicorn, SQLAlchemy and Dagster
included) and :class:`Watch` looks for the marker in:

- every log record that reaches Python logging, exception text included (:class:`LeakHandler`)
  (SQLAlchemy's engine at INFO: statements and parameters, not the rows read back);
- every statement and parameter sent to any database in the test process
  (:meth:`Watch.before_cursor_execute`): Dagster's run storage (run configs, tags) and event log
  (asset metadata, logged messages, failure texts), whatever the instance, and the warehouse
  and state databases;
- what a test leaves on disk (:meth:`Watch.scan_folder`): a Dagster home of a subprocess (its
  SQLite storage, compute logs), log files;
- pytest's captured stdout, stderr and log of each test (``tests/conftest.py``).

The handler and the listener only test a substring and store nothing else, so DEBUG everywhere
costs little. Tests of error paths (``tests/integration/test_secrets_canary.py``) add exception
texts and ``repr()`` of the resources.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MARKER = "CANARY"
_MARKER_BYTES = MARKER.encode()
# Loggers raised to DEBUG for every test. Some libraries set their own level (SQLAlchemy: WARNING;
# uvicorn: its --log-level whenever a server is configured); the watch sets them back.
DEBUG_LOGGERS = ("rillet_dagster", "dagster", "httpx", "httpcore", "uvicorn", "sqlalchemy", "tests")
# What a test may leave on disk that a leak could land in: SQLite files (Dagster's storage of a
# subprocess run, warehouse and state databases) and logs (Dagster compute logs end in .out and
# .err). Scripts, .env and config files that a test writes itself hold secrets on purpose.
SCANNED_SUFFIXES = (".db", ".db-wal", ".db-journal", ".sqlite", ".log", ".out", ".err")


def api_key(name: str) -> str:
    """A Rillet API key for one test module. Keys differ in their first characters, as real
    ones do (the sandbox counts requests per key prefix); the marker is found in any cut that
    keeps more than the name."""
    return f"{name}-{MARKER}-key-{MARKER}"


def webhook_token(name: str) -> str:
    """A webhook token (standard base64) whose text and whose HMAC key both carry the marker.

    The leading 8 characters decode to 6 bytes on their own, so the rest decodes to a key that
    reads ``CANARY-<name>-hmac-CANARY``: a leaked token or a leaked decoded key is found alike.
    """
    key = f"{MARKER}-{name}-hmac-{MARKER}".encode()
    return f"{MARKER}wh" + base64.b64encode(key).decode()


def password(name: str) -> str:
    """A database password (for URLs; PostgreSQL's trust authentication ignores it)."""
    return f"{MARKER}-{name}-password"


def contains(text: str | bytes) -> bool:
    if isinstance(text, bytes):
        return _MARKER_BYTES in text
    return MARKER in text


def excerpt(text: str, width: int = 160) -> str:
    """The text around the first marker, for a failure message."""
    at = text.find(MARKER)
    return text[max(0, at - width // 2) : at + width // 2]


class Watch:
    """Collects where the marker was seen since the last :meth:`drain` (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._findings: list[str] = []
        self.handler = LeakHandler(self)
        self.installed = False

    def report(self, where: str, text: str) -> None:
        with self._lock:
            self._findings.append(f"{where}: ...{excerpt(text)}...")

    def drain(self) -> list[str]:
        with self._lock:
            found, self._findings = self._findings, []
        return found

    # ---- databases --------------------------------------------------------------------------

    def before_cursor_execute(
        self,
        conn: Any,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        """SQLAlchemy ``before_cursor_execute`` listener for every engine of the process."""
        if MARKER in statement:
            self.report(f"SQL statement {statement[:60]!r}", statement)
            return
        for value in _values(parameters):
            if (type(value) is str and MARKER in value) or (
                type(value) is bytes and _MARKER_BYTES in value
            ):
                shown = value.decode(errors="replace") if type(value) is bytes else value
                self.report(f"SQL parameter of {statement[:60]!r}", shown)
                return

    # ---- files ------------------------------------------------------------------------------

    def scan_folder(self, folder: Path) -> None:
        """Every log and SQLite file under ``folder`` (Dagster homes of subprocesses included)."""
        for path in folder.rglob("*"):
            if path.name.endswith(SCANNED_SUFFIXES) and path.is_file():
                try:
                    data = path.read_bytes()
                except OSError:  # removed while we looked (a WAL checkpointed away)
                    continue
                if _MARKER_BYTES in data:
                    self.report(f"file {path}", data.decode(errors="replace"))

    # ---- logging ----------------------------------------------------------------------------

    def raise_loggers(self) -> None:
        """DEBUG for the watched libraries; our handler also on those that do not propagate
        (uvicorn's own loggers, once a server has configured them)."""
        for name in (*DEBUG_LOGGERS, "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
            logger = logging.getLogger(name)
            logger.setLevel(logging.DEBUG)
            if not logger.propagate and self.handler not in logger.handlers:
                logger.addHandler(self.handler)
        # Every statement and its parameters, not every row read back: rows were 87,000 of the
        # 141,000 records of one full materialization (about 4 us each, 4-6% of the test), and
        # a row read here was written by a statement the SQL listener saw with all its values.
        logging.getLogger("sqlalchemy.engine").setLevel(logging.INFO)


def install() -> Watch:
    """Everything at DEBUG and watched by :data:`WATCH`, for the rest of the process (called
    once per pytest process, workers included; again, it changes nothing)."""
    import sqlalchemy as sa
    import uvicorn.config

    watch = WATCH
    if watch.installed:
        return watch
    watch.installed = True
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    root.addHandler(watch.handler)
    watch.raise_loggers()
    sa.event.listen(sa.engine.Engine, "before_cursor_execute", watch.before_cursor_execute)
    configure = uvicorn.config.Config.configure_logging

    def configure_then_watch(config: uvicorn.config.Config) -> None:
        # Every uvicorn server (sandbox, receiver) sets its loggers back to its own level and
        # stops "uvicorn" from propagating: DEBUG again, and our handler on them.
        configure(config)
        watch.raise_loggers()

    uvicorn.config.Config.configure_logging = configure_then_watch  # type: ignore[method-assign]
    return watch


def _values(parameters: Any) -> Iterable[Any]:
    """The values of one execute's parameters: a mapping or sequence, or a list of them."""
    if isinstance(parameters, dict):
        return parameters.values()
    if isinstance(parameters, list | tuple):
        if parameters and isinstance(parameters[0], dict | list | tuple):
            return (
                value
                for row in parameters
                for value in (row.values() if isinstance(row, dict) else row)
            )
        return parameters
    return ()


class LeakHandler(logging.Handler):
    """A root handler at DEBUG: the formatted message and exception text of every record are
    searched for the marker; nothing is stored or written."""

    def __init__(self, watch: Watch) -> None:
        super().__init__(logging.DEBUG)
        self.watch = watch
        self._formatter = logging.Formatter()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception as error:  # a record whose arguments do not format: still searched
            message = f"{record.msg!r} % {record.args!r} ({type(error).__name__})"
        parts = [message]
        if record.exc_info and not record.exc_text:
            # Cached on the record as logging.Formatter does, so other handlers reuse it.
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            parts.append(record.exc_text)
        if record.stack_info:
            parts.append(record.stack_info)
        for part in parts:
            if MARKER in part:
                self.watch.report(f"log record {record.name} {record.levelname}", part)
                return


WATCH = Watch()
