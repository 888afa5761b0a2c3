"""Assemble the aiohttp application and run it, in one or several processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket

import structlog
from aiohttp import web

from service import db, logs
from service.metrics import ApiMetrics, clear_multiprocess_dir, start_metrics_server
from service.http import (
    AUTH_STAGE,
    HTTP_SETTINGS,
    REQUEST_OBSERVER,
    ROUTE_SPECS,
    RequestObserver,
    pipeline_middleware,
)
from service.auth import stage as auth_stage
from service.auth.store import KeyStore
from service.auth.verifier import start_verifier
from service.notify import ACCOUNT_CHANNEL, IMAGE_CHANNEL, ChangeListener
from service.hotpath import HOT_PATH, HotPath
from service.protocol import make_runner
from service.routes import IMAGE_STORE, SHUTTING_DOWN, add_routes
from service.settings import Settings
from service.storage import ImageStore

log = structlog.get_logger("api")

SETTINGS = web.AppKey("settings", Settings)
POOL = web.AppKey("pool", object)
LISTENER = web.AppKey("listener", ChangeListener)
METRICS = web.AppKey("metrics", ApiMetrics)


def _access_logger(settings: Settings) -> RequestObserver:
    logger = structlog.get_logger("access")
    # In a server process the log is buffered JSON, and the line skips structlog's
    # processor chain (a tenth of a cached GetImage); elsewhere it goes through structlog.
    write_line = logs.line_writer("access")

    def observe(method: str, spec, status: int, seconds: float, error, request_id: str, login: str | None) -> None:
        fields = {
            "method": method,
            "route": spec.name,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "request_id": request_id,
        }
        if login is not None:
            fields["login"] = login
        if error is not None:
            fields["error_code"] = error.code
        if write_line is not None and status < 500:
            fields["event"] = "request_served"
            fields["level"] = "info"
            write_line(fields)
        elif status >= 500:
            logger.error("request_served", **fields)
        else:
            logger.info("request_served", **fields)

    return observe


def _request_observer(settings: Settings, metrics: ApiMetrics | None) -> RequestObserver | None:
    """Return the pipeline's per-request hook: metrics, then the access log line; or None."""
    log_access = _access_logger(settings) if settings.access_log else None
    if metrics is None:
        return log_access
    record = metrics.request_recorder()
    if log_access is None:

        def observe(method: str, spec, status: int, seconds: float, error, request_id: str, login) -> None:
            record(spec.name, method, status, seconds)

        return observe

    def observe_and_log(method: str, spec, status: int, seconds: float, error, request_id: str, login) -> None:
        record(spec.name, method, status, seconds)
        log_access(method, spec, status, seconds, error, request_id, login)

    return observe_and_log


def create_app(settings: Settings) -> web.Application:
    """Build the API application; the pool and listener start with the app.

    Metrics are recorded when `METRICS_PORT` is not 0; `serve()` or, with several
    processes, the parent process serves them.
    """
    app = web.Application(middlewares=[pipeline_middleware])
    app[SETTINGS] = settings
    app[HTTP_SETTINGS] = settings
    app[SHUTTING_DOWN] = {"value": False}
    app[ROUTE_SPECS] = add_routes(app)
    metrics = ApiMetrics() if settings.metrics_port else None
    if metrics is not None:
        app[METRICS] = metrics
    app[REQUEST_OBSERVER] = _request_observer(settings, metrics)
    app[AUTH_STAGE] = auth_stage.authenticate
    app[HOT_PATH] = HotPath(app)
    app.cleanup_ctx.append(_database_context)
    if metrics is not None and settings.http_processes > 1:
        app.cleanup_ctx.append(_sampling_context)
    return app


def begin_shutdown(app: web.Application) -> None:
    """Mark the app as stopping, so that /readyz returns 503 from now on."""
    app[SHUTTING_DOWN]["value"] = True


async def _database_context(app: web.Application):
    settings = app[SETTINGS]
    pool = await db.create_pool(
        settings.database_url,
        size=settings.db_pool_size,
        connect_timeout=settings.db_connect_timeout,
        application_name="cloudapi-images-api",
        keep_session_state=True,  # plain reads only
    )
    store = ImageStore(pool, query_timeout=settings.db_query_timeout, cache_size=settings.cache_max_images)
    keys = KeyStore(pool, query_timeout=settings.db_query_timeout)
    auth_stage.prepare()
    verifier = await start_verifier(settings.signature_checks, settings.http_processes)
    listener = ChangeListener(settings.database_url, connect_timeout=settings.db_connect_timeout)
    listener.subscribe(IMAGE_CHANNEL, store)
    listener.subscribe(ACCOUNT_CHANNEL, keys)
    listener.start()
    app[POOL] = pool
    app[IMAGE_STORE] = store
    app[auth_stage.KEY_STORE] = keys
    app[LISTENER] = listener
    app[auth_stage.VERIFIER] = verifier
    if METRICS in app:
        app[METRICS].watch(store=store, pool=pool, listener=listener)
    yield
    await listener.stop()
    await verifier.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(pool.close(), timeout=5)


async def _sampling_context(app: web.Application):
    # In a child of a multi-process API the parent reads the metric files, not this
    # process's memory, so the sampled figures must be written out periodically.
    task = asyncio.create_task(app[METRICS].sample_periodically(), name="metrics-sampler")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def serve(settings: Settings, *, sock: socket.socket | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then drain requests in flight and close the pool.

    With one process, this process also serves the metrics on `METRICS_PORT` until the
    drain has finished. With several (`sock` comes from the parent), the parent does.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    app = create_app(settings)
    runner = make_runner(app, settings)
    await runner.setup()
    metrics_runner = None
    try:
        if settings.http_processes == 1 and METRICS in app:
            metrics = app[METRICS]
            metrics_runner = await start_metrics_server(
                metrics.registry, settings.http_host, settings.metrics_port, before_scrape=metrics.sample
            )
        if sock is not None:
            site = web.SockSite(runner, sock)
        else:
            site = web.TCPSite(runner, settings.http_host, settings.http_port, backlog=1024)
        await site.start()
    except BaseException:
        # A port in use, most likely: close the pool before the error ends the process.
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await runner.cleanup()
        raise
    log.info(
        "api_started",
        host=settings.http_host,
        port=settings.http_port,
        metrics_port=settings.metrics_port if metrics_runner is not None else None,
        pid=os.getpid(),
        settings=repr(settings),
    )

    await stop.wait()

    log.info("api_stopping", drain_timeout=settings.http_drain_timeout, pid=os.getpid())
    begin_shutdown(app)
    await runner.cleanup()
    if metrics_runner is not None:
        await metrics_runner.cleanup()
    log.info("api_stopped", pid=os.getpid())
    logs.flush()


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
    logs.configure(settings.log_format, settings.log_level, buffered=True)
    _install_event_loop_policy()
    sock = _listening_socket(settings)
    asyncio.run(serve(settings, sock=sock))


def run(settings: Settings) -> int:
    """Run `settings.http_processes` API processes sharing the port; return an exit status."""
    if settings.http_processes > 1:
        from service.supervisor import supervise

        return supervise(settings, _serve_process)

    if settings.metrics_port and settings.prometheus_multiproc_dir:
        # The library writes metric files there whenever the variable is set, even for
        # one process, so the directory must exist.
        clear_multiprocess_dir(settings.prometheus_multiproc_dir)
    _install_event_loop_policy()
    asyncio.run(serve(settings))
    return 0
