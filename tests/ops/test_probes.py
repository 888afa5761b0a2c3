"""/livez and /readyz of the API and of the worker in each state: starting, ready,
database down, shutting down. Liveness never depends on Postgres or RabbitMQ.

"Database down" points DATABASE_URL at a closed loopback port; the shared Postgres is
never stopped.
"""

from __future__ import annotations

import asyncio
import dataclasses

import orjson
import pytest

from service.app import begin_shutdown, create_app
from tests.helpers import DEFAULT_TIMEOUT, ServiceServer
from tests.ops.conftest import CLOSED_DATABASE_URL, ServiceProcess, free_port
from workers.consumer import Worker
from workers.health import start_health_server


async def _probe(http, url: str) -> tuple[int, dict]:
    async with http.get(url) as response:
        return response.status, orjson.loads(await response.read())


@pytest.fixture
async def api_server():
    """Start `create_app(settings)` on a free loopback port; yields (app, base URL)."""
    servers = []

    async def start(settings):
        app = create_app(settings)
        server = ServiceServer(app, settings)
        await server.start_server()
        servers.append(server)
        return app, str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


# The API.


async def test_api_probes_ready(api_server, settings, http):
    _, url = await api_server(settings)

    live = await _probe(http, url + "/livez")
    ready = await _probe(http, url + "/readyz")

    assert live == (200, {"status": "ok"})
    assert ready == (200, {"status": "ready"})


async def test_api_probes_database_down(api_server, settings, http):
    _, url = await api_server(dataclasses.replace(settings, database_url=CLOSED_DATABASE_URL))

    live = await _probe(http, url + "/livez")
    ready = await _probe(http, url + "/readyz")

    assert live == (200, {"status": "ok"})
    assert ready == (503, {"code": "ServiceUnavailable", "message": "database unavailable"})


async def test_api_probes_shutting_down(api_server, settings, http):
    app, url = await api_server(settings)
    assert (await _probe(http, url + "/readyz"))[0] == 200

    begin_shutdown(app)
    live = await _probe(http, url + "/livez")
    ready = await _probe(http, url + "/readyz")

    assert live == (200, {"status": "ok"})
    assert ready == (503, {"code": "ServiceUnavailable", "message": "shutting down"})


async def test_api_starts_without_database(api_env, http):
    """Starting: the pool has no connection and the change listener never connects, yet
    the API listens and is live, and readiness reports why it is not ready."""
    api = ServiceProcess("service", {**api_env, "DATABASE_URL": CLOSED_DATABASE_URL})
    url = f"http://127.0.0.1:{api_env['HTTP_PORT']}"
    try:
        await api.wait_for_events("api_started")

        live = await _probe(http, url + "/livez")
        ready = await _probe(http, url + "/readyz")

        assert live == (200, {"status": "ok"})
        assert ready == (503, {"code": "ServiceUnavailable", "message": "database unavailable"})
        assert api.events("listener_connected") == []
    finally:
        api.kill()


# The worker.


@pytest.fixture
async def worker_probe():
    """Serve a worker's health endpoint on a free loopback port; yields a start function."""
    runners = []

    async def start(worker: Worker) -> str:
        port = free_port()
        runners.append(await start_health_server(worker, "127.0.0.1", port))
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def _stop(worker: Worker) -> None:
    worker.stop()
    await asyncio.wait_for(worker.run(), timeout=DEFAULT_TIMEOUT)


async def test_worker_probes_starting(worker_probe, broker_settings, http):
    worker = Worker(broker_settings)
    url = await worker_probe(worker)

    live = await _probe(http, url + "/livez")
    ready = await _probe(http, url + "/readyz")

    assert live == (200, {"status": "ok"})
    assert ready == (503, {"status": "not ready", "consumer": False, "database": False, "stopping": False})


async def test_worker_probes_ready(worker_probe, broker_settings, http):
    worker = Worker(broker_settings)
    url = await worker_probe(worker)
    await worker.start()
    try:
        live = await _probe(http, url + "/livez")
        ready = await _probe(http, url + "/readyz")

        assert live == (200, {"status": "ok"})
        assert ready == (200, {"status": "ready", "consumer": True, "database": True, "stopping": False})
    finally:
        await _stop(worker)


async def test_worker_probes_database_down(worker_probe, broker_settings, http):
    worker = Worker(dataclasses.replace(broker_settings, database_url=CLOSED_DATABASE_URL))
    url = await worker_probe(worker)
    await worker.start()
    try:
        live = await _probe(http, url + "/livez")
        ready = await _probe(http, url + "/readyz")

        assert live == (200, {"status": "ok"})
        assert ready == (503, {"status": "not ready", "consumer": True, "database": False, "stopping": False})
    finally:
        await _stop(worker)


async def test_worker_probes_shutting_down(worker_probe, broker_settings, http):
    worker = Worker(broker_settings)
    url = await worker_probe(worker)
    await worker.start()
    try:
        worker.stop()
        live = await _probe(http, url + "/livez")
        stopping = await _probe(http, url + "/readyz")
    finally:
        await asyncio.wait_for(worker.run(), timeout=DEFAULT_TIMEOUT)
    stopped = await _probe(http, url + "/readyz")

    assert live == (200, {"status": "ok"})
    # stop() cancels the consumer first, so readiness is already false for two reasons.
    assert stopping == (503, {"status": "not ready", "consumer": False, "database": True, "stopping": True})
    assert stopped[0] == 503
    assert stopped[1]["consumer"] is False

