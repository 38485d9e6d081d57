"""Serve the receiver with uvicorn, with the limits that a public endpoint needs.

uvicorn times out idle keep-alive connections but not a client that is slow to send its request
line and headers (slowloris), and its parsers take a head of any size that arrives complete in
one read. The guards here close a connection that has not delivered a complete request head
within ``head_timeout`` seconds of opening (or of its previous response), and answer 431 and
close when a head exceeds :data:`MAX_HEADER_BYTES`, counted twice over:

* bytes received while a head is still incomplete, so that a head arriving in pieces (or one
  endless header) is cut off before the parser buffers it all;
* the parsed request line and headers, so that a head arriving in one read, or pipelined behind
  another request, is measured as well (httptools' ``on_url``/``on_header`` callbacks; h11's
  ``Request`` event).

A slow *body* is cut off by the app itself (``ReceiverConfig.body_timeout``), a large one by its
streamed cap, and all bodies together by its ``max_buffered_bytes`` budget.

httptools is the default parser: it serves about 1.7x the events per second of h11 on one
core (see BENCHMARKS.md); ``http="h11"`` gets the same guards plus h11's own head limit.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import h11
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

_HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: 24\r\n"
    b"connection: close\r\n\r\n"
    b"Request head too large.\n"
)


class _HeadTooLarge(Exception):
    """Raised inside a parser callback to stop parsing; the parser reports it as a bad request."""


class _GuardMixin:
    """Head timeout and head size cap for a uvicorn HTTP protocol (httptools or h11)."""

    head_timeout: float = HEAD_TIMEOUT_SECONDS
    _head_timer: asyncio.TimerHandle | None = None
    # Bytes received while the current head was incomplete, and the parsed size of the head.
    _head_bytes: int = 0
    _parsed_head_bytes: int = 0
    _head_refused: bool = False
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
        if self._head_refused:
            return  # answered 431 and closing: the rest of the request is not parsed
        super().data_received(data)  # type: ignore[misc]
        if not self._waiting_for_head():
            self._head_bytes = 0
            return
        # Bytes of a head still incomplete after parsing: all of this chunk belongs to it.
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
            self._refuse_head()

    def send_400_response(self, msg: str) -> None:
        # The parser's answer to a bad request, also when a size callback below stopped it.
        if self._head_refused:
            self._send_431()
        else:
            super().send_400_response(msg)  # type: ignore[misc]

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._head_bytes = 0
        if not self.transport.is_closing():
            self._arm_head_timer()

    def _count_parsed_head(self, size: int) -> None:
        self._parsed_head_bytes += size
        if self._parsed_head_bytes > MAX_HEADER_BYTES:
            self._head_refused = True
            raise _HeadTooLarge

    def _refuse_head(self) -> None:
        self._head_refused = True
        self._send_431()

    def _send_431(self) -> None:
        if not self.transport.is_closing():
            self.transport.write(_HEAD_TOO_LARGE)
            self.transport.close()

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


class _HttpToolsGuard(_GuardMixin):
    """httptools hands over the URL and each header as parsed: count them as they come."""

    def on_message_begin(self) -> None:
        self._parsed_head_bytes = 0
        super().on_message_begin()  # type: ignore[misc]

    def on_url(self, url: bytes) -> None:
        self._count_parsed_head(len(url))
        super().on_url(url)  # type: ignore[misc]

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_parsed_head(len(name) + len(value) + 4)  # "name: value\r\n"
        super().on_header(name, value)  # type: ignore[misc]


class _H11Guard(_GuardMixin):
    """h11 hands over a whole ``Request``: measure it before uvicorn builds a scope from it."""

    conn: h11.Connection

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        next_event = self.conn.next_event

        def measured_next_event() -> Any:
            event = next_event()
            if isinstance(event, h11.Request):
                self._parsed_head_bytes = 0
                try:
                    self._count_parsed_head(len(event.target))
                    for name, value in event.headers.raw_items():
                        self._count_parsed_head(len(name) + len(value) + 4)
                except _HeadTooLarge:
                    # uvicorn answers a RemoteProtocolError with send_400_response: a 431 here.
                    raise h11.RemoteProtocolError("request head too large") from None
            return event

        self.conn.next_event = measured_next_event  # type: ignore[method-assign]


def protocol_class(
    parser: HttpParser = "httptools", head_timeout: float = HEAD_TIMEOUT_SECONDS
) -> type:
    base, guard = (
        (HttpToolsProtocol, _HttpToolsGuard) if parser == "httptools" else (H11Protocol, _H11Guard)
    )
    return type(f"Receiver{base.__name__}", (guard, base), {"head_timeout": head_timeout})


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
