"""The simulator's HTTP surface: Rillet's API as ``shared/rillet-api.md`` models it.

Every request passes, in order: the sandbox admin routes (``/_sandbox/...``, outside Rillet's
surface, no key needed, but refusing what a web page in the user's browser could send: other
origins and non-JSON bodies), inbound latency (a fault), bearer authentication (401), the rolling
rate limit counted at arrival (429), the API version header (400), injected server errors, and
then the route. Routes are generated from the catalog: one list route per entity, a by-id route
where Rillet has one, the report routes, and the write routes of :mod:`writes`.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router
from starlette.types import Message, Receive, Scope, Send

from rillet_dagster import catalog
from rillet_dagster.catalog import EntitySpec, FilterOp, FilterSpec
from rillet_dagster.clock import Clock, parse_timestamp
from rillet_dagster.rillet.money import money_json
from rillet_dagster.sandbox import reports
from rillet_dagster.sandbox.arr import arr_waterfall
from rillet_dagster.sandbox.cursors import CURSOR_TTL_SECONDS, CursorCodec, CursorState
from rillet_dagster.sandbox.data import World
from rillet_dagster.sandbox.faults import FaultInjector, Faults, faults_from_json
from rillet_dagster.sandbox.idempotency import IdempotencyStore, InFlight
from rillet_dagster.sandbox.ledger import exchange_rate
from rillet_dagster.sandbox.limits import RollingWindowLimiter
from rillet_dagster.sandbox.problems import invalid_parameter, problem
from rillet_dagster.sandbox.store import ListQuery, dumps, to_us
from rillet_dagster.sandbox.webhooks import WebhookConfigError, WebhookDispatcher
from rillet_dagster.sandbox.writes import WRITE_ROUTES, WriteError, Writer

JSON = "application/json"
MAX_BODY_BYTES = 1_000_000
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$")
# The reporting view of journal entries is served from the journal-entry records themselves.
_VIEW_OF = {"reporting_journal_entry": "journal_entry"}
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Sec-Fetch-Site values of a request a page from another origin made ("same-site" includes
# another port of the same host, e.g. any local dev server).
_FOREIGN_FETCH_SITES = frozenset({"cross-site", "same-site"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass
class SandboxConfig:
    api_keys: frozenset[str]
    rate_limit: int = 60
    rate_window_seconds: float = 60.0
    cursor_ttl_seconds: float = CURSOR_TTL_SECONDS
    faults: Faults = field(default_factory=Faults)
    seed: int = 7
    size: str = "small"


class ParamError(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


class Sandbox:
    """The simulated Rillet organization behind one HTTP app."""

    def __init__(
        self,
        world: World,
        clock: Clock,
        config: SandboxConfig,
        dispatcher: WebhookDispatcher | None = None,
    ) -> None:
        if not config.api_keys:
            raise ValueError("the sandbox needs at least one API key")
        self.world = world
        self.clock = clock
        self.config = config
        self.limiter = RollingWindowLimiter(clock, config.rate_limit, config.rate_window_seconds)
        self.idempotency = IdempotencyStore(clock)
        self.faults = FaultInjector(config.faults)
        self.cursors = CursorCodec(secrets.token_bytes(16), config.cursor_ttl_seconds)
        self.dispatcher = dispatcher
        self.writer = Writer(world, clock)
        self.requests: Counter[str] = Counter()
        self._count_lock = threading.Lock()
        world.store.add_listener(self._on_change)

    # ---- webhooks ------------------------------------------------------------------------

    def _on_change(self, entity: str, event: str, body: dict[str, Any] | str) -> None:
        spec = catalog.ENTITY_BY_NAME.get(entity)
        if self.dispatcher is None or spec is None or spec.webhook_entity is None:
            return
        if event in {e.value for e in spec.webhook_events}:
            self.dispatcher.emit(spec.webhook_entity, event, body)

    # ---- the ASGI app ----------------------------------------------------------------------

    def app(self) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
        router = Router(routes=self._routes())

        async def application(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await router(scope, receive, send)
                return
            path: str = scope["path"]
            if path.startswith("/_sandbox"):
                refused = _admin_guard(Request(scope))
                if refused is not None:
                    await refused(scope, receive, send)
                    return
            if path.startswith("/_sandbox") or path == "/health":
                await router(scope, receive, send)
                return
            delay = self.faults.latency_seconds()
            if delay:
                await asyncio.sleep(delay)
            early = self._gate(Request(scope))
            if early is not None:
                await early(scope, receive, send)
                return
            with self._count_lock:
                self.requests[f"{scope['method']} {path}"] += 1
            if self.faults.drop():
                await _send_truncated(router, scope, receive, send)
                return
            await router(scope, receive, send)

        return application

    def _gate(self, request: Request) -> Response | None:
        """Authentication, rate limit, version and injected errors, in Rillet's order."""
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or key.strip() not in self.config.api_keys:
            return problem(
                401,
                "Missing or invalid API key: send 'Authorization: Bearer <key>' with a key "
                "created in Organization Settings > API Access.",
            )
        key = key.strip()
        request.scope.setdefault("state", {})["api_key"] = key
        forced = self.faults.take_forced_429()
        if forced or not self.limiter.admit(key):
            retry_after = self.faults.faults.retry_after
            headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else None
            return problem(
                429,
                f"Rate limit exceeded: {self.config.rate_limit} requests per "
                f"{self.config.rate_window_seconds:g} seconds.",
                headers=headers,
            )
        version = request.headers.get("x-rillet-api-version")
        if version is not None and version.strip() not in {str(v) for v in catalog.API_VERSIONS}:
            return problem(
                400,
                f"Unsupported X-Rillet-API-Version {version!r}; supported versions are "
                f"{', '.join(map(str, catalog.API_VERSIONS))}.",
                slug="unsupported-version",
            )
        status = self.faults.server_error()
        if status is not None:
            return problem(status, "The sandbox injected a server error (fault error_rate).")
        return None

    # ---- routes ----------------------------------------------------------------------------

    def _routes(self) -> list[Route]:
        routes = [
            Route("/health", self._health),
            Route("/api-key", self._api_key),
            Route("/organizations/self", self._single("organization")),
            Route("/books/periods/last-closed", self._single("book_period")),
            Route("/invoices/{invoice_id}/payments", self._invoice_payments, methods=["GET"]),
        ]
        for spec in catalog.ENTITIES:
            if spec.single:
                continue
            if spec.parent:
                routes.append(Route(spec.path, self._child_list(spec), methods=["GET"]))
                continue
            routes.append(Route(spec.path, self._list(spec), methods=["GET"]))
            if spec.get_by_id:
                routes.append(Route(f"{spec.path}/{{id}}", self._get(spec), methods=["GET"]))
        for report in catalog.REPORTS:
            routes.append(Route(report.path, self._report(report), methods=["GET"]))
        for (method, path), name in WRITE_ROUTES.items():
            routes.append(Route(path, self._write(method, name), methods=[method]))
        routes.extend(self._admin_routes())
        return routes

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _api_key(self, request: Request) -> Response:
        organization = self.world.store.singletons["organization"] or {}
        return JSONResponse({"valid": True, "organization_id": organization.get("id")})

    def _single(self, entity: str) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            with self.world.store.lock:
                record = self.world.store.singletons[entity]
            if record is None:
                return problem(404, "No accounting period has been closed yet.")
            return Response(dumps(record), media_type=JSON)

        return endpoint

    def _get(self, spec: EntitySpec) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            record_id = request.path_params["id"]
            with self.world.store.lock:
                record = self.world.store[spec.name].get(record_id)
                body = dumps(record) if record is not None else None
            if body is None:
                return problem(404, f"No {spec.name.replace('_', ' ')} with id {record_id!r}.")
            return Response(body, media_type=JSON)

        return endpoint

    async def _invoice_payments(self, request: Request) -> Response:
        invoice_id = request.path_params["invoice_id"]
        return self._payments_of("invoice", "invoice_payment", invoice_id)

    def _child_list(self, spec: EntitySpec) -> Callable[[Request], Awaitable[Response]]:
        parent_param = f"{spec.parent}_id"

        async def endpoint(request: Request) -> Response:
            assert spec.parent is not None
            return self._payments_of(spec.parent, spec.name, request.path_params[parent_param])

        return endpoint

    def _payments_of(self, parent: str, entity: str, parent_id: str) -> Response:
        store = self.world.store
        with store.lock:
            if store[parent].get(parent_id) is None:
                return problem(404, f"No {parent} with id {parent_id!r}.")
            payments = store[entity]
            parts = [
                payments.record_json(seq)
                for pid in self.world.payments_of.get(parent_id, [])
                if (seq := payments.seq_of(pid)) is not None and not payments.is_deleted(seq)
            ]
        return Response(b'{"payments":[' + b",".join(parts) + b"]}", media_type=JSON)

    # ---- lists -----------------------------------------------------------------------------

    def _list(self, spec: EntitySpec) -> Callable[[Request], Awaitable[Response]]:
        source = _VIEW_OF.get(spec.name, spec.name)
        render = self._reporting_json if spec.name in _VIEW_OF else None

        async def endpoint(request: Request) -> Response:
            params = request.query_params
            try:
                limit = _limit(params.get("limit")) if spec.paginated else None
                fresh = _list_query(spec, params)
            except ParamError as error:
                return invalid_parameter(error.param, error.message)
            now = self.clock.time()
            with self.world.store.lock:
                collection = self.world.store[source]
                state = None
                if spec.paginated and params.get("cursor"):
                    if self.faults.cursor_presented():
                        self.cursors.expire_all()
                    state = self.cursors.decode(params["cursor"], entity=spec.name, now=now)
                    if state is None and self.faults.faults.cursor_error:
                        return problem(
                            400,
                            "The pagination cursor has expired or is unknown; "
                            "start again without a cursor.",
                            slug="cursor-expired",
                        )
                query = _query_from_fingerprint(spec, state.query) if state else fresh
                start = state.position if state else collection.start_position(query.sort)
                seqs, next_position = collection.page(
                    query, start, limit if limit is not None else len(collection) + 1
                )
                renderer = render or collection.record_json
                parts = [renderer(seq) for seq in seqs]
            body = b'{"' + spec.list_key.encode() + b'":[' + b",".join(parts) + b"]"  # type: ignore[union-attr]
            if spec.paginated:
                cursor = ""
                if next_position is not None:
                    token = self.cursors.encode(
                        CursorState(
                            spec.name, next_position, query.fingerprint(), now, self.cursors.epoch
                        )
                    )
                    cursor = '"next_cursor":' + json.dumps(token)
                body += b',"pagination":{' + cursor.encode() + b"}"
            body += b"}"
            if spec.paginated and self.faults.malformed():
                return Response(body[: len(body) // 2], media_type=JSON)
            return Response(body, media_type=JSON)

        return endpoint

    def _reporting_json(self, seq: int) -> bytes:
        record = self.world.store["journal_entry"].record(seq)
        return dumps(reporting_journal_entry(self.world, record))

    # ---- reports ---------------------------------------------------------------------------

    def _report(self, spec: catalog.ReportSpec) -> Callable[[Request], Awaitable[Response]]:
        builders: dict[str, Callable[[Any, Any], dict[str, Any]]] = {
            "trial_balance": reports.trial_balance,
            "balance_sheet": reports.balance_sheet,
            "income_statement": reports.income_statement,
            "cash_flow_statement": reports.cash_flow_statement,
            "executive_pl": reports.executive_pl,
        }

        async def endpoint(request: Request) -> Response:
            params = dict(request.query_params)
            try:
                with self.world.store.lock:
                    if spec.name == "arr_waterfall":
                        body = arr_waterfall(self.world, params, self.cursors, self.clock.time())
                    else:
                        body = builders[spec.name](self.world.ledger, params)
            except (reports.ReportParamError, ParamError) as error:
                return invalid_parameter(error.param, error.message)
            return Response(dumps(body), media_type=JSON)

        return endpoint

    # ---- writes ----------------------------------------------------------------------------

    def _write(self, method: str, name: str) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            body: Any = None
            if method in {"POST", "PUT"}:
                content_type = request.headers.get("content-type", "").split(";")[0].strip()
                if content_type != JSON:
                    return problem(415, "Send the request body as application/json.")
                raw = await request.body()
                if len(raw) > MAX_BODY_BYTES:
                    return problem(413, f"Request bodies are limited to {MAX_BODY_BYTES} bytes.")
                try:
                    body = json.loads(raw)
                except (ValueError, UnicodeDecodeError):
                    return problem(400, "The request body is not valid JSON.", slug="invalid-json")
            api_key = request.scope["state"]["api_key"]
            idem_key = request.headers.get("idempotency-key") if method == "POST" else None
            if idem_key:
                try:
                    stored = self.idempotency.begin(api_key, idem_key)
                except InFlight:
                    return problem(
                        409,
                        "A request with this Idempotency-Key is still being processed; "
                        "retry after it completes.",
                        slug="idempotency-key-in-use",
                    )
                if stored is not None:
                    return Response(
                        stored.body,
                        status_code=stored.status,
                        media_type=stored.media_type,
                        headers={"Idempotent-Replayed": "true"},
                    )
            try:
                if idem_key:
                    # Writes take time at Rillet; the injected latency keeps the key in flight
                    # long enough for a concurrent duplicate to see the 409.
                    delay = self.faults.latency_seconds()
                    if delay:
                        await asyncio.sleep(delay)
                response = self._apply_write(name, dict(request.path_params), body, method)
            except BaseException:
                if idem_key:
                    self.idempotency.abandon(api_key, idem_key)
                raise
            if idem_key:
                self.idempotency.finish(
                    api_key, idem_key, response.status_code, bytes(response.body), JSON
                )
            return response

        return endpoint

    def _apply_write(
        self, name: str, path_params: dict[str, str], body: Any, method: str
    ) -> Response:
        handler = getattr(self.writer, name)
        kwargs: dict[str, Any] = dict(path_params)
        if method in {"POST", "PUT"}:
            kwargs["body"] = body
        try:
            result = handler(**kwargs)
        except WriteError as error:
            return problem(
                error.status,
                error.detail,
                title=error.title,
                slug="validation-error" if error.status in {400, 422} else None,
                violations=error.violations,
            )
        if method == "DELETE" and result is None:
            return Response(status_code=204)
        return Response(dumps(result), media_type=JSON)

    # ---- sandbox admin (not part of Rillet's API) -------------------------------------------

    def _admin_routes(self) -> list[Route]:
        return [
            Route("/_sandbox", self._admin_info, methods=["GET"]),
            Route("/_sandbox/stats", self._admin_stats, methods=["GET"]),
            Route("/_sandbox/stats/reset", self._admin_stats_reset, methods=["POST"]),
            Route("/_sandbox/faults", self._admin_faults, methods=["GET", "PUT"]),
            Route("/_sandbox/cursors/expire", self._admin_expire_cursors, methods=["POST"]),
            Route("/_sandbox/webhooks", self._admin_webhooks, methods=["GET", "POST"]),
            Route("/_sandbox/webhooks/{id}", self._admin_webhook_delete, methods=["DELETE"]),
            Route("/_sandbox/deliveries", self._admin_deliveries, methods=["GET"]),
            Route("/_sandbox/records/{entity}", self._admin_records, methods=["GET"]),
        ]

    async def _admin_info(self, request: Request) -> Response:
        with self.world.store.lock:
            counts = {name: len(c) for name, c in self.world.store.collections.items()}
        return JSONResponse(
            {
                "seed": self.config.seed,
                "size": self.config.size,
                "anchor": self.world.anchor.isoformat(),
                "rate_limit": {
                    "requests": self.config.rate_limit,
                    "window_seconds": self.config.rate_window_seconds,
                },
                "records": counts,
                "faults": self.faults.faults.to_json(),
            }
        )

    async def _admin_stats(self, request: Request) -> Response:
        with self._count_lock:
            by_route = dict(self.requests)
        return JSONResponse(
            {
                "keys": {_key_label(k): v for k, v in self.limiter.stats().items()},
                "requests": by_route,
                "total_requests": sum(by_route.values()),
            }
        )

    async def _admin_stats_reset(self, request: Request) -> Response:
        self.limiter.reset()
        with self._count_lock:
            self.requests.clear()
        return Response(status_code=204)

    async def _admin_faults(self, request: Request) -> Response:
        if request.method == "PUT":
            try:
                body = await request.json()
                if not isinstance(body, dict):
                    raise ValueError("send a JSON object of faults")
                self.faults.set(faults_from_json(self.faults.faults, body))
            except (ValueError, TypeError) as error:
                return problem(400, str(error))
        return JSONResponse(self.faults.faults.to_json())

    async def _admin_expire_cursors(self, request: Request) -> Response:
        self.cursors.expire_all()
        return Response(status_code=204)

    async def _admin_webhooks(self, request: Request) -> Response:
        if self.dispatcher is None:
            return problem(409, "Webhook delivery is not running in this sandbox.")
        if request.method == "POST":
            try:
                body = await request.json()
                subscription = self.dispatcher.subscribe(
                    body["url"], body["tokens"], body.get("events")
                )
            except (KeyError, TypeError, ValueError, WebhookConfigError) as error:
                return problem(
                    400,
                    f"Send {{'url': ..., 'tokens': [base64 token, ...], 'events'?: [...]}}: "
                    f"{error}",
                )
            return JSONResponse(subscription.to_json(), status_code=201)
        return JSONResponse([s.to_json() for s in self.dispatcher.subscriptions()])

    async def _admin_webhook_delete(self, request: Request) -> Response:
        if self.dispatcher is None or not self.dispatcher.unsubscribe(request.path_params["id"]):
            return problem(404, "No such webhook subscription.")
        return Response(status_code=204)

    async def _admin_deliveries(self, request: Request) -> Response:
        records = self.dispatcher.deliveries() if self.dispatcher else []
        return JSONResponse([vars(r) for r in records])

    async def _admin_records(self, request: Request) -> Response:
        """Ground truth for tests and demos: every live record of an entity, newest first.

        ``entity`` is a catalog name (``invoice``) or its warehouse table name (``invoices``).
        """
        store = self.world.store
        entity = _ENTITY_BY_TABLE.get(request.path_params["entity"], request.path_params["entity"])
        if entity not in store.collections:
            known = ", ".join(sorted(_ENTITY_BY_TABLE))
            return problem(
                404,
                f"Unknown entity {request.path_params['entity']!r}; use a table name ({known}) "
                "or its singular catalog name.",
            )
        with store.lock:
            if entity in _VIEW_OF:  # the reporting view, rendered from the records it shows
                seqs = store[_VIEW_OF[entity]].live_seqs()
                parts = [self._reporting_json(seq) for seq in seqs]
            else:
                collection = store[entity]
                parts = [collection.record_json(seq) for seq in collection.live_seqs()]
        return Response(b"[" + b",".join(parts) + b"]", media_type=JSON)


_ENTITY_BY_TABLE = {catalog.plural(spec.name): spec.name for spec in catalog.ENTITIES}


def _admin_guard(request: Request) -> Response | None:
    """Refuse an admin request with a side effect that a web page could have made.

    The admin routes need no key, so a page open in the user's browser could POST to them (a
    ``text/plain`` POST needs no CORS preflight) to register a webhook to any URL or reset the
    sandbox. Browsers say where a request comes from (``Origin``, ``Sec-Fetch-Site``); scripts
    and the CLI send neither, and send their bodies as JSON.
    """
    if request.method in _SAFE_METHODS:
        return None
    origin = request.headers.get("origin")
    fetch_site = request.headers.get("sec-fetch-site", "").strip().lower()
    if fetch_site in _FOREIGN_FETCH_SITES or (
        origin is not None and not _same_origin(origin, request)
    ):
        return problem(
            403,
            "Sandbox admin routes refuse requests from other origins (a web page cannot change "
            "the sandbox); call them from a script or curl.",
        )
    content_type = request.headers.get("content-type")
    length = request.headers.get("content-length", "0").strip()
    has_body = length != "0" or "transfer-encoding" in request.headers
    media_type = (content_type or "").split(";")[0].strip().lower()
    if (has_body or content_type is not None) and media_type != JSON:
        return problem(415, "Send sandbox admin request bodies as application/json.")
    return None


def _same_origin(origin: str, request: Request) -> bool:
    """``origin`` is the sandbox's own: scheme, host and port of the URL this request went to."""
    try:
        theirs = urlsplit(origin.strip())
        their_port = theirs.port or _DEFAULT_PORTS.get(theirs.scheme.lower())
    except ValueError:  # a malformed port
        return False
    ours = request.url
    our_port = ours.port or _DEFAULT_PORTS.get(ours.scheme)
    return (
        bool(theirs.hostname)
        and theirs.scheme.lower() == ours.scheme
        and theirs.hostname == (ours.hostname or "").lower()
        and their_port == our_port
    )


def _key_label(key: str) -> str:
    """Stats name keys by a short prefix only; the sandbox never echoes whole keys."""
    return f"{key[:4]}..." if len(key) > 8 else "***"


async def _send_truncated(router: Router, scope: Scope, receive: Receive, send: Send) -> None:
    """Serve the request, then drop the connection half-way through the response body."""
    started: list[Message] = []
    chunks: list[bytes] = []

    async def capture(message: Message) -> None:
        if message["type"] == "http.response.start":
            started.append(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await router(scope, receive, capture)
    body = b"".join(chunks)
    headers = [(k, v) for k, v in started[0]["headers"] if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": started[0]["status"], "headers": headers})
    await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
    raise ConnectionAbortedError("sandbox fault: connection dropped mid-response")


def _limit(raw: str | None) -> int:
    if raw is None:
        return catalog.DEFAULT_PAGE_SIZE
    if not raw.isdigit() or not 1 <= int(raw) <= catalog.MAX_PAGE_SIZE:
        raise ParamError("limit", f"must be an integer from 1 to {catalog.MAX_PAGE_SIZE}")
    return int(raw)


def _list_query(spec: EntitySpec, params: Any) -> ListQuery:
    """Validate a list request's filters (unknown parameters are ignored, as Rillet does)."""
    sort = "created"
    if spec.sort_by and "sort_by" in params:
        sort = params["sort_by"]
        if sort not in {"created", "updated"}:
            raise ParamError("sort_by", "must be 'created' or 'updated'")
    updated_gt = None
    if spec.updated_gt and "updated.gt" in params:
        text = params["updated.gt"]
        if not _TIMESTAMP.match(text):
            raise ParamError("updated.gt", "must be an ISO 8601 UTC timestamp ending in Z")
        updated_gt = to_us(parse_timestamp(text))
    filters = []
    for spec_filter in spec.filters:
        value = params.get(spec_filter.param)
        if value is None:
            continue
        _check_filter_value(spec_filter, value)
        filters.append((spec_filter, value))
    return ListQuery(sort, updated_gt, tuple(filters))


def _check_filter_value(spec: FilterSpec, value: str) -> None:
    if spec.op in {FilterOp.GT, FilterOp.GTE, FilterOp.LT, FilterOp.LTE}:
        try:
            if not _DATE.match(value):
                raise ValueError
            date.fromisoformat(value)
        except ValueError:
            raise ParamError(spec.param, "must be a date like 2026-01-31") from None
    elif spec.op is FilterOp.BOOL and value not in {"true", "false"}:
        raise ParamError(spec.param, "must be true or false")
    elif spec.param.endswith("_id") and not _UUID.match(value):
        raise ParamError(spec.param, "must be a UUID")
    elif spec.op is FilterOp.ANY_LINE_ACCOUNT:
        ids = [v.strip() for v in value.split(",")]
        if not ids or not all(_UUID.match(v) for v in ids):
            raise ParamError(spec.param, "must be comma-separated account UUIDs")


def _query_from_fingerprint(spec: EntitySpec, fingerprint: list[Any]) -> ListQuery:
    sort, updated_gt, filters = fingerprint
    by_param = {f.param: f for f in spec.filters}
    return ListQuery(sort, updated_gt, tuple((by_param[p], v) for p, v in filters))


def reporting_journal_entry(world: World, record: dict[str, Any]) -> dict[str, Any]:
    """A journal entry as ``/reports/journal-entries`` serves it: local and reporting amounts."""
    _, _, lines = world.ledger.lines_of(record)
    posted = date.fromisoformat(record["date"])
    rate = exchange_rate(record["currency"], world.reporting_currency, posted)
    items = []
    for item, line in zip(record["items"], lines, strict=True):
        items.append(
            {
                "id": item["id"],
                "account_id": item["account_id"],
                "account_code": item["account_code"],
                "side": item["side"],
                "local_amount": item["amount"],
                "reporting_amount": money_json(line.reporting, world.reporting_currency),
                "exchange_rate": format(rate, "f"),
                "description": item.get("description"),
                "fields": item.get("fields", []),
            }
        )
    return {
        "id": record["id"],
        "subsidiary_id": record.get("subsidiary_id"),
        "name": record["name"],
        "date": record["date"],
        "reversal_date": record.get("reversal_date"),
        "related_entity": record.get("related_entity"),
        "attachmentUrl": record.get("attachmentUrl"),
        "items": items,
    }
