"""The HTTP/1.1 connection layer under the request pipeline: parser limits, protocol
errors as CloudAPI JSON, and the header timeout.

aiohttp itself responds, in text/plain and before any middleware runs, to what its
parser rejects: an overlong request line or header, too many headers, malformed syntax,
TLS sent to the plain port. So does its `Expect` check. aiohttp also has no limit on the
time a client takes to send a request's headers, because its `keepalive_timeout` (3630 s
by default) only closes connections that wait between requests. This module changes
both:

- Every such response is a CloudAPI error with the full header set of `service.http`:
  400 BadRequestError (malformed request), 408 RequestTimeout, 414 UriTooLong (request
  target over MAX_REQUEST_LINE bytes), 417 ExpectationFailed (an `Expect` other than
  `100-continue`), 431 RequestHeaderFieldsTooLarge (a header name or value over
  MAX_FIELD_SIZE bytes, or more than MAX_HEADERS headers), and 500 InternalError. The
  connection is closed after it.
- A request whose headers are not complete `header_timeout` seconds after its first
  byte gets 408 and the connection is closed. On a new connection the time counts from
  the connection's opening, and a connection that sends nothing in that time is closed
  without an answer.

Written for aiohttp 3.14 (tested with 3.14.5). Besides public API it relies on
`BaseRunner._make_server`, `Server._kwargs` and `._loop`, `RequestHandler._messages`,
`._waiter` and `._loop`, and `aiohttp.web_protocol._ErrInfo`. tests/hostile/test_limits.py checks that
each is still there, so an aiohttp upgrade that moves one fails there first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web, web_protocol
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader

from service.errors import (
    BadRequest,
    CloudApiError,
    ExpectationFailed,
    InternalError,
    RequestHeaderTooLarge,
    RequestTimeout,
    UriTooLong,
)
from service.hotpath import HOT_PATH
from service.http import REQUEST_ID, ROUTE, STARTED, RouteSpec, build_response, error_body, request_id_for

log = structlog.get_logger("http")

MAX_REQUEST_LINE = 4096  # bytes of the request target (the method and version not counted)
MAX_FIELD_SIZE = 8190  # bytes of one header name, and of one header value
MAX_HEADERS = 128  # headers in one request

# Seconds a timer may fire before its deadline (the loop's clock counts milliseconds).
_TIMER_SLACK = 0.002

# The route name that logs and metrics show for a response given before any routing.
_PROTOCOL_ROUTE = RouteSpec(name="protocol_error")


class HeaderTimeout(Exception):
    """The request headers were not complete within the header timeout."""


def _parser_error(exc: BaseException | None) -> CloudApiError:
    """Return the CloudAPI error for an exception of aiohttp's request parser."""
    if isinstance(exc, LineTooLong):
        # The C parser and the pure-Python one both pass the limit that was exceeded.
        limit = exc.args[1] if len(exc.args) > 1 else None
        if limit == MAX_REQUEST_LINE:
            return UriTooLong(f"the request line must not exceed {MAX_REQUEST_LINE} bytes")
        return RequestHeaderTooLarge(f"a request header must not exceed {MAX_FIELD_SIZE} bytes")
    if isinstance(exc, BadHttpMessage) and exc.message.startswith("Too many headers"):
        return RequestHeaderTooLarge(f"a request must not have more than {MAX_HEADERS} headers")
    if isinstance(exc, HttpProcessingError):
        # aiohttp's first clause names the problem; what follows it quotes the request.
        detail = exc.message.split("\n", 1)[0].split(":", 1)[0].strip()[:120]
        return BadRequest(f"malformed HTTP request: {detail or type(exc).__name__}")
    return BadRequest("malformed HTTP request")


def error_for_status(status: int, exc: BaseException | None) -> CloudApiError:
    """Return the CloudAPI error for a request that aiohttp rejects with `status`."""
    if isinstance(exc, HeaderTimeout):
        return RequestTimeout(str(exc))
    if status == 417:
        return ExpectationFailed("the only expectation supported is 100-continue")
    if isinstance(exc, web.HTTPException) and 400 <= status < 500:
        error = BadRequest(exc.reason)
        error.status = status
        return error
    if 400 <= status < 500:
        error = _parser_error(exc)
        if status != 400 and error.status == 400:
            error.status = status
        return error
    return InternalError()


def error_response(request: web.BaseRequest, error: CloudApiError) -> web.Response:
    """Build the JSON answer to `error` for a request the pipeline has not seen.

    A request that failed to parse carries no headers, so it gets a new Request-Id.
    """
    if REQUEST_ID not in request:
        request[REQUEST_ID] = request_id_for(request)
    if STARTED not in request:
        request[STARTED] = time.monotonic()
    if ROUTE not in request:
        request[ROUTE] = _PROTOCOL_ROUTE
    response = build_response(request, status=error.status, body=error_body(error), extra=error.headers)
    response.force_close()
    return response


def _answering_http_exceptions(
    handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
    """Wrap the application so that an HTTPException raised before the middleware runs
    (aiohttp's `Expect` check) is answered in JSON too."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            error = error_for_status(exc.status, exc)
            log.info("request_rejected", status=error.status, error_code=error.code, reason=type(exc).__name__)
            return error_response(request, error)

    return handle


class CloudApiRequestHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler with JSON protocol errors and a header timeout."""

    __slots__ = (
        "_header_timeout",
        "_header_timer",
        "_header_deadline",
        "_header_bytes_seen",
        "_last_payload",
        "_timed_out",
    )

    def __init__(self, manager: web.Server, *, header_timeout: float, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        # The loop time by which the headers being received must be complete, or None
        # between requests. The timer is not cancelled when a request's headers are
        # complete: when it fires it looks at the deadline of that moment, and sets
        # itself again for a later one. So a kept-alive connection costs one timer per
        # `header_timeout`, not a timer per request.
        self._header_deadline: float | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes_seen = False
        # The body of the newest parsed request: bytes that arrive while it is not
        # complete belong to it, not to the headers of a next request.
        self._last_payload: StreamReader | None = None
        self._timed_out = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._start_header_timer(bytes_seen=False)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._header_deadline = None
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data and not self._timed_out:
            if self._header_deadline is not None:
                self._header_bytes_seen = True
            elif self._last_payload is None or self._last_payload.is_eof():
                # The first byte of the next request on a kept-alive connection.
                # NOTE: bytes of the next request that arrive in the same read as the end
                # of the previous one start no timer. The next read that brings more does.
                self._start_header_timer(bytes_seen=True)
        super().data_received(data)
        if self._messages:
            # A complete request (or a parse error) is queued: its headers are in.
            self._last_payload = self._messages[-1][1]
            self._header_deadline = None

    def _start_header_timer(self, *, bytes_seen: bool) -> None:
        self._header_bytes_seen = bytes_seen
        loop = self._loop
        self._header_deadline = loop.time() + self._header_timeout
        if self._header_timer is None:
            self._header_timer = loop.call_at(self._header_deadline, self._header_timer_expired)

    def _header_timer_expired(self) -> None:
        self._header_timer = None
        deadline = self._header_deadline
        if deadline is None:
            return
        loop = self._loop
        if deadline - loop.time() > _TIMER_SLACK:
            self._header_timer = loop.call_at(deadline, self._header_timer_expired)
            return
        self._header_deadline = None
        if self._messages or self.transport is None:
            return
        if not self._header_bytes_seen:
            # A new connection that never sent a byte: no client is waiting for a response.
            log.debug("connection_closed", reason="no request", timeout=self._header_timeout)
            self.force_close()
            return
        self._timed_out = True
        timeout = HeaderTimeout(f"request headers not received within {self._header_timeout:g} seconds")
        # Queue the timeout the way data_received() queues a parse error, so that the
        # answer goes through handle_error() and the normal response path.
        self._messages.append((web_protocol._ErrInfo(status=408, exc=timeout, message=str(timeout)), EMPTY_PAYLOAD))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Answer a request that aiohttp could not parse or handle, as CloudAPI JSON."""
        error = error_for_status(status, exc)
        if error.status >= 500:
            log.error("request_failed", status=status, error=type(exc).__name__, exc_info=exc)
        else:
            # Only the exception's type: its message quotes request bytes, which may
            # include an Authorization header.
            log.info("request_rejected", status=error.status, error_code=error.code, reason=type(exc).__name__)
        if request.writer.output_size > 0:
            raise ConnectionError("the response has started, so the error cannot be sent")
        return error_response(request, error)


class CloudApiServer(web.Server):
    """aiohttp's low-level server, making CloudApiRequestHandler connections."""

    def __init__(self, handler, *, header_timeout: float, **kwargs: Any):
        super().__init__(_answering_http_exceptions(handler), **kwargs)
        self._header_timeout = header_timeout

    def __call__(self) -> CloudApiRequestHandler:
        return CloudApiRequestHandler(self, loop=self._loop, header_timeout=self._header_timeout, **self._kwargs)


class CloudApiRunner(web.AppRunner):
    """An AppRunner whose connections are CloudApiRequestHandler, with this module's
    limits, and whose requests go to the hot path (`service.hotpath`) before the app."""

    __slots__ = ("_header_timeout",)

    def __init__(self, app: web.Application, *, header_timeout: float, **kwargs: Any):
        super().__init__(
            app, max_line_size=MAX_REQUEST_LINE, max_field_size=MAX_FIELD_SIZE, max_headers=MAX_HEADERS, **kwargs
        )
        self._header_timeout = header_timeout

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        handler = server.request_handler
        hot_path = self._app.get(HOT_PATH)
        if hot_path is not None:
            handler = hot_path.handler(handler)
        return CloudApiServer(
            handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            header_timeout=self._header_timeout,
            **server._kwargs,
        )


def make_runner(app: web.Application, settings) -> CloudApiRunner:
    """Return the runner the API serves `app` with, configured from `settings`."""
    return CloudApiRunner(
        app,
        header_timeout=settings.http_header_timeout,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=settings.http_drain_timeout,
    )
