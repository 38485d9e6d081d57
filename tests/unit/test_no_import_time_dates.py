"""No module reads the clock at import (issue 17): a date taken when a module is imported is a
day stale once a session runs across midnight UTC, and partition ranges built from it no longer
match the partitions that Dagster and the sandbox compute when the test (or run) happens. Tests
take ``today`` from the fixture in ``tests/conftest.py``; code reads the clock when it runs."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("rillet_dagster", "tests")
# Calls that read the wall clock: datetime.now(), date.today(), datetime.utcnow(), time.time().
CLOCK_READS = {("datetime", "now"), ("datetime", "utcnow"), ("datetime", "today")}
CLOCK_READS |= {("date", "today"), ("time", "time")}


def clock_reads(node: ast.AST) -> list[int]:
    """Lines of the clock reads anywhere inside ``node``."""
    found = []
    for call in ast.walk(node):
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)):
            continue
        owner = call.func.value
        name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", None)
        if (name, call.func.attr) in CLOCK_READS:
            found.append(call.lineno)
    return found


def evaluated_at_import(body: list[ast.stmt]) -> list[int]:
    """Clock reads that run when the module is imported: module- and class-level statements,
    default argument values and decorators; not function bodies, which run when called."""
    found = []
    for statement in body:
        if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef):
            arguments = statement.args
            for part in [*arguments.defaults, *arguments.kw_defaults, *statement.decorator_list]:
                if part is not None:
                    found += clock_reads(part)
        elif isinstance(statement, ast.ClassDef):
            for part in statement.decorator_list:
                found += clock_reads(part)
            found += evaluated_at_import(statement.body)
        else:
            found += clock_reads(statement)
    return found


def test_the_scan_sees_an_import_time_date() -> None:
    """The scan itself: what issue 17 found is flagged; a read inside a function is not."""
    source = """
import time
from datetime import UTC, date, datetime
TODAY = datetime.now(UTC).date()
class Window:
    opened = time.time()
def since(moment=date.today()) -> None: ...
def fine() -> date:
    return datetime.now(UTC).date()
"""
    assert evaluated_at_import(ast.parse(source).body) == [4, 6, 7]


def test_no_module_reads_the_clock_at_import() -> None:
    offenders = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            lines = evaluated_at_import(ast.parse(path.read_text(), filename=name).body)
            offenders += [f"{name}:{line}" for line in lines]
    assert offenders == [], "read the date when needed (the `today` fixture), not at import"
