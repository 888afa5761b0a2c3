"""Property tests of the event contract (`workers.contract.decode`), and a bounded run
of the same events through a real worker, RabbitMQ and Postgres, with the results read
back through GetImage.

Every way of breaking the contract, as the schema and the limits of docs/events.md
state it, must end in InvalidEvent with its reason code, and in the worker in a dead
letter carrying that code. Valid events with extreme values must be applied and served
back unchanged to their owner. The extremes are names and descriptions at their maximum
length, characters of every Unicode plane but NUL, tags nested to the maximum depth, a
10,000-entry acl, and numbers at the ends of the 64-bit range.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import json
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import aio_pika
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import AMQP_URL
from tests.helpers import ALICE_UUID, DEFAULT_TIMEOUT, openssh_public, wait_until
from workers.contract import (
    INT64_MAX,
    INT64_MIN,
    MAX_DEPTH,
    ImageEvent,
    InvalidEvent,
    Rejection,
    apply_imgapi_defaults,
    decode,
)
from workers.producer import account_event, image_event

SMALL_LIMIT = 4096  # the message size limit the pure tests decode with

# One character of every Unicode plane (0 to 16) and the awkward ones of the BMP:
# controls, the line and paragraph separators, a right-to-left mark, a byte-order mark,
# the last characters of the BMP and of Unicode. NUL is the one character excluded.
EVERY_PLANE = (
    "\x01\x1f\x7f\u00e9\u2028\u2029\u200f\ufeff\ufffd\uffff"
    + "".join(chr(plane * 0x10000 + 0x41) for plane in range(1, 17))
    + "\U0001f600\U0010ffff"
)


def _manifest(**fields: Any) -> dict[str, Any]:
    image_uuid = str(uuid.uuid4())
    manifest = {
        "v": 2,
        "uuid": image_uuid,
        "owner": ALICE_UUID,
        "name": "fuzz",
        "version": "1.0.0",
        "state": "active",
        "disabled": False,
        "public": False,
        "type": "zone-dataset",
        "os": "smartos",
        "files": [{"sha1": "0" * 40, "size": 1, "compression": "gzip"}],
        "requirements": {},
    }
    manifest.update(fields)
    return manifest


def _nested(levels: int) -> dict[str, Any]:
    """Return `levels` dicts nested in one another, the innermost holding a string."""
    value: dict[str, Any] = {"leaf": "x"}
    for level in range(levels - 1):
        value = {f"level{level}": value}
    return value


def _fill(text: str, length: int) -> str:
    return (text * (length // len(text) + 1))[:length]


# Valid events with extreme values.

_ANY_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)


@st.composite
def extreme_manifests(draw) -> dict[str, Any]:
    def text(maximum: int) -> str:
        return _fill(EVERY_PLANE + draw(_ANY_TEXT), maximum) if draw(st.booleans()) else draw(_ANY_TEXT)[:maximum]

    size = st.integers(INT64_MIN, INT64_MAX)
    return _manifest(
        name=text(512),
        version=text(128),
        description=draw(st.none() | st.just(text(512))),
        homepage=text(1024),
        eula=draw(st.none() | st.just(text(1024))),
        published_at=text(64),
        origin=text(128),
        type=draw(st.sampled_from(["zvol", "zone-dataset", "lx-dataset"])),
        os=text(64),
        image_size=draw(size),
        files=[{"sha1": text(128), "size": draw(size), "compression": text(32)}],
        requirements={"min_ram": draw(size), "max_ram": draw(size), "brand": text(64), "bootrom": text(64)},
        # The event is depth 1, the manifest 2 and tags 3, so tags may hold 29 more levels.
        tags=draw(st.sampled_from([_nested(MAX_DEPTH - 2), {"k": text(40)}, {}])),
        acl=draw(st.lists(st.uuids().map(str), max_size=20)),
    )


@settings(max_examples=200, deadline=None)
@given(manifest=extreme_manifests(), revision=st.integers(1, INT64_MAX))
def test_extreme_valid_events_decode(manifest, revision):
    body = orjson.dumps(image_event("image.updated", manifest, revision=revision))

    event = decode(body)

    assert isinstance(event, ImageEvent)
    assert event.revision == revision
    stored = orjson.loads(event.manifest_json)
    assert stored == apply_imgapi_defaults(manifest)
    assert list(stored) == list(manifest)


# Ways of breaking the contract. Each takes a valid event and a random source and
# returns the message body and the reason the worker must give.

Breakage = Callable[[dict[str, Any], random.Random], tuple[bytes, Rejection]]


def _dumps(document: Any) -> bytes:
    # The standard library, because orjson refuses to write integers beyond 64 bits.
    return json.dumps(document, ensure_ascii=False).encode("utf-8")


def _too_large(event, rng):
    event["manifest"]["description"] = None
    event["manifest"]["padding"] = "x" * (SMALL_LIMIT + rng.randint(1, 1000))
    return _dumps(event), Rejection.TOO_LARGE


def _not_json(event, rng):
    body = _dumps(event)
    choice = rng.randrange(6)
    if choice == 0:
        return body[: rng.randrange(len(body))], Rejection.NOT_JSON
    if choice == 1:
        position = rng.randrange(len(body))
        return body[:position] + bytes([rng.choice([0x80, 0xC0, 0xFE, 0xFF])]) + body[position:], Rejection.NOT_JSON
    if choice == 2:
        return body + b" trailing", Rejection.NOT_JSON
    if choice == 3:
        return body.replace(b'"revision":', b'"revision":NaN,"x":', 1), Rejection.NOT_JSON
    if choice == 4:
        return body.replace(b'"', b"'"), Rejection.NOT_JSON
    return b"\xef\xbb\xbf" + body if rng.random() < 0.5 else b"", Rejection.NOT_JSON


def _not_an_object(event, rng):
    return _dumps(rng.choice([[event], "event", 42, None, True, []])), Rejection.NOT_AN_OBJECT


def _string_paths(value: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in _string_paths(item, (*path, key))]
    if isinstance(value, list):
        return [p for index, item in enumerate(value) for p in _string_paths(item, (*path, index))]
    return [path] if isinstance(value, str) else []


def _set(document: Any, path: tuple, value: Any) -> None:
    for step in path[:-1]:
        document = document[step]
    document[path[-1]] = value


def _get(document: Any, path: tuple) -> Any:
    for step in path:
        document = document[step]
    return document


def _nul_character(event, rng):
    if rng.random() < 0.2:
        event["manifest"]["tags"] = {"bad\x00key": "v"}
    else:
        path = rng.choice(_string_paths(event))
        text = _get(event, path)
        position = rng.randint(0, len(text))
        _set(event, path, text[:position] + "\x00" + text[position:])
    return _dumps(event), Rejection.NUL_CHARACTER


def _number_out_of_range(event, rng):
    value = rng.choice([INT64_MAX + 1, INT64_MIN - 1, 2**64, -(2**70), 10**30, 1e19, -1e300])
    path = rng.choice([("revision",), ("manifest", "image_size"), ("manifest", "files", 0, "size"), ("manifest", "tags")])
    if path[-1] == "tags":
        value = {"big": value}
    _set(event, path, value)
    return _dumps(event), Rejection.NUMBER_OUT_OF_RANGE


def _too_deep(event, rng):
    if rng.random() < 0.5:
        event["manifest"]["tags"] = _nested(MAX_DEPTH - 1 + rng.randint(0, 20))
    else:
        nested: Any = [1]
        for _ in range(MAX_DEPTH + rng.randint(0, 20)):
            nested = [nested]
        event["manifest"]["extra"] = nested
    return _dumps(event), Rejection.TOO_DEEP


_SCHEMA_BREAKAGES: list[Callable[[dict[str, Any], random.Random], None]] = [
    lambda event, rng: event.pop(rng.choice(["contract_version", "event_id", "type", "revision", "time", "manifest", "image_uuid"])),
    lambda event, rng: event.update({rng.choice(["extra", "Type", "manifest_json", ""]): 1}),
    lambda event, rng: event.update(contract_version=rng.choice([2, 0, "1", None, True])),
    lambda event, rng: event.update(type=rng.choice(["image.exploded", "", "IMAGE.CREATED", "image.created ", 7])),
    lambda event, rng: event.update(event_id=rng.choice(["", "not-a-uuid", str(uuid.uuid4()).upper(), str(uuid.uuid4()) + "\n", 1])),
    lambda event, rng: event.update(revision=rng.choice([0, -1, "1", 1.5, None, [1]])),
    lambda event, rng: event.update(
        time=rng.choice(["", "yesterday", "2026-13-01T00:00:00Z", "2026-02-30T00:00:00Z", "2026-01-01 00:00:00Z",
                         "2026-01-01T00:00:00", "2026-01-01T00:00:00.1234567890Z", "9999-12-31T23:59:59-23:59",
                         "0001-01-01T00:00:00+23:59", "2026-01-01T24:00:00Z", 1700000000])
    ),
    lambda event, rng: event["manifest"].update(name=_fill(EVERY_PLANE, 513)),
    lambda event, rng: event["manifest"].update(description=_fill("d", 513)),
    lambda event, rng: event["manifest"].update(homepage=_fill("h", 1025)),
    lambda event, rng: event["manifest"].update(state=rng.choice(["deleted", "ACTIVE", "", None])),
    lambda event, rng: event["manifest"].update(public=rng.choice(["true", 1, None])),
    lambda event, rng: event["manifest"].update(acl=rng.choice(["alice", [1], [None], {"a": 1}])),
    lambda event, rng: event["manifest"].update(owner=rng.choice(["", 5, None, _fill("o", 129)])),
    lambda event, rng: event["manifest"].update(files=rng.choice([{}, [1], [{"size": "1"}], [{"sha1": 1}]])),
    lambda event, rng: event["manifest"].update(requirements=rng.choice([[], {"min_ram": "512"}, {"brand": 1}])),
    lambda event, rng: event["manifest"].update(image_size=rng.choice(["1", 1.5, True])),
    lambda event, rng: event["manifest"].update(tags=rng.choice([[], "tags", 1])),
    lambda event, rng: event["manifest"].update(error=rng.choice([[], {"code": 1}])),
    lambda event, rng: event["manifest"].update(uuid=rng.choice([1, "not-a-uuid", None])),
    lambda event, rng: event.update(manifest=rng.choice([[], "manifest", None, {}])),
]


def _schema_violation(event, rng):
    rng.choice(_SCHEMA_BREAKAGES)(event, rng)
    return _dumps(event), Rejection.SCHEMA_VIOLATION


def _manifest_mismatch(event, rng):
    event["manifest"]["uuid"] = str(uuid.uuid4())
    return _dumps(event), Rejection.MANIFEST_MISMATCH


_ACCOUNT_UUID = "f0220000-0000-4000-8000-0000000000f0"


def _account_schema_violation(event, rng):
    login = rng.choice(["my", "", "-alice", "al ice", "al/ice", "alice\n", _fill("a", 257), "\u0430lice"])
    body = account_event("account.upserted", _ACCOUNT_UUID, revision=1, login=login)
    if rng.random() < 0.3:
        body = account_event("account.key.removed", _ACCOUNT_UUID, revision=1, key_name=rng.choice(["a/b", "", "a b", "a\n"]))
    return _dumps(body), Rejection.SCHEMA_VIOLATION


def _invalid_key(event, rng):
    text = rng.choice(
        [
            "ssh-ed25519 AAAA",
            "ssh-rsa not-base64!",
            "ssh-dss AAAAB3NzaC1kc3MAAACBAP",
            "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTY=",
            "not a key at all",
            "ssh-ed25519",
        ]
    )
    return _dumps(account_event("account.key.added", _ACCOUNT_UUID, revision=1, key_name="k", public_key=text)), Rejection.INVALID_KEY


BREAKAGES: dict[str, Breakage] = {
    "too_large": _too_large,
    "not_json": _not_json,
    "not_an_object": _not_an_object,
    "nul_character": _nul_character,
    "number_out_of_range": _number_out_of_range,
    "too_deep": _too_deep,
    "schema_violation": _schema_violation,
    "account_schema_violation": _account_schema_violation,
    "manifest_mismatch": _manifest_mismatch,
    "invalid_key": _invalid_key,
}


def _base_event(rng: random.Random) -> dict[str, Any]:
    manifest = _manifest(description="d" * rng.randint(0, 50), tags={"role": "os"}, acl=[str(uuid.uuid4())])
    return image_event(rng.choice(["image.created", "image.activated", "image.updated"]), manifest, revision=rng.randint(1, 100))


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(sorted(BREAKAGES)), rng=st.randoms(use_true_random=False))
def test_every_breakage_has_its_reason(kind, rng):
    body, reason = BREAKAGES[kind](_base_event(rng), rng)

    with pytest.raises(InvalidEvent) as caught:
        decode(body, max_bytes=SMALL_LIMIT)

    assert caught.value.reason is reason, caught.value.detail
    assert caught.value.detail


# Anything at all: decode returns an event or raises InvalidEvent, nothing else.

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=30,
)


def _mutate(document: Any, rng: random.Random, replacement: Any) -> Any:
    """Replace or delete one randomly chosen value anywhere in `document`."""
    containers = []

    def walk(value):
        if isinstance(value, dict):
            containers.append(value)
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            containers.append(value)
            for item in value:
                walk(item)

    walk(document)
    target = rng.choice(containers)
    if not target:
        return document
    key = rng.choice(list(target.keys()) if isinstance(target, dict) else list(range(len(target))))
    if rng.random() < 0.3:
        del target[key]
    else:
        target[key] = replacement
    return document


@settings(max_examples=300, deadline=None)
@given(rng=st.randoms(use_true_random=False), replacement=_JSON, times=st.integers(1, 4))
def test_mutated_events_decode_or_raise_invalid_event(rng, replacement, times):
    event = _base_event(rng)
    for _ in range(times):
        event = _mutate(event, rng, copy.deepcopy(replacement))

    try:
        decode(_dumps(event))
    except InvalidEvent as exc:
        assert isinstance(exc.reason, Rejection)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=300) | _JSON.map(_dumps))
def test_arbitrary_bodies_decode_or_raise_invalid_event(body):
    with contextlib.suppress(InvalidEvent):
        decode(body)


# Through the worker: its own exchange and queues, RabbitMQ and Postgres, a bounded
# number of messages.

_SEED = 20261204


@pytest.fixture(scope="module")
async def fuzz_worker(settings):
    """A worker on exchange and queue names of this module alone, so that its dead
    letters do not mix with those of other tests."""
    from workers.consumer import Worker

    own = dataclasses.replace(
        settings, amqp_exchange=f"{settings.amqp_exchange}.fuzz", amqp_queue=f"{settings.amqp_queue}.fuzz"
    )
    worker = Worker(own)
    await worker.start()
    task = asyncio.create_task(worker.run())
    yield own
    worker.stop()
    await asyncio.wait_for(task, timeout=DEFAULT_TIMEOUT)
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        for queue in (own.amqp_queue, own.dead_letter_queue):
            await channel.queue_delete(queue)
        for exchange in (own.amqp_exchange, own.dead_letter_exchange):
            await channel.exchange_delete(exchange)
    finally:
        await connection.close()


def _invalid_messages() -> list[tuple[str, bytes, Rejection]]:
    """Three messages of every breakage, plus one over the worker's real size limit."""
    rng = random.Random(_SEED)
    messages = []
    for kind in sorted(BREAKAGES):
        if kind == "too_large":
            continue
        for index in range(3):
            body, reason = BREAKAGES[kind](_base_event(rng), rng)
            messages.append((f"fuzz-{kind}-{index}", body, reason))
    event = _base_event(rng)
    event["manifest"]["padding"] = "x" * (1 << 20)
    messages.append(("fuzz-too_large-0", orjson.dumps(event), Rejection.TOO_LARGE))
    return messages


def _extreme_manifests() -> list[dict[str, Any]]:
    return [
        _manifest(
            name=_fill(EVERY_PLANE, 512),
            version=_fill(EVERY_PLANE, 128),
            description=_fill(EVERY_PLANE[::-1], 512),
            homepage=_fill("https://example.com/" + EVERY_PLANE, 1024),
            eula=_fill(EVERY_PLANE, 1024),
            published_at=_fill(EVERY_PLANE, 64),
            origin=_fill(EVERY_PLANE, 128),
            os=_fill(EVERY_PLANE, 64),
            tags={EVERY_PLANE: EVERY_PLANE, "\u2028": ["\uffff", "\U0010ffff"]},
        ),
        _manifest(name="deep", tags=_nested(MAX_DEPTH - 2)),
        _manifest(name="wide acl", acl=[str(uuid.UUID(int=index)) for index in range(10_000)]),
        _manifest(
            name="largest numbers",
            type="zvol",
            image_size=INT64_MAX,
            files=[{"sha1": "f" * 40, "size": INT64_MAX, "compression": "none"}],
            requirements={"min_ram": INT64_MAX, "max_ram": INT64_MAX},
        ),
        _manifest(
            name="smallest numbers",
            type="zvol",
            image_size=INT64_MIN,
            files=[{"sha1": "0" * 40, "size": INT64_MIN, "compression": "none"}],
            requirements={"min_ram": INT64_MIN, "max_ram": INT64_MIN},
        ),
    ]


def _expected_fields(manifest: dict[str, Any]) -> dict[str, Any]:
    """Return what GetImage at API 8 must show of `manifest` (see service/images.py)."""
    expected = {key: manifest[key] for key in ("name", "version", "os", "homepage", "published_at", "owner", "public", "state", "eula", "acl", "origin", "tags") if key in manifest}
    expected["id"] = manifest["uuid"]
    expected["type"] = manifest["type"]
    if manifest["type"] == "zvol":
        expected["image_size"] = manifest["image_size"]
    if manifest.get("description"):
        expected["description"] = manifest["description"]
    expected["files"] = [{key: manifest["files"][0][key] for key in ("compression", "sha1", "size")}]
    requirements = manifest.get("requirements") or {}
    expected["requirements"] = {}
    if requirements.get("max_ram"):
        expected["requirements"].update(max_memory=requirements["max_ram"], max_ram=requirements["max_ram"])
    if requirements.get("min_ram"):
        expected["requirements"].update(min_memory=requirements["min_ram"], min_ram=requirements["min_ram"])
    return expected


async def _take_dead_letters(settings, expected_ids: set[str]) -> dict[str, aio_pika.abc.AbstractIncomingMessage]:
    """Take dead letters from the queue until those of `expected_ids` are all in."""
    connection = await aio_pika.connect(AMQP_URL)
    taken = {}
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(settings.dead_letter_queue)
        deadline = time.monotonic() + DEFAULT_TIMEOUT
        while not expected_ids <= set(taken):
            message = await queue.get(no_ack=True, fail=False)
            if message is None:
                assert time.monotonic() < deadline, f"dead letters missing after {DEFAULT_TIMEOUT}s: {sorted(expected_ids - set(taken))}"
                await asyncio.sleep(0.05)
                continue
            taken[message.message_id] = message
    finally:
        await connection.close()
    return taken


async def test_worker_dead_letters_breakages_and_applies_extremes(fuzz_worker, api, http, accounts, db_pool):
    invalid = _invalid_messages()
    valid = [image_event("image.updated", manifest, revision=1) for manifest in _extreme_manifests()]
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(fuzz_worker.amqp_exchange)
        for message_id, body, _reason in invalid:
            await exchange.publish(aio_pika.Message(body, message_id=message_id), routing_key="image.created")
        for event in valid:
            message = aio_pika.Message(orjson.dumps(event), message_id=event["event_id"])
            await exchange.publish(message, routing_key=event["type"])
    finally:
        await connection.close()

    letters = await _take_dead_letters(fuzz_worker, {message_id for message_id, _body, _reason in invalid})

    wrong = []
    for message_id, body, reason in invalid:
        letter = letters[message_id]
        if letter.headers.get("x-rejection-reason") != reason.value or letter.body != body:
            wrong.append((message_id, letter.headers.get("x-rejection-reason"), reason.value))
        if not letter.headers.get("x-rejection-detail"):
            wrong.append((message_id, "no detail"))
    assert wrong == []
    assert len(letters) == len(invalid)

    alice = accounts["alice"]
    for event in valid:
        manifest = event["manifest"]
        path = f"/my/images/{manifest['uuid']}"

        async def served():
            headers = {"Accept-Version": "~8", **alice.sign("GET", path, key="ed25519")}
            async with http.get(api + path, headers=headers) as response:
                return orjson.loads(await response.read()) if response.status == 200 else None

        image = await wait_until(served, message=f"image {manifest['name'][:20]!r} to be served")
        expected = _expected_fields(manifest)
        assert {key: image.get(key) for key in expected} == expected
        assert list(image.get("tags", {})) == list(manifest.get("tags", {}))

    recorded = await db_pool.fetchval(
        "SELECT count(*) FROM event_log WHERE event_id = ANY($1::uuid[])", [event["event_id"] for event in valid]
    )
    assert recorded == len(valid)
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(fuzz_worker.amqp_queue, passive=True)
        dead_letter_queue = await channel.declare_queue(fuzz_worker.dead_letter_queue, passive=True)
    finally:
        await connection.close()
    # Nothing left unsettled, and no dead letter beyond the invalid messages.
    assert queue.declaration_result.message_count == 0
    assert dead_letter_queue.declaration_result.message_count == 0


async def test_valid_account_events_with_extreme_values(fuzz_worker, db_pool):
    from workers.producer import EventPublisher
    from tests.helpers import TestAccount

    person = TestAccount("x")
    login = "A" + _fill("z9._@+-", 255)
    # Key names exclude "/" and white space, which includes U+001F, U+2028 and U+2029.
    key_name = _fill("".join(character for character in EVERY_PLANE if not character.isspace()), 256)
    events = [
        account_event("account.upserted", person.uuid, revision=INT64_MAX - 2, login=login),
        account_event(
            "account.key.added", person.uuid, revision=INT64_MAX - 1, key_name=key_name, public_key=openssh_public(person.keys["rsa"])
        ),
    ]
    async with EventPublisher.connect(fuzz_worker) as publisher:
        for event in events:
            await publisher.publish(event)

    async def stored():
        return await db_pool.fetchrow("SELECT login, revision FROM accounts WHERE uuid = $1", person.uuid)

    row = await wait_until(stored, message="the account to be stored")
    assert (row["login"], row["revision"]) == (login, INT64_MAX - 2)

    async def key_stored():
        return await db_pool.fetchval("SELECT name FROM account_keys WHERE account_uuid = $1", person.uuid)

    assert await wait_until(key_stored, message="the key to be stored") == events[1]["key"]["name"]
