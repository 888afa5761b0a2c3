"""The worker's HTTP endpoint: /livez, /readyz and /metrics on `WORKER_HTTP_PORT`.

Liveness answers without I/O, so a broker or database outage never gets the worker
killed; readiness is false without an active consumer or a reachable database, so an
orchestrator notices a worker that silently stopped consuming.
"""

from __future__ import annotations

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from workers.consumer import Worker

WORKER = web.AppKey("worker", Worker)


async def livez(request: web.Request) -> web.Response:
    """Liveness: the event loop runs. Touches neither Postgres nor RabbitMQ."""
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


async def readyz(request: web.Request) -> web.Response:
    """Readiness: an active consumer, a Postgres query done within a second, not stopping."""
    worker = request.app[WORKER]
    database = await worker.check_database()
    consumer = worker.consumer_active
    ready = database and consumer and worker.ready
    body = orjson.dumps(
        {
            "status": "ready" if ready else "not ready",
            "consumer": consumer,
            "database": database,
            "stopping": worker.stopping,
        }
    )
    return web.Response(status=200 if ready else 503, body=body, content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    # The worker sets the consumer gauge when it starts or cancels its consumer, but a
    # lost broker connection changes no gauge. So read the live state at every scrape.
    worker.metrics.consumer_active.set(1 if worker.consumer_active else 0)
    payload = generate_latest(worker.metrics.registry)
    return web.Response(body=payload, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def start_health_server(worker: Worker, host: str, port: int) -> web.AppRunner:
    """Serve the health endpoints; return the runner to clean up on exit."""
    app = web.Application()
    app[WORKER] = worker
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
