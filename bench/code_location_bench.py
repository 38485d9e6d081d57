"""Code location load time: ours beside Dagster's own floor, measured in one interleaved run.

Four fresh processes per round, in turn, so that machine noise hits all of them alike:

- ``import dagster``: what any code location pays before it defines anything;
- ``from rillet_dagster.definitions import defs``: our whole code location, built;
- a Dagster gRPC code server (``dagster api grpc``, what ``dagster dev`` and the docker code
  server run) for a one-asset Definitions, until it lists its repositories;
- the same code server for ``rillet_dagster.definitions``.

The gRPC pair is what a user waits for when the UI reloads the location; its difference is what
this code location adds to Dagster's own cost.
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.table import print_table

ROUNDS = 5
ROOT = Path(__file__).resolve().parent.parent
SERVER_START_TIMEOUT_SECONDS = 60.0

ONE_ASSET_LOCATION = """
import dagster as dg


@dg.asset
def one() -> int:
    return 1


defs = dg.Definitions(assets=[one])
"""


def _time_python(code: str, cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=cwd, check=True)
    return time.perf_counter() - started


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _time_code_server(module: str, cwd: Path) -> float:
    from dagster._core.errors import DagsterUserCodeUnreachableError
    from dagster._grpc.client import DagsterGrpcClient

    port = _free_port()
    started = time.perf_counter()
    command = [sys.executable, "-m", "dagster", "api", "grpc", "-m", module]
    server = subprocess.Popen(
        [*command, "-h", "127.0.0.1", "-p", str(port)],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    client = DagsterGrpcClient(port=port, host="127.0.0.1")
    try:
        while True:
            if server.poll() is not None:
                error = server.stderr.read().decode() if server.stderr else ""
                raise RuntimeError(f"code server for {module} exited: {error[-2000:]}")
            if time.perf_counter() - started > SERVER_START_TIMEOUT_SECONDS:
                raise RuntimeError(f"code server for {module} not up after 60 s")
            try:
                client.list_repositories()
                return time.perf_counter() - started
            except DagsterUserCodeUnreachableError:  # not listening yet
                time.sleep(0.02)
    finally:
        server.terminate()
        server.wait()


def _row(name: str, seconds: list[float], floor: list[float] | None) -> list[object]:
    median = statistics.median(seconds)
    ratio = f"{median / statistics.median(floor):.2f}x" if floor else "1.00x"
    return [name, f"{median:.2f}", f"{min(seconds):.2f}", f"{max(seconds):.2f}", ratio]


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        one_asset_dir = Path(scratch)
        (one_asset_dir / "one_asset_location.py").write_text(ONE_ASSET_LOCATION)
        measures: dict[str, Callable[[], float]] = {
            "import dagster": lambda: _time_python("import dagster", ROOT),
            "import rillet_dagster.definitions (defs built)": lambda: _time_python(
                "from rillet_dagster.definitions import defs", ROOT
            ),
            "code server, one-asset location": lambda: _time_code_server(
                "one_asset_location", one_asset_dir
            ),
            "code server, rillet_dagster": lambda: _time_code_server(
                "rillet_dagster.definitions", ROOT
            ),
        }
        seconds: dict[str, list[float]] = {name: [] for name in measures}
        for _ in range(ROUNDS):
            for name, measure in measures.items():
                seconds[name].append(measure())

    names = list(measures)
    rows = [
        _row(names[0], seconds[names[0]], None),
        _row(names[1], seconds[names[1]], seconds[names[0]]),
        _row(names[2], seconds[names[2]], None),
        _row(names[3], seconds[names[3]], seconds[names[2]]),
    ]
    print_table(
        f"Code location load ({ROUNDS} interleaved rounds, fresh processes)",
        ["measure", "median s", "min s", "max s", "vs Dagster's floor"],
        rows,
    )
