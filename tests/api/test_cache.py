"""The in-process caches follow Postgres notifications: a change drops the cached answer,
and a lost listening connection flushes every cache until it is back."""

import pytest

from service.app import LISTENER
from service.auth.stage import KEY_STORE
from service.images import Rendering
from service.routes import IMAGE_STORE
from service.storage import image_key
from tests.helpers import manifest, wait_until


@pytest.fixture
def app(api_server):
    return api_server.app


def _entry(store, uuid):
    return store._entries[Rendering.V8].get(image_key(uuid))


async def _listener_connected(app):
    assert await app[LISTENER].wait_connected(10), "the change listener did not connect"


async def test_cached_answer_is_served_from_memory(call, app, db_pool):
    from tests.conftest import store_manifests

    await _listener_connected(app)
    image = manifest(name="cached")
    await store_manifests(db_pool, image)
    store = app[IMAGE_STORE]
    await call(f"/my/images/{image['uuid']}")
    hits = store.hits

    answer = await call(f"/my/images/{image['uuid']}")

    assert answer.json()["name"] == "cached"
    assert store.hits == hits + 1


async def test_notification_drops_the_cached_answer(call, app, db_pool):
    from tests.conftest import store_manifests

    await _listener_connected(app)
    image = manifest(name="before")
    await store_manifests(db_pool, image, revision=1)
    assert (await call(f"/my/images/{image['uuid']}")).json()["name"] == "before"
    store = app[IMAGE_STORE]
    assert store.holds(image["uuid"])

    # The write sends NOTIFY in its transaction; the API drops the entry when it arrives.
    await store_manifests(db_pool, {**image, "name": "after"}, revision=2)

    async def dropped():
        return not store.holds(image["uuid"])

    await wait_until(dropped, timeout=5, message="the cached answer to be dropped")
    assert (await call(f"/my/images/{image['uuid']}")).json()["name"] == "after"


async def test_missing_id_is_cached_and_dropped_on_creation(call, app, db_pool):
    from tests.conftest import store_manifests

    await _listener_connected(app)
    image = manifest(name="late")
    assert (await call(f"/my/images/{image['uuid']}")).status == 404
    store = app[IMAGE_STORE]
    assert store.holds_missing(image["uuid"])

    await store_manifests(db_pool, image)

    async def visible():
        return (await call(f"/my/images/{image['uuid']}")).status == 200

    await wait_until(visible, timeout=5, message="the new image to be served")


async def test_lost_listener_flushes_every_cache(call, app, db_pool):
    from tests.conftest import store_manifests

    listener = app[LISTENER]
    await _listener_connected(app)
    image = manifest()
    await store_manifests(db_pool, image)
    await call(f"/my/images/{image['uuid']}")
    store = app[IMAGE_STORE]
    keys = app[KEY_STORE]
    assert store.cached_images > 0
    assert keys._entries
    cached_entry = _entry(store, image["uuid"])
    assert cached_entry is not None
    reconnects = listener.reconnects
    image_generation, key_generation = store._generation, keys._generation

    # Terminate the listener's own backend (only that connection of this test run).
    terminated = await db_pool.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name = 'cloudapi-images-listener' AND datname = current_database()"
    )
    assert terminated >= 1

    async def flushed_and_back():
        return listener.reconnects > reconnects and listener.connected

    await wait_until(flushed_and_back, timeout=20, message="the listener to reconnect")
    # Both caches were flushed (at the drop, and again on reconnecting), so everything
    # cached before the drop is gone.
    assert store._generation >= image_generation + 2
    assert keys._generation >= key_generation + 2
    # The cache fills itself again after reconnecting, with entries read after the flush.
    assert _entry(store, image["uuid"]) is not cached_entry
    answer = await call(f"/my/images/{image['uuid']}")
    assert answer.status == 200


async def test_rejected_listener_warns_once():
    import secrets
    from urllib.parse import urlsplit, urlunsplit

    import structlog

    from service.notify import ChangeListener
    from tests.conftest import ADMIN_DSN

    # A database the shared cluster lacks: Postgres rejects every attempt (3D000).
    dsn = urlunsplit(urlsplit(ADMIN_DSN)._replace(path=f"/missing_{secrets.token_hex(4)}"))
    listener = ChangeListener(dsn, connect_timeout=2.0, retry_max=0.05)
    with structlog.testing.capture_logs() as logs:
        listener.start()
        try:
            async def three_failures():
                return listener.connect_failures >= 3

            await wait_until(three_failures, timeout=10, message="three failed attempts")
        finally:
            await listener.stop()

    failures = [entry for entry in logs if entry["event"] == "listener_connect_failed"]
    warnings = [entry for entry in failures if entry["log_level"] == "warning"]
    assert len(warnings) == 1
    assert "InvalidCatalogNameError" in warnings[0]["error"]
    assert not listener.connected
