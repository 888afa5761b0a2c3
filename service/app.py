"""Assemble the aiohttp application and run it, in one or several processes."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import socket
import sys

import structlog
from aiohttp import web

from service import db, logs
from service.http import (
    AUTH_STAGE,
    CALLER,
    HTTP_SETTINGS,
    REQUEST_ID,
    REQUEST_OBSERVER,
    ROUTE_SPECS,
    pipeline_middleware,
)
from service.auth import stage as auth_stage
from service.auth.store import KeyStore
from service.notify import ACCOUNT_CHANNEL, IMAGE_CHANNEL, ChangeListener
from service.protocol import make_runner
from service.routes import IMAGE_STORE, SHUTTING_DOWN, add_routes
from service.settings import Settings
from service.storage import ImageStore

log = structlog.get_logger("api")

SETTINGS = web.AppKey("settings", Settings)
POOL = web.AppKey("pool", object)
LISTENER = web.AppKey("listener", ChangeListener)


def _access_logger(settings: Settings):
    logger = structlog.get_logger("access")

    def observe(request: web.Request, spec, status: int, seconds: float, error) -> None:
        if not settings.access_log:
            return
        caller = request.get(CALLER)
        fields = {
            "method": request.method,
            "route": spec.name,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "request_id": request[REQUEST_ID],
        }
        if caller is not None:
            fields["login"] = caller.login
        if error is not None:
            fields["error_code"] = error.code
        if status >= 500:
            logger.error("request_served", **fields)
        else:
            logger.info("request_served", **fields)

    return observe


def create_app(settings: Settings) -> web.Application:
    """Build the API application; the pool and listener start with the app."""
    app = web.Application(middlewares=[pipeline_middleware])
    app[SETTINGS] = settings
    app[HTTP_SETTINGS] = settings
    app[SHUTTING_DOWN] = {"value": False}
    app[ROUTE_SPECS] = add_routes(app)
    app[REQUEST_OBSERVER] = _access_logger(settings)
    app[AUTH_STAGE] = auth_stage.authenticate
    app.cleanup_ctx.append(_database_context)
    return app


async def _database_context(app: web.Application):
    settings = app[SETTINGS]
    pool = await db.create_pool(
        settings.database_url,
        size=settings.db_pool_size,
        connect_timeout=settings.db_connect_timeout,
        application_name="cloudapi-images-api",
    )
    store = ImageStore(pool, query_timeout=settings.db_query_timeout, cache_size=settings.cache_max_images)
    keys = KeyStore(pool, query_timeout=settings.db_query_timeout)
    auth_stage.prepare()
    listener = ChangeListener(settings.database_url, connect_timeout=settings.db_connect_timeout)
    listener.subscribe(IMAGE_CHANNEL, store)
    listener.subscribe(ACCOUNT_CHANNEL, keys)
    listener.start()
    app[POOL] = pool
    app[IMAGE_STORE] = store
    app[auth_stage.KEY_STORE] = keys
    app[LISTENER] = listener
    yield
    await listener.stop()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(pool.close(), timeout=5)


async def serve(settings: Settings, *, sock: socket.socket | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then drain requests in flight and close the pool."""
    app = create_app(settings)
    runner = make_runner(app, settings)
    await runner.setup()
    if sock is not None:
        site = web.SockSite(runner, sock)
    else:
        site = web.TCPSite(runner, settings.http_host, settings.http_port, backlog=1024)
    await site.start()
    log.info(
        "api_started",
        host=settings.http_host,
        port=settings.http_port,
        pid=os.getpid(),
        settings=repr(settings),
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()

    log.info("api_stopping", drain_timeout=settings.http_drain_timeout, pid=os.getpid())
    app[SHUTTING_DOWN]["value"] = True
    await runner.cleanup()
    log.info("api_stopped", pid=os.getpid())


def _listening_socket(settings: Settings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.http_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((settings.http_host, settings.http_port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _install_event_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _serve_process(settings: Settings) -> None:
    logs.configure(settings.log_format, settings.log_level)
    _install_event_loop_policy()
    sock = _listening_socket(settings)
    asyncio.run(serve(settings, sock=sock))


def run(settings: Settings) -> int:
    """Run `settings.http_processes` API processes sharing the port; return an exit status."""
    if settings.http_processes == 1:
        _install_event_loop_policy()
        asyncio.run(serve(settings))
        return 0

    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(target=_serve_process, args=(settings,), name=f"api-{index}")
        for index in range(settings.http_processes)
    ]
    for child in children:
        child.start()

    def forward(signum, _frame):
        for child in children:
            if child.is_alive():
                os.kill(child.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    for child in children:
        child.join()
        if child.exitcode not in (0, -signal.SIGTERM, -signal.SIGINT):
            status = 1
    sys.stdout.flush()
    return status
