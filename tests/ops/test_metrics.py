"""Prometheus metrics scraped from the real endpoints after a few requests and events:
the API in one and in several processes, and the worker."""

from __future__ import annotations

import os
import signal

import aio_pika
import aiohttp

from tests.conftest import AMQP_URL, store_manifests
from tests.helpers import DEFAULT_TIMEOUT, manifest, wait_until
from tests.ops.conftest import ServiceProcess, free_port, sample, scrape, wait_for_value
from workers.producer import EventPublisher, image_event

REQUESTS = "cloudapi_images_http_requests_total"
DURATIONS = "cloudapi_images_http_request_duration_seconds"


async def _status(http, method: str, url: str, headers: dict[str, str] | None = None) -> int:
    async with http.request(method, url, headers=headers) as response:
        await response.read()
        return response.status


async def _ready(http, base: str) -> None:
    # Ready once the cache has filled itself; an image stored after that is not cached.
    async def ready():
        return await _status(http, "GET", base + "/readyz") == 200

    await wait_until(ready, message="the API to be ready")


async def test_api_metrics_one_process(api_env, db_pool, accounts, http):
    image = manifest()
    path = f"/my/images/{image['uuid']}"
    metrics_port = free_port()
    api = ServiceProcess("service", {**api_env, "METRICS_PORT": str(metrics_port), "DB_POOL_SIZE": "3"})
    base = f"http://127.0.0.1:{api_env['HTTP_PORT']}"
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        await api.wait_for_events("api_started")
        # The cache is used only while the change listener is connected.
        await wait_for_value(http, metrics_url, "cloudapi_images_change_listener_connected", 1)
        await _ready(http, base)
        await store_manifests(db_pool, image)

        statuses = [await _status(http, "GET", base + "/--ping") for _ in range(3)]
        for _ in range(2):
            statuses.append(await _status(http, "GET", base + path, accounts["alice"].sign("GET", path)))
        statuses.append(await _status(http, "GET", base + "/no/such/path"))
        statuses.append(await _status(http, "PROPFIND", base + "/--ping"))
        samples = await scrape(http, metrics_url)
    finally:
        api.kill()

    assert statuses == [200, 200, 200, 200, 200, 404, 405]
    assert sample(samples, REQUESTS, route="Ping", method="GET", status="200") == 3
    assert sample(samples, REQUESTS, route="GetImage", method="GET", status="200") == 2
    assert sample(samples, REQUESTS, route="unknown", method="GET", status="404") == 1
    assert sample(samples, REQUESTS, route="method_not_allowed", method="other", status="405") == 1
    assert sample(samples, DURATIONS + "_count", route="Ping", method="GET", status="200") == 3
    assert sample(samples, DURATIONS + "_bucket", route="GetImage", method="GET", status="200", le="+Inf") == 2
    assert sample(samples, "cloudapi_images_cache_lookups_total", result="miss") == 1
    assert sample(samples, "cloudapi_images_cache_lookups_total", result="hit") == 1
    # The image, and whatever the cache filled itself with from the test database.
    assert sample(samples, "cloudapi_images_cache_entries") >= 1
    assert sample(samples, "cloudapi_images_db_pool_connections", state="max") == 3
    assert sample(samples, "cloudapi_images_db_pool_connections", state="open") >= 1
    assert sample(samples, "cloudapi_images_change_listener_reconnects_total") == 0
    label_values = {value for _, labels in samples for _, value in labels}
    assert not any(image["uuid"] in value for value in label_values)


async def test_api_metrics_several_processes(api_env, db_pool, accounts, tmp_path):
    image = manifest()
    await store_manifests(db_pool, image)
    path = f"/my/images/{image['uuid']}"
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    stale = metrics_dir / "counter_1.db"
    stale.write_bytes(b"left by an earlier run")
    metrics_port = free_port()
    env = {
        **api_env,
        "HTTP_PROCESSES": "2",
        "METRICS_PORT": str(metrics_port),
        "DB_POOL_SIZE": "3",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    api = ServiceProcess("service", env)
    base = f"http://127.0.0.1:{api_env['HTTP_PORT']}"
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    # A connection per request, so that the kernel spreads them over both processes.
    fresh = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
    try:
        await api.wait_for_events("api_started", 2)
        stale_removed = not stale.exists()

        async def both_listening():
            # The pool maximum sums to 6 only once both processes have written their
            # figures, so the minimum of their listener states then covers both.
            samples = await scrape(fresh, metrics_url)
            return (
                sample(samples, "cloudapi_images_db_pool_connections", state="max") == 6
                and sample(samples, "cloudapi_images_change_listener_connected") == 1
            )

        await wait_until(both_listening, message="both processes to report a connected change listener")

        statuses = [await _status(fresh, "GET", base + "/--ping") for _ in range(20)]
        for _ in range(4):
            statuses.append(await _status(fresh, "GET", base + path, accounts["alice"].sign("GET", path)))
        # Request counters are written at once; the cache and pool figures every second.
        await wait_for_value(fresh, metrics_url, REQUESTS, 20, route="Ping", method="GET", status="200")

        async def all_lookups_sampled():
            samples = await scrape(fresh, metrics_url)
            hits = sample(samples, "cloudapi_images_cache_lookups_total", result="hit") or 0
            misses = sample(samples, "cloudapi_images_cache_lookups_total", result="miss") or 0
            return hits + misses == 4

        await wait_until(all_lookups_sampled, message="4 cache lookups in the aggregate")
        samples = await scrape(fresh, metrics_url)

        os.kill(api.pid, signal.SIGTERM)
        exit_code = await api.wait_exit(timeout=DEFAULT_TIMEOUT)
    finally:
        await fresh.close()
        api.kill()

    assert stale_removed
    assert statuses == [200] * 24
    assert sample(samples, REQUESTS, route="GetImage", method="GET", status="200") == 4
    assert sample(samples, DURATIONS + "_count", route="Ping", method="GET", status="200") == 20
    assert sample(samples, "cloudapi_images_change_listener_connected") == 1
    assert sample(samples, "cloudapi_images_cache_entries") >= 1
    assert exit_code == 0
    assert list(metrics_dir.glob("*.db")), "the configured directory keeps its files for inspection"


async def test_worker_metrics(running_worker, broker_settings, http):
    _, metrics_url = running_worker
    images = [manifest() for _ in range(3)]
    async with EventPublisher.connect(broker_settings) as publisher:
        for image in images:
            await publisher.publish(image_event("image.activated", image, revision=1))
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(broker_settings.amqp_exchange)
        await exchange.publish(aio_pika.Message(b"not json"), routing_key="image.activated")
    finally:
        await connection.close()

    await wait_for_value(http, metrics_url, "cloudapi_images_events_total", 3, type="image.activated", outcome="applied")
    samples = await wait_for_value(http, metrics_url, "cloudapi_images_events_total", 1, type="unknown", outcome="invalid")

    assert sample(samples, "cloudapi_images_events_dead_lettered_total", reason="not_json") == 1
    assert sample(samples, "cloudapi_images_event_lag_seconds_count") == 3
    assert sample(samples, "cloudapi_images_batch_size_sum") == 4
    assert sample(samples, "cloudapi_images_batch_apply_seconds_count") >= 1
    assert sample(samples, "cloudapi_images_worker_consumer_active") == 1
    assert sample(samples, "cloudapi_images_worker_database_available") == 1
    assert sample(samples, "cloudapi_images_db_pool_connections", state="max") == 4
    assert sample(samples, "cloudapi_images_db_pool_connections", state="open") >= 1
