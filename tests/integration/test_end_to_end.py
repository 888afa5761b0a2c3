"""The whole path: events published to RabbitMQ become GetImage answers from Postgres."""

from pathlib import Path

import aio_pika
import orjson
import pytest

from tests.conftest import AMQP_URL
from service import accounts as account_commands
from tests.helpers import ALICE_UUID, TestAccount, manifest, openssh_public, wait_until
from workers.producer import image_event
from workers.seed import lifecycle_events, read_manifests

REAL_MANIFESTS = Path(__file__).parents[1] / "data" / "real-manifests.jsonl"


async def _fetch(api, http, account, image_uuid: str, version: str = "~9"):
    path = f"/my/images/{image_uuid}"
    headers = {"Accept-Version": version, **account.sign("GET", path, key="ed25519")}
    async with http.get(api + path, headers=headers) as response:
        return response.status, orjson.loads(await response.read())


@pytest.fixture
def get(api, http, accounts):
    """GetImage as alice."""

    async def fetch(image_uuid: str, version: str = "~9"):
        return await _fetch(api, http, accounts["alice"], image_uuid, version)

    return fetch


async def _state_becomes(get, image_uuid, state):
    async def check():
        status, body = await get(image_uuid)
        return status == 200 and body.get("state") == state

    await wait_until(check, message=f"image {image_uuid} to be {state}")


async def _is_gone(get, image_uuid):
    async def check():
        status, _ = await get(image_uuid)
        return status == 404

    await wait_until(check, message=f"image {image_uuid} to be gone")


async def test_created_then_activated(worker, publisher, get):
    image = manifest()
    for event in lifecycle_events(image):
        await publisher.publish(event)

    await _state_becomes(get, image["uuid"], "active")

    status, body = await get(image["uuid"])
    assert status == 200
    assert body["published_at"] == image["published_at"]


async def test_created_then_failed_with_error(worker, publisher, get):
    image = manifest(owner=ALICE_UUID, state="failed", error={"code": "VmHasNoOrigin", "message": "vm has no origin"}, public=False)
    for event in lifecycle_events(image):
        await publisher.publish(event)

    await _state_becomes(get, image["uuid"], "failed")

    _, body = await get(image["uuid"])
    assert body["error"] == {"code": "VmHasNoOrigin", "message": "vm has no origin"}


async def test_activated_then_disabled(worker, publisher, get):
    image = manifest()
    await publisher.publish(image_event("image.activated", image, revision=1))
    await _state_becomes(get, image["uuid"], "active")

    await publisher.publish(image_event("image.disabled", {**image, "state": "disabled", "disabled": True}, revision=2))

    await _state_becomes(get, image["uuid"], "disabled")


async def test_deleted_image_answers_404(worker, publisher, get):
    image = manifest()
    await publisher.publish(image_event("image.activated", image, revision=1))
    await _state_becomes(get, image["uuid"], "active")

    await publisher.publish(image_event("image.deleted", image_uuid=image["uuid"], revision=2))

    await _is_gone(get, image["uuid"])
    status, body = await get(image["uuid"])
    assert status == 404
    assert body == {"code": "ResourceNotFound", "message": f"image {image['uuid']} not found"}


async def test_duplicate_and_older_events_leave_the_newer_state(worker, publisher, get, db_pool):
    image = manifest(name="first")
    newer = image_event("image.updated", {**image, "name": "newer"}, revision=5)
    await publisher.publish(image_event("image.activated", image, revision=1))
    await publisher.publish(newer)
    await publisher.publish(newer)  # the same event twice
    await publisher.publish(image_event("image.updated", {**image, "name": "older"}, revision=3))
    marker = image_event("image.updated", {**image, "name": "marker"}, revision=6)
    await publisher.publish(marker)

    await wait_until(lambda: _name_is(get, image["uuid"], "marker"), message="the marker revision")

    revisions = await db_pool.fetch(
        "SELECT revision, outcome FROM event_log WHERE subject_uuid = $1 ORDER BY seq", image["uuid"]
    )
    # Each event is logged once. Events that share a batch with a newer revision of the
    # same image are logged as stale, so only 3 (older than 5) and 6 (newest) are certain.
    assert [row["revision"] for row in revisions] == [1, 5, 3, 6]
    outcomes = {row["revision"]: row["outcome"] for row in revisions}
    assert (outcomes[3], outcomes[6]) == ("stale", "applied")


async def _name_is(get, image_uuid, name):
    status, body = await get(image_uuid)
    return status == 200 and body.get("name") == name


async def test_late_event_does_not_resurrect_a_deleted_image(worker, publisher, get, db_pool):
    image = manifest()
    await publisher.publish(image_event("image.activated", image, revision=1))
    await publisher.publish(image_event("image.deleted", image_uuid=image["uuid"], revision=3))
    await publisher.publish(image_event("image.updated", {**image, "name": "late"}, revision=2))
    await _is_gone(get, image["uuid"])

    async def late_event_recorded():
        return await db_pool.fetchval("SELECT outcome FROM event_log WHERE subject_uuid = $1 AND revision = 2", image["uuid"])

    assert await wait_until(late_event_recorded, message="the late event") == "stale"
    status, _ = await get(image["uuid"])
    assert status == 404
    row = await db_pool.fetchrow("SELECT deleted, revision FROM images WHERE uuid = $1", image["uuid"])
    assert (row["deleted"], row["revision"]) == (True, 3)


async def test_recreation_after_delete_with_higher_revision(worker, publisher, get):
    image = manifest()
    await publisher.publish(image_event("image.activated", image, revision=1))
    await publisher.publish(image_event("image.deleted", image_uuid=image["uuid"], revision=2))
    await _is_gone(get, image["uuid"])

    await publisher.publish(
        image_event("image.created", {**image, "owner": ALICE_UUID, "state": "unactivated", "name": "again"}, revision=3)
    )

    await wait_until(lambda: _name_is(get, image["uuid"], "again"), message="the re-created image")


async def _dead_letters(settings, message_ids: set[str], *, timeout: float = 20.0) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Take the dead letters with `message_ids` from this run's dead-letter queue; others stay."""
    import asyncio
    import time

    connection = await aio_pika.connect(AMQP_URL)
    taken = []
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(settings.dead_letter_queue)
        deadline = time.monotonic() + timeout
        while len(taken) < len(message_ids):
            message = await queue.get(no_ack=False, fail=False)
            if message is not None and message.message_id in message_ids:
                await message.ack()
                taken.append(message)
                continue
            if message is not None:
                await message.nack(requeue=True)
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(taken)} of {len(message_ids)} dead letters arrived in {timeout}s")
            await asyncio.sleep(0.05)
    finally:
        await connection.close()
    return taken


async def test_malformed_and_invalid_events_are_dead_lettered(worker, publisher, settings, get):
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(settings.amqp_exchange)
        await exchange.publish(aio_pika.Message(b"{this is not json", message_id="poison-json"), routing_key="image.created")
        invalid = image_event("image.created", manifest(), revision=1)
        invalid["revision"] = "one"
        await exchange.publish(aio_pika.Message(orjson.dumps(invalid), message_id="poison-schema"), routing_key="image.created")
    finally:
        await connection.close()
    good = manifest()
    await publisher.publish(image_event("image.activated", good, revision=1))

    await _state_becomes(get, good["uuid"], "active")

    letters = await _dead_letters(settings, {"poison-json", "poison-schema"})
    reasons = {message.message_id: message.headers["x-rejection-reason"] for message in letters}
    assert reasons == {"poison-json": "not_json", "poison-schema": "schema_violation"}
    schema_letter = next(message for message in letters if message.message_id == "poison-schema")
    assert "revision" in schema_letter.headers["x-rejection-detail"]
    assert schema_letter.headers["x-original-routing-key"] == "image.created"
    assert orjson.loads(schema_letter.body) == invalid


async def _owner_accounts(db_pool, manifests) -> dict[str, TestAccount]:
    """Register an account (with an Ed25519 key) for every owner that is a UUID."""
    from workers.contract import EVENT_SCHEMA, OPERATOR_UUID

    import re

    uuid_pattern = re.compile(EVENT_SCHEMA["definitions"]["uuid"]["pattern"])
    owners = {image.get("owner", OPERATOR_UUID) for image in manifests}
    people = {}
    async with db_pool.acquire() as connection:
        for index, owner in enumerate(sorted(owner for owner in owners if uuid_pattern.match(owner))):
            person = TestAccount(f"owner{index}", owner)
            person.keys = {"ed25519": person.keys["ed25519"]}
            await account_commands.add_account(connection, person.login, owner)
            await account_commands.add_key(connection, person.login, openssh_public(person.keys["ed25519"]), "ed25519")
            people[owner] = person
    return people


async def test_all_real_manifests_load(worker, publisher, api, http, accounts, db_pool):
    manifests = list(read_manifests(REAL_MANIFESTS))
    assert len(manifests) == 309
    owners = await _owner_accounts(db_pool, manifests)
    stranger = accounts["carol"]
    events = [event for image in manifests for event in lifecycle_events(image)]
    final_revisions = {event["image_uuid"]: event["revision"] for event in events}
    await publisher.publish_many(events)

    async def all_stored():
        rows = await db_pool.fetch("SELECT uuid, revision FROM images WHERE uuid = ANY($1::uuid[])", list(final_revisions))
        return {str(row["uuid"]): row["revision"] for row in rows} == final_revisions

    await wait_until(all_stored, timeout=60, interval=0.1, message="all 309 real images")

    hidden = 0
    for image in manifests:
        owner = image.get("owner", "00000000-0000-0000-0000-000000000000")
        visible_to_all = image.get("public", False) and image.get("state", "active") in ("active", "disabled")
        if owner in owners:
            status, body = await _fetch(api, http, owners[owner], image["uuid"])
            assert status == 200, image["uuid"]
            assert body["id"] == image["uuid"]
            assert body["name"] == image["name"]
            assert body["version"] == image["version"]
            assert body["os"] == image["os"]
            assert body["type"] == image["type"]
            assert body["owner"] == owner
            if "published_at" in image:
                assert body["published_at"] == image["published_at"]
        else:
            # A few real owners are not UUIDs, so no account can own them; all are public.
            assert visible_to_all, image["uuid"]
        status, body = await _fetch(api, http, stranger, image["uuid"])
        if visible_to_all:
            assert status == 200, image["uuid"]
            assert (body["id"], body["name"], body["version"], body["os"], body["type"]) == (
                image["uuid"], image["name"], image["version"], image["os"], image["type"]
            )
        else:
            hidden += 1
            assert status == 404
            assert body == {"code": "ResourceNotFound", "message": f"image {image['uuid']} not found"}
    assert hidden == 18
