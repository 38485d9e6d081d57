"""Run benchmarks: ``python -m bench [name ...]`` (default: all)."""

from __future__ import annotations

import sys

from bench import (
    client_bench,
    code_location_bench,
    dev_ready_bench,
    ratelimit_bench,
    receiver_bench,
    sandbox_bench,
    sync_memory_bench,
    warehouse_bench,
    webhook_latency_bench,
)

BENCHMARKS = {
    "sandbox": sandbox_bench.main,
    "client": client_bench.main,
    "ratelimit": ratelimit_bench.main,
    "warehouse": warehouse_bench.main,
    "sync-memory": sync_memory_bench.main,
    "receiver": receiver_bench.main,
    "webhook-latency": webhook_latency_bench.main,
    "code-location": code_location_bench.main,
    "dev-ready": dev_ready_bench.main,
}


def main(argv: list[str]) -> None:
    names = argv or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        sys.exit(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    for name in names:
        BENCHMARKS[name]()


if __name__ == "__main__":
    main(sys.argv[1:])
