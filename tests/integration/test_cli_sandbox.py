"""``rillet-dagster sandbox`` as a user runs it: a real process, a real port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_sandbox_command_serves_invoices() -> None:
    port = free_port()
    executable = Path(sys.executable).with_name("rillet-dagster")
    process = subprocess.Popen(
        [str(executable), "sandbox", "--port", str(port), "--size", "tiny", "--api-key", "cli-key"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        banner = ""
        while "RILLET_API_KEY=" not in banner:
            line = process.stdout.readline() if process.stdout else ""
            assert line, f"sandbox exited early: {banner}"
            banner += line
        assert f"RILLET_BASE_URL=http://127.0.0.1:{port}" in banner
        assert "RILLET_API_KEY=cli-key" in banner
        # The banner prints just before uvicorn binds; connect retries (with backoff) cover it.
        transport = httpx.HTTPTransport(retries=8)
        with httpx.Client(transport=transport, timeout=10) as client:
            response = client.get(
                f"http://127.0.0.1:{port}/invoices",
                params={"limit": "2"},
                headers={"Authorization": "Bearer cli-key", "X-Rillet-API-Version": "4"},
            )
        body = response.json()
        assert set(body) == {"invoices", "pagination"}
        assert len(body["invoices"]) == 2 and body["pagination"]["next_cursor"]
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_bad_arguments_say_what_to_fix() -> None:
    executable = Path(sys.executable).with_name("rillet-dagster")
    for args, expected in (
        (["--size", "enormous"], "tiny"),
        (["--faults", "boom=1"], "unknown fault"),
        (["--rate-limit", "lots"], "REQUESTS/SECONDS"),
        (["--webhook-url", "http://127.0.0.1:9/hook"], "--webhook-token"),
        (["--activity", "-1"], "positive"),
    ):
        result = subprocess.run(
            [str(executable), "sandbox", "--port", str(free_port()), "--size", "tiny", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode != 0, args
        assert expected in result.stderr, (args, result.stderr)
