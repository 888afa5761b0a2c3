"""The hot path: GetImage handled below aiohttp's router and middleware.

Nearly every request the API gets is a GetImage signed by a CLI. aiohttp's Application
adds a router lookup, a middleware chain and a copy of the request to each one. That
costs about a quarter of the requests per second the bare stack serves
(docs/benchmarks.md). So the connection layer (`service.protocol`) offers every request
to `HotPath` first, which handles it when it is an ordinary GetImage:

- GET or HEAD of `/LOGIN/images/ID`, without query, percent escapes, body or `Expect`;
- with a version range and an Accept header the API can serve;
- signed in the form the CLIs use (see `parse_client_form`), by an account the key cache contains.

Anything else goes unchanged to the application, whose pipeline (`service.http`)
remains the reference. The hot path decides before any work a client could notice: no
signature checked, nothing logged. From the signature check on, it finishes the request
itself, errors included, with the same functions as the pipeline (`verify`,
`find_answer`, `error_for_exception`). Its responses are written by
`serialize_response`, with the header set of `make_response`, which skips aiohttp's
header preparation. So both paths send the same responses and log the same lines;
tests/api/test_hot_path.py sends requests both ways and compares them.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web
from structlog.contextvars import bind_contextvars, clear_contextvars

from service.auth import stage as auth_stage
from service.auth.signature import parse_client_form
from service.auth.store import UNKNOWN
from service.errors import CloudApiError
from service.http import (
    AUTH_STAGE,
    REQUEST_ID,
    REQUEST_OBSERVER,
    ROUTE_SPECS,
    _accepts_json,
    SerializedResponse,
    content_md5,
    error_body,
    error_for_exception,
    request_id_for,
    serialize_response,
)
from service.routes import IMAGE_STORE, find_answer
from service.versions import negotiate, rendering_for, requested_range

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

HOT_PATH = web.AppKey("hot_path", "HotPath")

_ROUTE = "/{login}/images/{id}"
_METHODS = frozenset({hdrs.METH_GET, hdrs.METH_HEAD})


class HotPath:
    """The connection layer's request handler: GetImage here, the rest to the application.

    `create_app` makes one per application; the runner of `service.protocol` installs it.
    """

    def __init__(self, app: web.Application):
        self._app = app
        self._fallback: Handler | None = None
        self._ready = False
        # Requests handled here, and passed to the application; read by the tests.
        self.answered = 0
        self.declined = 0

    def handler(self, fallback: Handler) -> Handler:
        """Return the connection layer's request handler, which passes to `fallback`
        (the application's own handler) every request it does not handle."""
        self._fallback = fallback
        return self

    def _bind(self) -> bool:
        # The stores exist once the application has started, before the first request.
        app = self._app
        if app.get(AUTH_STAGE) is not auth_stage.authenticate or IMAGE_STORE not in app:
            return False
        self._spec = app[ROUTE_SPECS][_ROUTE]
        self._keys = app[auth_stage.KEY_STORE]
        self._images = app[IMAGE_STORE]
        self._observer = app.get(REQUEST_OBSERVER)
        self._verifier = app.get(auth_stage.VERIFIER)
        self._ready = True
        return True

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.monotonic()
        try:
            claim = self._claim(request)
        except Exception:
            # Whatever failed here fails again in the pipeline, which responds to it.
            claim = None
        if claim is None:
            self.declined += 1
            return await self._fallback(request)
        self.answered += 1
        version, credentials, account, key_reference, login_in_path, image_id = claim
        method = request.method

        # From here on this method responds itself: every Exception becomes an error response.
        request_id = request_id_for(request)
        bind_contextvars(request_id=request_id)
        login = error = extra = None
        try:
            caller = await auth_stage.verify(
                credentials, None if account is UNKNOWN else account, key_reference, self._verifier
            )
            login = caller.login
            body, md5 = await find_answer(
                self._images, caller, method, request.raw_path, login_in_path, image_id, rendering_for(version)
            )
            status = 200
        except Exception as exc:
            request[REQUEST_ID] = request_id
            error = error_for_exception(request, exc)
            status, body, md5, extra = error.status, error_body(error), None, error.headers
        finally:
            clear_contextvars()
        version_info = request.version
        response = SerializedResponse(
            status,
            serialize_response(
                status,
                body,
                md5 if md5 is not None else content_md5(body),
                head=method == hdrs.METH_HEAD,
                http_version=f"{version_info.major}.{version_info.minor}",
                keep_alive=request.keep_alive,
                request_id=request_id,
                api_version=version,
                spec=self._spec,
                started=started,
                extra=extra,
            ),
            keep_alive=request.keep_alive,
        )
        if self._observer is not None:
            self._observer(method, self._spec, status, time.monotonic() - started, error, request_id, login)
        return response

    def _claim(self, request: web.BaseRequest) -> tuple | None:
        """Return what the hot path needs to handle `request`, or None to pass it to
        the application. Checks no signature and logs nothing."""
        if request.method not in _METHODS or (not self._ready and not self._bind()):
            return None
        path = request.raw_path
        parts = path.split("/")
        if (
            len(parts) != 4
            or parts[2] != "images"
            or not parts[1]
            or not parts[3]
            or "%" in path
            or "?" in path
            or "{" in path
            or "}" in path
            or request.body_exists
        ):
            return None

        headers = request.headers
        version = negotiate(requested_range(headers))
        accept = headers.get(hdrs.ACCEPT)
        if (
            version is None
            or (accept is not None and accept.strip() and not _accepts_json(accept))
            or hdrs.EXPECT in headers
        ):
            return None

        credentials = parse_client_form(
            headers.get(hdrs.AUTHORIZATION, ""), auth_stage.request_view(request), time.time()
        )
        if credentials is None:
            return None
        try:
            account_reference, key_reference = auth_stage.parse_key_id(credentials.key_id)
        except CloudApiError:
            return None
        account = self._keys.cached(account_reference)
        if account is None:
            return None
        return version, credentials, account, key_reference, parts[1], parts[3]
