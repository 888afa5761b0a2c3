"""HTTP handlers. They take values from the path, call storage and return a response.
Every failure is raised as a `CloudApiError`, which the pipeline turns into a response."""

from __future__ import annotations

import re
from importlib import resources

import orjson
from aiohttp import web

from service.errors import NotAuthorized, ResourceNotFound, ServiceUnavailable, DatabaseUnavailable
from service.http import API_VERSION, CALLER, RouteSpec, build_response
from service.storage import ImageStore
from service.images import Rendering
from service.versions import SUPPORTED_VERSIONS, rendering_for

IMAGE_STORE = web.AppKey("image_store", ImageStore)
SHUTTING_DOWN = web.AppKey("shutting_down", dict)

# IMGAPI's UUID pattern: lower case only, so an upper-case id is "malformed", as in CloudAPI.
_IMAGE_ID = re.compile(r"^[a-f0-9]{8}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{12}$")

_PING_BODY = orjson.dumps({"ping": "pong", "cloudapi": {"versions": list(SUPPORTED_VERSIONS)}})
_READINESS_TIMEOUT = 1.0  # seconds the database check of /readyz may take

ROUTES: dict[str, RouteSpec] = {
    "/{login}/images/{id}": RouteSpec(name="GetImage", authenticated=True),
    "/--ping": RouteSpec(name="Ping"),
    "/livez": RouteSpec(name="livez", versioned=False, json_only=False),
    "/readyz": RouteSpec(name="readyz", versioned=False, json_only=False),
    "/openapi.yaml": RouteSpec(name="openapi", versioned=False, json_only=False),
}


def _check_login(caller, method: str, raw_path: str, login: str) -> None:
    """Allow `my`, the caller's login and the caller's UUID; refuse every other login.

    The refusal comes before any lookup, whether or not `login` exists, so it reveals
    nothing about other accounts or their images.
    """
    if caller is None:
        return
    if login == "my" or login == caller.login or login == caller.uuid:
        return
    action = "headimage" if method == "HEAD" else "getimage"
    raise NotAuthorized(f"You do not have permission to access {raw_path} ({action})")


async def get_image(request: web.Request) -> web.Response:
    """GetImage and HeadImage: `GET /:login/images/:id`."""
    match_info = request.match_info
    body, md5 = await find_answer(
        request.app[IMAGE_STORE],
        request.get(CALLER),
        request.method,
        request.rel_url.raw_path,
        match_info["login"],
        match_info["id"],
        rendering_for(request[API_VERSION]),
    )
    return build_response(request, status=200, body=body, md5=md5)


async def find_answer(
    store: ImageStore, caller, method: str, raw_path: str, login: str, image_id: str, rendering: Rendering
) -> tuple[bytes, str]:
    """Return the body of GetImage and its Content-MD5, or raise the CloudAPI error.

    `caller` is the authenticated account (None when authentication is off). Shared by
    the route above and the hot path (service.hotpath), which calls it without
    aiohttp's router.
    """
    _check_login(caller, method, raw_path, login)
    if not _IMAGE_ID.match(image_id):
        raise ResourceNotFound(f"{image_id} not found")
    entry = await store.get(image_id, rendering)
    if entry is None or not store.visible_to(entry, None if caller is None else caller.uuid):
        # Hidden and missing images get the same response, so a stranger learns nothing.
        raise ResourceNotFound(f"image {image_id} not found")
    return store.answer(entry)


async def ping(request: web.Request) -> web.Response:
    """`GET /--ping`: no authentication, no database."""
    return build_response(request, status=200, body=_PING_BODY)


async def livez(request: web.Request) -> web.Response:
    """Liveness: the event loop runs. Touches neither Postgres nor RabbitMQ."""
    return build_response(request, status=200, body=b'{"status":"ok"}')


async def readyz(request: web.Request) -> web.Response:
    """Report readiness: not shutting down, and Postgres responds within a second."""
    if request.app[SHUTTING_DOWN]["value"]:
        raise ServiceUnavailable("shutting down")
    if request.app[IMAGE_STORE].warming_up:
        raise ServiceUnavailable("filling the image cache")
    try:
        await request.app[IMAGE_STORE].ping(_READINESS_TIMEOUT)
    except DatabaseUnavailable:
        raise ServiceUnavailable("database unavailable") from None
    return build_response(request, status=200, body=b'{"status":"ready"}')


_OPENAPI = None


async def openapi(request: web.Request) -> web.Response:
    """Return the OpenAPI document of this service."""
    global _OPENAPI
    if _OPENAPI is None:
        _OPENAPI = resources.files("service").joinpath("openapi.yaml").read_bytes()
    return build_response(request, status=200, body=_OPENAPI, content_type="application/yaml")


def add_routes(app: web.Application) -> dict[str, RouteSpec]:
    """Register every route and return the pipeline's table of route specs."""
    app.router.add_get("/{login}/images/{id}", get_image)
    app.router.add_get("/--ping", ping)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/openapi.yaml", openapi)
    return dict(ROUTES)
