"""Translate a stored IMGAPI manifest into CloudAPI's image object, byte for byte.

The rules follow CloudAPI's `translate()` for GetImage: a fixed key order, `requirements`
reduced to a few truthy values, `type` translated for API versions below 8.0, the
fields added in 7.1 gated on the negotiated version, `files` reduced to the first file,
and `error` rewritten unless its code is one of three known ones. Presence follows
JavaScript: a key present with a `null` value is copied as `null`, a missing key is
dropped, and "truthy" means JavaScript truthiness (an empty list is truthy).
"""

from __future__ import annotations

import enum
import math
from typing import Any

import orjson


class Rendering(enum.IntEnum):
    """The shape of the image object at a negotiated API version."""

    V7_0 = 0
    """7.0.0: `type` translated, no 7.1 fields."""
    V7_1 = 1
    """7.1.0 to 7.3.0: `type` translated, 7.1 fields present."""
    V8 = 2
    """8.0.0 and later: IMGAPI `type` as stored, 7.1 fields present."""


# Fields added in API 7.1.0, in output order.
_GATED_FIELDS = ("owner", "public", "state", "eula", "acl", "origin")

# error.code values whose message CloudAPI passes through; any other code is hidden.
_KNOWN_ERROR_CODES = frozenset({"PrepareImageDidNotRun", "VmHasNoOrigin", "NotSupported"})
_INTERNAL_ERROR = {
    "code": "InternalError",
    "message": "an unexpected error occurred (Contact support for assistance.)",
}

# IMGAPI stores the string "null" as type and os of placeholder images and drops it when
# it serializes them; a manifest that still carries it is treated the same way.
_PLACEHOLDER = "null"


def js_truthy(value: Any) -> bool:
    """Return JavaScript's truthiness of a JSON value."""
    if value is None or value is False:
        return False
    if value is True:
        return True
    if isinstance(value, int):
        return value != 0
    if isinstance(value, float):
        return value != 0 and not math.isnan(value)
    if isinstance(value, str):
        return value != ""
    return True


def _requirements(source: Any) -> dict[str, Any]:
    requirements: dict[str, Any] = {}
    if not isinstance(source, dict):
        return requirements
    max_ram = source.get("max_ram")
    if js_truthy(max_ram):
        requirements["max_memory"] = max_ram
        requirements["max_ram"] = max_ram
    min_ram = source.get("min_ram")
    if js_truthy(min_ram):
        requirements["min_memory"] = min_ram
        requirements["min_ram"] = min_ram
    for key in ("brand", "bootrom"):
        value = source.get(key)
        if js_truthy(value):
            requirements[key] = value
    return requirements


def _error(source: Any) -> dict[str, Any]:
    if isinstance(source, dict) and source.get("code") in _KNOWN_ERROR_CODES:
        error = {"code": source["code"]}
        if "message" in source:
            error["message"] = source["message"]
        return error
    return dict(_INTERNAL_ERROR)


def translate(manifest: dict[str, Any], rendering: Rendering) -> dict[str, Any]:
    """Return the CloudAPI image object for `manifest`, keys in CloudAPI's order."""
    image: dict[str, Any] = {}
    if "uuid" in manifest:
        image["id"] = manifest["uuid"]
    for key in ("name", "version"):
        if key in manifest:
            image[key] = manifest[key]
    if "os" in manifest and manifest["os"] != _PLACEHOLDER:
        image["os"] = manifest["os"]
    image["requirements"] = _requirements(manifest.get("requirements"))

    image_type = manifest.get("type")
    if js_truthy(image_type) and image_type != _PLACEHOLDER:
        if rendering is Rendering.V8:
            image["type"] = image_type
        else:
            image["type"] = "virtualmachine" if image_type == "zvol" else "smartmachine"
    if image_type == "zvol" and "image_size" in manifest:
        image["image_size"] = manifest["image_size"]

    description = manifest.get("description")
    if js_truthy(description):
        image["description"] = description

    files = manifest.get("files")
    if isinstance(files, list) and files:
        first = files[0] if isinstance(files[0], dict) else {}
        image["files"] = [{key: first[key] for key in ("compression", "sha1", "size") if key in first}]

    for key in ("tags", "homepage", "published_at"):
        if key in manifest:
            image[key] = manifest[key]

    if rendering is not Rendering.V7_0:
        for key in _GATED_FIELDS:
            if key in manifest:
                image[key] = manifest[key]
        if "error" in manifest:
            image["error"] = _error(manifest["error"])
    return image


def render(manifest: dict[str, Any], rendering: Rendering) -> bytes:
    """Return the compact UTF-8 JSON body CloudAPI sends for `manifest`."""
    return orjson.dumps(translate(manifest, rendering))
