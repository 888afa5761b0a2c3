"""Shared fixtures: a database and broker names of this test run's own, the API on a free
loopback port, a worker, a publisher, and helpers to wait for conditions with a timeout.

Every run creates its own database (`cloudapi_test_<random>`) and its own exchange and
queue names (`test-<random>.…`), and removes them at the end, so runs never see each
other's data. Tests talk to the real Postgres and RabbitMQ of the machine, whose
addresses come from TEST_DATABASE_URL (an admin DSN, default the local cluster's
`postgres` database) and TEST_AMQP_URL.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiohttp
import asyncpg
import orjson
import pytest
import structlog

from service import logs
from service.app import LISTENER, create_app
from service.migrate import migrate
from service.settings import Settings
from workers.contract import decode
from workers.producer import EventPublisher, image_event
from workers.projector import apply_batch

from tests import log_capture
from tests.helpers import ACCOUNT_UUIDS, DEFAULT_TIMEOUT, ServiceServer, TestAccount, openssh_public

# Before any test module imports the signing helpers, so every signature is recorded.
log_capture.record_signatures()

ADMIN_DSN = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
RUN_ID = secrets.token_hex(4)



def _dsn_for(database: str) -> str:
    parts = urlsplit(ADMIN_DSN)
    return urlunsplit(parts._replace(path=f"/{database}"))


@pytest.fixture(scope="session")
def log_capture_dir(tmp_path_factory):
    """Where every log line of this run is captured (see tests/log_capture.py)."""
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session", autouse=True)
def _logging(log_capture_dir):
    logs.configure("json", "debug", cache=False)
    log_capture.start_capture(log_capture_dir)


def pytest_collection_modifyitems(items):
    """Run tests marked `last` after all others: they check what the whole run logged."""
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)


@pytest.fixture(scope="session")
async def database_url(_logging):
    """A fresh, migrated database for this test run, dropped at the end."""
    name = f"cloudapi_test_{RUN_ID}"
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = _dsn_for(name)
    await migrate(dsn)
    yield dsn
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
async def settings(database_url) -> Settings:
    """Settings of this run: its own database, exchange and queue."""
    return Settings.from_env(
        {},
        database_url=database_url,
        amqp_url=AMQP_URL,
        amqp_exchange=f"test-{RUN_ID}.images",
        amqp_queue=f"test-{RUN_ID}.images.read-model",
        http_port=8080,
        metrics_port=0,
        worker_http_port=0,
        worker_batch_wait=5.0,
        log_level="warning",
    )


@pytest.fixture(scope="session", autouse=True)
async def _broker_cleanup(settings):
    """Delete this run's exchanges and queues at the end of the session."""
    yield
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        for queue in (settings.amqp_queue, settings.dead_letter_queue):
            await channel.queue_delete(queue)
        for exchange in (settings.amqp_exchange, settings.dead_letter_exchange):
            await channel.exchange_delete(exchange)
    finally:
        await connection.close()


@pytest.fixture(scope="session")
async def db_pool(database_url):
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
async def api_server(settings):
    """The API on a free loopback port, shared by the session."""
    server = ServiceServer(create_app(settings), settings)
    await server.start_server()
    # The caches (images and keys) stay off until the change listener is connected, and
    # the hot path handles only accounts the key cache contains. Tests expect both on.
    assert await server.app[LISTENER].wait_connected(10), "the change listener did not connect"
    yield server
    await server.close()


@pytest.fixture(scope="session")
async def api(api_server) -> str:
    """The base URL of the session's API."""
    return str(api_server.make_url("")).rstrip("/")


@pytest.fixture(scope="session")
async def http():
    session = aiohttp.ClientSession(auto_decompress=False)
    yield session
    await session.close()


@pytest.fixture(scope="session")
async def publisher(settings):
    async with EventPublisher.connect(settings) as publisher:
        yield publisher


@pytest.fixture(scope="session")
async def worker(settings, publisher):
    """One worker consuming this run's queue for the whole session."""
    from workers.consumer import Worker

    instance = Worker(settings)
    await instance.start()
    task = asyncio.create_task(instance.run())
    yield instance
    instance.stop()
    await asyncio.wait_for(task, timeout=DEFAULT_TIMEOUT)


async def store_manifests(pool: asyncpg.Pool, *manifests: dict[str, Any], revision: int = 1) -> None:
    """Store manifests in the read model directly (no broker), the way the worker does."""
    events = [decode(orjson.dumps(image_event("image.updated", manifest, revision=revision))) for manifest in manifests]
    async with pool.acquire() as connection:
        await apply_batch(connection, events)


@pytest.fixture
def capture_logs():
    with structlog.testing.capture_logs() as captured:
        yield captured


@pytest.fixture(scope="session")
async def accounts(db_pool) -> dict[str, TestAccount]:
    """alice, bob and carol, plus dave (disabled), each with a key of every type."""
    from service import accounts as account_commands

    people = {login: TestAccount(login, account_uuid) for login, account_uuid in ACCOUNT_UUIDS.items()}
    async with db_pool.acquire() as connection:
        for person in people.values():
            await account_commands.add_account(connection, person.login, person.uuid)
            for name, private_key in person.keys.items():
                await account_commands.add_key(connection, person.login, openssh_public(private_key), name)
        await account_commands.set_disabled(connection, "dave", True)
    return people
