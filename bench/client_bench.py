"""Client: API requests per 1,000 records for a full read of every list (medium sandbox).

The minimum is 10 per 1,000 for paginated lists (100-record pages) plus one final page; the
non-paginated lists cost one request each whatever their size.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from bench.table import print_table
from rillet_dagster import catalog
from rillet_dagster.rillet.client import RilletClient
from rillet_dagster.sandbox.server import SandboxOptions, SandboxServer, build_sandbox

KEY = "bench-client-key"


def main() -> None:
    options = SandboxOptions(size="medium", api_keys=(KEY,), rate_limit=1_000_000_000)
    server = SandboxServer(build_sandbox(options)).start()
    rows = []
    try:
        with RilletClient(api_key=KEY, base_url=server.base_url) as client:
            for spec in catalog.ENTITIES:
                if spec.single or spec.parent:
                    continue
                before = client.stats.requests
                started = time.perf_counter()
                count = sum(1 for _ in client.iter_records(spec.name))
                seconds = time.perf_counter() - started
                requests = client.stats.requests - before
                per_thousand = f"{1000 * requests / count:.1f}" if count else "-"
                rows.append((spec.name, count, requests, per_thousand, f"{count / seconds:,.0f}"))
    finally:
        server.stop()
    total_records = sum(r[1] for r in rows)
    total_requests = sum(r[2] for r in rows)
    rows.append(
        (
            "all lists",
            total_records,
            total_requests,
            f"{1000 * total_requests / total_records:.1f}",
            "",
        )
    )
    print_table(
        f"Client: requests per 1,000 records, full read of the medium sandbox "
        f"({datetime.now(UTC):%Y-%m-%d})",
        ["entity", "records", "requests", "requests per 1,000", "records/s (no rate limit)"],
        rows,
    )


if __name__ == "__main__":
    main()
