"""Serve the receiver with uvicorn, with the limits that a public endpoint needs.

uvicorn times out idle keep-alive connections but not a client that is slow to send its request
line and headers (slowloris), and its httptools parser buffers header bytes without limit.
:class:`_GuardMixin` closes a connection that has not delivered a complete request head within
``head_timeout`` seconds of opening (or of its previous response) and answers 400 to a head
larger than :data:`MAX_HEADER_BYTES`. A slow *body* is cut off by the app itself
(``ReceiverConfig.body_timeout``), a large one by its streamed cap.

httptools is the default parser: it serves about 1.7x the events per second of h11 on one
core (see BENCHMARKS.md); ``http="h11"`` gets the same guards plus h11's own head limit.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from rillet_dagster.receiver.app import ReceiverConfig, create_app

MAX_HEADER_BYTES = 16 * 1024
KEEP_ALIVE_SECONDS = 5
HEAD_TIMEOUT_SECONDS = 10.0
# Beyond this many connections plus in-flight requests uvicorn answers 503 at once, which bounds
# memory and keeps latency for the requests it does take.
LIMIT_CONCURRENCY = 2048

HttpParser = Literal["httptools", "h11"]


class _GuardMixin:
    """Head timeout and head size cap for a uvicorn HTTP protocol (httptools or h11)."""

    head_timeout: float = HEAD_TIMEOUT_SECONDS
    _head_timer: asyncio.TimerHandle | None = None
    _head_bytes: int = 0
    # Provided by the uvicorn protocol class this is mixed into.
    cycle: Any
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]
        if not self._waiting_for_head():
            self._head_bytes = 0
            return
        # Bytes of a head still incomplete after parsing: all of this chunk belongs to it.
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
            self.send_400_response("Request head too large.")  # type: ignore[attr-defined]

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._head_bytes = 0
        if not self.transport.is_closing():
            self._arm_head_timer()

    def _waiting_for_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout, self._on_head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _on_head_timeout(self) -> None:
        self._head_timer = None
        # A request in progress is the app's business (its body deadline); only a connection
        # still waiting for a complete request head is closed here.
        if self._waiting_for_head() and not self.transport.is_closing():
            self.transport.close()


def protocol_class(
    parser: HttpParser = "httptools", head_timeout: float = HEAD_TIMEOUT_SECONDS
) -> type:
    base = HttpToolsProtocol if parser == "httptools" else H11Protocol
    return type(f"Receiver{base.__name__}", (_GuardMixin, base), {"head_timeout": head_timeout})


def build_server(
    config: ReceiverConfig,
    host: str = "127.0.0.1",
    port: int = 8780,
    *,
    head_timeout: float = HEAD_TIMEOUT_SECONDS,
    http: HttpParser = "httptools",
    log_level: str = "info",
    **uvicorn_options: Any,
) -> uvicorn.Server:
    """A uvicorn server for the receiver (not started); ``port=0`` picks a free port."""
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "http": protocol_class(http, head_timeout),
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
        "timeout_keep_alive": KEEP_ALIVE_SECONDS,
        "limit_concurrency": LIMIT_CONCURRENCY,
        "backlog": 2048,
        "access_log": False,
        "server_header": False,
        "proxy_headers": False,
        "lifespan": "on",
        "log_level": log_level,
        "timeout_graceful_shutdown": 5,
    }
    options.update(uvicorn_options)
    return uvicorn.Server(uvicorn.Config(create_app(config), **options))


def serve(config: ReceiverConfig, host: str, port: int, **options: Any) -> None:
    build_server(config, host, port, **options).run()
