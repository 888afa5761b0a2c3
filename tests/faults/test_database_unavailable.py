"""With Postgres stopped, silent or rejecting the connection, the API responds 503 within
a couple of seconds, never hangs and never sends a 500. When Postgres is back, it
recovers by itself."""

import asyncio
import secrets
import socket
import time
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import orjson
import pytest

from service import accounts as account_commands
from service.app import create_app
from service.migrate import migrate
from service.settings import Settings
from tests.conftest import ADMIN_DSN, store_manifests
from tests.helpers import ServiceServer, TestAccount, manifest, openssh_public, wait_until
from tests.support.fixtures import private_postgres  # noqa: F401 (a pytest fixture)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]

UNAVAILABLE = {"code": "ServiceUnavailable", "message": "CloudAPI service is currently unavailable"}


async def _prepare(dsn: str) -> tuple[TestAccount, dict]:
    await migrate(dsn)
    person = TestAccount("paula")
    image = manifest()
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        async with pool.acquire() as connection:
            await account_commands.add_account(connection, person.login, person.uuid)
            await account_commands.add_key(connection, person.login, openssh_public(person.keys["ed25519"]), "ed25519")
        await store_manifests(pool, image)
    finally:
        await pool.close()
    return person, image


async def _get(session, base: str, person: TestAccount, image_uuid: str) -> tuple[int, dict, float]:
    path = f"/my/images/{image_uuid}"
    started = time.monotonic()
    async with session.get(base + path, headers=person.sign("GET", path, key="ed25519")) as response:
        body = orjson.loads(await response.read())
        return response.status, body, time.monotonic() - started


async def test_stopped_postgres_gives_503_then_recovers(private_postgres):
    dsn = await asyncio.to_thread(private_postgres.create_database, "images")
    person, image = await _prepare(dsn)
    settings = Settings.from_env({}, database_url=dsn, metrics_port=0, access_log=False)
    server = ServiceServer(create_app(settings), settings)
    await server.start_server()
    base = str(server.make_url("")).rstrip("/")
    try:
        async with aiohttp.ClientSession() as session:
            assert (await _get(session, base, person, image["uuid"]))[0] == 200

            await asyncio.to_thread(private_postgres.stop)

            for _ in range(3):
                status, body, seconds = await _get(session, base, person, image["uuid"])
                assert status == 503
                assert body == UNAVAILABLE
                assert seconds < 3

            await asyncio.to_thread(private_postgres.start)

            async def recovered():
                return (await _get(session, base, person, image["uuid"]))[0] == 200

            await wait_until(recovered, timeout=30, interval=0.2, message="the API to recover")
    finally:
        await server.close()


async def test_postgres_that_never_answers_gives_503_quickly():
    # A loopback port whose connections are accepted by the kernel but never answered.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    port = silent.getsockname()[1]
    dsn = f"postgresql://postgres@127.0.0.1:{port}/images"
    settings = Settings.from_env({}, database_url=dsn, metrics_port=0, access_log=False, db_connect_timeout=1.0)
    server = ServiceServer(create_app(settings), settings)
    await server.start_server()
    base = str(server.make_url("")).rstrip("/")
    person = TestAccount("quinn")
    try:
        async with aiohttp.ClientSession() as session:
            status, body, seconds = await _get(session, base, person, manifest()["uuid"])
    finally:
        await server.close()
        silent.close()

    assert status == 503
    assert body == UNAVAILABLE
    assert seconds < 3


@pytest.mark.parametrize("missing_name", ["database", "role"])
async def test_rejected_connection_gives_503(missing_name):
    # DATABASE_URL names a database or a role that the shared cluster lacks, so Postgres
    # rejects every connection (3D000 or 28000): a fault of the setup, not of the request.
    missing = f"missing_{secrets.token_hex(4)}"
    parts = urlsplit(ADMIN_DSN)
    if missing_name == "database":
        parts = parts._replace(path=f"/{missing}")
    else:
        parts = parts._replace(netloc=f"{missing}@{parts.hostname}:{parts.port or 5432}")
    settings = Settings.from_env({}, database_url=urlunsplit(parts), metrics_port=0, access_log=False)
    server = ServiceServer(create_app(settings), settings)
    await server.start_server()
    base = str(server.make_url("")).rstrip("/")
    try:
        async with aiohttp.ClientSession() as session:
            status, body, seconds = await _get(session, base, TestAccount("rita"), manifest()["uuid"])
            async with session.get(base + "/readyz") as response:
                ready = response.status
    finally:
        await server.close()

    assert status == 503
    assert body == UNAVAILABLE
    assert seconds < 3
    assert ready == 503
