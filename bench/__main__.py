"""Run benchmarks: ``python -m bench [name ...]`` (default: all), or ``python -m bench name
--option ...`` to pass options to one benchmark (``ratelimit --full-scale``)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from bench import (
    client_bench,
    code_location_bench,
    dev_ready_bench,
    ratelimit_bench,
    receiver_bench,
    sandbox_bench,
    sync_memory_bench,
    topology_bench,
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
    "topology": topology_bench.main,
}


# Benchmarks that take options (everything after the first argument starting with "-").
WITH_OPTIONS: dict[str, Callable[[Sequence[str]], None]] = {"ratelimit": ratelimit_bench.main}


def main(argv: list[str]) -> None:
    first_option = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    names, options = argv[:first_option] or list(BENCHMARKS), argv[first_option:]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        sys.exit(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    if options:
        if len(names) != 1 or names[0] not in WITH_OPTIONS:
            sys.exit(f"options {options} need exactly one of: {', '.join(WITH_OPTIONS)}")
        WITH_OPTIONS[names[0]](options)
        return
    for name in names:
        BENCHMARKS[name]()


if __name__ == "__main__":
    main(sys.argv[1:])
