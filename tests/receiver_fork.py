"""Start many real ``rillet-dagster receiver`` processes cheaply, to SIGKILL them one by one.

A new interpreter needs about 1.7 s (idle machine) to import the receiver and answer /health,
so 100 restarts would cost minutes. :class:`ReceiverForkServer` runs this file as a small server
process that imports the command line once and forks one child per receiver. The child runs
``rillet_dagster.cli.main(["receiver", ...])``, what the ``rillet-dagster`` console script runs,
as a process of its own: the test kills it with a real SIGKILL, and the server reaps it and
reports the signal that ended it, so a test can tell that a kill, not an exit, ended it.

One JSON line each way per command:
``{"start": [argv], "env": {...}}`` -> ``{"pid": N}``;
``{"poll": N}`` -> ``{"pid": N, "running": bool, "signal": S|null, "exit": C|null}``;
``{"wait": N}`` -> the same once the child has ended.
When its standard input closes, the server SIGKILLs and reaps the children still running.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import IO, Any

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _status(pid: int, waited: tuple[int, int]) -> dict[str, Any]:
    done_pid, status = waited
    if done_pid == 0:
        return {"pid": pid, "running": True, "signal": None, "exit": None}
    return {
        "pid": pid,
        "running": False,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
    }


def _run_child(argv: list[str], env: dict[str, str]) -> None:
    """In the forked child: become the receiver; never return into the server's loop."""
    code = 1
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)  # the server's command pipes are not the receiver's business
        os.dup2(devnull, 1)
        os.environ.clear()
        os.environ.update(env)
        sys.argv = ["rillet-dagster", *argv]
        from rillet_dagster.cli import main

        main(argv)
        code = 0
    except SystemExit as stop:
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)


def _serve(commands: IO[str], replies: IO[str]) -> None:
    # Imported before any fork, so that each child starts with them loaded (none starts a
    # thread): the CLI, and what uvicorn, anyio and the drivers import on a first start. A child
    # then needs about 5 ms of CPU to serve, where importing these costs 165 ms.
    import encodings.idna  # noqa: F401
    import sqlite3  # noqa: F401

    import anyio._backends._asyncio
    import anyio.lowlevel
    import anyio.streams.memory  # noqa: F401
    import psycopg  # noqa: F401
    import sqlalchemy.dialects.postgresql.psycopg
    import sqlalchemy.dialects.sqlite.pysqlite  # noqa: F401
    import uvicorn.lifespan.on
    import uvicorn.loops.auto
    import uvicorn.protocols.websockets.auto  # noqa: F401
    import uvloop  # noqa: F401

    import rillet_dagster
    import rillet_dagster.cli
    import rillet_dagster.receiver.app
    import rillet_dagster.receiver.serve

    children: set[int] = set()
    replies.write(json.dumps({"ready": rillet_dagster.__file__}) + "\n")
    replies.flush()
    try:
        for line in commands:
            command = json.loads(line)
            if "start" in command:
                pid = os.fork()
                if pid == 0:
                    _run_child(command["start"], command["env"])
                children.add(pid)
                reply: dict[str, Any] = {"pid": pid}
            else:
                pid = command.get("wait", command.get("poll"))
                reply = _status(pid, os.waitpid(pid, 0 if "wait" in command else os.WNOHANG))
                if not reply["running"]:
                    children.discard(pid)
            replies.write(json.dumps(reply) + "\n")
            replies.flush()
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


class ReceiverForkServer:
    """The test's handle on the server: start receivers, learn how they ended."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self._process = subprocess.Popen(
            # -P: not the tests folder first on sys.path, where its modules could shadow others.
            [sys.executable, "-P", __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("wb"),  # the receivers' stderr too: shown when one fails to start
            text=True,
        )
        self._lock = threading.Lock()
        self._health = httpx.Client(timeout=1)  # one for all polls: each costs ~25 ms to make
        ready = self._read()
        import rillet_dagster

        # The server must run the code under test (a copy's PYTHONPATH), not another checkout.
        assert ready == {"ready": rillet_dagster.__file__}, ready

    def _read(self) -> dict[str, Any]:
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise AssertionError(f"receiver fork server died: {self.log.read_text()[-4000:]}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def _ask(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self._process.stdin is not None
        with self._lock:  # one command at a time, from whichever thread
            self._process.stdin.write(json.dumps(command) + "\n")
            self._process.stdin.flush()
            return self._read()

    def start(self, argv: list[str], env: dict[str, str]) -> int:
        return int(self._ask({"start": argv, "env": env})["pid"])

    def poll(self, pid: int) -> dict[str, Any]:
        return self._ask({"poll": pid})

    def wait(self, pid: int) -> dict[str, Any]:
        return self._ask({"wait": pid})

    def start_receiver(
        self, state_url: str, env: dict[str, str], timeout: float = 30.0
    ) -> tuple[int, int]:
        """A receiver on a free port, answering /health 200: its pid and port."""
        for _ in range(5):
            port = free_port()
            argv = [
                "receiver", "--port", str(port), "--state-url", state_url,
                "--log-level", "warning",
            ]  # fmt: skip
            pid = self.start(argv, env)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    if self._health.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                        return pid, port
                except httpx.TransportError:
                    pass
                ended = self.poll(pid)
                if not ended["running"]:
                    break
                time.sleep(0.01)
            else:
                os.kill(pid, signal.SIGKILL)
                self.wait(pid)
                raise AssertionError(f"receiver did not become healthy within {timeout:g} s")
            log = self.log.read_text()
            # Another process took the port between free_port() and the bind: try another.
            if f"('127.0.0.1', {port}): address already in use" not in log.lower():
                raise AssertionError(f"receiver ended {ended}: {log[-4000:]}")
        raise AssertionError("no free port for the receiver in 5 attempts")

    def close(self) -> None:
        self._health.close()
        assert self._process.stdin is not None
        self._process.stdin.close()
        try:
            self._process.wait(30)
        finally:
            if self._process.poll() is None:
                self._process.kill()
                self._process.wait(10)
            assert self._process.stdout is not None
            self._process.stdout.close()


if __name__ == "__main__":
    _serve(sys.stdin, sys.stdout)
