"""Build a sandbox and serve it with uvicorn, in the foreground (CLI) or on a thread (tests)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

import uvicorn

from rillet_dagster.clock import Clock, SystemClock
from rillet_dagster.sandbox.app import Sandbox, SandboxConfig
from rillet_dagster.sandbox.data import generate
from rillet_dagster.sandbox.faults import Faults
from rillet_dagster.sandbox.webhooks import WebhookDispatcher

DEFAULT_API_KEY = "sandbox-key"


@dataclass
class SandboxOptions:
    seed: int = 7
    size: str = "small"
    api_keys: Sequence[str] = (DEFAULT_API_KEY,)
    rate_limit: int = 60
    rate_window_seconds: float = 60.0
    faults: Faults = field(default_factory=Faults)
    webhook_urls: Sequence[str] = ()
    webhook_tokens: Sequence[str] = ()
    webhook_time_factor: float = 1.0


def build_sandbox(options: SandboxOptions, clock: Clock | None = None) -> Sandbox:
    """Generate the organization and wire the app, webhooks included (not yet serving)."""
    clock = clock or SystemClock()
    world = generate(seed=options.seed, size=options.size, now=clock.now())
    dispatcher = WebhookDispatcher(clock, time_factor=options.webhook_time_factor)
    if options.webhook_urls and not options.webhook_tokens:
        raise ValueError("--webhook-url needs at least one --webhook-token to sign deliveries")
    for url in options.webhook_urls:
        dispatcher.subscribe(url, list(options.webhook_tokens))
    config = SandboxConfig(
        api_keys=frozenset(options.api_keys),
        rate_limit=options.rate_limit,
        rate_window_seconds=options.rate_window_seconds,
        faults=options.faults,
        seed=options.seed,
        size=options.size,
    )
    return Sandbox(world, clock, config, dispatcher)


class SandboxServer:
    """A sandbox served on a background thread; ``base_url`` once started."""

    def __init__(self, sandbox: Sandbox, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sandbox = sandbox
        config = uvicorn.Config(
            sandbox.app(),
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="rillet-sandbox", daemon=True)
        self.host = host

    @property
    def port(self) -> int:
        return int(self._server.servers[0].sockets[0].getsockname()[1])

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> SandboxServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the sandbox did not start on {self.host}")
            self._thread.join(timeout=0.01)  # wait a moment, noticing a thread that died
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        if self.sandbox.dispatcher is not None:
            self.sandbox.dispatcher.stop()

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def serve_forever(sandbox: Sandbox, host: str, port: int) -> None:
    """Serve in the foreground until interrupted (the ``rillet-dagster sandbox`` command)."""
    try:
        uvicorn.run(sandbox.app(), host=host, port=port, log_level="warning", access_log=False)
    finally:
        if sandbox.dispatcher is not None:
            sandbox.dispatcher.stop()
