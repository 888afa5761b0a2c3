"""The event contract: what decode() accepts, and the reason it gives for what it rejects."""

from pathlib import Path

import fastjsonschema
import orjson
import pytest

from workers.contract import (
    _VALIDATE_BY_TYPE,
    EVENT_TYPES,
    IMAGE_EVENT_TYPES,
    OPERATOR_UUID,
    ImageEvent,
    InvalidEvent,
    Rejection,
    _validate,
    decode,
)
from workers.producer import account_event, image_event
from tests.helpers import REMOVE, manifest, new_uuid


def _nested(depth: int):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


def _body(event) -> bytes:
    return orjson.dumps(event)


def test_valid_image_event_decodes():
    image = manifest(os="QEMU", owner="not-a-uuid-owner-from-a-real-manifest")

    event = decode(_body(image_event("image.created", image, revision=3)))

    assert isinstance(event, ImageEvent)
    assert event.revision == 3
    assert event.owner == "not-a-uuid-owner-from-a-real-manifest"
    assert orjson.loads(event.manifest_json)["os"] == "QEMU"


def test_manifest_key_order_and_unknown_fields_are_kept():
    image = manifest(zzz_unknown={"b": 1, "a": [1, 2]}, tags={"z": 1, "a": 2})

    event = decode(_body(image_event("image.updated", image, revision=1)))

    stored = orjson.loads(event.manifest_json)
    assert list(stored)[: len(image)] == list(image)
    assert stored["zzz_unknown"] == {"b": 1, "a": [1, 2]}
    assert list(stored["tags"]) == ["z", "a"]


def test_missing_state_public_owner_get_imgapi_defaults():
    image = manifest(state=REMOVE, public=REMOVE, owner=REMOVE)

    event = decode(_body(image_event("image.activated", image, revision=2)))

    assert (event.state, event.public, event.owner) == ("active", False, OPERATOR_UUID)


def test_deleted_event_has_no_manifest():
    event = decode(_body(image_event("image.deleted", image_uuid=new_uuid(), revision=4)))

    assert event.deleted
    assert event.manifest_json is None


def _rejection(body: bytes, **kwargs) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as caught:
        decode(body, **kwargs)
    return caught.value


def _event(**changes):
    """Return a valid event with `changes`; a new manifest also sets image_uuid."""
    event = image_event("image.created", manifest(), revision=1)
    if isinstance(changes.get("manifest"), dict):
        event["image_uuid"] = changes["manifest"]["uuid"]
    for key, value in changes.items():
        if value is REMOVE:
            event.pop(key)
        else:
            event[key] = value
    return event


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", Rejection.NOT_JSON),
        (b"\xff\xfe", Rejection.NOT_JSON),
        (b"[1, 2]", Rejection.NOT_AN_OBJECT),
        (b'"text"', Rejection.NOT_AN_OBJECT),
        (_body(_event(extra="x")), Rejection.SCHEMA_VIOLATION),
        (_body(_event(event_id=REMOVE)), Rejection.SCHEMA_VIOLATION),
        (_body(_event(event_id="not-a-uuid")), Rejection.SCHEMA_VIOLATION),
        (_body(_event(type="image.exploded")), Rejection.SCHEMA_VIOLATION),
        (_body(_event(revision="1")), Rejection.SCHEMA_VIOLATION),
        (_body(_event(revision=0)), Rejection.SCHEMA_VIOLATION),
        (_body(_event(time="yesterday")), Rejection.SCHEMA_VIOLATION),
        (_body(_event(time="2026-02-30T00:00:00Z")), Rejection.SCHEMA_VIOLATION),
        (_body(_event(contract_version=2)), Rejection.SCHEMA_VIOLATION),
        (_body(_event(image_uuid=REMOVE)), Rejection.SCHEMA_VIOLATION),
        (_body(_event(manifest=REMOVE)), Rejection.SCHEMA_VIOLATION),
        (_body(_event(manifest=manifest(name=5))), Rejection.SCHEMA_VIOLATION),
        (_body(_event(manifest=manifest(public="yes"))), Rejection.SCHEMA_VIOLATION),
        (_body(_event(manifest=manifest(acl="b0c1d2e3-0000-4000-8000-000000000002"))), Rejection.SCHEMA_VIOLATION),
        (_body(_event(manifest=manifest(state="exploded"))), Rejection.SCHEMA_VIOLATION),
        (_body(_event(manifest=manifest(name="x" * 513))), Rejection.SCHEMA_VIOLATION),
        (_body(_event(image_uuid=new_uuid())), Rejection.MANIFEST_MISMATCH),
        (_body(_event(manifest=manifest(description="a\x00b"))), Rejection.NUL_CHARACTER),
        (_body(_event(manifest=manifest(tags={"a\x00": 1}))), Rejection.NUL_CHARACTER),
        (_body(_event(manifest=manifest(image_size=1 << 63))), Rejection.NUMBER_OUT_OF_RANGE),
        (b'{"contract_version": 1, "x": 18446744073709551616}', Rejection.NUMBER_OUT_OF_RANGE),
        (_body(_event(manifest=manifest(tags={"deep": _nested(40)}))), Rejection.TOO_DEEP),
    ],
)
def test_rejections(body, reason):
    assert _rejection(body).reason is reason


def test_deleted_event_with_manifest_is_rejected():
    event = _event(type="image.deleted")

    assert _rejection(_body(event)).reason is Rejection.SCHEMA_VIOLATION


def test_size_limit():
    event = _event(manifest=manifest(description="x" * 500, blob="y" * 5000))

    assert _rejection(_body(event), max_bytes=4096).reason is Rejection.TOO_LARGE
    decode(_body(event), max_bytes=8192)


def test_int64_bounds_are_inclusive():
    biggest = (1 << 63) - 1

    decode(_body(_event(manifest=manifest(image_size=biggest, files=[{"size": biggest}]))))
    decode(_body(_event(manifest=manifest(image_size=-(1 << 63)))))


def test_account_events_decode():
    account = new_uuid()

    upserted = decode(_body(account_event("account.upserted", account, revision=1, login="alice")))
    removed = decode(_body(account_event("account.key.removed", account, revision=2, key_name="id_rsa")))

    assert (upserted.login, upserted.disabled) == ("alice", False)
    assert removed.key_name == "id_rsa"


@pytest.mark.parametrize("login", ["my", "", "has space", "a/b"])
def test_account_login_rules(login):
    body = _body(account_event("account.upserted", new_uuid(), revision=1, login=login))

    assert _rejection(body).reason is Rejection.SCHEMA_VIOLATION


def test_rejection_detail_names_the_field():
    error = _rejection(_body(_event(manifest=manifest(name=5))))

    assert "manifest.name" in error.detail


REAL_MANIFESTS = [
    orjson.loads(line) for line in (Path(__file__).parents[1] / "data" / "real-manifests.jsonl").read_bytes().splitlines()
]
WRONG_VALUES = (None, 0, -1, "x", "", [], {}, True, 1.5)
# The schema requires only a non-empty string; decode() parses the key afterwards.
ACCOUNT_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 alice@example"


def _valid_documents():
    for image in REAL_MANIFESTS:
        yield image_event("image.updated", image, revision=2)
    for event_type in IMAGE_EVENT_TYPES:
        if event_type == "image.deleted":
            yield image_event(event_type, image_uuid=new_uuid(), revision=9)
        else:
            yield image_event(event_type, manifest(), revision=1)
    account = new_uuid()
    yield account_event("account.upserted", account, revision=1, login="alice")
    yield account_event("account.key.added", account, revision=2, key_name="id_rsa", public_key=ACCOUNT_KEY)
    yield account_event("account.key.removed", account, revision=3, key_name="id_rsa")


def _variants(document):
    """Yield the document, then copies of it with one key removed, retyped or given a wrong value."""
    yield document
    for key in document:
        yield {name: value for name, value in document.items() if name != key}
        for value in WRONG_VALUES:
            yield {**document, key: value}
    for event_type in EVENT_TYPES:
        yield {**document, "type": event_type}
    for name in ("manifest", "account", "key"):
        inner = document.get(name)
        if not isinstance(inner, dict):
            continue
        for key in {*inner, "uuid", "name", "state", "public", "owner", "acl", "login", "public_key"}:
            for value in WRONG_VALUES:
                yield {**document, name: {**inner, key: value}}


def _passes(validator, document) -> bool:
    try:
        validator(document)
    except fastjsonschema.JsonSchemaValueException:
        return False
    return True


def test_type_validators_agree_with_whole_schema():
    # decode() checks an event of a known type against that type's part of the schema only.
    # The outcome must be the one the whole schema gives.
    checked = {True: 0, False: 0}
    for document in _valid_documents():
        for variant in _variants(document):
            event_type = variant.get("type")
            if not isinstance(event_type, str) or event_type not in _VALIDATE_BY_TYPE:
                continue
            whole = _passes(_validate, variant)
            assert _passes(_VALIDATE_BY_TYPE[event_type], variant) is whole, variant
            checked[whole] += 1

    assert set(_VALIDATE_BY_TYPE) == set(EVENT_TYPES)
    assert checked[True] > len(REAL_MANIFESTS), checked
    assert checked[False] > 1000, checked


@pytest.mark.parametrize("event_type", [["image.created"], {"image.created": 1}, 7, None, REMOVE])
def test_unknown_type_value_rejected(event_type):
    assert _rejection(_body(_event(type=event_type))).reason is Rejection.SCHEMA_VIOLATION
