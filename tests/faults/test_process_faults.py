"""Faults of the worker process itself, run as `python -m workers`: SIGKILL between
commit and ack, SIGTERM with events queued and a batch in flight (also while RabbitMQ
is down), a message that crashes every worker that takes it, and poison messages."""

from __future__ import annotations

import asyncio
import signal
import time

import orjson
import pytest

from tests.faults.harness import (
    WorkerProcess,
    assert_read_model,
    consumers,
    dead_letters,
    fault_settings,
    fresh_database,
    image_histories,
    images_locked,
    logged_event_ids,
    nothing_settled,
    poll,
    publish,
    publish_raw,
    queue_empty,
    ready_count,
    wait_all_logged,
    worker_blocked_on_lock,
)
from tests.helpers import manifest
from workers.hooks import CRASH_EXIT_STATUS, CRASH_ON_MESSAGE_ID, PAUSE_AFTER_COMMIT
from workers.producer import image_event

pytestmark = pytest.mark.faults


async def stop_process(worker: WorkerProcess, timeout: float = 30.0) -> int:
    """SIGTERM the worker and return its exit status."""
    worker.signal(signal.SIGTERM)
    return await worker.wait(timeout)


@pytest.mark.timeout(120)
async def test_sigkill_between_commit_and_ack(steady_postgres, steady_rabbit, tmp_path):
    dsn = await fresh_database(steady_postgres)
    settings = fault_settings(dsn, steady_rabbit.url(), worker_prefetch=100, worker_batch_size=50)
    events = image_histories(60, 2)
    await publish(settings, events)
    paused = tmp_path / "paused.json"

    first = WorkerProcess.start(settings, tmp_path / "first.log", **{PAUSE_AFTER_COMMIT: str(paused)})
    try:
        await poll(paused.exists, timeout=30, message="the worker to pause after a commit")
        committed = orjson.loads(paused.read_bytes())
        assert committed
        # The batch is in the log, and not one message of it has been acknowledged.
        assert set(await logged_event_ids(dsn)) == set(committed)
        await nothing_settled(steady_rabbit, settings, len(events))

        first.signal(signal.SIGKILL)
        assert await first.wait(10) == -signal.SIGKILL
    finally:
        first.stop()

    second = WorkerProcess.start(settings, tmp_path / "second.log")
    try:
        await wait_all_logged(dsn, events)
        await poll(lambda: queue_empty(steady_rabbit, settings), message="every message acknowledged")
        assert await stop_process(second) == 0
    finally:
        second.stop()

    await assert_read_model(dsn, events)
    # The redelivered copies of the committed batch changed nothing.
    duplicates = second.logged("event_duplicate")
    assert {line["message_id"] for line in duplicates} == set(committed)
    assert all(line["redelivered"] for line in duplicates)


@pytest.mark.timeout(120)
async def test_sigterm_with_events_queued(steady_postgres, steady_rabbit, tmp_path):
    dsn = await fresh_database(steady_postgres)
    settings = fault_settings(dsn, steady_rabbit.url(), worker_prefetch=100, worker_batch_size=50)
    events = image_histories(150, 2)
    assert len(events) == 300

    worker = WorkerProcess.start(settings, tmp_path / "worker.log")
    try:
        async with images_locked(dsn):
            await publish(settings, events)
            await poll(lambda: worker_blocked_on_lock(dsn), message="a batch blocked on the lock")
            assert await consumers(steady_rabbit, settings.amqp_queue)

            signalled = time.monotonic()
            worker.signal(signal.SIGTERM)
            # The consumer goes first, while the batch still waits for the lock.
            await poll(lambda: _no_consumer(steady_rabbit, settings), timeout=10, message="the consumer cancelled")
            assert worker.running()

        status = await worker.wait(settings.worker_shutdown_timeout + 5)
        elapsed = time.monotonic() - signalled
    finally:
        worker.stop()

    assert status == 0
    assert elapsed < settings.worker_shutdown_timeout
    applied = set(await logged_event_ids(dsn))
    assert 0 < len(applied) <= settings.worker_batch_size
    # Everything else stayed queued: exactly the events not applied.
    await poll(lambda: _ready_is(settings, len(events) - len(applied)), message="the rest back in the queue")
    remaining = await _take_all(settings)
    assert set(remaining) == {event["event_id"] for event in events} - applied
    assert [line["event"] for line in worker.log_lines() if line["event"] in ("consumer_cancelled", "worker_stopped")] == [
        "consumer_cancelled",
        "worker_stopped",
    ]


async def _no_consumer(rabbit, settings) -> bool:
    return await consumers(rabbit, settings.amqp_queue) == []


async def _ready_is(settings, count: int) -> bool:
    return await ready_count(settings, settings.amqp_queue) == count


async def _take_all(settings) -> list[str]:
    """Take every ready message of the event queue; return their message ids."""
    import aio_pika

    connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    taken = []
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(settings.amqp_queue, passive=True)
        while (message := await queue.get(no_ack=True, fail=False, timeout=5)) is not None:
            taken.append(message.message_id)
    finally:
        await connection.close()
    return taken


@pytest.mark.timeout(150)
async def test_sigterm_while_rabbit_down(private_rabbit, steady_postgres, tmp_path):
    dsn = await fresh_database(steady_postgres)
    settings = fault_settings(dsn, private_rabbit.url(), worker_prefetch=100, worker_batch_size=50)
    events = image_histories(150, 2)

    worker = WorkerProcess.start(settings, tmp_path / "worker.log")
    try:
        async with images_locked(dsn):
            await publish(settings, events)
            await poll(lambda: worker_blocked_on_lock(dsn), message="a batch blocked on the lock")
            await asyncio.to_thread(private_rabbit.stop)

            signalled = time.monotonic()
            worker.signal(signal.SIGTERM)
        # The held batch commits now; its acks cannot reach the broker.
        status = await worker.wait(settings.worker_shutdown_timeout + 5)
        elapsed = time.monotonic() - signalled
    finally:
        worker.stop()

    assert status == 0
    assert elapsed < settings.worker_shutdown_timeout
    applied = set(await logged_event_ids(dsn))
    assert 0 < len(applied) <= settings.worker_batch_size
    assert len(worker.logged("stale_acks")) == 1

    await asyncio.to_thread(private_rabbit.start)
    # Nothing was acknowledged, so every event is back in the queue.
    await poll(lambda: _ready_is(settings, len(events)), message="every event back in the queue")
    second = WorkerProcess.start(settings, tmp_path / "second.log")
    try:
        await wait_all_logged(dsn, events)
        assert await stop_process(second) == 0
    finally:
        second.stop()
    await assert_read_model(dsn, events)
    assert {line["message_id"] for line in second.logged("event_duplicate")} == applied


@pytest.mark.timeout(150)
async def test_crashing_message_reaches_delivery_limit(steady_postgres, steady_rabbit, tmp_path):
    dsn = await fresh_database(steady_postgres)
    # The smallest delivery limit the settings accept.
    settings = fault_settings(dsn, steady_rabbit.url(), amqp_delivery_limit=5, worker_prefetch=50, worker_batch_size=10)
    poison = image_event("image.activated", manifest(name="crashes-workers"), revision=1)
    good = image_histories(30, 1)
    crash = {CRASH_ON_MESSAGE_ID: poison["event_id"]}

    await publish(settings, [poison])
    crashes = 0
    crashed: list[WorkerProcess] = []
    for attempt in range(settings.amqp_delivery_limit + 3):
        worker = WorkerProcess.start(settings, tmp_path / f"worker-{attempt}.log", **crash)
        try:
            exited = await _exit_or_dead_letter(worker, settings)
        finally:
            worker.stop()
        if not exited:
            break
        assert worker.process.returncode == CRASH_EXIT_STATUS
        crashes += 1
        crashed.append(worker)
        if crashes == 1:
            # Published after the first crash, so that later workers take them together
            # with the crashing message.
            await publish(settings, good)

    # RabbitMQ dead-letters a message returned more often than the limit.
    assert crashes == settings.amqp_delivery_limit + 1
    await wait_all_logged(dsn, good)
    letters = await dead_letters(settings)
    assert [message_id for message_id, _ in letters] == [poison["event_id"]]
    deaths = letters[0][1]["x-death"]
    assert deaths[0]["reason"] == "delivery_limit"
    await assert_read_model(dsn, good)
    # Once it is a suspect, the last line of each crashed worker that processed suspects
    # names the message that crashed it.
    last_suspects = [worker.logged("suspect_processing")[-1] for worker in crashed if worker.logged("suspect_processing")]
    assert len(last_suspects) >= crashes - 2
    assert {line["message_id"] for line in last_suspects} == {poison["event_id"]}


async def _exit_or_dead_letter(worker: WorkerProcess, settings) -> bool:
    """Wait until the worker crashes and exits (True), or until the dead-letter queue
    contains a message while the worker runs without having crashed (False)."""

    async def settled():
        if not worker.running():
            return "exited"
        if await ready_count(settings, settings.dead_letter_queue):
            # The kernel closes a crashing process's sockets before the process can be
            # reaped, so the broker may dead-letter the message first. The crash hook
            # writes its log line before it exits.
            return "exited" if worker.logged("test_crash") else "dead-lettered"
        return None

    outcome = await poll(settled, timeout=30, interval=0.1, message="a crash or a dead letter")
    if outcome == "exited":
        await worker.wait(timeout=10)
    return outcome == "exited"


@pytest.mark.timeout(120)
async def test_poison_messages_among_good_ones(steady_postgres, steady_rabbit, tmp_path):
    dsn = await fresh_database(steady_postgres)
    settings = fault_settings(dsn, steady_rabbit.url())
    good = image_histories(25, 2)
    unknown_type = {**image_event("image.activated", manifest(), revision=1), "type": "image.exploded"}
    missing_image = image_event("image.activated", manifest(), revision=1)
    del missing_image["image_uuid"]
    huge = image_event("image.activated", manifest(description="x" * (10 << 20)), revision=1)
    wrong_types = image_event("image.activated", manifest(), revision="one")
    poison = {
        "not-json": (b"{this is not json", "image.created", "not_json"),
        "unknown-type": (orjson.dumps(unknown_type), "image.exploded", "schema_violation"),
        "missing-image-id": (orjson.dumps(missing_image), "image.activated", "schema_violation"),
        "ten-megabytes": (orjson.dumps(huge), "image.activated", "too_large"),
        "wrong-types": (orjson.dumps(wrong_types), "image.activated", "schema_violation"),
    }

    worker = WorkerProcess.start(settings, tmp_path / "worker.log")
    try:
        # Interleaved: a poison message after every ten good events.
        for index, (message_id, (body, routing_key, _)) in enumerate(poison.items()):
            await publish(settings, good[index * 10 : (index + 1) * 10])
            await publish_raw(settings, body, message_id, routing_key)
        await wait_all_logged(dsn, good)

        async def all_dead_lettered():
            return await ready_count(settings, settings.dead_letter_queue) == len(poison)

        await poll(all_dead_lettered, message="every poison message dead-lettered")
        await poll(lambda: queue_empty(steady_rabbit, settings), message="every message settled")
        assert worker.running()
        assert await stop_process(worker) == 0
    finally:
        worker.stop()

    await assert_read_model(dsn, good)
    letters = dict(await dead_letters(settings))
    assert {message_id: headers["x-rejection-reason"] for message_id, headers in letters.items()} == {
        message_id: reason for message_id, (_, _, reason) in poison.items()
    }
    assert all(headers["x-rejection-detail"] for headers in letters.values())
    assert len(worker.logged("consumer_started")) == 1
    assert worker.logged("worker_failed") == []


@pytest.mark.timeout(60)
async def test_sigterm_while_connecting(steady_postgres, tmp_path):
    """A worker that cannot reach RabbitMQ keeps retrying, and still stops at once."""
    from tests.support.instances import allocate_port

    dsn = await fresh_database(steady_postgres)
    # A loopback port that nothing listens on.
    settings = fault_settings(dsn, f"amqp://guest:guest@127.0.0.1:{allocate_port()}/")
    worker = WorkerProcess.start(settings, tmp_path / "worker.log")
    try:
        await poll(lambda: len(worker.logged("broker_connect_failed")) >= 2, timeout=30, message="two connection attempts")
        assert worker.running()
        signalled = time.monotonic()
        assert await stop_process(worker, timeout=10) == 0
        assert time.monotonic() - signalled < 5
    finally:
        worker.stop()
