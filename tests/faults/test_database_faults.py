"""Postgres faults: a restart and killed backends in the middle of a batch, a worker
started while Postgres is down, rejects its connections or its writes, a lock timeout, a
stop during an outage, and a permanent refusal of one event in a batch. Postgres is a private cluster
of each test (the steady one where nothing breaks it); RabbitMQ is the steady private
node."""

from __future__ import annotations

import asyncio
import secrets

import asyncpg
import pytest

from tests.faults.harness import (
    dead_letters,
    nothing_settled,
    publish_raw,
    queue_empty,
    assert_read_model,
    consumers,
    fault_settings,
    fresh_database,
    image_histories,
    images_locked,
    in_process_worker,
    logged_event_ids,
    poll,
    publish,
    ready_count,
    until_counts,
    wait_all_logged,
    worker_blocked_on_lock,
)
from service.migrate import migrate
from tests.helpers import manifest
from workers.producer import image_event

pytestmark = pytest.mark.faults


@pytest.mark.timeout(120)
async def test_postgres_restart_mid_batch(private_postgres, steady_rabbit):
    dsn = await fresh_database(private_postgres)
    settings = fault_settings(dsn, steady_rabbit.url(), worker_batch_size=100)
    events = image_histories(100, 3, delete_every=7)

    async with in_process_worker(settings) as running:
        await poll(lambda: running.ready_is(200), message="readiness before the fault")
        pool = running.worker._pool
        async with images_locked(dsn):
            await publish(settings, events)
            await poll(lambda: worker_blocked_on_lock(dsn), message="a batch blocked on the lock")
            # Immediate, not fast: a fast shutdown may end the lock holder's backend first,
            # so the blocked batch could commit before its own backend ends, and the worker
            # would rightly ack it. An immediate stop releases no lock.
            await asyncio.to_thread(private_postgres.stop, "immediate")

        await poll(lambda: running.ready_is(503), message="readiness false while Postgres is down")
        await nothing_settled(steady_rabbit, settings, len(events))
        # The worker stops consuming while it cannot commit.
        await poll(lambda: _no_consumer(steady_rabbit, settings), message="the consumer cancelled")

        await asyncio.to_thread(private_postgres.start)
        await wait_all_logged(dsn, events)
        await poll(lambda: running.ready_is(200), message="readiness after recovery")
        await poll(lambda: queue_empty(steady_rabbit, settings), message="every message acknowledged")
        # The same pool serves again: it replaced its broken connections by itself.
        assert running.worker._pool is pool

    await assert_read_model(dsn, events)


async def _no_consumer(rabbit, settings) -> bool:
    return await consumers(rabbit, settings.amqp_queue) == []


@pytest.mark.timeout(120)
async def test_terminated_backends_mid_batch(private_postgres, steady_rabbit):
    dsn = await fresh_database(private_postgres)
    settings = fault_settings(dsn, steady_rabbit.url(), worker_batch_size=100)
    events = image_histories(100, 3)

    async with in_process_worker(settings) as running:
        await poll(lambda: running.ready_is(200), message="readiness before the fault")
        async with images_locked(dsn):
            await publish(settings, events)
            await poll(lambda: worker_blocked_on_lock(dsn), message="a batch blocked on the lock")
            assert await logged_event_ids(dsn) == []
            await nothing_settled(steady_rabbit, settings, len(events))
            # Terminates the lock holder too, so the retried batch can commit.
            terminated = await asyncio.to_thread(private_postgres.terminate_backends)
            assert terminated >= 2

        await wait_all_logged(dsn, events)
        await poll(lambda: queue_empty(steady_rabbit, settings), message="every message acknowledged")
        await poll(lambda: running.ready_is(200), message="readiness after recovery")

    await assert_read_model(dsn, events)


@pytest.mark.timeout(120)
async def test_worker_started_while_postgres_down(private_postgres, steady_rabbit):
    dsn = await fresh_database(private_postgres)
    settings = fault_settings(dsn, steady_rabbit.url())
    await asyncio.to_thread(private_postgres.stop, "fast")
    events = image_histories(50, 2)

    async with in_process_worker(settings) as running:
        await poll(lambda: _has_consumer(steady_rabbit, settings), message="the worker to start consuming")
        assert await running.readiness() == 503
        assert not running.worker.database_ok

        await publish(settings, events)
        # The first batch fails to commit: the worker cancels its consumer and holds it.
        await poll(lambda: _no_consumer(steady_rabbit, settings), message="the consumer cancelled")
        await nothing_settled(steady_rabbit, settings, len(events))
        assert await running.readiness() == 503

        await asyncio.to_thread(private_postgres.start)
        await wait_all_logged(dsn, events)
        await poll(lambda: running.ready_is(200), message="readiness once Postgres is up")

    await assert_read_model(dsn, events)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("rejection", ["missing", "closed"])
async def test_worker_rejected_by_its_database(steady_postgres, steady_rabbit, rejection):
    """Postgres rejects the connection: the database does not exist yet (3D000), or
    accepts no connections (55000). The worker keeps its events unacknowledged, as in an
    outage, and dead-letters none of them. Once the database takes connections, every
    event is applied."""
    name = f"faults_{secrets.token_hex(4)}"
    dsn = steady_postgres.dsn(name)
    if rejection == "closed":
        await asyncio.to_thread(steady_postgres.create_database, name)
        await migrate(dsn)
        await _allow_connections(steady_postgres, name, False)
    settings = fault_settings(dsn, steady_rabbit.url())
    events = image_histories(20, 2)

    async with in_process_worker(settings) as running:
        await poll(lambda: _has_consumer(steady_rabbit, settings), message="the worker to start consuming")
        assert await running.readiness() == 503

        await _publish_and_see_held(steady_rabbit, settings, events)

        if rejection == "closed":
            await _allow_connections(steady_postgres, name, True)
        else:
            await asyncio.to_thread(steady_postgres.create_database, name)
            await migrate(dsn)
        await wait_all_logged(dsn, events)
        await poll(lambda: running.ready_is(200), message="readiness once the database takes connections")

    await _assert_applied_none_dead_lettered(dsn, settings, events)


@pytest.mark.timeout(120)
async def test_worker_on_read_only_database(steady_postgres, steady_rabbit):
    """Postgres takes the connection but rejects every write (25006), as a standby or a
    primary being demoted in a failover does. The worker keeps its events
    unacknowledged and dead-letters none. Once the database takes writes again (new
    connections, as after the failover), every event is applied."""
    dsn, name = await _database_with(steady_postgres, "default_transaction_read_only = on")
    settings = fault_settings(dsn, steady_rabbit.url())
    events = image_histories(20, 2)

    async with in_process_worker(settings) as running:
        await poll(lambda: _has_consumer(steady_rabbit, settings), message="the worker to start consuming")
        await _publish_and_see_held(steady_rabbit, settings, events)
        assert await running.readiness() == 503

        await _admin(steady_postgres, f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
        await _admin(
            steady_postgres,
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()",
        )
        await wait_all_logged(dsn, events)
        await poll(lambda: running.ready_is(200), message="readiness once the database takes writes")

    await _assert_applied_none_dead_lettered(dsn, settings, events)


@pytest.mark.timeout(120)
async def test_worker_lock_timeout_keeps_events(steady_postgres, steady_rabbit):
    """With a lock_timeout set on the database, a batch that waits for a lock held by
    another transaction fails with 55P03. The worker keeps its events unacknowledged,
    dead-letters none, and applies them once the lock is released."""
    dsn, _ = await _database_with(steady_postgres, "lock_timeout = '200ms'")
    settings = fault_settings(dsn, steady_rabbit.url())
    events = image_histories(20, 2)

    async with in_process_worker(settings) as running:
        await poll(lambda: running.ready_is(200), message="readiness before the lock")
        async with images_locked(dsn):
            await _publish_and_see_held(steady_rabbit, settings, events)
        await wait_all_logged(dsn, events)

    await _assert_applied_none_dead_lettered(dsn, settings, events)


async def _publish_and_see_held(rabbit, settings, events) -> None:
    """Publish `events` and check that the worker pauses its consumer and keeps every
    message unsettled, none of them dead-lettered."""
    await publish(settings, events)
    await poll(lambda: _no_consumer(rabbit, settings), message="the consumer cancelled")
    await nothing_settled(rabbit, settings, len(events))
    assert await dead_letters(settings) == []


async def _assert_applied_none_dead_lettered(dsn: str, settings, events) -> None:
    await assert_read_model(dsn, events)
    assert await dead_letters(settings) == []


async def _database_with(postgres, setting: str) -> tuple[str, str]:
    """Create and migrate a database whose new sessions get `setting`, and return its DSN and name."""
    dsn = await fresh_database(postgres)
    name = dsn.rsplit("/", 1)[1]
    await _admin(postgres, f'ALTER DATABASE "{name}" SET {setting}')
    return dsn, name


async def _admin(postgres, statement: str) -> None:
    admin = await asyncpg.connect(postgres.dsn())
    try:
        await admin.execute(statement)
    finally:
        await admin.close()


async def _allow_connections(postgres, name: str, allowed: bool) -> None:
    await _admin(postgres, f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS {str(allowed).lower()}')


async def _has_consumer(rabbit, settings) -> bool:
    return bool(await consumers(rabbit, settings.amqp_queue))


@pytest.mark.timeout(120)
async def test_stop_during_outage_leaves_events_queued(private_postgres, steady_rabbit):
    """A batch that holds valid and invalid events when the worker stops during an
    outage: the invalid one is dead-lettered, the valid ones stay queued (not acked)."""
    dsn = await fresh_database(private_postgres)
    settings = fault_settings(dsn, steady_rabbit.url(), worker_batch_size=10, worker_batch_wait=500.0)
    good = image_histories(5, 1)

    async with in_process_worker(settings) as running:
        await poll(lambda: running.ready_is(200), message="readiness before the fault")
        await asyncio.to_thread(private_postgres.stop, "fast")
        # Valid events first, the invalid one last: it has the batch's highest delivery tag.
        await publish(settings, good)
        await publish_raw(settings, b"{not json", "poison-last")
        await poll(lambda: _no_consumer(steady_rabbit, settings), message="the consumer cancelled")

    await until_counts(steady_rabbit, settings.amqp_queue, messages_ready=len(good), messages_unacknowledged=0)
    assert await ready_count(settings, settings.amqp_queue) == len(good)
    letters = await dead_letters(settings)
    assert [message_id for message_id, _ in letters] == ["poison-last"]

    await asyncio.to_thread(private_postgres.start)
    async with in_process_worker(settings):
        await wait_all_logged(dsn, good)
    await assert_read_model(dsn, good)


@pytest.mark.timeout(120)
async def test_database_refusal_dead_letters_one_event(steady_postgres, steady_rabbit):
    dsn = await fresh_database(steady_postgres)
    admin = await asyncpg.connect(dsn)
    try:
        # A permanent refusal of one manifest name, as a stricter schema would refuse it.
        await admin.execute(
            "ALTER TABLE images ADD CONSTRAINT images_test_refusal "
            "CHECK (manifest IS NULL OR manifest->>'name' <> 'refused-by-test')"
        )
    finally:
        await admin.close()
    batch = 20
    settings = fault_settings(dsn, steady_rabbit.url(), worker_batch_size=batch, worker_batch_wait=2000.0)
    good = image_histories(batch - 1, 1)
    refused = image_event("image.activated", manifest(name="refused-by-test"), revision=1)
    events = good[:7] + [refused] + good[7:]
    # Published before the worker starts, so they arrive together as one batch.
    await publish(settings, events)

    async with in_process_worker(settings) as running:
        await wait_all_logged(dsn, good)
        await poll(lambda: _dead_letter_count(steady_rabbit, settings), message="the refused event dead-lettered")
        assert running.worker.batches == 1
        assert await running.readiness() == 200

    await assert_read_model(dsn, good)
    letters = await dead_letters(settings)
    assert [message_id for message_id, _ in letters] == [refused["event_id"]]
    headers = letters[0][1]
    assert headers["x-rejection-reason"] == "rejected_by_database"
    assert "images_test_refusal" in headers["x-rejection-detail"]
    await poll(lambda: queue_empty(steady_rabbit, settings), message="every message settled")


async def _dead_letter_count(rabbit, settings) -> int:
    return await ready_count(settings, settings.dead_letter_queue)
