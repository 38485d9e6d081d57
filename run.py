#!/usr/bin/env python3
"""Set up the project and run it: the only entry point a fresh machine needs (Python 3.11+ only).

    python3 run.py dev      # set up, then start the Rillet sandbox and the Dagster UI
    python3 run.py test     # set up, then run ruff and the full test suite
    python3 run.py bench    # set up, then run every benchmark in bench/
    python3 run.py setup    # only set up (.venv from uv.lock)
    python3 run.py audit    # known vulnerabilities in every locked version (pip-audit)

Set-up installs uv (pinned) into .tools/ with pip, then `uv sync --locked` builds .venv from
uv.lock, so every machine runs exactly the locked dependency set. Re-running is cheap.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TOOLS = ROOT / ".tools"
VENV = ROOT / ".venv"
UV_VERSION = "0.13.9"
PIP_AUDIT_VERSION = "2.10.1"
# Vulnerabilities accepted for a while: id -> (the day the acceptance ends, why). After that day
# the audit fails again until the dependency is upgraded or the entry renewed with a reason.
AUDIT_IGNORES: dict[str, tuple[str, str]] = {}


def _bin(env_dir: Path, name: str) -> Path:
    return env_dir / ("Scripts" if os.name == "nt" else "bin") / name


def _run(*cmd: str | Path, env: dict[str, str] | None = None) -> None:
    result = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, check=False)
    if result.returncode != 0:
        sys.exit(result.returncode)


def _test_env() -> dict[str, str]:
    """Tests write many small SQLite files (Dagster instances, warehouses, queues) and every
    commit waits for an fsync; a RAM-backed temp dir, where there is one, takes a quarter to a
    third off an in-process materialization. No test depends on surviving a power cut, only on
    surviving a killed process, which the page cache covers."""
    env = dict(os.environ)
    shm = Path("/dev/shm")  # noqa: S108 - only the parent of per-test private temp dirs
    if "TMPDIR" not in env and shm.is_dir() and os.access(shm, os.W_OK):
        env["TMPDIR"] = str(shm)
    return env


def setup() -> None:
    uv = _bin(TOOLS, "uv")
    if not uv.exists():
        print(f"run.py: installing uv {UV_VERSION} into {TOOLS.name}/", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(TOOLS)
        _run(_bin(TOOLS, "python"), "-m", "pip", "install", "--quiet", f"uv=={UV_VERSION}")
    env = dict(os.environ, UV_PROJECT_ENVIRONMENT=str(VENV), UV_PYTHON=sys.executable)
    _run(uv, "sync", "--locked", "--quiet", env=env)


def audit() -> None:
    """pip-audit over the exact versions uv.lock pins (runtime and deployment extras), strictly:
    a package that cannot be looked up fails the audit rather than passing unchecked."""
    import datetime

    today = datetime.date.today().isoformat()
    expired = sorted(i for i, (until, _) in AUDIT_IGNORES.items() if until < today)
    if expired:
        sys.exit(f"run.py audit: accepted vulnerabilities past their date: {', '.join(expired)}")
    pip_audit = _bin(TOOLS, "pip-audit")
    if not pip_audit.exists():
        _run(_bin(TOOLS, "python"), "-m", "pip", "install", "-q", f"pip-audit=={PIP_AUDIT_VERSION}")
    pins = TOOLS / "locked-requirements.txt"
    export = ("export", "--locked", "--no-hashes", "--all-extras", "--no-dev", "--no-emit-project")
    exported = subprocess.run(
        [str(_bin(TOOLS, "uv")), *export, "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    pins.write_text(exported.stdout)
    ignores = [arg for vuln in AUDIT_IGNORES for arg in ("--ignore-vuln", vuln)]
    _run(pip_audit, "-r", pins, "--no-deps", "--disable-pip", "--strict", *ignores)


def main(argv: list[str]) -> None:
    command, rest = (argv[0], argv[1:]) if argv else ("help", [])
    if command in {"help", "-h", "--help"}:
        print(__doc__)
        return
    if command not in {"setup", "dev", "test", "bench", "audit"}:
        sys.exit(f"run.py: unknown command {command!r}; use one of: dev, test, bench, setup, audit")
    setup()
    if command == "dev":
        os.execv(_bin(VENV, "rillet-dagster"), ["rillet-dagster", "dev", *rest])
    elif command == "test":
        _run(_bin(VENV, "ruff"), "check", ".")
        _run(_bin(VENV, "ruff"), "format", "--check", ".")
        pytest = (_bin(VENV, "python"), "-m", "pytest")
        if rest:  # a selection of the user's own: one pytest run, exactly as asked
            _run(*pytest, *rest, env=_test_env())
            return
        # Most tests wait on subprocesses, sockets and fsyncs: one worker per core (up to 4) takes
        # ~40 % off the suite. Tests that measure time or throughput run alone afterwards.
        _run(*pytest, "-n", "auto", "--maxprocesses", "4", "-m", "not serial", env=_test_env())
        _run(*pytest, "-m", "serial", env=_test_env())
    elif command == "audit":
        audit()
    elif command == "bench":
        _run(_bin(VENV, "python"), "-m", "bench", *rest)


if __name__ == "__main__":
    main(sys.argv[1:])
