"""A schema migration applied while the API serves requests and a worker applies events.

The migration adds a column to `images` and changes the result type of one cached
statement on each side: `images.state` becomes varchar (the API's `get_image` returns
it), and `apply_events` is replaced by a function that returns text arrays instead of
UUID arrays (the worker's `apply_events` statement returns them). Postgres then refuses
every prepared copy of those statements once with "cached plan must not change result
type" (asyncpg's InvalidCachedStatementError). asyncpg prepares the statement again and
retries by itself outside a transaction, which covers the API and the worker's batches
of image events. A batch with an account event runs in a transaction, where asyncpg
cannot retry: the worker retries the batch at once, without pausing its consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import aiohttp
import asyncpg
import pytest
import structlog

from service import accounts as account_commands
from service import db
from service.app import create_app
from tests.faults.harness import (
    assert_read_model,
    dead_letters,
    fault_settings,
    fresh_database,
    image_histories,
    in_process_worker,
    poll,
    publish,
    wait_all_logged,
)
from tests.helpers import ServiceServer, TestAccount, openssh_public
from workers.producer import account_event

pytestmark = pytest.mark.faults

TEST_MIGRATION = """
ALTER TABLE images ADD COLUMN size_bytes bigint;
ALTER TABLE images ALTER COLUMN state TYPE varchar(64);
ALTER FUNCTION apply_events RENAME TO apply_events_before;
CREATE FUNCTION apply_events(uuid[], bigint[], text[], boolean[], text[], text[], text[], uuid[], timestamptz[],
                             uuid[], text[], uuid[], bigint[], timestamptz[], text[], text[], boolean[],
                             OUT changed text[], OUT recorded text[])
LANGUAGE sql AS $$
    SELECT changed::text[], recorded::text[]
    FROM apply_events_before($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
$$;
"""

CACHED_PLAN_ERROR = "cached plan must not change result type"
WRITE_QUERIES = db.load_queries("write.sql")


class _Rollback(Exception):
    pass


async def prepare_on_every_connection(pool: asyncpg.Pool, query: str, *arguments) -> None:
    """Run `query` in a rolled-back transaction on every connection the pool may open, so
    each has it in its statement cache, as in a worker that has run for a while."""
    connections = [await pool.acquire() for _ in range(pool.get_max_size())]
    try:
        for connection in connections:
            with contextlib.suppress(_Rollback):
                async with connection.transaction():
                    await connection.fetch(query, *arguments)
                    raise _Rollback
    finally:
        for connection in connections:
            await pool.release(connection)


async def account_applied(dsn: str, account_uuid: str) -> bool:
    connection = await asyncpg.connect(dsn)
    try:
        return await connection.fetchval("SELECT count(*) FROM accounts WHERE uuid = $1::uuid", account_uuid) == 1
    finally:
        await connection.close()


@pytest.mark.timeout(120)
async def test_migration_while_serving(steady_postgres, steady_rabbit):
    dsn = await fresh_database(steady_postgres)
    # No image cache, so that every request runs the API's prepared statement.
    settings = fault_settings(dsn, steady_rabbit.url(), cache_max_images=0)
    reader = TestAccount("reader")
    reader.keys = {"ed25519": reader.keys["ed25519"]}
    connection = await asyncpg.connect(dsn)
    try:
        await account_commands.add_account(connection, reader.login, reader.uuid)
        await account_commands.add_key(connection, reader.login, openssh_public(reader.keys["ed25519"]), "ed25519")
    finally:
        await connection.close()

    newcomer = account_event("account.upserted", str(uuid.uuid4()), revision=1, login="newcomer", disabled=False)
    before = image_histories(40, 1)
    after = image_histories(40, 1)
    image_uuids = [event["image_uuid"] for event in before]
    statuses: list[int] = []
    server = ServiceServer(create_app(settings), settings)
    await server.start_server()
    http = aiohttp.ClientSession()
    stop_load = asyncio.Event()

    readiness: list[int] = []

    async def watch_readiness(running) -> None:
        while not stop_load.is_set():
            readiness.append(await running.readiness())
            await asyncio.sleep(0.05)

    async def load() -> None:
        index = 0
        while not stop_load.is_set():
            path = f"/my/images/{image_uuids[index % len(image_uuids)]}"
            headers = {"Accept-Version": "~9", **reader.sign("GET", path, key="ed25519")}
            async with http.get(str(server.make_url(path)), headers=headers) as response:
                await response.read()
                statuses.append(response.status)
            index += 1

    try:
        with structlog.testing.capture_logs() as logs:
            async with in_process_worker(settings) as running:
                await publish(settings, before)
                await wait_all_logged(dsn, before)
                await poll(lambda: running.ready_is(200), message="readiness before the migration")
                loaders = [asyncio.create_task(load()) for _ in range(4)]
                loaders.append(asyncio.create_task(watch_readiness(running)))
                try:
                    await poll(lambda: len(statuses) >= 100, message="requests before the migration")
                    # Without this, a batch after the migration could run on a connection
                    # that never prepared the statement, and meet no fault.
                    await prepare_on_every_connection(running.worker._pool, WRITE_QUERIES["apply_events"], *([[]] * 17))
                    log_offset = steady_postgres.log_path.stat().st_size
                    served_before = len(statuses)

                    admin = await asyncpg.connect(dsn)
                    try:
                        async with admin.transaction():
                            await admin.execute(TEST_MIGRATION)
                    finally:
                        await admin.close()
                    migrated_at = time.monotonic()

                    # First a batch in a transaction (an account event), then image batches.
                    await publish(settings, [newcomer])
                    await poll(lambda: account_applied(dsn, newcomer["account_uuid"]), message="the account event")
                    await publish(settings, after)
                    await wait_all_logged(dsn, before + after)
                    await poll(lambda: len(statuses) >= served_before + 200, message="requests after the migration")
                finally:
                    stop_load.set()
                    for task in loaders:
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
    finally:
        await http.close()
        await server.close()

    assert time.monotonic() - migrated_at < 60
    assert set(statuses) == {200}, {status: statuses.count(status) for status in set(statuses)}
    await assert_read_model(dsn, before + after)

    # The fault was hit on both sides: each refused its cached statement at least once.
    server_log = steady_postgres.log_path.read_bytes()[log_offset:].decode(errors="replace")
    refused = [line for line in server_log.splitlines() if CACHED_PLAN_ERROR in line]
    for application in ("cloudapi-images-api", "cloudapi-images-worker"):
        assert any(f" {application} " in line for line in refused), server_log[-2000:]
    # The worker retried the account batch at once: no outage, no pause, readiness true throughout.
    assert [entry for entry in logs if entry["event"] == "statement_cache_invalidated"]
    assert [entry for entry in logs if entry["event"] == "database_unavailable"] == []
    assert [entry for entry in logs if entry["log_level"] in ("error", "critical")] == []
    assert set(readiness) == {200}


@pytest.mark.timeout(120)
async def test_worker_waits_for_missing_migration(steady_postgres, steady_rabbit):
    """A worker of a new release that starts before the migrations Job finishes holds its
    events and retries, instead of dead-lettering them."""
    dsn = await fresh_database(steady_postgres)
    settings = fault_settings(dsn, steady_rabbit.url())
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute("ALTER FUNCTION apply_events RENAME TO apply_events_later")
    finally:
        await admin.close()

    events = image_histories(20, 1)
    with structlog.testing.capture_logs() as logs:
        async with in_process_worker(settings) as running:
            await publish(settings, events)
            # Readiness is 503 while the worker starts too, so the log line comes first.
            await poll(
                lambda: any(entry["event"] == "database_unavailable" for entry in logs),
                message="database_unavailable logged while the function is missing",
            )
            await poll(lambda: running.ready_is(503), message="readiness 503 while the function is missing")
            unavailable = [entry for entry in logs if entry["event"] == "database_unavailable"]
            assert unavailable
            assert "UndefinedFunctionError" in unavailable[0]["error"]

            admin = await asyncpg.connect(dsn)
            try:
                await admin.execute("ALTER FUNCTION apply_events_later RENAME TO apply_events")
            finally:
                await admin.close()
            await wait_all_logged(dsn, events)
            await poll(lambda: running.ready_is(200), message="readiness 200 once the function exists")

    await assert_read_model(dsn, events)
    assert await dead_letters(settings) == []
    assert [entry for entry in logs if entry["event"] == "event_rejected"] == []
