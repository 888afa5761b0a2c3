"""The event contract: decode and validate one message body into a typed event.

`decode()` is pure (bytes in, event or `InvalidEvent` out). Its checks, in order:
size, UTF-8 JSON object, the limits JSON Schema cannot state (no NUL character in any
string, every number within the signed 64-bit integer range, nesting depth), the JSON
Schema of `workers/schemas/events.schema.json`, and the cross-field rule that a manifest
describes the image its event names.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import fastjsonschema
import orjson

from service.auth.keys import InvalidKey, parse_public_key

CONTRACT_VERSION = 1

IMAGE_EVENT_TYPES = (
    "image.created",
    "image.activated",
    "image.failed",
    "image.disabled",
    "image.enabled",
    "image.updated",
    "image.deleted",
)
ACCOUNT_EVENT_TYPES = ("account.upserted", "account.key.added", "account.key.removed")
EVENT_TYPES = IMAGE_EVENT_TYPES + ACCOUNT_EVENT_TYPES

DEFAULT_MAX_BYTES = 1 << 20
MAX_DEPTH = 32  # nested objects and arrays, the event object itself counting as 1
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1

# IMGAPI's values for manifest fields that older records lack: what IMGAPI itself
# would hold for them (state derived from an activated, enabled image; public false; the
# operator as owner).
OPERATOR_UUID = "00000000-0000-0000-0000-000000000000"
IMGAPI_DEFAULTS = (("state", "active"), ("public", False), ("owner", OPERATOR_UUID))


class Rejection(enum.StrEnum):
    """The reason a message breaks the contract, sent in the dead-letter header and logs."""

    TOO_LARGE = "too_large"
    NOT_JSON = "not_json"
    NOT_AN_OBJECT = "not_an_object"
    NUL_CHARACTER = "nul_character"
    NUMBER_OUT_OF_RANGE = "number_out_of_range"
    TOO_DEEP = "too_deep"
    SCHEMA_VIOLATION = "schema_violation"
    MANIFEST_MISMATCH = "manifest_mismatch"
    INVALID_KEY = "invalid_key"


class InvalidEvent(Exception):
    """A message that can never be applied; it is dead-lettered with `reason` and `detail`."""

    def __init__(self, reason: Rejection, detail: str):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True, slots=True)
class ImageEvent:
    event_id: str
    type: str
    image_uuid: str
    revision: int
    time: datetime
    # None for image.deleted. The manifest is stored as this compact JSON text, so the
    # API serves exactly what was published, key order included.
    manifest_json: str | None
    owner: str | None
    public: bool | None
    state: str | None
    acl_json: str | None

    @property
    def deleted(self) -> bool:
        return self.manifest_json is None


@dataclass(frozen=True, slots=True)
class AccountEvent:
    event_id: str
    type: str
    account_uuid: str
    revision: int
    time: datetime
    login: str | None = None
    disabled: bool | None = None
    key_name: str | None = None
    public_key: str | None = None


Event = ImageEvent | AccountEvent


def _load_schema() -> dict[str, Any]:
    text = resources.files("workers").joinpath("schemas/events.schema.json").read_bytes()
    return orjson.loads(text)


EVENT_SCHEMA = _load_schema()
_validate = fastjsonschema.compile(EVENT_SCHEMA)


def _compile_by_type(schema: dict[str, Any]) -> dict[str, Callable[[Any], Any]]:
    """Compile one validator per event type: the whole schema with `allOf` cut to the type's `then`.

    The code that fastjsonschema generates for the whole schema raises and catches an
    exception for each `if` that does not match, four for every event. These validators
    have no `if`.
    """
    by_type = {}
    for rule in schema["allOf"]:
        condition = rule["if"]["properties"]["type"]
        types = condition["enum"] if "enum" in condition else [condition["const"]]
        validator = fastjsonschema.compile({**schema, "allOf": [rule["then"]]})
        by_type.update(dict.fromkeys(types, validator))
    return by_type


_VALIDATE_BY_TYPE = _compile_by_type(EVENT_SCHEMA)


def apply_imgapi_defaults(manifest: dict[str, Any]) -> dict[str, Any]:
    """Return `manifest` with IMGAPI's values for a missing state, public or owner."""
    missing = [(key, value) for key, value in IMGAPI_DEFAULTS if key not in manifest]
    if not missing:
        return manifest
    return {**manifest, **dict(missing)}


def _check_limits(document: Any) -> None:
    """Walk the decoded document once, checking what JSON Schema cannot express."""
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            if depth > MAX_DEPTH:
                raise InvalidEvent(Rejection.TOO_DEEP, f"nesting deeper than {MAX_DEPTH} levels")
            for key, item in value.items():
                if "\x00" in key:
                    raise InvalidEvent(Rejection.NUL_CHARACTER, "an object key contains U+0000")
                stack.append((item, depth + 1))
        elif isinstance(value, list):
            if depth > MAX_DEPTH:
                raise InvalidEvent(Rejection.TOO_DEEP, f"nesting deeper than {MAX_DEPTH} levels")
            stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, str):
            if "\x00" in value:
                raise InvalidEvent(Rejection.NUL_CHARACTER, "a string contains U+0000, which Postgres cannot store")
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            if not INT64_MIN <= value <= INT64_MAX:
                raise InvalidEvent(Rejection.NUMBER_OUT_OF_RANGE, f"{value} is outside the signed 64-bit range")
        elif isinstance(value, float):
            # orjson turns integers beyond 64 bits into floats, and -2^63 - 1 rounds to the
            # float -2^63, so a float of that size stands for an integer out of range.
            if not -9.223372036854775808e18 < value < 9.223372036854775808e18:
                raise InvalidEvent(Rejection.NUMBER_OUT_OF_RANGE, f"{value!r} is outside the signed 64-bit range")


def parse_time(text: str) -> datetime:
    """Parse the contract's RFC 3339 time, keeping at most microseconds.

    Raises ValueError for a time that is not a valid date, or whose UTC instant falls
    outside the years 1 to 9999 (such as 9999-12-31T23:59:59-23:59), which the database
    driver cannot store.
    """
    head, dot, rest = text.partition(".")
    if dot:
        # The schema allows up to nine fractional digits, and datetime keeps six.
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{head}.{rest[:min(digits, 6)]}{rest[digits:]}"
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    moment = datetime.fromisoformat(text)
    try:
        moment.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{text} is outside the years 1 to 9999 in UTC") from None
    return moment


def _validate_schema(document: dict[str, Any]) -> None:
    """Raise InvalidEvent unless `document` matches the event schema."""
    event_type = document.get("type")
    validator = _VALIDATE_BY_TYPE.get(event_type) if isinstance(event_type, str) else None
    if validator is not None:
        try:
            validator(document)
            return
        except fastjsonschema.JsonSchemaValueException:
            pass  # the whole schema below writes the rejection's detail, as for an unknown type
    try:
        _validate(document)
    except fastjsonschema.JsonSchemaValueException as exc:
        raise InvalidEvent(Rejection.SCHEMA_VIOLATION, exc.message) from None


def decode(body: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Event:
    """Decode and validate one message body; raise InvalidEvent when it breaks the contract."""
    if len(body) > max_bytes:
        raise InvalidEvent(Rejection.TOO_LARGE, f"message of {len(body)} bytes exceeds the limit of {max_bytes}")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent(Rejection.NOT_JSON, f"not valid UTF-8 JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidEvent(Rejection.NOT_AN_OBJECT, f"expected a JSON object, got {type(document).__name__}")
    _check_limits(document)
    _validate_schema(document)

    event_type = document["type"]
    try:
        time = parse_time(document["time"])
    except ValueError as exc:
        raise InvalidEvent(Rejection.SCHEMA_VIOLATION, f"data.time is not a valid date and time: {exc}") from None
    if event_type.startswith("image."):
        return _image_event(document, event_type, time)
    return _account_event(document, event_type, time)


def _image_event(document: dict[str, Any], event_type: str, time: datetime) -> ImageEvent:
    image_uuid = document["image_uuid"]
    manifest = document.get("manifest")
    if manifest is None:
        return ImageEvent(
            event_id=document["event_id"],
            type=event_type,
            image_uuid=image_uuid,
            revision=document["revision"],
            time=time,
            manifest_json=None,
            owner=None,
            public=None,
            state=None,
            acl_json=None,
        )
    if manifest["uuid"] != image_uuid:
        raise InvalidEvent(
            Rejection.MANIFEST_MISMATCH,
            f"manifest.uuid {manifest['uuid']} differs from image_uuid {image_uuid}",
        )
    manifest = apply_imgapi_defaults(manifest)
    acl = manifest.get("acl")
    return ImageEvent(
        event_id=document["event_id"],
        type=event_type,
        image_uuid=image_uuid,
        revision=document["revision"],
        time=time,
        manifest_json=orjson.dumps(manifest).decode("utf-8"),
        owner=manifest["owner"],
        public=manifest["public"],
        state=manifest["state"],
        acl_json=orjson.dumps(acl).decode("utf-8") if acl is not None else None,
    )


def _account_event(document: dict[str, Any], event_type: str, time: datetime) -> AccountEvent:
    account = document.get("account") or {}
    key = document.get("key") or {}
    if event_type == "account.key.added":
        try:
            parse_public_key(key["public_key"])
        except InvalidKey as exc:
            raise InvalidEvent(Rejection.INVALID_KEY, f"data.key.public_key: {exc}") from None
    return AccountEvent(
        event_id=document["event_id"],
        type=event_type,
        account_uuid=document["account_uuid"],
        revision=document["revision"],
        time=time,
        login=account.get("login"),
        disabled=account.get("disabled"),
        key_name=key.get("name"),
        public_key=key.get("public_key"),
    )
