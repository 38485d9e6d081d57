"""SIGKILL a sync pass from inside its write transactions (test-matrix row S1).

The pass runs in a child process. SQLAlchemy event listeners on its engine number every
statement sent inside a transaction and every commit (psycopg's ``COPY`` too, which bypasses
SQLAlchemy's events), and at the chosen point the process SIGKILLs itself: it dies holding an
open transaction whose rows are written but not committed. Just before dying it writes a
journal of what the committed transactions wrote and what the killed one held, so the test can
tell which rows must be visible and which must not.

Killing "before point N" covers "after point N - 1": before a commit every row of the batch is
written; before the first child-table write the header rows are written and their lines not.

A fork server imports the project once and forks one child per kill: importing Dagster costs
about 3 s of CPU, a fork a few milliseconds.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]

# The verb and table of a statement, for a point's label ("INSERT journal_entry_items").
_TARGET = re.compile(
    r"^\s*(INSERT INTO|UPDATE|DELETE FROM|COPY|TRUNCATE|CREATE TEMPORARY TABLE IF NOT EXISTS|"
    r"SAVEPOINT|RELEASE SAVEPOINT|ROLLBACK TO SAVEPOINT|SELECT|BEGIN IMMEDIATE|BEGIN)"
    r"\s*\"?(\w*)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Job:
    """One sync pass of ``entity`` into ``url``, killed before point ``kill_at`` (0: never)."""

    base_url: str
    api_key: str
    url: str
    entity: str
    batch_size: int
    kill_at: int
    journal: str


@dataclass(frozen=True)
class Point:
    """A place a pass can die: before a statement inside transaction ``txn``, or before its
    commit (``what == "commit"``); ``open`` is what the transaction had written by then."""

    index: int
    txn: int
    what: str
    open: tuple[str, ...]


@dataclass(frozen=True)
class Outcome:
    """How a pass ended: its exit code (-9 when killed), every point it reached (the last is
    where it died), what committed transactions wrote and what the killed one had written.

    Tags: ``record:<id>`` for each record a transaction upserted, ``deletions`` for the
    inferred soft deletes, ``watermark`` for the watermark."""

    returncode: int
    points: tuple[Point, ...]
    committed: frozenset[str]
    uncommitted: frozenset[str]
    stderr: str

    @property
    def killed_at(self) -> Point | None:
        return self.points[-1] if self.returncode == -signal.SIGKILL else None

    def committed_records(self) -> set[str]:
        return {t.removeprefix("record:") for t in self.committed if t.startswith("record:")}

    def uncommitted_records(self) -> set[str]:
        return {t.removeprefix("record:") for t in self.uncommitted if t.startswith("record:")}


class KillSwitch:
    """Numbers the write points of one engine and SIGKILLs this process at ``kill_at``."""

    def __init__(self, kill_at: int, journal: Path) -> None:
        self.kill_at = kill_at
        self.journal = journal
        self.count = 0
        self.txn = 0
        self.points: list[Point] = []
        self.open: list[str] = []
        self.committing: list[str] = []
        self.committed: list[str] = []

    def install(self, engine: Any) -> None:
        import psycopg
        import sqlalchemy as sa
        from sqlalchemy import event

        from rillet_dagster.warehouse import load

        def before_execute(
            conn: sa.Connection, _c: Any, statement: str, _p: Any, _x: Any, _m: bool
        ) -> None:
            if conn.in_transaction():
                self.point(_label(statement))

        event.listen(engine, "begin", self.begin, insert=True)
        event.listen(engine, "before_cursor_execute", before_execute)
        event.listen(engine, "commit", lambda _conn: self.point("commit", committing=True))
        event.listen(engine, "rollback", lambda _conn: self.open.clear())
        copy = psycopg.Cursor.copy

        @contextmanager
        def counted_copy(cursor: Any, statement: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
            self.point(_label(str(statement)))
            with copy(cursor, statement, *args, **kwargs) as writer:
                yield writer

        psycopg.Cursor.copy = counted_copy  # type: ignore[method-assign,assignment]
        upsert, mark, set_watermark = (
            load.upsert_records,
            load.mark_missing_deleted,
            load.set_watermark,
        )

        def upsert_records(target: Any, spec: Any, records: Any, **kwargs: Any) -> Any:
            records = list(records)
            self.open.extend(f"record:{r['id']}" for r in records)
            return upsert(target, spec, records, **kwargs)

        def mark_missing_deleted(*args: Any, **kwargs: Any) -> Any:
            self.open.append("deletions")
            return mark(*args, **kwargs)

        def watermark(*args: Any, **kwargs: Any) -> Any:
            self.open.append("watermark")
            return set_watermark(*args, **kwargs)

        load.upsert_records = upsert_records
        load.mark_missing_deleted = mark_missing_deleted
        load.set_watermark = watermark

    def begin(self, _conn: Any) -> None:
        self._settle()
        self.txn += 1

    def _settle(self) -> None:
        # A commit event fires before the commit is sent; reaching any later point means it
        # returned (had it failed, the pass would have stopped there).
        self.committed.extend(self.committing)
        self.committing = []

    def point(self, what: str, *, committing: bool = False) -> None:
        self._settle()
        self.count += 1
        self.points.append(Point(self.count, self.txn, what, tuple(self.open)))
        if self.count == self.kill_at:
            self.write_journal()
            os.kill(os.getpid(), signal.SIGKILL)
        if committing:
            self.committing, self.open = self.open, []

    def write_journal(self) -> None:
        self._settle()
        body = {
            "points": [asdict(p) for p in self.points],
            "committed": self.committed,
            "uncommitted": self.open,
        }
        with self.journal.open("w") as file:
            json.dump(body, file)
            file.flush()
            os.fsync(file.fileno())


def _label(statement: str) -> str:
    found = _TARGET.match(statement)
    if found is None:
        return statement.split(None, 1)[0].upper() if statement.strip() else "?"
    verb = found.group(1).upper().replace(" INTO", "").replace(" FROM", "")
    verb = verb.replace("CREATE TEMPORARY TABLE IF NOT EXISTS", "CREATE")
    return f"{verb} {found.group(2)}".strip()


# ----------------------------------------------------------------------------- the child


def _run_job(job: Job) -> None:
    """In the forked child: one pass with the kill switch; the journal on a normal end too."""
    import logging

    from rillet_dagster import catalog
    from rillet_dagster.assets import sync
    from rillet_dagster.rillet.client import RilletClient
    from rillet_dagster.warehouse.schema import make_engine

    switch = KillSwitch(job.kill_at, Path(job.journal))
    engine = make_engine(job.url)
    switch.install(engine)
    sync.BATCH_SIZE = job.batch_size
    with RilletClient(api_key=job.api_key, base_url=job.base_url) as client:
        sync.sync_entity(
            catalog.entity(job.entity),
            client,
            engine,
            window=sync.Window(None, None, True),
            run_id="killed",
            log=logging.getLogger("killed-sync"),
        )
    switch.write_journal()
    engine.dispose()


def serve(requests: IO[str] = sys.stdin, answers: IO[str] = sys.stdout) -> None:
    """The fork server: per line of jobs (JSON), forks a child per job, runs them at once and
    answers a line of their exit codes (negative: the signal that ended them)."""
    # Imported here, before any fork, so that every child starts with them loaded.
    import psycopg  # noqa: F401

    import rillet_dagster.assets.sync
    import rillet_dagster.rillet.client
    import rillet_dagster.warehouse.schema  # noqa: F401

    answers.write("ready\n")
    answers.flush()
    for line in requests:
        jobs = [Job(**j) for j in json.loads(line)]
        pids = []
        for job in jobs:
            pid = os.fork()
            if pid == 0:  # the child: its output goes to a file beside its journal
                code = 1
                try:
                    err = os.open(job.journal + ".err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                    os.dup2(err, 1)
                    os.dup2(err, 2)
                    _run_job(job)
                    code = 0
                except BaseException:
                    import traceback

                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            pids.append(pid)
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        answers.write(json.dumps(codes) + "\n")
        answers.flush()


class KillServer:
    """The fork server, started once per test; :meth:`run` runs jobs at once and reads back
    their journals."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from tests.crash_inject import serve; serve()"],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None and self.process.stdin is not None
        self.requests, self.answers = self.process.stdin, self.process.stdout
        ready = self.answers.readline()
        assert ready == "ready\n", f"the fork server did not start: {ready!r}"

    def run(self, jobs: Sequence[Job]) -> list[Outcome]:
        for job in jobs:
            Path(job.journal).unlink(missing_ok=True)
        self.requests.write(json.dumps([asdict(j) for j in jobs]) + "\n")
        self.requests.flush()
        answer = self.answers.readline()
        assert answer, "the fork server died"
        return [_outcome(job, code) for job, code in zip(jobs, json.loads(answer), strict=True)]

    def close(self) -> None:
        self.requests.close()
        self.process.wait(timeout=30)

    def __enter__(self) -> KillServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _outcome(job: Job, code: int) -> Outcome:
    err = Path(job.journal + ".err")
    stderr = err.read_text() if err.exists() else ""
    journal = Path(job.journal)
    if not journal.exists():
        return Outcome(code, (), frozenset(), frozenset(), stderr)
    body = json.loads(journal.read_text())
    points = tuple(Point(**{**p, "open": tuple(p["open"])}) for p in body["points"])
    return Outcome(
        code, points, frozenset(body["committed"]), frozenset(body["uncommitted"]), stderr
    )
