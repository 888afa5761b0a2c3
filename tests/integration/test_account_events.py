"""Accounts and keys arriving as events through the worker, with revisions and tombstones."""

from tests.helpers import PUB, PUB_UUID, TestAccount, openssh_public, wait_until
from workers.producer import account_event

PATH = f"/my/images/{PUB_UUID}"


async def _status(api, http, person: TestAccount, key_name: str) -> int:
    headers = person.sign("GET", PATH, key="ed25519", key_id=f"/{person.login}/keys/{key_name}")
    async with http.get(api + PATH, headers=headers) as response:
        return response.status


async def test_account_and_key_events_authenticate(worker, publisher, api, http, db_pool):
    from tests.conftest import store_manifests

    await store_manifests(db_pool, PUB)
    person = TestAccount("grace")
    public_key = openssh_public(person.keys["ed25519"])

    await publisher.publish(account_event("account.upserted", person.uuid, revision=1, login="grace"))
    await publisher.publish(account_event("account.key.added", person.uuid, revision=2, key_name="laptop", public_key=public_key))

    async def accepted():
        return await _status(api, http, person, "laptop") == 200

    await wait_until(accepted, message="grace's key to be accepted")


async def test_removed_key_stays_removed_after_a_late_add(worker, publisher, api, http, db_pool):
    person = TestAccount("heidi")
    public_key = openssh_public(person.keys["ed25519"])
    await publisher.publish(account_event("account.upserted", person.uuid, revision=1, login="heidi"))
    await publisher.publish(account_event("account.key.added", person.uuid, revision=2, key_name="laptop", public_key=public_key))
    await wait_until(lambda: _accepted(api, http, person), message="heidi's key to be accepted")

    await publisher.publish(account_event("account.key.removed", person.uuid, revision=4, key_name="laptop"))
    # A key-added event older than the removal arrives late; the tombstone keeps it out.
    late = account_event("account.key.added", person.uuid, revision=3, key_name="laptop", public_key=public_key)
    await publisher.publish(late)

    async def late_event_recorded():
        return await db_pool.fetchval("SELECT outcome FROM event_log WHERE event_id = $1", late["event_id"])

    assert await wait_until(late_event_recorded, message="the late event") == "stale"
    assert await _status(api, http, person, "laptop") == 401
    row = await db_pool.fetchrow("SELECT removed, revision FROM account_keys WHERE account_uuid = $1 AND name = 'laptop'", person.uuid)
    assert (row["removed"], row["revision"]) == (True, 4)


async def _accepted(api, http, person):
    return await _status(api, http, person, "laptop") == 200


async def test_disabling_event_gives_403(worker, publisher, api, http):
    person = TestAccount("ivan")
    await publisher.publish(account_event("account.upserted", person.uuid, revision=1, login="ivan"))
    await publisher.publish(
        account_event("account.key.added", person.uuid, revision=2, key_name="laptop", public_key=openssh_public(person.keys["ed25519"]))
    )
    await wait_until(lambda: _accepted(api, http, person), message="ivan's key to be accepted")

    await publisher.publish(account_event("account.upserted", person.uuid, revision=3, login="ivan", disabled=True))

    async def refused():
        return await _status(api, http, person, "laptop") == 403

    await wait_until(refused, message="ivan to be disabled")


async def test_invalid_key_event_is_dead_lettered(worker, publisher, settings):
    import aio_pika
    import orjson

    from tests.conftest import AMQP_URL
    from tests.integration.test_end_to_end import _dead_letters

    event = account_event("account.key.added", TestAccount("judy").uuid, revision=1, key_name="bad", public_key="ssh-rsa AAAAnot-a-key")
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(settings.amqp_exchange)
        await exchange.publish(aio_pika.Message(orjson.dumps(event), message_id="bad-key"), routing_key="account.key.added")
    finally:
        await connection.close()

    letters = await _dead_letters(settings, {"bad-key"})

    assert letters[0].message_id == "bad-key"
    assert letters[0].headers["x-rejection-reason"] == "invalid_key"
