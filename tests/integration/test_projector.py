"""The projector's one-statement apply (`apply_events`, migration 0003), against Postgres."""

from __future__ import annotations

import asyncio
import uuid

import orjson

from service.accounts import apply_account_event
from tests.helpers import DEFAULT_TIMEOUT, manifest
from workers.contract import decode
from workers.producer import account_event, image_event
from workers.projector import apply_batch
from workers.settlement import Outcome


def _decoded(*events: dict):
    return [decode(orjson.dumps(event)) for event in events]


async def test_large_batch_notification_chunks(db_pool):
    images = [manifest(name=f"chunk-{index}") for index in range(450)]
    events = _decoded(*(image_event("image.updated", image, revision=1) for image in images))
    received: list[str] = []

    def on_notification(_connection, _pid, _channel, payload: str) -> None:
        received.append(payload)

    async with db_pool.acquire() as listener:
        await listener.add_listener("image_changed", on_notification)
        try:
            async with db_pool.acquire() as connection:
                result = await apply_batch(connection, events)
                assert result.outcomes == [Outcome.APPLIED] * 450
                assert sorted(result.changed_images) == sorted(image["uuid"] for image in images)

                async with asyncio.timeout(DEFAULT_TIMEOUT):
                    while sum(len(payload.split(",")) for payload in received) < 450:
                        await asyncio.sleep(0.01)
                assert sorted(len(payload.split(",")) for payload in received) == [50, 200, 200]
                assert {part for payload in received for part in payload.split(",")} == set(result.changed_images)

                # The same batch again: every event is a duplicate and nothing is notified.
                received.clear()
                again = await apply_batch(connection, events)
                assert again.outcomes == [Outcome.DUPLICATE] * 450
                assert again.changed_images == []
                logged = await connection.fetchval(
                    "SELECT count(*) FROM event_log WHERE event_id = ANY($1::uuid[])", [event.event_id for event in events])
                assert logged == 450
                # Notifications arrive in commit order: once this one is in, any from the
                # second batch would be too.
                sentinel = str(uuid.uuid4())
                await connection.execute("SELECT pg_notify('image_changed', $1)", sentinel)
                async with asyncio.timeout(DEFAULT_TIMEOUT):
                    while sentinel not in received:
                        await asyncio.sleep(0.01)
                assert received == [sentinel]
        finally:
            await listener.remove_listener("image_changed", on_notification)


async def test_mixed_batch_outcomes(db_pool):
    image = manifest(name="mixed")
    older = image_event("image.updated", {**image, "name": "older"}, revision=1)
    newer = image_event("image.updated", {**image, "name": "newer"}, revision=2)
    account_uuid = str(uuid.uuid4())
    account = account_event("account.upserted", account_uuid, revision=1, login=f"mixed-{account_uuid[:8]}")
    # The newest event first, then an older one, a copy of the first, and an account event.
    events = _decoded(newer, older, newer, account)
    async with db_pool.acquire() as connection:
        result = await apply_batch(connection, events, apply_account_event=apply_account_event)
        assert result.outcomes == [Outcome.APPLIED, Outcome.STALE, Outcome.DUPLICATE, Outcome.APPLIED]
        assert result.changed_images == [image["uuid"]]
        row = await connection.fetchrow("SELECT revision, manifest::text FROM images WHERE uuid = $1::uuid", image["uuid"])
        assert row["revision"] == 2
        assert orjson.loads(row["manifest"])["name"] == "newer"
        logged = await connection.fetch(
            "SELECT event_id::text, outcome FROM event_log WHERE event_id = ANY($1::uuid[]) ORDER BY seq",
            [event.event_id for event in events])
        assert [(row["event_id"], row["outcome"]) for row in logged] == [
            (newer["event_id"], "applied"), (older["event_id"], "stale"), (account["event_id"], "applied")]
        assert await connection.fetchval("SELECT count(*) FROM accounts WHERE uuid = $1::uuid", account_uuid) == 1
