"""The operator commands of the workers: publish, dead-letters list and replay."""

import asyncio
import os
import sys

import aio_pika
import orjson

from tests.conftest import AMQP_URL
from tests.helpers import manifest, wait_until
from workers.producer import image_event


def _environment(settings) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "AMQP_URL": settings.amqp_url,
        "AMQP_EXCHANGE": settings.amqp_exchange,
        "AMQP_QUEUE": settings.amqp_queue,
        "LOG_LEVEL": "warning",
    }


async def _workers_command(settings, *arguments: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "workers", *arguments,
        env=_environment(settings), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode, stdout.decode(), stderr.decode()


async def _image_revision(db_pool, image_uuid):
    return await db_pool.fetchval("SELECT revision FROM images WHERE uuid = $1", image_uuid)


async def test_publish_command(worker, settings, db_pool, tmp_path):
    image = manifest()
    events = [image_event("image.created", {**image, "state": "unactivated"}, revision=1), image_event("image.activated", image, revision=2)]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(event) for event in events) + b"\n")

    status, stdout, stderr = await _workers_command(settings, "publish", str(path), "--correlation-id", "ops-42")

    assert status == 0, stderr
    assert "published 2 events" in stdout
    await wait_until(lambda: _revision_is(db_pool, image["uuid"], 2), message="the published events")


async def _revision_is(db_pool, image_uuid, revision):
    return await _image_revision(db_pool, image_uuid) == revision


async def test_publish_command_refuses_a_file_with_invalid_lines(worker, settings, db_pool, tmp_path):
    good = image_event("image.activated", manifest(), revision=1)
    bad = {**image_event("image.activated", manifest(), revision=1), "revision": "two"}
    path = tmp_path / "events.jsonl"
    path.write_bytes(orjson.dumps(good) + b"\n" + orjson.dumps(bad) + b"\nnot json\n")

    status, _, stderr = await _workers_command(settings, "publish", str(path))

    assert status == 1
    assert f"{path}:2: schema_violation" in stderr
    assert f"{path}:3: not_json" in stderr
    assert "nothing published" in stderr
    assert await _image_revision(db_pool, good["image_uuid"]) is None


async def test_dead_letters_list_and_replay(worker, settings, db_pool):
    # A valid event that was dead-lettered earlier (say, while a bug was deployed) sits in
    # the dead-letter queue; replaying it applies it.
    image = manifest()
    event = image_event("image.activated", image, revision=1)
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(settings.dead_letter_exchange)
        await exchange.publish(
            aio_pika.Message(
                orjson.dumps(event),
                message_id=event["event_id"],
                headers={"x-rejection-reason": "rejected_by_database", "x-original-routing-key": "image.activated"},
            ),
            routing_key="image.activated",
        )
    finally:
        await connection.close()

    status, listed, _ = await _workers_command(settings, "dead-letters", "list", "--reason", "rejected_by_database")
    assert status == 0
    entries = [orjson.loads(line) for line in listed.splitlines()]
    assert [entry["message_id"] for entry in entries if entry["message_id"] == event["event_id"]] == [event["event_id"]]

    status, replayed, _ = await _workers_command(settings, "dead-letters", "replay", "--reason", "rejected_by_database")
    assert status == 0
    assert event["event_id"] in replayed
    await wait_until(lambda: _revision_is(db_pool, image["uuid"], 1), message="the replayed event")


async def test_dead_letters_filters_finish(worker, settings, db_pool):
    # Two dead letters of different reasons; filters that match one, or none, must each
    # look at every dead letter once and stop.
    first, second = (image_event("image.activated", manifest(), revision=1) for _ in range(2))
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(settings.dead_letter_exchange)
        for event, reason in ((first, "rejected_by_database"), (second, "schema_violation")):
            await exchange.publish(
                aio_pika.Message(
                    orjson.dumps(event),
                    message_id=event["event_id"],
                    headers={"x-rejection-reason": reason, "x-original-routing-key": "image.activated"},
                ),
                routing_key="image.activated",
            )
    finally:
        await connection.close()

    status, listed, _ = await asyncio.wait_for(
        _workers_command(settings, "dead-letters", "list", "--reason", "no_such_reason"), timeout=30
    )
    assert (status, listed) == (0, "")

    status, listed, _ = await _workers_command(settings, "dead-letters", "list", "--message-id", second["event_id"])
    assert status == 0
    assert [orjson.loads(line)["message_id"] for line in listed.splitlines()] == [second["event_id"]]

    status, replayed, _ = await _workers_command(settings, "dead-letters", "replay", "--message-id", first["event_id"])
    assert status == 0
    assert [orjson.loads(line)["message_id"] for line in replayed.splitlines()] == [first["event_id"]]
    await wait_until(lambda: _revision_is(db_pool, first["image_uuid"], 1), message="the replayed event")

    # The other one is still there, once.
    status, listed, _ = await _workers_command(settings, "dead-letters", "list", "--message-id", second["event_id"], "--message-id", first["event_id"])
    assert [orjson.loads(line)["message_id"] for line in listed.splitlines()] == [second["event_id"]]
    assert await _image_revision(db_pool, second["image_uuid"]) is None
