"""`python -m workers rebuild` recomputes the read model from the event log: identical, row
for row, to the live table after duplicates, reordering and deletes; and swapped in while
the API answers and the worker applies new events."""

import asyncio
import random

import pytest

from tests.helpers import manifest, wait_until
from workers.producer import image_event
from workers.rebuild import rebuild

ROWS = "SELECT uuid, revision, deleted, owner, public, state, acl, manifest::text AS manifest, event_id, event_time, applied_at FROM images ORDER BY uuid"


def _stream(count: int, seed: int) -> tuple[list[dict], dict[str, int]]:
    """Events for `count` images with duplicates, reordering and deletes; and each image's final revision."""
    rng = random.Random(seed)
    events, final = [], {}
    for index in range(count):
        image = manifest(name=f"rebuild-{seed}-{index}")
        history = [image_event("image.created", {**image, "state": "unactivated"}, revision=1)]
        history.append(image_event("image.activated", image, revision=2))
        if index % 3 == 0:
            history.append(image_event("image.deleted", image_uuid=image["uuid"], revision=3))
        if index % 6 == 0:
            history.append(image_event("image.created", {**image, "name": "again"}, revision=4))
        if index % 4 == 1:
            history.append(image_event("image.updated", {**image, "acl": ["a11ce000-0000-4000-8000-00000000000a"]}, revision=5))
        final[image["uuid"]] = max(event["revision"] for event in history)
        history += rng.sample(history, k=2)  # duplicates
        rng.shuffle(history)  # out of order
        events += history
    return events, final


async def _applied(db_pool, final: dict[str, int]) -> bool:
    rows = await db_pool.fetch("SELECT uuid, revision FROM images WHERE uuid = ANY($1::uuid[])", list(final))
    return {str(row["uuid"]): row["revision"] for row in rows} == final


async def test_rebuilt_table_is_identical_to_the_live_one(worker, publisher, database_url, db_pool):
    events, final = _stream(40, seed=1)
    await publisher.publish_many(events)
    await wait_until(lambda: _applied(db_pool, final), message="the stream to be applied")
    live = [dict(row) for row in await db_pool.fetch(ROWS)]

    checked = await rebuild(database_url, swap=False)
    result = await rebuild(database_url)

    assert checked["differences"] == 0
    assert result["differences"] == 0
    assert result["rows"] == len(live)
    assert [dict(row) for row in await db_pool.fetch(ROWS)] == live


async def test_rebuild_while_events_arrive_and_the_api_answers(worker, publisher, database_url, db_pool, call_as_alice):
    before, final_before = _stream(20, seed=2)
    await publisher.publish_many(before)
    await wait_until(lambda: _applied(db_pool, final_before), message="the first stream")
    during, final_during = _stream(30, seed=3)
    probe = next(uuid for uuid, revision in final_before.items() if revision == 2)

    async def publish_during():
        for event in during:
            await publisher.publish(event)

    async def keep_asking():
        statuses = []
        while not rebuilt.done():
            statuses.append((await call_as_alice(f"/my/images/{probe}")).status)
            await asyncio.sleep(0.005)
        return statuses

    rebuilt = asyncio.ensure_future(rebuild(database_url))
    statuses, _, result = await asyncio.gather(keep_asking(), publish_during(), rebuilt)

    assert set(statuses) == {200}
    await wait_until(lambda: _applied(db_pool, {**final_before, **final_during}), message="every event, before and after the swap")
    assert (await rebuild(database_url, swap=False))["differences"] == 0
    assert result["rows"] >= len(final_before)
    assert (await call_as_alice(f"/my/images/{probe}")).status == 200


@pytest.fixture
def call_as_alice(api, http, accounts):
    from tests.api.conftest import Answer

    async def send(path: str):
        headers = accounts["alice"].sign("GET", path, key="ed25519")
        async with http.get(api + path, headers=headers) as response:
            return Answer(response.status, response.headers, await response.read())

    return send
