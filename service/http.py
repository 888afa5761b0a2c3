"""The request pipeline: the one place that turns errors into responses and sets headers.

`pipeline_middleware` wraps every request. In order, it:
  1. answers unknown paths (404) and methods (405) from the router's verdict;
  2. runs the route's stages: version negotiation (400 InvalidVersion), the Accept check
     (406), the body limit (413), then authentication once it is installed;
  3. calls the handler, which returns a body or raises a `CloudApiError`;
  4. turns any error into `{"code": ..., "message": ...}` (anything unexpected becomes a
     500 whose details go only to the log) and sets the full CloudAPI header set on every
     response, errors included;
  5. logs one line and records metrics for the request.
Order matters: CloudAPI checks the route, then the version, then Accept, then credentials.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import http
import itertools
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import orjson
import structlog
from aiohttp import hdrs, web
from aiohttp.helpers import rfc822_formatted_time
from structlog.contextvars import bind_contextvars, clear_contextvars

from service import __version__
from service.errors import (
    BadRequest,
    CloudApiError,
    DatabaseUnavailable,
    InternalError,
    InvalidVersion,
    MethodNotAllowed,
    NotAcceptable,
    RequestTimeout,
    RequestTooLarge,
    ResourceNotFound,
    ServiceUnavailable,
)
from service.versions import LATEST_VERSION, negotiate, requested_range

log = structlog.get_logger("http")

SERVER_HEADER = f"cloudapi-images/{__version__}"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_CORS_ALLOW_HEADERS = (
    "Accept, Accept-Version, Content-Length, Content-MD5, Content-Type, Date, Api-Version, Response-Time"
)
_CORS_EXPOSE_HEADERS = "Api-Version, Request-Id, Response-Time"
_JSON = "application/json"
_ACCEPTABLE = frozenset({"application/json", "application/*", "*/*"})

Stage = Callable[[web.Request], Awaitable[None] | None]
# Called once per request after its response is built: method, route, status, seconds, the error if any,
# request id and the caller's login if known. The access log and the metrics.
RequestObserver = Callable[[str, "RouteSpec", int, float, "CloudApiError | None", str, "str | None"], None]


@dataclass(frozen=True)
class RouteSpec:
    """How the pipeline treats a route: its name for logs and metrics, and its stages."""

    name: str
    methods: tuple[str, ...] = ("GET", "HEAD")
    versioned: bool = True
    authenticated: bool = False
    json_only: bool = True
    allow_methods: str = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "allow_methods", ", ".join(self.methods))


# Request keys set by the pipeline for the stages and handlers after it.
REQUEST_ID = web.RequestKey("request_id", str)
STARTED = web.RequestKey("started", float)
ROUTE = web.RequestKey("route", RouteSpec)
API_VERSION = web.RequestKey("api_version", str)
CALLER = web.RequestKey("caller", object)

ROUTE_SPECS = web.AppKey("route_specs", dict)
AUTH_STAGE = web.AppKey("auth_stage", object)
REQUEST_OBSERVER = web.AppKey("request_observer", object)
HTTP_SETTINGS = web.AppKey("http_settings", object)

_UNKNOWN_ROUTE = RouteSpec(name="unknown")
_METHOD_NOT_ALLOWED_ROUTE = RouteSpec(name="method_not_allowed")


def content_md5(body: bytes) -> str:
    """Return the base64 MD5 digest CloudAPI puts in Content-MD5."""
    return base64.b64encode(hashlib.md5(body).digest()).decode("ascii")


def error_body(error: CloudApiError) -> bytes:
    try:
        return orjson.dumps({"code": error.code, "message": error.message})
    except orjson.JSONEncodeError:
        # The message echoes request bytes that are not UTF-8, which aiohttp keeps as
        # lone surrogates. orjson cannot encode those, so they are shown as \xNN.
        return orjson.dumps({"code": error.code, "message": printable(error.message)})


def printable(text: str) -> str:
    """Return `text` with lone surrogates replaced by the escapes of the bytes they stand for."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")


def request_id_for(request: web.Request) -> str:
    """Echo the caller's Request-Id or X-Request-Id when it is sane, else make a UUID."""
    headers = request.headers
    for name in ("Request-Id", "X-Request-Id"):
        value = headers.get(name)
        if value is not None:
            if _REQUEST_ID.match(value):
                return value
            break
    return _new_request_id()


# Request ids are UUIDs in the version 4 layout: 74 random bits chosen once per process,
# then a 48-bit counter. Unique like uuid4(), for a seventh of its cost.
_ID_BITS = uuid.uuid4().hex
_ID_PREFIX = f"{_ID_BITS[:8]}-{_ID_BITS[8:12]}-4{_ID_BITS[13:16]}-{'89ab'[int(_ID_BITS[16], 16) % 4]}{_ID_BITS[17:20]}-"
_id_counter = itertools.count(int(_ID_BITS[20:32], 16))


def _new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter) & 0xFFFFFFFFFFFF:012x}"


def negotiate_version(request: web.Request) -> None:
    """Pick the API version from the version headers or raise InvalidVersion."""
    version_range = requested_range(request.headers)
    version = negotiate(version_range)
    if version is None:
        raise InvalidVersion(f"{version_range} is not supported by {request.method} {request.rel_url.raw_path}")
    request[API_VERSION] = version


@functools.lru_cache(maxsize=256)
def _accepts_json(accept: str) -> bool:
    for part in accept.split(","):
        media, _, params = part.partition(";")
        media = media.strip().lower()
        if media not in _ACCEPTABLE:
            continue
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value.strip())
                except ValueError:
                    quality = 0.0
        if quality > 0:
            return True
    return False


def check_accept(request: web.Request) -> None:
    """Refuse an Accept header that excludes application/json."""
    accept = request.headers.get(hdrs.ACCEPT)
    if accept is not None and accept.strip() and not _accepts_json(accept):
        raise NotAcceptable(f"Server accepts: {_JSON}")


async def check_body(request: web.Request, max_body: int, timeout: float) -> None:
    """Read and ignore a request body of at most `max_body` bytes.

    Raises RequestTooLarge for a larger body, and RequestTimeout when the body does not
    arrive within `timeout` seconds.
    """
    if not request.body_exists:
        return
    length = request.content_length
    if length is not None and length > max_body:
        raise RequestTooLarge(f"request body must not exceed {max_body} bytes")
    # A chunked body has no Content-Length, and read() returns whatever has arrived, so
    # count every chunk up to the end of the body.
    received = 0
    try:
        async with asyncio.timeout(timeout):
            while chunk := await request.content.readany():
                received += len(chunk)
                if received > max_body:
                    raise RequestTooLarge(f"request body must not exceed {max_body} bytes")
    except TimeoutError:
        raise RequestTimeout(f"request body not received within {timeout:g} seconds") from None
    except web.RequestPayloadError as exc:
        # A malformed chunked encoding, or a body shorter than its Content-Length.
        raise BadRequest(f"invalid request body: {exc}") from None


def build_response(
    request: web.BaseRequest,
    *,
    status: int,
    body: bytes,
    md5: str | None = None,
    content_type: str = _JSON,
    extra: dict[str, str] | None = None,
) -> web.Response:
    """Build a response with CloudAPI's full header set from what the pipeline stored
    on `request`."""
    return make_response(
        status,
        body,
        md5,
        request_id=request[REQUEST_ID],
        api_version=request.get(API_VERSION, LATEST_VERSION),
        spec=request[ROUTE],
        started=request[STARTED],
        content_type=content_type,
        extra=extra,
    )


def make_response(
    status: int,
    body: bytes,
    md5: str | None,
    *,
    request_id: str,
    api_version: str,
    spec: RouteSpec,
    started: float,
    content_type: str = _JSON,
    extra: dict[str, str] | None = None,
) -> web.Response:
    """Build a response with CloudAPI's full header set.

    HEAD gets the same headers, Content-Length and Content-MD5 as GET, without the body.
    """
    elapsed = str(int((time.monotonic() - started) * 1000))
    headers = {
        "Content-Type": content_type,
        "Content-MD5": md5 if md5 is not None else content_md5(body),
        "Server": SERVER_HEADER,
        "Api-Version": api_version,
        "X-Api-Version": api_version,
        "Request-Id": request_id,
        "X-Request-Id": request_id,
        "Response-Time": elapsed,
        "X-Response-Time": elapsed,
        "Access-Control-Allow-Origin": "*",
        "Access-Control-Allow-Headers": _CORS_ALLOW_HEADERS,
        "Access-Control-Allow-Methods": spec.allow_methods,
        "Access-Control-Expose-Headers": _CORS_EXPOSE_HEADERS,
    }
    if extra:
        headers.update(extra)
    # For HEAD, aiohttp keeps Content-Length of `body` and does not send the body.
    return web.Response(status=status, body=body, headers=headers)


_REASONS = {status.value: status.phrase for status in http.HTTPStatus}
# The headers that are the same in every response of a route, serialized once.
_FIXED_HEAD = (
    f"Server: {SERVER_HEADER}\r\n"
    "Access-Control-Allow-Origin: *\r\n"
    f"Access-Control-Allow-Headers: {_CORS_ALLOW_HEADERS}\r\n"
    f"Access-Control-Expose-Headers: {_CORS_EXPOSE_HEADERS}\r\n"
)


def serialize_response(
    status: int,
    body: bytes,
    md5: str,
    *,
    head: bool,
    http_version: str,
    keep_alive: bool,
    request_id: str,
    api_version: str,
    spec: RouteSpec,
    started: float,
    extra: dict[str, str] | None = None,
) -> bytes:
    """Return the bytes of a JSON response with the header set of `make_response`,
    as aiohttp would write them (`head`: without the body, for HEAD).

    Every value comes from this service: request ids pass `_REQUEST_ID` or are made
    here, and `extra` contains fixed strings. So none needs aiohttp's check for control
    characters.
    """
    elapsed = int((time.monotonic() - started) * 1000)
    lines = [
        f"HTTP/{http_version} {status} {_REASONS.get(status, '')}\r\n"
        f"Content-Type: {_JSON}\r\n"
        f"Content-MD5: {md5}\r\n"
        f"{_FIXED_HEAD}"
        f"Api-Version: {api_version}\r\n"
        f"X-Api-Version: {api_version}\r\n"
        f"Request-Id: {request_id}\r\n"
        f"X-Request-Id: {request_id}\r\n"
        f"Response-Time: {elapsed}\r\n"
        f"X-Response-Time: {elapsed}\r\n"
        f"Access-Control-Allow-Methods: {spec.allow_methods}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Date: {rfc822_formatted_time()}\r\n"
    ]
    if extra:
        lines.extend(f"{name}: {value}\r\n" for name, value in extra.items())
    if not keep_alive and http_version == "1.1":
        lines.append("Connection: close\r\n")
    elif keep_alive and http_version == "1.0":
        lines.append("Connection: keep-alive\r\n")
    lines.append("\r\n")
    head_bytes = "".join(lines).encode("latin-1")
    return head_bytes if head else head_bytes + body


class SerializedResponse(web.StreamResponse):
    """A response whose bytes are ready (`serialize_response`): aiohttp writes them as
    they are, skipping its header preparation and serialization.

    Relies on aiohttp 3.14's `StreamResponse` attributes `_req`, `_payload_writer`,
    `_eof_sent`, `_body_length` and `_keep_alive`, and on `StreamWriter._write`;
    tests/api/test_hot_path.py compares its responses with aiohttp's own.
    """

    def __init__(self, status: int, data: bytes, *, keep_alive: bool):
        super().__init__(status=status)
        self._data = data
        self._keep_alive = keep_alive

    async def prepare(self, request: web.BaseRequest):
        if self._payload_writer is None and not self._eof_sent:
            self._req = request
            self._payload_writer = request._payload_writer
        return self._payload_writer

    async def write_eof(self, data: bytes = b"") -> None:
        if self._eof_sent:
            return
        writer = self._payload_writer
        writer._write(self._data)
        await writer.drain()
        self._eof_sent = True
        self._body_length = len(self._data)
        self._req = None
        self._payload_writer = None


async def _run_stages(request: web.Request, spec: RouteSpec) -> None:
    app = request.app
    if spec.versioned:
        negotiate_version(request)
    if spec.json_only:
        check_accept(request)
    settings = app[HTTP_SETTINGS]
    await check_body(request, settings.http_max_body, settings.http_header_timeout)
    if spec.authenticated:
        authenticate = app.get(AUTH_STAGE)
        if authenticate is not None:
            await authenticate(request)


def _route_error(request: web.Request, exc: web.HTTPException) -> CloudApiError:
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(method for method in ("GET", "HEAD") if method in exc.allowed_methods)
        return MethodNotAllowed(f"{request.method} is not allowed", headers={"Allow": allowed})
    return ResourceNotFound(f"{request.rel_url.raw_path} does not exist")


def _preflight(request: web.Request) -> bool:
    headers = request.headers
    return (
        request.method == hdrs.METH_OPTIONS
        and "Origin" in headers
        and headers.get("Access-Control-Request-Method", "").upper() in ("GET", "HEAD")
    )


@web.middleware
async def pipeline_middleware(request: web.Request, handler) -> web.StreamResponse:
    started = time.monotonic()
    request_id = request[REQUEST_ID] = request_id_for(request)
    # Every log line of the request carries its id. aiohttp 3.14 runs each request in a
    # task of its own with a copy of the connection's context. Clearing at the end keeps
    # what a request bound from reaching the next one even where that is not so.
    bind_contextvars(request_id=request_id)
    try:
        return await _serve_request(request, handler, started)
    finally:
        clear_contextvars()


async def _serve_request(request: web.Request, handler, started: float) -> web.StreamResponse:
    match_info = request.match_info
    route_exception = match_info.http_exception
    spec = _UNKNOWN_ROUTE
    if route_exception is None:
        spec = request.app[ROUTE_SPECS].get(match_info.route.resource.canonical, _UNKNOWN_ROUTE)
    elif isinstance(route_exception, web.HTTPMethodNotAllowed):
        spec = _METHOD_NOT_ALLOWED_ROUTE
    request[STARTED] = started
    request[ROUTE] = spec

    error: CloudApiError | None = None
    response: web.StreamResponse | None = None
    try:
        if route_exception is not None:
            if _preflight(request):
                response = build_response(request, status=200, body=b"")
            else:
                error = _route_error(request, route_exception)
        else:
            await _run_stages(request, spec)
            response = await handler(request)
    except Exception as exc:
        error = error_for_exception(request, exc)
    return finish(request, spec, started, response, error, request.app.get(REQUEST_OBSERVER))


def error_for_exception(request: web.BaseRequest, exc: Exception) -> CloudApiError:
    """Return the CloudAPI error for `exc`, and log the details the response leaves out."""
    if isinstance(exc, CloudApiError):
        return exc
    if isinstance(exc, DatabaseUnavailable):
        log.warning("database_unavailable", error=str(exc), request_id=request[REQUEST_ID])
        return ServiceUnavailable(headers={"Retry-After": "1"})
    if isinstance(exc, web.HTTPException):
        # Raised by aiohttp itself (for example a malformed body); keep its status.
        error = CloudApiError(exc.reason)
        error.status = exc.status
        error.code = "BadRequestError" if 400 <= exc.status < 500 else "InternalError"
        return error
    log.error(
        "request_failed", request_id=request[REQUEST_ID], method=request.method, path=request.path, exc_info=exc
    )
    return InternalError()


def finish(
    request: web.BaseRequest,
    spec: RouteSpec,
    started: float,
    response: web.StreamResponse | None,
    error: CloudApiError | None,
    observer: RequestObserver | None,
) -> web.StreamResponse:
    """Build the response to `error` if there is one, then pass the request to `observer`
    (the access log and metrics)."""
    if error is not None:
        response = build_response(request, status=error.status, body=error_body(error), extra=error.headers)
    if observer is not None:
        caller = request.get(CALLER)
        observer(
            request.method,
            spec,
            response.status,
            time.monotonic() - started,
            error,
            request[REQUEST_ID],
            None if caller is None else caller.login,
        )
    return response
