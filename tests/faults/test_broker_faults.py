"""RabbitMQ faults: a restart with events in flight, a forced close of the worker's
connection while it holds unacknowledged messages, and a worker started while the
broker is down. The broker is a private node of each test; Postgres is the steady one."""

from __future__ import annotations

import asyncio
import time

import pytest
import structlog

from tests.faults.harness import (
    assert_read_model,
    consumers,
    fault_settings,
    fresh_database,
    image_histories,
    images_locked,
    in_process_worker,
    poll,
    publish,
    queue_counts,
    until_counts,
    wait_all_logged,
    worker_blocked_on_lock,
)

pytestmark = pytest.mark.faults

# A prefetch unlike the default (512), so the check that reconnection restored it means something.
PREFETCH = 300


@pytest.mark.timeout(120)
async def test_rabbit_restart_with_events_in_flight(private_rabbit, steady_postgres):
    dsn = await fresh_database(steady_postgres)
    settings = fault_settings(dsn, private_rabbit.url(), worker_prefetch=PREFETCH, worker_batch_size=100)
    events = image_histories(250, 4, delete_every=10)
    assert len(events) == 1000

    async with in_process_worker(settings) as running:
        await poll(lambda: running.ready_is(200), message="readiness before the fault")
        # A lock on the table holds the first batch inside its transaction, so the worker
        # holds a full prefetch unacknowledged and the rest waits in the queue.
        async with images_locked(dsn):
            await publish(settings, events)
            await poll(lambda: worker_blocked_on_lock(dsn), message="a batch blocked on the lock")

            async def prefetch_full():
                counts = await queue_counts(private_rabbit, settings.amqp_queue)
                return counts["messages_unacknowledged"] == PREFETCH and counts

            counts = await poll(prefetch_full, message="a full prefetch held by the worker")
            assert counts["messages_ready"] == len(events) - PREFETCH

            await asyncio.to_thread(private_rabbit.stop)
            await poll(lambda: running.ready_is(503), message="readiness false while RabbitMQ is down")
            await asyncio.to_thread(private_rabbit.start)
            started = time.monotonic()

        async def consumer_back():
            found = await consumers(private_rabbit, settings.amqp_queue)
            return found if found else None

        found = await poll(consumer_back, timeout=30, interval=0.5, message="the consumer to come back")
        back_after = time.monotonic() - started
        assert back_after < 30
        assert [row["prefetch_count"] for row in found] == [PREFETCH]
        assert running.worker.settings.worker_prefetch == PREFETCH

        await wait_all_logged(dsn, events)
        await poll(lambda: running.ready_is(200), message="readiness after recovery")

        await until_counts(private_rabbit, settings.amqp_queue, messages_ready=0, messages_unacknowledged=0)

    await assert_read_model(dsn, events)


@pytest.mark.timeout(120)
async def test_forced_close_while_holding_unacked(private_rabbit, steady_postgres):
    dsn = await fresh_database(steady_postgres)
    settings = fault_settings(dsn, private_rabbit.url(), worker_prefetch=200, worker_batch_size=50)
    events = image_histories(50, 3)

    with structlog.testing.capture_logs() as logs:
        async with in_process_worker(settings) as running:
            await poll(lambda: running.ready_is(200), message="readiness before the fault")
            async with images_locked(dsn):
                await publish(settings, events)
                await poll(lambda: worker_blocked_on_lock(dsn), message="a batch blocked on the lock")

                async def all_held():
                    counts = await queue_counts(private_rabbit, settings.amqp_queue)
                    return counts["messages_unacknowledged"] == len(events)

                await poll(all_held, message="every event held by the worker")

                await asyncio.to_thread(private_rabbit.close_connections)

                async def reconsumed():
                    return await consumers(private_rabbit, settings.amqp_queue)

                await poll(reconsumed, timeout=30, interval=0.5, message="the consumer on a new connection")
                # The held batch commits only after the connection it came from is gone.

            await wait_all_logged(dsn, events)
            await poll(lambda: running.ready_is(200), message="readiness after recovery")

            await until_counts(private_rabbit, settings.amqp_queue, messages_ready=0, messages_unacknowledged=0)

    await assert_read_model(dsn, events)
    stale = [entry for entry in logs if entry["event"] == "stale_acks"]
    assert len(stale) == 1, stale
    assert 0 < stale[0]["count"] <= settings.worker_batch_size
    failures = [entry for entry in logs if entry["log_level"] in ("error", "critical")]
    assert failures == []


@pytest.mark.timeout(120)
async def test_worker_started_while_rabbit_down(private_rabbit, steady_postgres):
    dsn = await fresh_database(steady_postgres)
    settings = fault_settings(dsn, private_rabbit.url())
    await asyncio.to_thread(private_rabbit.stop)

    with structlog.testing.capture_logs() as logs:
        async with in_process_worker(settings) as running:

            def connect_attempts() -> int:
                return len([entry for entry in logs if entry["event"] == "broker_connect_failed"])

            await poll(lambda: connect_attempts() >= 2, timeout=20, message="two failed connection attempts")
            assert not running.task.done()
            assert await running.readiness() == 503

            # Backoff: attempts grow apart instead of looping fast.
            waits = [entry["retry_in_s"] for entry in logs if entry["event"] == "broker_connect_failed"]
            assert all(wait > 0.2 for wait in waits)

            await asyncio.to_thread(private_rabbit.start)
            await poll(lambda: running.ready_is(200), timeout=30, message="readiness once RabbitMQ is up")

            events = image_histories(20, 2)
            await publish(settings, events)
            await wait_all_logged(dsn, events)

    await assert_read_model(dsn, events)
    assert connect_attempts() < 20
