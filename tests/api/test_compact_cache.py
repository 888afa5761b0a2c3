"""The compact image cache of service.storage: entries, visibility, eviction and the
fill at start, against the test database."""

import asyncio
import hashlib
import base64

import orjson
import pytest

from service.images import Rendering, render
from service.storage import ImageStore, _Names, pack
from tests.conftest import store_manifests
from tests.helpers import ALICE_UUID, BOB_UUID, CAROL_UUID, manifest

REAL = [orjson.loads(line) for line in open("tests/data/real-manifests.jsonl", "rb")]


def _row(image: dict) -> dict:
    return {
        "manifest": orjson.dumps(image).decode(),
        "owner": image.get("owner"),
        "public": image.get("public"),
        "state": image.get("state"),
        "acl": image.get("acl"),
    }


@pytest.fixture
async def store(db_pool):
    return ImageStore(db_pool, query_timeout=5, cache_size=3)


@pytest.mark.parametrize("compress", [True, False])
async def test_entry_gives_back_body_and_md5(store, compress):
    for image in REAL:
        for rendering in Rendering:
            body = render(image, rendering)
            entry = pack(_row(image), rendering, _Names(), store._codec if compress else None)

            assert store.answer(entry) == (body, base64.b64encode(hashlib.md5(body).digest()).decode())


async def test_compressed_entries_are_smaller(store):
    names = _Names()
    bodies = sum(len(render(image, Rendering.V8)) for image in REAL)
    entries = sum(len(pack(_row(image), Rendering.V8, names, store._codec)) for image in REAL)

    assert entries < bodies / 2


@pytest.mark.parametrize(
    "fields, viewer, visible",
    [
        ({"owner": ALICE_UUID, "public": False, "state": "creating"}, ALICE_UUID, True),
        ({"owner": ALICE_UUID, "public": False, "state": "creating"}, BOB_UUID, False),
        ({"owner": ALICE_UUID, "public": True, "state": "active"}, BOB_UUID, True),
        ({"owner": ALICE_UUID, "public": True, "state": "disabled"}, BOB_UUID, True),
        ({"owner": ALICE_UUID, "public": True, "state": "failed"}, BOB_UUID, False),
        ({"owner": ALICE_UUID, "public": False, "state": "active", "acl": [CAROL_UUID, BOB_UUID]}, BOB_UUID, True),
        ({"owner": ALICE_UUID, "public": False, "state": "active", "acl": [CAROL_UUID]}, BOB_UUID, False),
        ({"owner": ALICE_UUID, "public": False, "state": "unactivated", "acl": [BOB_UUID]}, BOB_UUID, False),
        ({"owner": "not-a-uuid", "public": False, "state": "active"}, "not-a-uuid", True),
        ({"owner": ALICE_UUID, "public": False, "state": "failed"}, None, True),
    ],
)
async def test_visibility_of_entries(store, fields, viewer, visible):
    entry = pack(_row(manifest(**fields)), Rendering.V8, store._names, store._codec)

    assert store.visible_to(entry, viewer) is visible


async def test_oldest_entry_is_evicted_first(store, db_pool):
    images = [manifest() for _ in range(4)]
    await store_manifests(db_pool, *images)
    store.set_enabled(True)
    store._warm_task.cancel()

    for image in images:
        await store.get(image["uuid"], Rendering.V8)

    assert store.cached_images == 3
    assert not store.holds(images[0]["uuid"])
    assert all(store.holds(image["uuid"]) for image in images[1:])


async def test_fill_at_start_loads_live_images(db_pool):
    images = [manifest() for _ in range(3)]
    await store_manifests(db_pool, *images)
    store = ImageStore(db_pool, query_timeout=5, cache_size=100_000)

    store.set_enabled(True)
    assert store.warming_up
    await asyncio.wait_for(store._warm_task, timeout=20)

    assert not store.warming_up
    assert all(store.holds(image["uuid"]) for image in images)
    hits = store.hits
    entry = await store.get(images[0]["uuid"], Rendering.V8)
    assert store.hits == hits + 1
    assert orjson.loads(store.answer(entry)[0])["id"] == images[0]["uuid"]


async def test_fill_skips_images_changed_meanwhile(db_pool):
    image = manifest()
    await store_manifests(db_pool, image)
    store = ImageStore(db_pool, query_timeout=5, cache_size=100_000)

    store.set_enabled(True)
    # The fill has sent its first query; a change notified now may not be in its rows.
    await asyncio.sleep(0)
    store.on_change([image["uuid"]])
    await asyncio.wait_for(store._warm_task, timeout=20)

    assert not store.holds(image["uuid"])
    assert store.cached_images > 0
