"""A real ``rillet-dagster dev`` for tests: the README's main command, on free ports.

It runs exactly what a user runs (sandbox with activity, receiver, ``dagster dev``, the first
run), with its own ``DAGSTER_HOME`` and ``.env`` in a temporary folder so that it never touches
the checkout's. :meth:`DevStack.wait_ready` returns once the console says "ready".
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"ready \((\d+) s after start\).*?(\d+) checks passed")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class DevStack:
    folder: Path
    sandbox_port: int = field(default_factory=free_port)
    ui_port: int = field(default_factory=free_port)
    receiver_port: int = field(default_factory=free_port)
    lines: list[str] = field(default_factory=list)
    process: subprocess.Popen[str] | None = None

    @property
    def home(self) -> Path:
        return self.folder / "dagster_home"

    @property
    def env_file(self) -> Path:
        return self.folder / ".env"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.ui_port}"

    @property
    def sandbox_url(self) -> str:
        return f"http://127.0.0.1:{self.sandbox_port}"

    @property
    def warehouse_url(self) -> str:
        return f"sqlite:///{self.home / 'warehouse.db'}"

    def start(self, *extra: str) -> DevStack:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RILLET_", "DAGSTER_"))}
        env["DAGSTER_HOME"] = str(self.home)
        command = [
            str(Path(sys.executable).with_name("rillet-dagster")),
            "dev",
            "--port",
            str(self.sandbox_port),
            "--ui-port",
            str(self.ui_port),
            "--receiver-port",
            str(self.receiver_port),
            "--env-file",
            str(self.env_file),
            *extra,
        ]
        self.process = subprocess.Popen(
            command,
            cwd=self.folder,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        compiled = re.compile(pattern)
        seen = 0
        while time.monotonic() < deadline:
            for line in self.lines[seen:]:
                found = compiled.search(line)
                if found:
                    return found
            seen = len(self.lines)
            if self.process is not None and self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r}; the console said:\n" + self.console)

    def wait_ready(self, timeout: float = 300) -> re.Match[str]:
        return self.wait_for(READY.pattern, timeout)

    @property
    def console(self) -> str:
        return "\n".join(self.lines)

    def stop(self, timeout: float = 60) -> int:
        """Ctrl+C, as a user stops it; returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


@contextmanager
def running_dev(folder: Path, *extra: str) -> Iterator[DevStack]:
    stack = DevStack(folder).start(*extra)
    try:
        yield stack
    finally:
        stack.stop()
