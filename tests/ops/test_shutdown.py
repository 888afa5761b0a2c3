"""Graceful shutdown of the API as a real process: SIGTERM with a request in flight, and
the parent of several processes on SIGTERM and when a child dies."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import asyncpg
import orjson

from tests.conftest import store_manifests
from tests.helpers import DEFAULT_TIMEOUT, manifest, wait_until
from tests.ops.conftest import ServiceProcess, connection_refused

# Backends of the API's pool (its application_name) that wait for a lock.
_WAITING_API_QUERIES = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database()
  AND application_name = 'cloudapi-images-api'
  AND wait_event_type = 'Lock'
"""


async def _get(http, url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    async with http.get(url, headers=headers) as response:
        return response.status, await response.read()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_sigterm_drains_request_in_flight(api_env, settings, db_pool, accounts, http):
    image = manifest()
    path = f"/my/images/{image['uuid']}"
    port = int(api_env["HTTP_PORT"])
    drain_timeout = float(api_env["HTTP_DRAIN_TIMEOUT"])
    # The held query must outlast the test's steps, so the query timeout is long.
    api = ServiceProcess("service", {**api_env, "DB_QUERY_TIMEOUT": "60"})
    # The API only reads, and a SELECT waits only for a lock that conflicts with
    # ACCESS SHARE: hold ACCESS EXCLUSIVE on images, as a migration's ALTER TABLE does.
    locker = await asyncpg.connect(settings.database_url)
    lock = locker.transaction()
    in_flight = None
    try:
        await api.wait_for_events("api_started")

        async def ready():
            return (await _get(http, f"http://127.0.0.1:{port}/readyz"))[0] == 200

        # Once the cache has filled itself, an image stored now is not in it, and the
        # request for it queries Postgres.
        await wait_until(ready, message="the API to be ready")
        await store_manifests(db_pool, image)
        await lock.start()
        await locker.execute("LOCK TABLE images IN ACCESS EXCLUSIVE MODE")
        headers = {"Request-Id": "drain-test.1", "Accept-Version": "~9", **accounts["alice"].sign("GET", path)}
        in_flight = asyncio.create_task(_get(http, f"http://127.0.0.1:{port}{path}", headers))
        await wait_until(
            lambda: _count_waiting(db_pool),
            message="the API's query to wait for the table lock",
        )

        signalled = time.monotonic()
        os.kill(api.pid, signal.SIGTERM)
        await api.wait_for_events("api_stopping")

        async def refused():
            return await asyncio.to_thread(connection_refused, port)

        await wait_until(refused, message=f"port {port} to refuse new connections")
        assert not in_flight.done()

        await lock.rollback()
        status, body = await asyncio.wait_for(in_flight, DEFAULT_TIMEOUT)
        exit_code = await api.wait_exit(timeout=drain_timeout)
        stopped_after = time.monotonic() - signalled
    finally:
        if in_flight is not None and not in_flight.done():
            in_flight.cancel()
        if locker.is_in_transaction():
            await lock.rollback()
        await locker.close()
        api.kill()

    assert status == 200
    assert orjson.loads(body)["id"] == image["uuid"]
    assert exit_code == 0
    assert stopped_after < drain_timeout
    assert len(api.events("api_stopped")) == 1
    served = [line for line in api.events("request_served") if line["route"] == "GetImage"]
    assert [(line["status"], line["request_id"]) for line in served] == [(200, "drain-test.1")]


async def _count_waiting(pool) -> bool:
    return await pool.fetchval(_WAITING_API_QUERIES) > 0


async def test_processes_stop_on_sigterm(api_env, http):
    api = ServiceProcess("service", {**api_env, "HTTP_PROCESSES": "2"})
    try:
        children = [line["pid"] for line in await api.wait_for_events("api_started", 2)]
        status, _ = await _get(http, f"http://127.0.0.1:{api_env['HTTP_PORT']}/livez")

        os.kill(api.pid, signal.SIGTERM)
        exit_code = await api.wait_exit(timeout=DEFAULT_TIMEOUT)
    finally:
        api.kill()

    assert status == 200
    assert exit_code == 0
    assert sorted(line["pid"] for line in api.events("api_stopped")) == sorted(children)
    assert not any(_alive(pid) for pid in children)
    assert [line["reason"] for line in api.events("api_processes_stopping")] == ["SIGTERM"]
    assert [line["exit_code"] for line in api.events("api_processes_stopped")] == [0]


async def test_process_death_stops_the_others(api_env):
    api = ServiceProcess("service", {**api_env, "HTTP_PROCESSES": "2"})
    try:
        children = [line["pid"] for line in await api.wait_for_events("api_started", 2)]
        victim, survivor = children

        os.kill(victim, signal.SIGKILL)
        exit_code = await api.wait_exit(timeout=DEFAULT_TIMEOUT)
    finally:
        api.kill()

    assert exit_code == 1
    unexpected = [line for line in api.events("api_process_exited") if not line["expected"]]
    assert [(line["child_pid"], line["exit_code"]) for line in unexpected] == [(victim, -signal.SIGKILL)]
    assert [line["pid"] for line in api.events("api_stopped")] == [survivor]
    assert not _alive(survivor)
    assert [line["exit_code"] for line in api.events("api_processes_stopped")] == [1]
