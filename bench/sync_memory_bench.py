"""Sync memory: peak RSS of one full journal-entry sync of 1M entries from the simulator.

Goal: under 300 MB, i.e. the sync streams (one page and one load batch at a time) rather than
holding the list. The simulator runs as its own ``rillet-dagster sandbox`` process (its ~650 MB
of generated data must not count), with the rate limit lifted; the sync runs in a second, fresh
process whose own peak RSS (``ru_maxrss``) is the figure. That process imports dagster, the
client and the warehouse before the clock starts; that floor is reported too.

    python -m bench sync-memory                       # 1M journal entries, SQLite and PostgreSQL
    python -m bench.sync_memory_bench --count 200000 --backend sqlite
    python -m bench.sync_memory_bench --count 50000 --trace   # tracemalloc: top allocation sites
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.table import print_table

KEY = "bench-key"
COUNT = 1_000_000
POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
GOAL_MB = 300


# ----------------------------------------------------------------------------- measured process


def _rss_mb() -> float:
    """Current resident set size (``ru_maxrss`` only gives the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_sync(base_url: str, warehouse_url: str, schema: str | None, trace: bool) -> dict[str, Any]:
    """One full journal-entry pass into ``warehouse_url``; what it took, as a dict."""
    import logging

    from rillet_dagster import catalog
    from rillet_dagster.assets.sync import Window, sync_entity
    from rillet_dagster.resources import RilletResource
    from rillet_dagster.warehouse import ensure_schema, make_engine

    connect_args = {"options": f"-csearch_path={schema}"} if schema else {}
    engine = make_engine(warehouse_url, connect_args=connect_args)
    ensure_schema(engine)
    floor_mb = _rss_mb()
    top: list[str] = []
    if trace:
        _snapshot_before_deletes(top)
    with tempfile.TemporaryDirectory() as folder:
        resource_ = RilletResource(
            base_url=base_url,
            api_key=KEY,
            state_url=f"sqlite:///{Path(folder) / 'state.db'}",
            rate_limit_requests=1_000_000_000,
        )
        started = time.perf_counter()
        with resource_.client() as client:
            results = sync_entity(
                catalog.entity("journal_entry"),
                client,
                engine,
                window=Window(None, None, full=True),
                run_id="bench",
                log=logging.getLogger("bench.sync_memory"),
            )
        seconds = time.perf_counter() - started
    engine.dispose()
    measured: dict[str, Any] = {
        "records": _row_count(results[0]),
        "lines": _row_count(results[1]),
        "seconds": seconds,
        "floor_mb": floor_mb,
        "peak_mb": _peak_mb(),
    }
    if trace:
        measured["top"] = top
    return measured


def _row_count(result: Any) -> int:
    value = result.metadata["dagster/row_count"]
    return int(getattr(value, "value", value))


def _snapshot_before_deletes(top: list[str]) -> None:
    """Trace allocations; list the largest live ones when the pass has read every record.

    That moment is the start of ``mark_missing_deleted`` (called once, after the last page),
    when everything the pass keeps per record is still held; the wrapper is bench-only.
    """
    import tracemalloc

    from rillet_dagster.warehouse import load

    original = load.mark_missing_deleted

    def traced(*args: Any, **kwargs: Any) -> int:
        top.extend(_top_allocations())
        marked = original(*args, **kwargs)
        _, peak = tracemalloc.get_traced_memory()
        top.append(f"traced peak by the end of mark_missing_deleted: {peak / 2**20:.1f} MB")
        return marked

    load.mark_missing_deleted = traced  # type: ignore[assignment]
    tracemalloc.start(4)


def _top_allocations(limit: int = 10) -> list[str]:
    import tracemalloc

    current, _ = tracemalloc.get_traced_memory()
    lines = [f"traced {current / 2**20:.1f} MB live after the last page, by line:"]
    for stat in tracemalloc.take_snapshot().statistics("lineno")[:limit]:
        lines.append(f"{stat.size / 2**20:8.1f} MB {stat.count:>9,} blocks  {stat.traceback[0]}")
    return lines


# ----------------------------------------------------------------------------- driver


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_sandbox(count: int) -> tuple[subprocess.Popen[str], str]:
    """The simulator with ``count`` bulk journal entries and no rate limit, once it listens."""
    port = _free_port()
    command = [
        sys.executable, "-m", "rillet_dagster.cli", "sandbox", "--port", str(port),
        "--size", f"customers=8,vendors=6,journal_entries={count}",
        "--api-key", KEY, "--rate-limit", "1000000000/60",
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert server.stdout is not None
    while "RILLET_API_KEY" not in server.stdout.readline():
        if server.poll() is not None:
            raise RuntimeError(f"the sandbox exited with {server.returncode}")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return server, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)  # the benchmark's own start-up wait, never in tests
    server.terminate()
    raise RuntimeError(f"sandbox did not listen on port {port}")


def measure(base_url: str, warehouse_url: str, schema: str | None, trace: bool) -> dict[str, Any]:
    """Run :func:`run_sync` in a fresh interpreter and read back its JSON line."""
    command = [
        sys.executable, "-m", "bench.sync_memory_bench", "--child", "--base-url", base_url,
        "--warehouse", warehouse_url, *(["--schema", schema] if schema else []),
        *(["--trace"] if trace else []),
    ]  # fmt: skip
    output = subprocess.run(command, capture_output=True, text=True, check=False)
    if output.returncode != 0:
        raise RuntimeError(f"sync process failed:\n{output.stderr[-3000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def _postgres_schema() -> str | None:
    """A fresh schema for one run, or ``None`` (reported) when PostgreSQL is not there."""
    from sqlalchemy import exc, text

    from rillet_dagster.warehouse import make_engine

    schema = f"bench_{uuid.uuid4().hex[:12]}"
    admin = make_engine(POSTGRES_URL)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except exc.SQLAlchemyError as error:
        print(f"PostgreSQL unavailable ({type(error).__name__}); skipped")
        return None
    finally:
        admin.dispose()
    return schema


def _drop_schema(schema: str) -> None:
    from sqlalchemy import text

    from rillet_dagster.warehouse import make_engine

    admin = make_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def run_backend(backend: str, base_url: str, trace: bool) -> dict[str, Any] | None:
    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            return measure(base_url, f"sqlite:///{Path(folder) / 'warehouse.db'}", None, trace)
    schema = _postgres_schema()
    if schema is None:
        return None
    try:
        return measure(base_url, POSTGRES_URL, schema, trace)
    finally:
        _drop_schema(schema)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sync_memory_bench")
    parser.add_argument("--count", type=int, default=COUNT, help="bulk journal entries")
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--trace", action="store_true", help="tracemalloc (slow; small counts)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--warehouse", help=argparse.SUPPRESS)
    parser.add_argument("--schema", help=argparse.SUPPRESS)
    args = parser.parse_args(argv if argv is not None else [])
    if args.child:
        print(json.dumps(run_sync(args.base_url, args.warehouse, args.schema, args.trace)))
        return
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    server, base_url = start_sandbox(args.count)
    rows = []
    try:
        for backend in backends:
            result = run_backend(backend, base_url, args.trace)
            if result is None:
                rows.append((backend, "-", "-", "-", "-", "-", "-"))
                continue
            for line in result.get("top", []):
                print(line)
            rows.append(
                (
                    backend,
                    f"{result['records']:,}",
                    f"{result['lines']:,}",
                    f"{result['seconds']:.1f}",
                    f"{result['records'] / result['seconds']:,.0f}",
                    f"{result['floor_mb']:.0f}",
                    f"{result['peak_mb']:.0f}",
                )
            )
    finally:
        server.terminate()
        server.wait(timeout=30)
    print_table(
        f"Sync memory: one full journal-entry pass ({args.count:,} bulk entries + the company's "
        f"own), goal peak under {GOAL_MB} MB",
        ["warehouse", "records", "lines", "seconds", "records/s", "RSS after imports MB",
         "peak RSS MB"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
